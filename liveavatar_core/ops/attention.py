"""Attention backends behind one signature, chosen once and injected into the model.

Every backend computes exact softmax(QK^T / sqrt(d)) V without a mask (spec/dit.md 3.1: any
exact-softmax kernel is mathematically equivalent to the official cuDNN / FlashAttention calls).
Tensors use the `[B, L, H, D]` layout of the model; the result comes back in the query's dtype,
as the official `flash_attention` wrapper does.

Optional kernels are imported only when chosen, so a missing wheel never breaks the import of the
pack; choosing one that is not installed raises an `InputError` naming the package to install.

A query block of the DiT attends to two key sets kept apart in memory: its step cache's history and
the condition tokens. `attend` takes such segments. A backend that can return the log-sum-exp of
its softmax (`with_lse`) attends to each segment where it lies and merges the partial results
exactly (`merge_attention`); the others get the segments concatenated, history first, as the
official code does. Merging skips a copy of every layer's whole history per call.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from .transfer import cuda_index

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Keys and values `[B, Lk, H, D]` of one part of what a query attends to.
Segment = tuple[torch.Tensor, torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    dtype = v.dtype
    out = F.scaled_dot_product_attention(q.to(dtype).transpose(1, 2), k.to(dtype).transpose(1, 2),
                                         v.transpose(1, 2))
    return out.transpose(1, 2).to(q.dtype)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V spelled out in fp32: the form the golden fixtures were made with.

    A reference for parity tests and debugging; it materialises the full score matrix.
    """
    qh, kh, vh = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (scores.softmax(dim=-1) @ vh).transpose(1, 2).to(q.dtype)


def math_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_math` plus the fp32 log-sum-exp of each query's scores `[B, Lq, H]`."""
    qh, kh, vh = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = (scores.softmax(dim=-1) @ vh).transpose(1, 2).to(q.dtype)
    return out, scores.logsumexp(dim=-1).transpose(1, 2)


@functools.cache
def _cudnn_sdpa_device(index: int) -> bool:
    # cuDNN's fused attention needs Ampere or newer.
    return torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(index) >= (8, 0)


def _cudnn_accepts(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in _HALF and q.shape[-1] <= 128
            and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
            and _cudnn_sdpa_device(cuda_index(q.device)))


def _cudnn_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's fused attention (SDPA's own choice on Hopper), asked for its log-sum-exp too."""
    b, lq, h, _ = q.shape
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2), None, True)
    return out.transpose(1, 2), lse.reshape(b, h, lq).transpose(1, 2)


@dataclass(frozen=True)
class WithLse:
    """An attention kernel that also returns the log-sum-exp `[B, Lq, H]` (fp32), for inputs it accepts."""

    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    accepts: Callable[[torch.Tensor], bool]


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention over the union of disjoint key sets from each set's output `[B, Lq, H, D]` and
    log-sum-exp `[B, Lq, H]`: outputs weighted by their share of the total softmax mass (fp32)."""
    total = torch.stack(list(lses)).logsumexp(dim=0)
    acc = sum(o.float() * (lse - total).exp().unsqueeze(-1) for o, lse in zip(outs, lses))
    return acc.to(outs[0].dtype)


def attend(attn: AttentionFn, q: torch.Tensor, segments: Sequence[Segment],
           merge: Callable = merge_attention) -> torch.Tensor:
    """`attn` of `q` over all `segments` of keys/values, as if they were one concatenated set.

    Kernels with `with_lse` (see the module docstring) run once per segment and `merge` joins the
    results; otherwise the segments are concatenated in order.
    """
    if len(segments) == 1:
        return attn(q, *segments[0])
    lse_kernel: WithLse | None = getattr(attn, "with_lse", None)
    if lse_kernel is not None and lse_kernel.accepts(q):
        parts = [lse_kernel.run(q, k, v) for k, v in segments]
        return merge([o for o, _ in parts], [lse for _, lse in parts])
    return attn(q, torch.cat([k for k, _ in segments], dim=1), torch.cat([v for _, v in segments], dim=1))


def _half_inputs(q, k, v):
    # The fused kernels take fp16/bf16 only; like the official wrapper, fp32 inputs go in as bf16.
    dtype = v.dtype if v.dtype in _HALF else torch.bfloat16
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _make_flash2(module) -> AttentionFn:
    def run(q, k, v):
        out = module.flash_attn_func(*_half_inputs(q, k, v))
        return out.to(q.dtype)
    return run


def _make_flash3(module) -> AttentionFn:
    def with_lse(q, k, v):
        out, lse = module.flash_attn_func(*_half_inputs(q, k, v), return_attn_probs=True)[:2]
        return out.to(q.dtype), lse.transpose(1, 2)  # FA3 gives the log-sum-exp as [B, H, Lq]

    def run(q, k, v):
        return with_lse(q, k, v)[0]
    run.with_lse = WithLse(with_lse, lambda q: q.is_cuda)
    return run


def _make_sage(module) -> AttentionFn:
    def run(q, k, v):
        out = module.sageattn(*_half_inputs(q, k, v), tensor_layout="NHD", is_causal=False)
        return out.to(q.dtype)
    return run


@dataclass(frozen=True)
class _Backend:
    module: str | None  # Python module imported lazily; None for built-in backends
    install: str  # what the error tells the user to install
    build: Callable[..., AttentionFn]
    needs_cuda: bool


_sdpa.with_lse = WithLse(_cudnn_with_lse, _cudnn_accepts)

_BACKENDS: dict[str, _Backend] = {
    "sdpa": _Backend(None, "", lambda _mod: _sdpa, needs_cuda=False),
    "math": _Backend(None, "", lambda _mod: _math, needs_cuda=False),
    "flash2": _Backend("flash_attn", "flash-attn", _make_flash2, needs_cuda=True),
    "flash3": _Backend("flash_attn_interface", "FlashAttention 3 (no PyPI wheel: in flash-attention's hopper/ folder run "
                       "`python setup.py install`; Hopper GPUs only)", _make_flash3, needs_cuda=True),
    "sage": _Backend("sageattention", "sageattention", _make_sage, needs_cuda=True),
}

DEFAULT_BACKEND = "sdpa"


def attention_backends() -> tuple[str, ...]:
    """Names accepted by `get_attention`, default first."""
    return tuple(_BACKENDS)


def get_attention(name: str = DEFAULT_BACKEND) -> AttentionFn:
    """Return the attention function called `name`; raise InputError if unknown or not installed."""
    backend = _BACKENDS.get(name)
    if backend is None:
        raise InputError("attention", f"unknown attention backend '{name}'.",
                         f"choose one of: {', '.join(_BACKENDS)}.")
    if backend.module is None:
        return backend.build(None)
    if backend.needs_cuda and not torch.cuda.is_available():
        raise InputError("attention", f"'{name}' needs a CUDA GPU and none is available.",
                         f"use '{DEFAULT_BACKEND}'.")
    try:
        module = importlib.import_module(backend.module)
    except ImportError as exc:
        raise InputError("attention", f"'{name}' was chosen but {backend.module} is not importable ({exc}).",
                         f"install {backend.install} for your torch/CUDA version, or use '{DEFAULT_BACKEND}'."
                         ) from None
    return backend.build(module)
