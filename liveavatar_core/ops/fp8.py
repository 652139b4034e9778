"""FP8 (e4m3) linear layers as used by the official `--fp8` flag (spec/dit.md section 5).

Weights are quantised once, per tensor; activations are quantised per call, per tensor, over the
whole 2-D input. Scale rule: `s = min(448 / max(amax, 1e-12), 448)` (tensors with amax < 1 are not
stretched to the full range). `X * s` is computed in fp32 and rounded to e4m3 once, as the
official `torch.compile`d quantiser does. The matmul is `torch._scaled_mm` with fast accumulation
and a fused bf16 bias; the result is cast to the input's dtype.

`convert_to_fp8(model)` is a transformation on a built (and LoRA-merged) model. It refuses to run
where FP8 matmuls are unavailable instead of silently keeping bf16.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ..errors import InputError
from .transfer import cuda_index

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Module names containing any of these stay in high precision (official ignore list).
IGNORE = ("text_embedding", "time_embedding", "time_projection", "head.head",
          "casual_audio_encoder.encoder.final_linear")


def fp8_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor quantisation scale `s` (fp32 scalar) of the official rule."""
    amax = x.detach().abs().max().float()
    return torch.clamp(E4M3_MAX / torch.clamp(amax, min=1e-12), max=E4M3_MAX)


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a whole tensor: (e4m3 codes, fp32 dequantisation factor 1/s)."""
    s = fp8_scale(x)
    codes = torch.clamp(x.float() * s, -E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, (1.0 / s).float()


@functools.cache
def _can_fuse(device_index: int) -> bool:
    """Whether torch.compile can build FP8 kernels here: Triton installed, FP8-capable GPU."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _fusable(x: torch.Tensor) -> bool:
    return x.is_cuda and _can_fuse(cuda_index(x.device))


@functools.cache
def _fused(fn):
    """One compiled version of `fn` per process (dynamic shapes: every layer and length)."""
    return torch.compile(fn, dynamic=True)


def quantize_activation(x: torch.Tensor, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_e4m3` for per-call activations: one fused kernel on CUDA with Triton unless `fused`
    is False (the official code also compiles its quantiser), the eager form elsewhere. Both round
    X*s once from fp32; the fused kernel's scale can differ by one fp32 ulp, which moved 0.0001 %
    of the codes by one e4m3 step on random activations (bench/fp8_quant_check.py)."""
    # Inside a compiled region (DiT block regional compilation) the eager form is what gets fused.
    if not fused or torch.compiler.is_compiling() or not _fusable(x):
        return quantize_e4m3(x)
    return _fused(quantize_e4m3)(x)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of `x` with one scale per row of its last dimension (a key or value head).

    Returns (codes like `x`, scales `[..., 1]` in `x`'s dtype) with `x ~= codes * scale`; the
    stored (rounded) scale is the one divided by, so a row's largest entry maps into the range.
    """
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny).to(x.dtype)
    codes = (x.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`codes * scale` in `dtype` (the inverse of `quantize_rows`)."""
    return (codes.float() * scale.float()).to(dtype)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, fused: bool = True) -> torch.Tensor:
    """`dequantize_rows` for cached keys/values: one fused kernel on CUDA with Triton unless `fused`
    is False (read codes and scales once, write `dtype`), the eager form elsewhere; both give the
    same values."""
    if not fused or torch.compiler.is_compiling() or not _fusable(codes):
        return dequantize_rows(codes, scale, dtype)
    return _fused(dequantize_rows)(codes, scale, dtype)


class FP8Linear(nn.Module):
    """Linear with an e4m3 weight and per-call e4m3 activations (needs `torch._scaled_mm`)."""

    def __init__(self, weight_codes: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = weight_codes.shape[1]
        self.out_features = weight_codes.shape[0]
        self.weight = nn.Parameter(weight_codes, requires_grad=False)
        self.register_buffer("weight_scale_inv", weight_scale_inv.reshape(()))
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)
        self.fused = True  # quantize_activation's fused kernel where available (convert_to_fp8)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantize_on: torch.device | None = None) -> "FP8Linear":
        """Quantise `linear`'s weight (on `quantize_on` if given: the same codes, computed faster on a
        GPU than on the host); the codes stay where the weight was."""
        w = linear.weight.data
        codes, inv = quantize_e4m3(w if quantize_on is None else w.to(quantize_on))
        bias = None if linear.bias is None else linear.bias.data
        return cls(codes.to(w.device), inv.to(w.device), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        xq, x_inv = quantize_activation(flat, self.fused)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_inv, scale_b=self.weight_scale_inv,
                               bias=self.bias, out_dtype=torch.bfloat16, use_fast_accum=True)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def fp8_targets(model: nn.Module) -> list[str]:
    """Names of the Linear layers `convert_to_fp8` replaces (460 on the 14B model)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(tag in name for tag in IGNORE)]


def check_fp8_support(device: torch.device) -> None:
    """Raise InputError unless `device` can run e4m3 `_scaled_mm` (CUDA, compute capability >= 8.9)."""
    fix = "turn FP8 off (bf16 weights), or run on an Ada/Hopper/Blackwell GPU."
    if not hasattr(torch, "_scaled_mm"):
        raise InputError("fp8", f"this PyTorch ({torch.__version__}) has no torch._scaled_mm.", fix)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise InputError("fp8", f"FP8 matmuls need a CUDA GPU; the model is on '{device}'.", fix)
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise InputError("fp8", f"{name} (compute capability {cap[0]}.{cap[1]}) has no FP8 tensor cores "
                         "(needs 8.9 or newer).", fix)


@torch.no_grad()
def convert_to_fp8(model: nn.Module, compute_device: torch.device | str | None = None, fused: bool = True) -> int:
    """Replace every eligible Linear by an `FP8Linear` in place; returns how many were replaced.

    Run after the LoRA merge (the merged bf16 weights are what gets quantised). `compute_device`
    is the GPU the model will run on (default: where its weights are). Weights held in host memory
    for block swap are quantised on that GPU one at a time and stay in host memory. `fused=False`
    keeps the activation quantiser eager (nothing is compiled; the loader's compile='off').
    """
    weights_on = next(model.parameters()).device
    device = torch.device(compute_device) if compute_device is not None else weights_on
    check_fp8_support(device)
    quantize_on = device if device != weights_on else None
    # Units a layer layout rank did not load stay on the meta device, unconverted (never run).
    names = [n for n in fp8_targets(model) if not model.get_submodule(n).weight.is_meta]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = FP8Linear.from_linear(getattr(parent, leaf), quantize_on)
        layer.fused = fused
        setattr(parent, leaf, layer)
    return len(names)
