"""The lazy checkpoint reader on real files: every supported container and every way a file breaks."""

import json

import pytest
import torch
from safetensors.torch import save_file

from liveavatar_core.errors import WeightsError
from liveavatar_core.weights.io import check_checkpoint, open_checkpoint


@pytest.fixture()
def tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16),
            "b.bias": torch.randn(5, generator=g)}


def test_safetensors_shapes_dtypes_and_values(tmp_path, tensors):
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    sd = open_checkpoint(path)
    assert sd.shapes() == {"a.weight": (4, 3), "b.bias": (5,)}
    assert sd.dtype("a.weight") == torch.bfloat16
    assert sd.metadata == {"format": "pt"}
    assert sd.dtype_summary() == "bf16"
    for k, v in tensors.items():
        assert torch.equal(sd[k], v)


def test_pth_is_loaded_weights_only(tmp_path, tensors):
    path = tmp_path / "m.pth"
    torch.save(tensors, path)
    sd = open_checkpoint(path)
    assert set(sd) == set(tensors)
    assert torch.equal(sd["b.bias"], tensors["b.bias"])


def test_pth_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"w": torch.zeros(2), "fn": print}, path)
    with pytest.raises(WeightsError, match="not a plain tensor checkpoint"):
        open_checkpoint(path, "vae")


def test_sharded_index(tmp_path, tensors):
    save_file({"a.weight": tensors["a.weight"]}, str(tmp_path / "s-1.safetensors"))
    save_file({"b.bias": tensors["b.bias"]}, str(tmp_path / "s-2.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "s-1.safetensors", "b.bias": "s-2.safetensors"}}))
    sd = open_checkpoint(index)
    assert torch.equal(sd["b.bias"], tensors["b.bias"])
    (tmp_path / "s-2.safetensors").unlink()
    with pytest.raises(WeightsError, match="s-2.safetensors"):
        open_checkpoint(index)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_missing_empty_and_truncated_files(tmp_path, tensors, suffix):
    path = tmp_path / f"m{suffix}"
    with pytest.raises(WeightsError, match="not found") as err:
        open_checkpoint(path, "dit")
    assert str(err.value).startswith("dit:")
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        open_checkpoint(path, "dit")
    if suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(WeightsError, match="truncated|corrupt") as err:
        open_checkpoint(path, "dit")
    assert "download" in str(err.value)


def test_garbage_and_unsupported_files(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        open_checkpoint(path)
    other = tmp_path / "m.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(WeightsError, match="unsupported file type"):
        open_checkpoint(other)
    with pytest.raises(WeightsError, match="folder"):
        open_checkpoint(tmp_path)


# --- crafted safetensors headers: every malformation is a WeightsError naming the file -------------

def _raw_safetensors(path, header, data: bytes):
    """A safetensors file written byte by byte, so the header can be anything."""
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


def test_hand_written_header_is_read_like_a_real_file(tmp_path):
    path = _raw_safetensors(tmp_path / "m.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I16", "shape": [1, 2], "data_offsets": [8, 12]}},
        torch.tensor([1.5, -2.0]).numpy().tobytes() + torch.tensor([[3, 4]], dtype=torch.int16).numpy().tobytes())
    sd = open_checkpoint(path)
    assert torch.equal(sd["a"], torch.tensor([1.5, -2.0])) and sd.shape("b") == (1, 2)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data_len, expect", [
    ([F32_2], 8, "a JSON list, not an object"),
    ({"a": "F32"}, 8, "tensor a is described by a JSON str"),
    ({"a": {"dtype": "F32", "shape": [2]}}, 8, "tensor a has no data_offsets"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, "tensor a has no dtype"),
    ({"a": {**F32_2, "dtype": "F7"}}, 8, "unsupported dtype 'F7'"),
    ({"a": {**F32_2, "dtype": 4}}, 8, "unsupported dtype 4"),
    ({"a": {**F32_2, "shape": "2"}}, 8, "shape '2', not a list of non-negative integers"),
    ({"a": {**F32_2, "shape": [-2]}}, 8, "not a list of non-negative integers"),
    ({"a": {**F32_2, "shape": [True, 2]}}, 8, "not a list of non-negative integers"),
    ({"a": {**F32_2, "shape": [2.0]}}, 8, "not a list of non-negative integers"),
    ({"a": {**F32_2, "data_offsets": [-8, 0]}}, 8, "data_offsets [-8, 0]"),
    ({"a": {**F32_2, "data_offsets": [8, 0]}}, 8, "0 <= begin <= end"),
    ({"a": {**F32_2, "data_offsets": [0]}}, 8, "data_offsets [0]"),
    ({"a": {**F32_2, "data_offsets": "0-8"}}, 8, "data_offsets '0-8'"),
    ({"a": {**F32_2, "shape": [3]}}, 8, "needs 12 bytes but its data_offsets span 8"),
    ({"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}, 12, "tensors a and b overlap"),
    ({"a": F32_2, "b": {**F32_2, "data_offsets": [12, 20]}}, 20, "no tensor covers bytes 8-12"),
    ({"a": F32_2}, 12, "4 bytes after the last tensor"),
    ({"a": {**F32_2, "data_offsets": [0, 8]}}, 4, "is truncated"),
    ({"a": F32_2, "__metadata__": ["format", "pt"]}, 8, "__metadata__ is not an object"),
])
def test_crafted_headers_are_refused_with_the_file_named(tmp_path, header, data_len, expect):
    path = _raw_safetensors(tmp_path / "crafted.safetensors", header, b"\0" * data_len)
    with pytest.raises(WeightsError) as err:
        open_checkpoint(path, "lora")
    assert expect in str(err.value) and str(path) in str(err.value)
    assert err.value.input_name == "lora" and err.value.fix


# --- torch zip files: directory, members and tensor extents checked before torch.load ------------

def _rewrite_member(path, member_suffix, transform):
    """Copy a torch zip file with one member's bytes transformed (stored, as torch writes them)."""
    import zipfile

    with zipfile.ZipFile(path) as src:
        items = [(info, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info, data in items:
            dst.writestr(info.filename, transform(data) if info.filename.endswith(member_suffix) else data)


def test_torch_zip_headers_give_every_tensor_without_loading(tmp_path):
    from liveavatar_core.weights.torch_zip import read_torch_zip

    path = tmp_path / "m.pth"
    torch.save({"w": torch.zeros(2, 3, dtype=torch.bfloat16), "f8": torch.zeros(4).to(torch.float8_e4m3fn),
                "view": torch.arange(10.0)[2:5]}, path)
    assert read_torch_zip(path) == {"w": ((2, 3), torch.bfloat16), "f8": ((4,), torch.float8_e4m3fn),
                                    "view": ((3,), torch.float32)}
    assert check_checkpoint(path).tensors == 3


def test_torch_zip_damage_is_named(tmp_path, tensors):
    path = tmp_path / "m.pth"
    torch.save(tensors, path)
    good = path.read_bytes()
    # A storage member shorter than the storage the pickle declares.
    _rewrite_member(path, "data/1", lambda data: data[:-4])
    with pytest.raises(WeightsError, match="storage 1 should hold 20 bytes but its zip member has 16"):
        open_checkpoint(path, "vae")
    # A tensor that starts past its storage's end (its storage offset patched in data.pkl).
    path.write_bytes(good)
    _rewrite_member(path, "data.pkl", lambda data: data.replace(b"QK\x00", b"QK\x03", 1))
    with pytest.raises(WeightsError, match="tensor a.weight needs bytes up to 30 of storage 0, which has 24"):
        check_checkpoint(path, "vae")
    # A storage the pickle names but the archive lacks.
    path.write_bytes(good)
    _rewrite_member(path, "data.pkl", lambda data: data.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x007", 1))
    with pytest.raises(WeightsError, match="lacks the data of storage 7"):
        check_checkpoint(path, "vae")
    # Neither zip nor pickle.
    path.write_bytes(b"GGUF" + good[4:])
    with pytest.raises(WeightsError, match="not a torch checkpoint"):
        check_checkpoint(path, "vae")
    # Truncated anywhere: the directory at the end is gone.
    for cut in (len(good) - 10, len(good) // 2, 100):
        path.write_bytes(good[:cut])
        with pytest.raises(WeightsError, match="is truncated: its zip directory") as err:
            check_checkpoint(path, "vae")
        assert str(path) in str(err.value)


def test_legacy_torch_files_are_passed_to_torch(tmp_path, tensors):
    path = tmp_path / "legacy.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    assert check_checkpoint(path).tensors == 0  # presence only: the format has no directory to read
    assert torch.equal(open_checkpoint(path)["b.bias"], tensors["b.bias"])
