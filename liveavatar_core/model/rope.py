"""3D rotary position embedding of the causal S2V DiT (spec/dit.md 3.4).

The official code looks rotations up in a 45,000-position float64 table and stores the per-token
values as complex-half, i.e. cos and sin rounded to fp16. Here the angles of exactly the positions a
call needs are computed on demand with the same float64 recipe (inverse frequency, product,
`torch.polar`) and the same rounding, so any position below 45,000 gives the table's bits and
positions beyond it simply keep working (no length limit).

A token group is a (time, height, width) grid of integer positions; a sequence is a list of groups
whose tokens are laid out group after group, each in (t, h, w) row-major order.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..ops.transfer import upload


@dataclass(frozen=True)
class TokenGrid:
    """Integer RoPE positions of one token group: tokens = every (t, h, w) combination."""

    t: tuple[int, ...]
    h: tuple[int, ...]
    w: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.t) * len(self.h) * len(self.w)

    def shifted(self, dt: int) -> "TokenGrid":
        return TokenGrid(tuple(p + dt for p in self.t), self.h, self.w)


def spread(n_out: int, n_in: int) -> tuple[int, ...]:
    """`n_out` integer indices spread over `0..n_in-1` (numpy linspace truncated toward zero).

    FramePack's 2x/4x tokens use these spatial positions on the 1x grid (spec/dit.md 3.4).
    """
    return tuple(int(v) for v in np.linspace(0, n_in - 1, n_out).astype(int))


class RopeFreqs:
    """fp16-rounded cos/sin for any integer positions, per head-dimension part (time, h, w).

    Tables are built on the host in float64 and cached: a block's table serves all its sampler
    steps, and the FramePack motion groups, whose positions never move, are built once per stream
    (the reference group moves with every call). Cached tensors are shared; nothing writes to them.
    """

    GRID_CACHE = 16  # token groups kept (a block group is 3168 tokens: 1.6 MB at 704*384)
    SEQUENCE_CACHE = 4  # device tables kept

    def __init__(self, head_dim: int, theta: float = 10000.0):
        pairs = head_dim // 2
        # Official split of the complex pairs: time gets the remainder, h and w a third each.
        self.part_pairs = (pairs - 2 * (pairs // 3), pairs // 3, pairs // 3)
        # Always on the CPU in float64, also when the model is built on the meta device.
        self._inv = [1.0 / torch.pow(theta, torch.arange(0, 2 * p, 2, device="cpu").to(torch.float64).div(2 * p))
                     for p in self.part_pairs]
        self._grids: OrderedDict[TokenGrid, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._sequences: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def part(self, axis: int, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[n, pairs_of_axis]` (fp32 holding fp16 values) for integer positions.

        Negative positions rotate by the negative angle: the official code conjugates the
        positive-position entry, so cos is even and sin odd bit for bit.
        """
        pos = torch.as_tensor(positions, dtype=torch.int64, device="cpu")
        angles = torch.outer(pos.abs().to(torch.float64), self._inv[axis])
        rot = torch.polar(torch.ones_like(angles), angles)
        # complex128 -> complex32 in the official code goes through complex64.
        cos = rot.real.float().half().float()
        sin = rot.imag.float().half().float() * torch.where(pos < 0, -1.0, 1.0)[:, None]
        return cos, sin

    def grid(self, g: TokenGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[g.num_tokens, head_dim/2]` for one token group, (t, h, w) row-major."""
        return _cached(self._grids, g, self.GRID_CACHE, lambda: self._build_grid(g))

    def _build_grid(self, g: TokenGrid) -> tuple[torch.Tensor, torch.Tensor]:
        nt, nh, nw = len(g.t), len(g.h), len(g.w)
        parts = [self.part(0, g.t), self.part(1, g.h), self.part(2, g.w)]
        shapes = [(nt, 1, 1, -1), (1, nh, 1, -1), (1, 1, nw, -1)]
        out = []
        for i in range(2):
            out.append(torch.cat([p[i].view(s).expand(nt, nh, nw, -1) for p, s in zip(parts, shapes)],
                                 dim=-1).reshape(nt * nh * nw, -1))
        return out[0], out[1]

    def sequence(self, grids: list[TokenGrid], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[sum tokens, head_dim/2]` for groups laid out one after the other (on `device`)."""
        device = torch.device(device) if device is not None else torch.device("cpu")

        def build():
            cs = [self.grid(g) for g in grids]
            cos, sin = torch.cat([c for c, _ in cs]), torch.cat([s for _, s in cs])
            return upload(cos, device), upload(sin, device)
        return _cached(self._sequences, (tuple(grids), device), self.SEQUENCE_CACHE, build)


def _cached(cache: OrderedDict, key, size: int, build):
    """`cache[key]`, built on a miss; least recently used entries beyond `size` are dropped."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = build()
    while len(cache) > size:
        cache.popitem(last=False)
    return value


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of `x [B, L, H, D]` by per-token `cos/sin [L, D/2]`.

    Official numerics: the rotation runs in float64 on the upcast input and is rounded to fp32, then
    to the input dtype. For half inputs the products with fp16 cos/sin are exact in fp32, so fp32
    arithmetic gives the same bits with less memory traffic.
    """
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else torch.float64
    pairs = x.to(work).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c = cos.to(device=x.device, dtype=work)[None, :, None, :]
    s = sin.to(device=x.device, dtype=work)[None, :, None, :]
    out = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    return out.to(torch.float32).to(x.dtype)
