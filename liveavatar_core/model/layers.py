"""Small building blocks with the official dtype behaviour made explicit (spec/dit.md 3.1, 7).

The official model runs under bf16 autocast; here the casts autocast would insert are written out,
so the same code runs in fp32 (parity) and bf16 (real use) with the parameters' dtype deciding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import AttentionFn, Segment, attend, merge_attention


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 `x` rounded to the nearest bf16 value (ties to even), still in fp32, as `x.to(bf16).float()`.

    Written as integer arithmetic on the bits because compilers may drop a cast round trip inside a
    fused kernel (inductor does, in different ways across torch versions, with or without its
    `emulate_precision_casts`); bit arithmetic they keep. NaNs pass through unchanged.
    """
    bits = x.view(torch.int32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) & -0x10000).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded)


class Linear(nn.Linear):
    """Linear that runs in its weight dtype, casting the input like bf16 autocast does.

    FP8 conversion (ops/fp8.py) replaces these modules; the ones that must stay in high precision
    are `Fp32Linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Fp32Linear(nn.Linear):
    """Linear computed in fp32 whatever the stored dtype (time MLPs, head, audio final_linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class RMSNorm(nn.Module):
    """RMSNorm over the full width: normalise in fp32, cast back to the input dtype, times gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        n = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return n.to(x.dtype) * self.weight


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm over the last dim computed in fp32; the caller decides the output dtype."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


class AffineLayerNorm(nn.Module):
    """`norm3`: affine LayerNorm whose parameters are named `weight` / `bias` as in the checkpoint."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.eps, self.weight, self.bias)


class Attention(nn.Module):
    """q/k/v/o projections with full-width qk RMSNorm; the kernel is injected, never chosen here."""

    def __init__(self, dim: int, num_heads: int, eps: float, attn: AttentionFn):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.o = Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.attn = attn
        self.merge = merge_attention  # or its compiled version (LiveAvatarDiT.compile_regions)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, L, D]` -> normalised query heads `[B, L, H, HD]`."""
        return self._heads(self.norm_q(self.q(x)))

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, L, D]` -> normalised key heads and value heads, both `[B, L, H, HD]`."""
        return self._heads(self.norm_k(self.k(x))), self._heads(self.v(x))

    def attend(self, q: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """The kernel over key/value segments taken as one set (see `ops.attention.attend`)."""
        return attend(self.attn, q, segments, self.merge)

    def output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend and project: heads re-concatenated in order, then `o`."""
        return self.o(self.attn(q, k, v).flatten(2))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Cross-attention of `x` over precomputed key/value heads (text or audio tokens)."""
        return self.output(self.query(x), k, v)
