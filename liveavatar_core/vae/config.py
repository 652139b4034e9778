"""Configuration of the Wan 2.1 VAE."""

from __future__ import annotations

from dataclasses import dataclass

from ..weights.vae import DIM_MULT, NUM_RES_BLOCKS, TEMPORAL_DOWNSAMPLE

# Per-channel latent statistics hard-coded in the official wrapper (spec/pipeline.md 4.2).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the Wan 2.1 VAE. Defaults are the released model (127 M parameters).

    `base_dim` is the only width that varies between checkpoints (96 released, 8 in the tiny
    fixture); the layout (`dim_mult`, `num_res_blocks`, `temporal_downsample`) is fixed by the key
    table in `weights/vae.py`.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = DIM_MULT
    num_res_blocks: int = NUM_RES_BLOCKS
    temporal_downsample: tuple[bool, ...] = TEMPORAL_DOWNSAMPLE
    latent_mean: tuple[float, ...] = LATENT_MEAN
    latent_std: tuple[float, ...] = LATENT_STD
