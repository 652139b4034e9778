"""DiT checkpoint formats, key maps and detection on real files written from the fixture checkpoint."""

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from liveavatar_core.config import DiTConfig
from liveavatar_core.errors import WeightsError
from liveavatar_core.weights.dit import (FORMAT_PREFIX, describe_dit, expected_dit_keys,
                                         from_canonical, infer_dit_config, load_dit_checkpoint, load_into_module,
                                         to_canonical)
from liveavatar_core.weights.fp8_scaled import quantize_scaled_fp8
from liveavatar_core.weights.io import open_checkpoint
from liveavatar_core.weights.layout import DIT_INDEX as OFFICIAL_INDEX

AUDIO_PREFIXES = ("casual_audio_encoder.", "audio_injector.", "frame_packer.", "cond_encoder.",
                  "trainable_cond_mask.")


@pytest.fixture(scope="module")
def official(ckpt_dir):
    return load_dit_checkpoint(ckpt_dir)


@pytest.fixture(scope="module")
def base_tensors(official):
    return {k: v.clone() for k, v in official.state_dict.items()}


def _write_single(tmp_path, tensors, ckpt_dir, prefix="", name="s2v.safetensors", with_config=True):
    path = tmp_path / name
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path))
    if with_config:
        shutil.copy(ckpt_dir / "config.json", path.with_suffix(".json"))
    return path


def _header_only_file(path, shapes, dtype_names):
    """A valid safetensors file whose data region is sparse (no allocation of real-size tensors)."""
    sizes = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * sizes[dtype_names[key]]
        header[key] = {"dtype": dtype_names[key], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return path


# --- the key/shape contract -----------------------------------------------------------------------

def test_table_matches_fixture_checkpoint(ckpt_dir):
    cfg = DiTConfig.from_json(ckpt_dir / "config.json")
    on_disk = open_checkpoint(ckpt_dir / OFFICIAL_INDEX).shapes()
    assert expected_dit_keys(cfg) == on_disk


def test_14b_table_matches_spec():
    table = expected_dit_keys(DiTConfig.wan_s2v_14b())
    assert len(table) == 1260
    assert sum(math.prod(s) for s in table.values()) == 16_295_755_609
    assert len([k for k in table if k.startswith("blocks.")]) == 40 * 27
    assert len([k for k in table if k.startswith("audio_injector.")]) == 12 * 12
    spec_rows = {
        "patch_embedding.weight": (5120, 16, 1, 2, 2),
        "trainable_cond_mask.weight": (3, 5120),
        "text_embedding.0.weight": (5120, 4096),
        "time_embedding.0.weight": (5120, 256),
        "time_projection.1.weight": (30720, 5120),
        "head.modulation": (1, 2, 5120),
        "head.head.weight": (64, 5120),
        "frame_packer.proj_4x.weight": (5120, 16, 4, 8, 8),
        "casual_audio_encoder.weights": (1, 25, 1, 1),
        "casual_audio_encoder.encoder.conv1_local.conv.weight": (5120, 1024, 3),
        "casual_audio_encoder.encoder.conv1_global.conv.weight": (1280, 1024, 3),
        "casual_audio_encoder.encoder.conv2.conv.weight": (2560, 1280, 3),
        "casual_audio_encoder.encoder.padding_tokens": (1, 1, 1, 5120),
        "blocks.39.modulation": (1, 6, 5120),
        "blocks.0.self_attn.norm_q.weight": (5120,),
        "blocks.17.ffn.0.weight": (13824, 5120),
        "blocks.17.ffn.2.weight": (5120, 13824),
        "audio_injector.injector.11.o.weight": (5120, 5120),
        "audio_injector.injector_adain_layers.11.linear.weight": (10240, 5120),
    }
    for key, shape in spec_rows.items():
        assert table[key] == shape, key
    for absent in ("blocks.0.norm1.weight", "head.norm.weight", "motioner.patch_embedding.weight"):
        assert absent not in table


def test_key_map_round_trip():
    table = expected_dit_keys(DiTConfig.wan_s2v_14b())
    for fmt, prefix in FORMAT_PREFIX.items():
        for key in table:
            stored = from_canonical(key, fmt)
            assert stored.startswith(prefix)
            assert to_canonical(stored) == key


# --- every format loads to the same canonical tensors ---------------------------------------------

def test_official_folder_and_index(ckpt_dir, official, base_tensors):
    assert official.format == "official"
    assert official.source_dtype == torch.bfloat16
    assert official.config == DiTConfig.from_json(ckpt_dir / "config.json")
    assert official.description.startswith("Wan2.2-S2V DiT")
    assert f"{len(base_tensors)} tensors" in official.description
    from_index = load_dit_checkpoint(ckpt_dir / OFFICIAL_INDEX)
    assert list(from_index.state_dict) == list(official.state_dict)
    for k in base_tensors:
        assert torch.equal(from_index.state_dict[k], base_tensors[k])


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_single_bf16_file(tmp_path, ckpt_dir, official, base_tensors, prefix):
    path = _write_single(tmp_path, base_tensors, ckpt_dir, prefix)
    single = load_dit_checkpoint(path)
    assert single.format == "comfyui"
    assert single.config == official.config
    assert set(single.state_dict) == set(base_tensors)
    for k, v in base_tensors.items():
        assert torch.equal(single.state_dict[k], v)


def test_fp8_scaled_file_dequantises_lazily(tmp_path, ckpt_dir, official, base_tensors):
    linears = [k for k, v in base_tensors.items() if k.startswith("blocks.") and v.ndim == 2]
    stored = quantize_scaled_fp8({"model.diffusion_model." + k: v for k, v in base_tensors.items()},
                                 ["model.diffusion_model." + k for k in linears])
    path = tmp_path / "s2v_fp8_scaled.safetensors"
    save_file(stored, str(path))
    shutil.copy(ckpt_dir / "config.json", path.with_suffix(".json"))
    fp8 = load_dit_checkpoint(path)
    assert fp8.format == "comfyui_fp8_scaled"
    assert "scaled" in fp8.description
    assert set(fp8.state_dict) == set(base_tensors)
    for k, v in base_tensors.items():
        got = fp8.state_dict[k]
        if k in linears:
            raw = stored["model.diffusion_model." + k]
            scale = stored["model.diffusion_model." + k.removesuffix(".weight") + ".scale_weight"]
            assert raw.dtype == torch.float8_e4m3fn
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, (raw.float() * scale).to(torch.bfloat16))
            torch.testing.assert_close(got.float(), v.float(), rtol=0.07, atol=1e-3)
        else:
            assert torch.equal(got, v)


@pytest.mark.parametrize("scaled", [False, True])
def test_release_width_single_file_needs_no_config(tmp_path, scaled):
    table = expected_dit_keys(DiTConfig.wan_s2v_14b())
    prefix = "model.diffusion_model."
    shapes, dtypes = {}, {}
    if scaled:
        shapes["scaled_fp8"], dtypes["scaled_fp8"] = (0,), "F8_E4M3"
    for key, shape in table.items():
        quantised = scaled and key.startswith("blocks.") and len(shape) == 2
        shapes[prefix + key], dtypes[prefix + key] = shape, "F8_E4M3" if quantised else "BF16"
        if quantised:
            scale_key = prefix + key.removesuffix(".weight") + ".scale_weight"
            shapes[scale_key], dtypes[scale_key] = (1,), "F32"
    name = "wan2.2_s2v_14B_fp8_scaled.safetensors" if scaled else "wan2.2_s2v_14B_bf16.safetensors"
    ckpt = load_dit_checkpoint(_header_only_file(tmp_path / name, shapes, dtypes))
    assert ckpt.config == DiTConfig.wan_s2v_14b()
    word = "fp8_e4m3fn scaled" if scaled else "bf16"
    assert ckpt.description == f"Wan2.2-S2V DiT (14B), {word}, 1260 tensors"
    assert ckpt.format == ("comfyui_fp8_scaled" if scaled else "comfyui")
    assert ckpt.source_dtype == (torch.float8_e4m3fn if scaled else torch.bfloat16)
    assert ckpt.shapes() == table


def test_describe_lazy_checkpoint(ckpt_dir, base_tensors):
    lazy = open_checkpoint(ckpt_dir / OFFICIAL_INDEX)
    assert describe_dit(lazy) == describe_dit(lazy.shapes(), "bf16")
    assert describe_dit(lazy).endswith(f", bf16, {len(base_tensors)} tensors")


def test_release_width_shapes_give_release_config():
    table = expected_dit_keys(DiTConfig.wan_s2v_14b())
    assert infer_dit_config(table) == DiTConfig.wan_s2v_14b()
    assert describe_dit(table, "bf16") == "Wan2.2-S2V DiT (14B), bf16, 1260 tensors"


def _module_from_table(table, device, dtype):
    """An nn.Module whose parameter names and shapes are exactly `table` (stands in for the DiT)."""
    root = torch.nn.Module()
    for name, shape in table.items():
        owner = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
    return root


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_load_into_module_streams_and_casts(official, base_tensors, device):
    module = _module_from_table(expected_dit_keys(official.config), device, torch.float32)
    load_into_module(module, official.state_dict)
    params = dict(module.named_parameters())
    assert set(params) == set(base_tensors)
    for name, param in params.items():
        assert param.device.type == "cpu" and param.dtype == torch.float32
        assert torch.equal(param, base_tensors[name].float())


def test_load_into_module_refuses_other_architectures(official):
    table = expected_dit_keys(replace(official.config, num_layers=official.config.num_layers + 1))
    extra = len(table) - len(official.state_dict)
    with pytest.raises(WeightsError, match=rf"{extra} of {len(table)} expected tensors missing"):
        load_into_module(_module_from_table(table, "meta", torch.float32), official.state_dict)


# --- refusals -------------------------------------------------------------------------------------

def test_small_single_file_without_config_is_refused(tmp_path, ckpt_dir, base_tensors):
    path = _write_single(tmp_path, base_tensors, ckpt_dir, with_config=False)
    with pytest.raises(WeightsError, match="config.json"):
        load_dit_checkpoint(path)


def test_incomplete_file_lists_what_is_missing(tmp_path, ckpt_dir, base_tensors):
    dropped = [k for k in base_tensors if k.startswith("blocks.1.")]
    kept = {k: v for k, v in base_tensors.items() if k not in dropped}
    path = _write_single(tmp_path, kept, ckpt_dir)
    with pytest.raises(WeightsError) as err:
        load_dit_checkpoint(path)
    message = str(err.value)
    assert f"{len(dropped)} of {len(base_tensors)} expected tensors missing" in message
    assert sum(k in message for k in dropped) == 5  # the first examples, then a count
    assert f"({len(dropped) - 5} more)" in message


def test_config_that_does_not_fit_the_weights_is_refused(tmp_path, ckpt_dir, base_tensors):
    path = _write_single(tmp_path, base_tensors, ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    config["ffn_dim"] *= 2
    path.with_suffix(".json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="wrong shape.*ffn.0.weight"):
        load_dit_checkpoint(path)


def _wan_t2v_like(base_tensors, in_dim):
    """A Wan T2V/I2V-shaped DiT: the S2V trunk without audio/FramePack modules, given in_dim."""
    out = {k: v for k, v in base_tensors.items() if not k.startswith(AUDIO_PREFIXES)}
    w = out["patch_embedding.weight"]
    out["patch_embedding.weight"] = torch.zeros(w.shape[0], in_dim, *w.shape[2:], dtype=w.dtype)
    return out


@pytest.mark.parametrize("in_dim, name", [(16, "T2V DiT"), (36, "I2V DiT"), (48, "TI2V-5B DiT")])
def test_other_wan_dits_are_named(tmp_path, ckpt_dir, base_tensors, in_dim, name):
    path = _write_single(tmp_path, _wan_t2v_like(base_tensors, in_dim), ckpt_dir, "model.diffusion_model.")
    with pytest.raises(WeightsError, match=f"is Wan.*{name}.*not the Wan2.2-S2V-14B DiT"):
        load_dit_checkpoint(path)


@pytest.mark.parametrize("relative, what", [
    ("Wan2.2-S2V-14B/Wan2.1_VAE.pth", "a Wan video VAE"),
    ("Wan2.2-S2V-14B/models_t5_umt5-xxl-enc-bf16.pth", "a umT5 text encoder"),
    ("Wan2.2-S2V-14B/wav2vec2-large-xlsr-53-english/model.safetensors", "a wav2vec2 audio encoder"),
    ("LiveAvatar/liveavatar.safetensors", "a LoRA file"),
])
def test_other_components_are_named(fixtures, relative, what):
    with pytest.raises(WeightsError, match=f"is {what}.*not the Wan2.2-S2V-14B DiT"):
        load_dit_checkpoint(fixtures / "ckpt" / relative)


def test_missing_shard(tmp_path, ckpt_dir):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in ckpt_dir.glob("diffusion_pytorch_model*"):
        shutil.copy(f, folder / f.name)
    shutil.copy(ckpt_dir / "config.json", folder / "config.json")
    shard = sorted(folder.glob("*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"missing: {shard.name}"):
        load_dit_checkpoint(folder)


def test_truncated_shard(tmp_path, ckpt_dir):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in ckpt_dir.glob("diffusion_pytorch_model*"):
        shutil.copy(f, folder / f.name)
    shutil.copy(ckpt_dir / "config.json", folder / "config.json")
    shard = sorted(folder.glob("*-of-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(WeightsError, match="truncated"):
        load_dit_checkpoint(folder)


def test_folder_without_weights(tmp_path):
    with pytest.raises(WeightsError, match="holds neither"):
        load_dit_checkpoint(tmp_path)
