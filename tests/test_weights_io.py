"""The lazy checkpoint reader on real files: every supported container and every way a file breaks."""

import json

import pytest
import torch
from safetensors.torch import save_file

from liveavatar_core.errors import WeightsError
from liveavatar_core.weights.io import open_checkpoint


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
