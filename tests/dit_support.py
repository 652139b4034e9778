"""The DiT for tests, built as the product builds it (`loading.load_generator`): on the meta device in
the run's dtype, then filled by `weights.dit.load_into_module` one tensor at a time."""

from __future__ import annotations

import torch

from liveavatar_core.model.dit import LiveAvatarDiT
from liveavatar_core.weights.dit import DiTCheckpoint, load_into_module


def build_dit(ckpt: DiTCheckpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              **model_options) -> LiveAvatarDiT:
    """`ckpt`'s weights in a LiveAvatarDiT of `dtype` on `device` (options: e.g. `attention`)."""
    with torch.device("meta"):
        model = LiveAvatarDiT(ckpt.config, **model_options).to(dtype)
    load_into_module(model, ckpt.state_dict, device=device)
    return model
