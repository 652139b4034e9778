"""Causal audio encoder and per-frame audio injection (spec/dit.md 3.5, 3.6).

Parameter names follow the checkpoint, including its spelling `casual_audio_encoder`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DiTConfig
from ..ops.attention import AttentionFn
from .layers import Attention, Fp32Linear, Linear, layer_norm

_ENC_EPS = 1e-6


class CausalConv1d(nn.Module):
    """Conv1d that only looks back: left-pad kernel-1 frames by replicating the first one."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, C_in, T]` -> float32 `[N, C_out, T']`."""
        conv = self.conv
        x = F.pad(x.float(), (self.pad, 0), mode="replicate")
        bias = None if conv.bias is None else conv.bias.float()
        if x.is_cuda:
            # cuDNN re-lays the (up to 157 MB) float32 weights out for its kernel on every call:
            # 1.6 ms of GPU time per DiT call on an H200, far more than the products themselves.
            return conv1d_as_gemm(x, conv.weight.float(), bias, conv.stride[0])
        return F.conv1d(x, conv.weight.float(), bias, conv.stride)


def conv1d_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """`F.conv1d(x, weight, bias, stride)` (no padding) as one GEMM over the unfolded windows."""
    windows = x.unfold(2, weight.shape[-1], stride).transpose(1, 2).flatten(2)
    return F.linear(windows, weight.flatten(1), bias).transpose(1, 2)


class MotionEncoderTC(nn.Module):
    """Conv stack behind the audio tokens: a local path (4 tokens/frame) and a global path (1)."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_tokens)
        self.conv1_global = CausalConv1d(in_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = Fp32Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, T, C]` -> LN, SiLU, conv2, LN, SiLU, conv3, LN, SiLU -> `[N, T'', dim]`."""
        x = F.silu(layer_norm(x, _ENC_EPS))
        x = F.silu(layer_norm(self.conv2(x.transpose(1, 2)).transpose(1, 2), _ENC_EPS))
        return F.silu(layer_norm(self.conv3(x.transpose(1, 2)).transpose(1, 2), _ENC_EPS))

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feat `[B, C_a, T]` fp32 -> (global `[B, T'', 1, D]`, local `[B, T'', num_tokens+1, D]`)."""
        b = feat.shape[0]
        # Local path: channel group n of conv1_local becomes token n, each run as its own sequence.
        x = self.conv1_local(feat)
        x = x.unflatten(1, (self.num_tokens, -1)).flatten(0, 1).transpose(1, 2)
        x = self._tail(x)
        x = x.unflatten(0, (b, self.num_tokens)).transpose(1, 2)
        pad = self.padding_tokens.float().expand(b, x.shape[1], 1, -1)
        local = torch.cat([x, pad], dim=2)
        g = self._tail(self.conv1_global(feat).transpose(1, 2))
        return self.final_linear(g).unsqueeze(2), local


class CausalAudioEncoder(nn.Module):
    """Mixes the wav2vec2 hidden states with learned weights and encodes them causally."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, cfg.num_wav2vec_layers, 1, 1), 0.01))
        self.encoder = MotionEncoderTC(cfg.audio_dim, cfg.dim, cfg.num_audio_token)

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio `[B, layers, C_a, T]` -> fp32 (global `[B, T'', 1, D]`, local `[B, T'', 5, D]`).

        The layer product is taken in the parameter dtype (bf16 in real use) before the fp32
        division and sum, as the official autocast region does (spec 3.5 step 2).
        """
        w = F.silu(self.weights)
        total = w.float().sum(dim=1, keepdim=True)
        feat = ((audio.to(w.dtype) * w).float() / total).sum(dim=1)
        return self.encoder(feat)


class AdaLayerNorm(nn.Module):
    """diffusers AdaLayerNorm as used by the injectors: eps 1e-5, (shift, scale) from one Linear."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x `[N, T, D]`, emb `[N, D]` -> fp32 `LN(x) * (1 + scale) + shift`."""
        shift, scale = self.linear(F.silu(emb)).unsqueeze(1).chunk(2, dim=-1)
        # (1 + scale) stays in the Linear's output dtype (bf16 on the real path, spec 6.12).
        return layer_norm(x, self.eps) * (1 + scale) + shift


class AudioInjector(nn.Module):
    """Audio cross-attention applied after selected blocks, per latent frame (spec 3.6)."""

    def __init__(self, cfg: DiTConfig, attn: AttentionFn):
        super().__init__()
        n = len(cfg.audio_inject_layers)
        self.injector = nn.ModuleList([Attention(cfg.dim, cfg.num_heads, cfg.eps, attn) for _ in range(n)])
        self.injector_adain_layers = nn.ModuleList([AdaLayerNorm(cfg.dim, cfg.adain_eps) for _ in range(n)])
        self.slot = {layer: i for i, layer in enumerate(cfg.audio_inject_layers)}
        self.inject = inject  # or its compiled version (LiveAvatarDiT.compile_regions)

    def forward(self, layer: int, x: torch.Tensor, tokens: torch.Tensor, global_emb: torch.Tensor) -> torch.Tensor:
        """Inject after block `layer` if it is listed; x `[B, F*fs, D]`, tokens `[B, F, n, D]`,
        global_emb `[B, F, D]` (both in the model dtype)."""
        slot = self.slot.get(layer)
        if slot is None:
            return x
        return self.inject(self.injector_adain_layers[slot], self.injector[slot], x, tokens, global_emb)


def inject(adain: AdaLayerNorm, attn: Attention, x: torch.Tensor, tokens: torch.Tensor,
           global_emb: torch.Tensor) -> torch.Tensor:
    """One injection: each latent frame's tokens attend to that frame's audio tokens (pure tensor
    code, so `LiveAvatarDiT.compile_regions` can compile it)."""
    b, length, d = x.shape
    frames = tokens.shape[1]
    xf = x.reshape(b * frames, length // frames, d)
    y = adain(xf, global_emb.reshape(b * frames, d))
    k, v = attn.key_value(tokens.flatten(0, 1))
    r = attn.output(attn.query(y), k, v)
    return (xf.float() + r.float()).to(x.dtype).view(b, length, d)
