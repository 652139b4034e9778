"""Building blocks of the Wan 2.1 VAE, with the official parameter names.

Temporal causality (spec/pipeline.md 4.1): every 3-D conv with a temporal kernel sees only the
past. Video is processed in short chunks; a `FeatureCache` carries the last frames each conv saw
into the next chunk, so chunked processing equals processing the whole sequence at once with zero
history in front. The cache keeps 2 frames per conv (1 for the temporal down-samplers), so its
size does not depend on the video length.

Dtype flow mirrors the official bf16 autocast run: convolutions and attention run in the weights'
dtype, the RMS norm is computed in float32 and its (SiLU-activated) output is cast back right
before the next conv, exactly where autocast would cast it. Conv biases are added in float32 by
the kernel after the conv (one bf16 rounding fewer than autocast's conv output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CACHE_FRAMES = 2


class FeatureCache:
    """Causal history of one encode or decode stream.

    Layers claim slots in call order at every chunk (`begin_chunk` rewinds the cursor), so slot `i`
    always belongs to the same layer. `first_chunk` is True until the first chunk has finished:
    the temporal resamplers treat that chunk specially (spec/pipeline.md 4.3).
    """

    def __init__(self):
        self.slots: list[torch.Tensor | None] = []
        self.first_chunk = True
        self._cursor = 0

    def begin_chunk(self) -> None:
        self._cursor = 0

    def end_chunk(self) -> None:
        self.first_chunk = False

    def take(self) -> int:
        i = self._cursor
        self._cursor += 1
        if i == len(self.slots):
            self.slots.append(None)
        return i

    def history(self, i: int, like: torch.Tensor, frames: int) -> torch.Tensor:
        """The stored frames of slot `i`, or zeros (the causal padding) while it is empty."""
        cached = self.slots[i]
        if cached is None:
            b, c, _, h, w = like.shape
            return like.new_zeros(b, c, frames, h, w)
        return cached

    def nbytes(self) -> int:
        """Bytes held by the cache, for memory accounting and tests."""
        return sum(t.numel() * t.element_size() for t in self.slots if t is not None)


class CausalConv3d(nn.Conv3d):
    """3-D conv padded only on the past side in time; the padding comes from the cache.

    `padding` follows the official constructor: `(p_t, p_h, p_w)` means `2*p_t` frames of history
    and symmetric spatial padding.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=(0, pad[1], pad[2]))
        self.history = 2 * pad[0]
        self.memory_format = torch.contiguous_format  # of weight and input; see WanVAE.set_channels_last
        # `partials` runs it as one 2-D conv per temporal tap; set by WanVAE.set_channels_last.
        self.taps = False

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        """The conv of `x` after the cached history, in the weights' dtype (never by `taps`: summing
        the partials here would take float32 temporaries of the output's size)."""
        return self._conv_forward(self._padded(x, cache), self.weight, self.bias)

    def partials(self, x: torch.Tensor, cache: FeatureCache | None = None) -> tuple[torch.Tensor, ...]:
        """Bias-free partial outputs whose sum plus the bias is `forward(x)`, for a consumer that
        fuses sum, bias and its own work into one kernel (`norm_silu`, `residual_sum`).

        One tensor, or with `taps` one per temporal tap: sum over k of the 2-D conv of frames
        k..k+T-1 with the weight's time slice k. On Hopper cuDNN runs the batch-1 96-channel 3-D
        convs on its sm80 kernels (192 channels get sm90 ones) and the 2-D convs on its sm90 ones,
        1.8 times as fast.
        """
        x = self._padded(x, cache)
        return self._taps(x) if self._by_taps(x) else (self._conv_forward(x, self.weight, None),)

    def _padded(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.history:
            i = cache.take()
            x = torch.cat([cache.history(i, x, self.history), x], dim=2)
            # clone: a slice would keep the whole concatenated chunk alive. The layout cat chooses
            # depends on its inputs' strides (and is ambiguous for a single frame): set it here.
            cache.slots[i] = x[:, :, -self.history:].clone(memory_format=self.memory_format)
        return x.contiguous(memory_format=self.memory_format)

    def _by_taps(self, x: torch.Tensor) -> bool:
        return self.taps and x.shape[0] == 1

    def _taps(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # NDHWC: each frame of the batch-1 input is one NHWC image, so frames k..k+T-1 are a view.
        frames = x[0].transpose(0, 1)
        kt = self.kernel_size[0]
        t = frames.shape[0] - kt + 1
        parts = []
        for k in range(kt):
            w = self.weight[:, :, k].contiguous(memory_format=torch.channels_last)
            y = F.conv2d(frames[k:k + t], w, None, self.stride[1:], self.padding[1:], self.dilation[1:])
            parts.append(y.unsqueeze(0).transpose(1, 2))  # [1, C, T, H, W], NDHWC strides
        return tuple(parts)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
                and torch.backends.mkldnn.is_available()):
            # PyTorch's CPU heuristic sends batch-1 3-D convs with few channels (narrow test
            # models) to its reference kernel, ~15x slower than oneDNN on the same shapes.
            # Compiled graphs keep the standard op (fake tensors cannot run this one).
            return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(self.padding),
                                                     list(self.stride), list(self.dilation), self.groups)
        return super()._conv_forward(x, weight, bias)

    @property
    def tappable(self) -> bool:
        """Whether `taps` can apply: a temporal kernel over unit temporal stride and dilation."""
        return self.kernel_size[0] > 1 and self.stride[0] == 1 and self.dilation[0] == 1


class RMSNorm(nn.Module):
    """`normalize(x over channels) * sqrt(C) * gamma`, computed and returned in float32."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.gamma)


def rms_norm(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The Wan VAE RMS norm over channels (dim 1) in float32; gamma `[C, 1, 1(, 1)]`."""
    x = x.float()
    # F.normalize(x, dim=1) (eps 1e-12 on the norm) with sqrt(C) folded into the per-pixel
    # factor: two full-size multiplies instead of three, equal up to float rounding.
    factor = torch.rsqrt(x.square().sum(1, keepdim=True).clamp_min(1e-24)) * x.shape[1] ** 0.5
    return x * factor * gamma


def conv_sum(parts: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> torch.Tensor:
    """float32 sum of a conv's partial outputs (`CausalConv3d.partials`) and its bias."""
    x = parts[0].float()
    for p in parts[1:]:
        x = x + p.float()
    return x if bias is None else x + bias.float().view(-1, *(1,) * (x.dim() - 2))


def norm_silu(x: torch.Tensor | tuple[torch.Tensor, ...], gamma: torch.Tensor, dtype: torch.dtype,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """`SiLU(rms_norm(x, gamma))` in float32, cast to `dtype` (the next conv's input dtype, where
    bf16 autocast would cast it). `x` may be a conv's partial outputs: their sum plus `bias`.
    `WanVAE.compile_regions` fuses it into one kernel."""
    if isinstance(x, tuple):
        x = conv_sum(x, bias)
    return F.silu(rms_norm(x, gamma)).to(dtype)


def residual_sum(parts: tuple[torch.Tensor, ...], bias: torch.Tensor | None,
                 shortcut: torch.Tensor) -> torch.Tensor:
    """A residual block's output: its last conv (partial outputs plus bias) plus the shortcut."""
    return (conv_sum(parts, bias) + shortcut.float()).to(parts[0].dtype)


@dataclass(frozen=True)
class Kernels:
    """The fusable elementwise work around the convs: eager, or compiled (WanVAE.compile_regions)."""

    norm_silu: Callable = norm_silu
    residual_sum: Callable = residual_sum


EAGER = Kernels()


class Upsample2x(nn.Module):
    """Nearest-exact spatial x2 (parameter-free slot `resample.0` of the official layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class ResidualBlock(nn.Module):
    """norm-SiLU-conv-norm-SiLU-conv plus a (1x1x1 conv) shortcut; indices match the official keys."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(),  # slot 5 is dropout (0) upstream
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        self.kernels = EAGER

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        r, k = self.residual, self.kernels
        h = self.shortcut(x)
        # Parameters as plain tensors: inputs of the compiled code, not constants baked into it.
        # Each conv's bias joins the kernel after it (cuDNN adds it in a pass of its own).
        x = r[2].partials(k.norm_silu(x, r[0].gamma.detach(), r[2].weight.dtype), cache)
        x = r[6].partials(k.norm_silu(x, r[3].gamma.detach(), r[6].weight.dtype, _detached(r[2].bias)), cache)
        return k.residual_sum(x, _detached(r[6].bias), h)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        # Per-frame, so it needs no history; `cache` is accepted to keep block calls uniform.
        identity = x
        b, c, t, h, w = x.shape
        x = x.transpose(1, 2).reshape(b * t, c, h, w)
        x = self.to_qkv(self.norm(x).to(self.to_qkv.weight.dtype))
        q, k, v = x.reshape(b * t, 1, 3 * c, h * w).transpose(2, 3).contiguous().chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(x.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x.reshape(b, t, c, h, w).transpose(1, 2) + identity


class Resample(nn.Module):
    """Spatial x2 up/down-sampling, optionally with a causal temporal x2 (spec/pipeline.md 4.1, 4.3).

    Temporal up-sampling: a (3,1,1) conv doubles the channels and the two halves become two
    consecutive frames. It is skipped for the first chunk (the first latent gives one frame), and
    its history starts empty at the second chunk: the first latent's features are never part of it.
    Temporal down-sampling: a stride-2 (3,1,1) conv over [last frame of the previous chunk, chunk];
    the first chunk (one frame) passes through unchanged.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cache)
        b, c, t, h, w = x.shape
        x = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = x.reshape(b, t, *x.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cache)
        return x

    def _time_upsample(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        i = cache.take()
        if cache.first_chunk:
            return x
        b, c, t, h, w = x.shape
        x = torch.cat([cache.history(i, x, CACHE_FRAMES), x.to(self.time_conv.weight.dtype)], dim=2)
        cache.slots[i] = x[:, :, -CACHE_FRAMES:].clone(memory_format=self.time_conv.memory_format)
        x = self.time_conv(x).reshape(b, 2, c, t, h, w)
        return torch.stack((x[:, 0], x[:, 1]), dim=3).reshape(b, c, 2 * t, h, w)

    def _time_downsample(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        i = cache.take()
        last = x[:, :, -1:].clone()
        if not cache.first_chunk:
            x = self.time_conv(torch.cat([cache.slots[i], x], dim=2))
        cache.slots[i] = last
        return x
