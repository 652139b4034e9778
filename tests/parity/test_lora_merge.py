"""The LiveAvatar LoRA merged into the base DiT equals the official PEFT merge (golden/05)."""

import torch
from safetensors.torch import load_file

from liveavatar_core.weights.dit import load_dit_checkpoint
from liveavatar_core.weights.lora import load_lora, merge_lora
from tests.parity.tolerance import LORA_MERGE, assert_parity

MERGED_SUFFIX = ".merged"


def test_merged_weights_match_official(fixtures, ckpt_dir, manifest):
    golden = load_file(str(fixtures / "golden" / "05_lora_merge.safetensors"))
    lora_cfg = manifest["tiny_config"]["lora"]
    # The reference ran the whole model in this dtype (README section 5: fp32 merge of bf16 files).
    param_dtype = getattr(torch, manifest["settings"]["param_dtype"])

    ckpt = load_dit_checkpoint(ckpt_dir)
    lora = load_lora(fixtures / "ckpt" / "LiveAvatar" / "liveavatar.safetensors", ckpt.shapes())
    assert lora.rank == lora_cfg["rank"]
    assert len(lora.pairs) == lora_cfg["num_lora_modules"]

    weights = {k: v.to(param_dtype) for k, v in ckpt.state_dict.items()}
    base = {k: v.clone() for k, v in weights.items()}
    merged = merge_lora(weights, lora, scale=lora_cfg["alpha"] / lora_cfg["rank"])

    assert merged == manifest["params_total"] - manifest["params_unchanged_by_lora"]
    assert all(torch.equal(weights[k], base[k]) for k in weights if k not in lora.pairs)
    assert golden, "golden/05 holds no tensors"
    for key, expected in golden.items():
        name = key.removesuffix(MERGED_SUFFIX)
        assert weights[name].dtype == expected.dtype
        # The official merge was exact (manifest: max error 0 across thread counts).
        assert_parity(weights[name], expected, LORA_MERGE, name)
        assert not torch.equal(weights[name], base[name]), f"{name} was not changed by the merge"
