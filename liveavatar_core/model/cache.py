"""Per-stream state of the DiT: step KV caches, the condition ("sink") cache and the text cache.

* `KVCache`: one per denoising step. A ring of `cache_frames * fs` token rows per layer holding the
  already-rotated keys and the values of past blocks computed at that step's noise level
  (spec/pipeline.md 3.4, 3.6-3.8). Rows are never moved; keys carry absolute positions.
* `CondCache`: un-rotated keys and values of the reference + FramePack tokens, sized by their actual
  count (2.5 * fs), plus the RoPE layout needed to re-rotate the keys at each call. All step caches
  of a stream may share one (the single-GPU official behaviour: the four sink passes are identical).
* `TextCache`: per-layer text cross-attention keys/values; they depend only on the prompt, so they
  are computed once per stream instead of on every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DiTConfig
from ..errors import InputError
from .rope import RopeFreqs, TokenGrid


@dataclass
class CondCache:
    """Condition tokens of every layer: k, v `[B, Lc, H, HD]`, keys not rotated."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    ref: TokenGrid  # reference group at its sink position; its time index moves per call
    motion: list[TokenGrid]  # FramePack groups; their positions never move

    @property
    def num_tokens(self) -> int:
        return self.k[0].shape[1]

    @property
    def patch_grid(self) -> tuple[int, int]:
        return len(self.ref.h), len(self.ref.w)

    def rope(self, freqs: RopeFreqs, ref_time: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of all condition keys with the reference group at time index `ref_time`."""
        ref = self.ref.shifted(ref_time - self.ref.t[0])
        return freqs.sequence([ref, *self.motion], device=device)


@dataclass
class TextCache:
    """Embedded text `[B, text_len, D]` and each layer's cross-attention (k, v) heads."""

    embedded: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class KVCache:
    """Ring buffer of rotated self-attention keys/values for one denoising step, all layers."""

    def __init__(self, num_layers: int, batch: int, length: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None, cond: CondCache | None = None):
        shape = (num_layers, batch, length, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cond = cond

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def window(self, current_start: int, num_tokens: int) -> tuple[int, int]:
        """(write row, rows to attend) for a block of `num_tokens` starting at `current_start`.

        Before the ring is full the block attends to rows [0, start + n); afterwards the whole ring
        (spec/dit.md 3.9 step 3). Writes never wrap because the length is a multiple of the block.
        """
        if current_start < 0:
            raise InputError("current_start", f"must be >= 0, got {current_start}.",
                             "pass the block's token offset since the stream start.")
        if self.length % num_tokens:
            raise InputError("kv_cache", f"cache length {self.length} is not a multiple of the block "
                             f"length {num_tokens} tokens.",
                             "allocate cache_frames as a multiple of the frames per block.")
        if current_start >= self.length:
            return current_start % self.length, self.length
        return current_start, current_start + num_tokens

    def update(self, layer: int, current_start: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the block's rotated k and v, return the keys/values history it attends to."""
        row, visible = self.window(current_start, k.shape[1])
        self.k[layer, :, row:row + k.shape[1]] = k
        self.v[layer, :, row:row + v.shape[1]] = v
        return self.k[layer, :, :visible], self.v[layer, :, :visible]


def tokens_per_frame(cfg: DiTConfig, lat_h: int, lat_w: int) -> int:
    """Patch tokens of one latent frame: (H_l / 2) * (W_l / 2)."""
    _, ph, pw = cfg.patch_size
    return (lat_h // ph) * (lat_w // pw)


def make_step_caches(cfg: DiTConfig, lat_h: int, lat_w: int, *, num_steps: int, cache_frames: int,
                     batch: int = 1, dtype: torch.dtype = torch.bfloat16, device=None) -> list[KVCache]:
    """One `KVCache` per denoising step, `cache_frames` latent frames long (12 for 48-frame clips).

    The condition cache is attached by `LiveAvatarDiT.sink`, shared by all of them.
    """
    if cache_frames <= 0 or cache_frames % cfg.num_frames_per_block:
        raise InputError("cache_frames", f"{cache_frames} latent frames is not a positive multiple of "
                         f"the {cfg.num_frames_per_block} frames denoised per block.",
                         "use latent frames per clip = a multiple of the block size (12 for 48-frame clips).")
    length = cache_frames * tokens_per_frame(cfg, lat_h, lat_w)
    return [KVCache(cfg.num_layers, batch, length, cfg.num_heads, cfg.head_dim, dtype, device)
            for _ in range(num_steps)]
