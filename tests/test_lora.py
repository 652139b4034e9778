"""LoRA parsing (every PEFT spelling), strict validation against the model, and the merge numerics."""

import itertools
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from liveavatar_core.config import DiTConfig
from liveavatar_core.errors import WeightsError
from liveavatar_core.weights.dit import expected_dit_keys, load_dit_checkpoint
from liveavatar_core.weights.fp8_scaled import quantize_scaled_fp8
from liveavatar_core.weights.lora import (check_lora_shapes, load_lora, lora_targets, merge_lora,
                                          merged_weight, parse_lora_keys)

FACTOR_SPELLINGS = {"peft": ("lora_A", "lora_B"), "kohya": ("lora_down", "lora_up")}


@pytest.fixture(scope="module")
def model(ckpt_dir):
    return load_dit_checkpoint(ckpt_dir)


@pytest.fixture(scope="module")
def base(model):
    return {k: v.clone() for k, v in model.state_dict.items()}


@pytest.fixture(scope="module")
def lora_path(fixtures):
    return fixtures / "ckpt" / "LiveAvatar" / "liveavatar.safetensors"


@pytest.fixture(scope="module")
def factors(lora_path):
    """The fixture LoRA as {module: (A, B)}, independent of the loader under test."""
    raw = load_file(str(lora_path))
    modules = {k.split(".lora_")[0] for k in raw}
    return {m: (raw[f"{m}.lora_A.default.weight"], raw[f"{m}.lora_B.default.weight"]) for m in modules}


def _write(path, factors, prefix="", spelling="peft", adapter=".default", extra=None):
    down, up = FACTOR_SPELLINGS[spelling]
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{prefix}{module}.{down}{adapter}.weight"] = a
        tensors[f"{prefix}{module}.{up}{adapter}.weight"] = b
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("prefix, spelling, adapter", itertools.product(
    ["", "base_model.model.", "diffusion_model.", "model.diffusion_model.", "base_model.model.diffusion_model."],
    FACTOR_SPELLINGS, [".default", ""]))
def test_every_spelling_gives_the_same_pairs(tmp_path, model, factors, prefix, spelling, adapter):
    path = _write(tmp_path / "l.safetensors", factors, prefix, spelling, adapter)
    lora = load_lora(path, model.shapes())
    assert set(lora.pairs) == {m + ".weight" for m in factors}
    for module, (a, b) in factors.items():
        got_a, got_b = lora.pairs[module + ".weight"]
        assert torch.equal(got_a, a) and torch.equal(got_b, b)
    assert lora.rank == next(iter(factors.values()))[0].shape[0]


def test_alpha_tensors_are_ignored(tmp_path, model, factors):
    alphas = {f"{m}.alpha": torch.tensor(123.0) for m in factors}
    lora = load_lora(_write(tmp_path / "l.safetensors", factors, extra=alphas), model.shapes())
    assert len(lora.pairs) == len(factors)
    assert f"{len(factors)} alpha tensors ignored" in lora.description


def test_pair_matching_nothing_is_refused(tmp_path, model, factors):
    bad = dict(factors)
    bad["blocks.999.self_attn.q"] = bad.pop(next(iter(bad)))
    with pytest.raises(WeightsError, match=r"1 of \d+ LoRA pairs match no weight.*blocks\.999\.self_attn\.q\.weight"):
        load_lora(_write(tmp_path / "l.safetensors", bad), model.shapes())


def test_wrong_shape_is_refused(tmp_path, model, factors):
    bad = dict(factors)
    module = next(m for m in bad if m.endswith("ffn.0"))
    a, b = bad[module]
    bad[module] = (b.T.contiguous(), a.T.contiguous())
    with pytest.raises(WeightsError, match=rf"1 LoRA pairs do not fit.*{module}\.weight"):
        load_lora(_write(tmp_path / "l.safetensors", bad), model.shapes())


def test_file_without_pairs_is_refused(tmp_path, model, factors):
    only_alpha = {f"{m}.alpha": torch.tensor(4.0) for m in factors}
    path = tmp_path / "alpha.safetensors"
    save_file(only_alpha, str(path))
    with pytest.raises(WeightsError, match="no LoRA A/B pairs"):
        load_lora(path, model.shapes())


def test_full_weights_are_refused(tmp_path, model, base, factors):
    extra = {"blocks.0.norm3.weight": base["blocks.0.norm3.weight"]}
    with pytest.raises(WeightsError, match="1 tensors are not LoRA factors.*blocks.0.norm3.weight"):
        load_lora(_write(tmp_path / "l.safetensors", factors, extra=extra), model.shapes())


@pytest.mark.parametrize("relative, what", [
    ("diffusion_pytorch_model.safetensors.index.json", "Wan2.2-S2V DiT"),
    ("Wan2.1_VAE.pth", "a Wan video VAE"),
])
def test_model_checkpoint_as_lora_is_refused(model, ckpt_dir, relative, what):
    with pytest.raises(WeightsError, match=f"is {what}.*not a LoRA file"):
        load_lora(ckpt_dir / relative, model.shapes())


def test_unpaired_factor_is_refused(tmp_path, model, factors):
    module = next(iter(factors))
    path = _write(tmp_path / "l.safetensors", {m: f for m, f in factors.items() if m != module},
                  extra={f"{module}.lora_A.default.weight": factors[module][0]})
    with pytest.raises(WeightsError, match=rf"1 LoRA factors have no partner: {module} \(only A\)"):
        load_lora(path, model.shapes())


def test_incomplete_lora_is_refused_unless_allowed(tmp_path, model, factors):
    module = sorted(factors)[-1]
    path = _write(tmp_path / "l.safetensors", {m: f for m, f in factors.items() if m != module})
    with pytest.raises(WeightsError, match=rf"covers {len(factors) - 1} of the {len(factors)} layers.*{module}"):
        load_lora(path, model.shapes())
    assert len(load_lora(path, model.shapes(), require_all_targets=False).pairs) == len(factors) - 1


# --- merge ----------------------------------------------------------------------------------------

def test_merge_rounds_once_to_the_weight_dtype(model, base, lora_path):
    lora = load_lora(lora_path, model.shapes())
    weights = {k: v.clone() for k, v in base.items()}
    assert merge_lora(weights, lora, scale=0.5) == len(lora.pairs)
    once_differs_from_twice = False
    for name, (a, b) in lora.pairs.items():
        w = base[name]
        delta = 0.5 * (b.float() @ a.float())
        assert weights[name].dtype == w.dtype
        assert torch.equal(weights[name], (w.float() + delta).to(w.dtype))
        twice = (w.float() + delta.to(w.dtype).float()).to(w.dtype)
        once_differs_from_twice |= not torch.equal(weights[name], twice)
    assert once_differs_from_twice, "the fixture cannot tell single from double rounding"
    for name in set(weights) - set(lora.pairs):
        assert torch.equal(weights[name], base[name])


def test_merge_into_module_equals_merge_into_dict(model, base, lora_path):
    lora = load_lora(lora_path, model.shapes())
    module = torch.nn.Module()
    for name, tensor in base.items():
        owner = module
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
    weights = {k: v.clone() for k, v in base.items()}
    assert merge_lora(module, lora) == merge_lora(weights, lora) == len(lora.pairs)
    for name, param in module.named_parameters():
        assert torch.equal(param, weights[name])


def test_merge_into_scaled_fp8_dequantises_to_bf16(model, base, lora_path):
    lora = load_lora(lora_path, model.shapes())
    targets = list(lora.pairs)
    stored = quantize_scaled_fp8(base, targets)
    merge_lora(stored, lora)
    for name in targets:
        module = name.removesuffix(".weight")
        assert module + ".scale_weight" not in stored
        assert stored[name].dtype == torch.bfloat16
    name = targets[0]
    quant = quantize_scaled_fp8({name: base[name]}, [name])
    a, b = lora.pairs[name]
    scale = quant[name.removesuffix(".weight") + ".scale_weight"]
    expected = (quant[name].float() * scale + 0.5 * (b.float() @ a.float())).to(torch.bfloat16)
    assert torch.equal(stored[name], expected)
    assert torch.equal(merged_weight(quant[name], a, b, 0.5, scale), expected)


def test_merge_refuses_a_model_without_the_target_weights(model, lora_path):
    lora = load_lora(lora_path, model.shapes())
    with pytest.raises(WeightsError, match="target weights this model does not have"):
        merge_lora({"unrelated.weight": torch.zeros(1)}, lora)


# --- full-size contract (shapes only, nothing of 14B size is allocated) ---------------------------

def test_release_lora_layout_fits_the_14b_table():
    table = expected_dit_keys(DiTConfig.wan_s2v_14b())
    targets = lora_targets(table)
    assert len(targets) == 448
    rank = 128
    lora_shapes = {}
    for weight in targets:
        module = weight.removesuffix(".weight")
        out_features, in_features = table[weight]
        lora_shapes[f"{module}.lora_A.default.weight"] = (rank, in_features)
        lora_shapes[f"{module}.lora_B.default.weight"] = (out_features, rank)
    assert len(lora_shapes) == 896
    assert sum(math.prod(s) for s in lora_shapes.values()) == 676_331_520
    plan = parse_lora_keys(lora_shapes)
    assert check_lora_shapes(plan, lora_shapes, table) == rank
    assert len(plan.pairs) == 448
    kinds = {w.split(".")[2] if w.startswith("blocks.") else "injector" for w in plan.pairs}
    assert kinds == {"self_attn", "cross_attn", "ffn", "injector"}
    assert not any("norm_" in w or "adain" in w or "embedding" in w for w in plan.pairs)
