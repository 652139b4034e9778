"""Loading a Wan 2.1 VAE file into `WanVAE`."""

from __future__ import annotations

import os

import torch

from ..weights.io import open_checkpoint
from ..weights.vae import inspect_vae, vae_state_dict
from .config import VAEConfig
from .model import WanVAE


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             latent_dtype: torch.dtype | None = None, input_name: str = "vae") -> WanVAE:
    """Load `Wan2.1_VAE.pth` or ComfyUI's `wan_2.1_vae.safetensors` (any key prefix) for inference.

    `dtype` is the weights' and compute dtype (float32 for parity, bfloat16 on GPU).
    `latent_dtype` overrides the dtype of the latent normalisation constants (default: `dtype`,
    as upstream). Raises `WeightsError` naming the file's model when it is not a Wan 2.1 VAE.
    """
    lazy = open_checkpoint(path, input_name)
    info = inspect_vae(lazy.shapes(), input_name, lazy.dtype_summary())
    with torch.device("meta"):
        vae = WanVAE(VAEConfig(base_dim=info.base_dim, z_dim=info.z_dim), latent_dtype=latent_dtype)
    state = {k: v.to(device) for k, v in vae_state_dict(lazy, info, dtype).items()}
    vae.load_state_dict(state, strict=True, assign=True)
    vae.description = info.describe()
    return vae.eval().requires_grad_(False)
