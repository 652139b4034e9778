"""One transformer block of the causal S2V DiT (spec/dit.md 3.8 step 7, 3.9 "Block i").

Dtype flow (bf16 path; the fp32 path runs the same casts as no-ops, except the bf16 rounding of
`norm3`'s input and output, which the official code applies in every precision):
block input/output in the model dtype, residual stream in fp32 inside the block, modulation in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ..config import DiTConfig
from ..ops.attention import AttentionFn, Segment
from .layers import AffineLayerNorm, Attention, Linear, layer_norm, round_to_bf16
from .rope import apply_rope

# (k_rotated, k_unrotated, v) -> the key/value segments to attend over (ops.attention.attend);
# decides sink vs cached inference.
SelfKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Sequence[Segment]]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x * (1 + scale) + shift` with one modulation row per group of consecutive tokens.

    x `[B, L, D]`; shift/scale `[B, G, 1, D]`, G dividing L (G = latent frames, or 1 in the sink).
    """
    b, l, d = x.shape
    g = shift.shape[1]
    return (x.view(b, g, l // g, d) * (1 + scale) + shift).view(b, l, d)


def gated(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """fp32 `y * gate` with one gate row per token group (see `modulate`)."""
    b, l, d = y.shape
    g = gate.shape[1]
    return (y.float().view(b, g, l // g, d) * gate).view(b, l, d)


class DiTBlock(nn.Module):
    """Self-attention (through a cache strategy), text cross-attention and FFN, AdaLN-modulated."""

    def __init__(self, cfg: DiTConfig, attn: AttentionFn):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))
        self.self_attn = Attention(d, cfg.num_heads, cfg.eps, attn)
        self.norm3 = AffineLayerNorm(d, cfg.eps)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.eps, attn)
        self.ffn = nn.Sequential(Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, d))
        # (attn_inputs, attn_outputs) as plain functions of (block, ...): eager, or their compiled
        # versions shared by all blocks (LiveAvatarDiT.compile_regions).
        self.regions: tuple[Callable, Callable] = (DiTBlock.attn_inputs, DiTBlock.attn_outputs)

    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's cross-attention keys/values of the embedded text `[B, 512, D]`."""
        return self.cross_attn.key_value(text)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                self_kv: SelfKV, text_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x `[B, L, D]` (model dtype); e0 `[B, G, 6, D]` fp32 time projection per token group;
        rope = (cos, sin) `[L, HD/2]` of the query tokens.

        The cache strategy `self_kv` and the attention kernel run between two pure tensor
        functions, `attn_inputs` and `attn_outputs`, which `LiveAvatarDiT.compile_regions` compiles
        once for all 40 blocks: their shapes depend only on the query tokens, never on the cache length.
        """
        inputs, outputs = self.regions
        q_rot, k_rot, k, v = inputs(self, x, e0, *rope)
        return outputs(self, x, e0, self.self_attn.attend(q_rot, self_kv(k_rot, k, v)), *text_kv)

    def attn_inputs(self, x: torch.Tensor, e0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention inputs: rotated queries and keys, un-rotated keys, values `[B, L, H, HD]`."""
        dt = x.dtype
        shift1, scale1 = self._modulation(e0)[:2]
        # LN output is rounded to the model dtype before modulation.
        u = modulate(layer_norm(x, self.eps).to(dt).float(), shift1, scale1).to(dt)
        q = self.self_attn.query(u)
        k, v = self.self_attn.key_value(u)
        return apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype), k, v

    def attn_outputs(self, x: torch.Tensor, e0: torch.Tensor, attended: torch.Tensor,
                     text_k: torch.Tensor, text_v: torch.Tensor) -> torch.Tensor:
        """The rest of the block from the self-attention kernel's output `[B, L, H, HD]`."""
        dt = x.dtype
        _, _, gate1, shift2, scale2, gate2 = self._modulation(e0)
        x = x.float() + gated(self.self_attn.o(attended.flatten(2)), gate1)

        # Text cross-attention: the official code rounds the residual to bf16 before norm3, and
        # norm3's output, in every precision (spec 3.9 step 5, fixtures README 5).
        c = round_to_bf16(self.norm3(round_to_bf16(x))).to(dt)
        x = x + self.cross_attn(c, text_k, text_v).float()

        # FFN; norm2 input stays fp32 (no rounding here, spec 6.14).
        u2 = modulate(layer_norm(x, self.eps), shift2, scale2).to(dt)
        return (x + gated(self.ffn(u2), gate2)).to(dt)

    def _modulation(self, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Six fp32 rows `[B, G, 1, D]`: shift/scale/gate for attention, then for the FFN (spec 3.3)."""
        return (self.modulation.float().unsqueeze(1) + e0).unsqueeze(3).unbind(2)

