"""Shared parity fixtures: the fixture DiT built as the official run used it, and golden loading."""

import pytest
import torch
from safetensors.torch import load_file

from liveavatar_core.weights.dit import load_dit_checkpoint
from liveavatar_core.weights.lora import load_lora, merge_lora
from tests.dit_support import build_dit


@pytest.fixture(scope="session")
def golden(fixtures):
    """`golden("08_rollout_offline")` -> dict of the golden tensors of that file (cached)."""
    cache = {}

    def load(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            cache[name] = load_file(str(fixtures / "golden" / f"{name}.safetensors"))
        return cache[name]
    return load


@pytest.fixture(scope="session")
def tiny_dit(fixtures, ckpt_dir, manifest):
    """The fixture DiT with the LoRA merged, in the run's parameter dtype, "math" attention, loaded
    and merged in the product's order (`loading.load_generator`: streamed load, then the merge).

    The golden runs computed attention as plain fp32 softmax (fixtures README 5), which "math" spells out.
    """
    ckpt = load_dit_checkpoint(ckpt_dir)
    lora_cfg = manifest["tiny_config"]["lora"]
    lora = load_lora(fixtures / "ckpt" / "LiveAvatar" / "liveavatar.safetensors", ckpt.shapes())
    model = build_dit(ckpt, getattr(torch, manifest["settings"]["param_dtype"]), attention="math")
    merge_lora(model, lora, scale=lora_cfg["alpha"] / lora_cfg["rank"])
    return model
