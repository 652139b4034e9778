"""FramePack motion tokens for the sink call (spec/dit.md 3.7, positions 3.4)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..config import DiTConfig
from .rope import TokenGrid, spread


class FramePacker(nn.Module):
    """Compresses the last motion latents into 1x, 2x and 4x patch tokens, newest first."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        c, d = cfg.in_dim, cfg.dim
        self.buckets = tuple(cfg.zip_frame_buckets)  # newest -> oldest: (1, 2, 16)
        self.proj = nn.Conv3d(c, d, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(c, d, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(c, d, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def grids(self, lat_h: int, lat_w: int) -> list[TokenGrid]:
        """RoPE grids of the post / 2x / 4x groups for a `lat_h x lat_w` latent (`motion_grids`)."""
        return motion_grids(self.buckets, lat_h, lat_w)

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """motion `[B, 16, T_m, H_l, W_l]` -> tokens `[B, N, D]` ordered post, 2x, 4x.

        Only the last sum(buckets) frames are used; fewer frames are zero-padded in front.
        """
        b, c, t_m, h, w = motion.shape
        total = sum(self.buckets)
        buf = motion.new_zeros(b, c, total, h, w)
        keep = min(total, t_m)
        if keep > 0:
            buf[:, :, total - keep:] = motion[:, :, t_m - keep:]
        n1, n2, n4 = self.buckets
        old4, mid2, new1 = buf.split([n4, n2, n1], dim=2)
        out = []
        for conv, part in ((self.proj, new1), (self.proj_2x, mid2), (self.proj_4x, old4)):
            out.append(conv(part.to(conv.weight.dtype)).flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)


def motion_grids(buckets: tuple[int, int, int], lat_h: int, lat_w: int) -> list[TokenGrid]:
    """RoPE grids of the FramePack post / 2x / 4x groups (`buckets` frames, newest first) for a
    `lat_h x lat_w` latent.

    Time positions count backwards from the block: the newest frame at -1, the 2x group at
    -(1+2), the 4x group at -(1+2+16) ... one position per 4x output frame, spaced like the
    official `linspace` over the group's frame range.
    """
    hp, wp = lat_h // 2, lat_w // 2
    n1, n2, n4 = buckets
    post = TokenGrid(tuple(-v for v in _linspace_int(n1, 1, n1)), tuple(range(hp)), tuple(range(wp)))
    start2 = n1 + n2
    g2 = TokenGrid(tuple(-v for v in _linspace_int(start2, start2 - n2 + 1, n2 // 2)),
                   spread(lat_h // 4, hp), spread(lat_w // 4, wp))
    start4 = n1 + n2 + n4
    g4 = TokenGrid(tuple(-v for v in _linspace_int(start4, start4 - n4 + 1, n4 // 4)),
                   spread(lat_h // 8, hp), spread(lat_w // 8, wp))
    return [post, g2, g4]


def condition_tokens(cfg: DiTConfig, lat_h: int, lat_w: int) -> int:
    """Condition tokens of a stream: the reference frame's patches and the FramePack groups."""
    grids = motion_grids(tuple(cfg.zip_frame_buckets), lat_h, lat_w)
    return (lat_h // 2) * (lat_w // 2) + sum(len(g.t) * len(g.h) * len(g.w) for g in grids)


def _linspace_int(start: int, stop: int, n: int) -> tuple[int, ...]:
    """numpy-style linspace truncated to int (the official position builder)."""
    return tuple(int(v) for v in np.linspace(start, stop, n).astype(int))
