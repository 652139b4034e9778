"""Attention over the DiT's two key sets (history and condition) in one Triton kernel pass.

cuDNN attends to each key set on its own and the model merges the partial results by their
log-sum-exp; copying the sets into one costs a copy of every layer's history per call. This
kernel walks both sets where they lie with one online softmax, so neither the merge nor the copy
is paid. `exact` mode computes QK^T and PV from bf16 operands with fp32 accumulation, like the
fused SDPA kernels. `fp8` mode quantises inside the kernel to e4m3 with one scale per query and
key row (a head's 128 values) and one per value row, folded into P per key tile; PV tiles are
accumulated in fp32 (the two-level accumulation of SageAttention 2, since Hopper's FP8 MMA
accumulates with fewer bits). It is a speed option with its error reported (bench/attention_kernels.py).

Triton is imported only when a backend of this module is chosen (it comes with CUDA builds of
PyTorch); the kernels need a CUDA GPU, FP8 needs compute capability 8.9 or newer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
LOG2E = 1.4426950408889634


@triton.jit
def _rows_int8(x):
    """int8 codes of an fp32 tile with one scale per row (rounded half away from zero), and the scales."""
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-30) / 127.0
    y = x / scale[:, None]
    return tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8), scale


@triton.jit
def _key_tile(acc, m_i, l_i, q, q_scale, k_ptrs, v_ptrs, ks_ptrs, vs_ptrs, valid, MASKED: tl.constexpr,
              QK8: tl.constexpr, PV8: tl.constexpr):
    """Fold one tile of keys/values into the running softmax state (m_i, l_i, acc) in log2 units."""
    # The partial last tile reads its last row again in place of rows past the end (masked below).
    k = tl.load(k_ptrs)
    v = tl.load(v_ptrs)
    if QK8:
        k_scale = tl.load(ks_ptrs)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * q_scale[:, None] * k_scale[None, :]
    else:
        s = tl.dot(q, tl.trans(k)) * q_scale
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if PV8:
        v_scale = tl.where(valid, tl.load(vs_ptrs), 0.0) if MASKED else tl.load(vs_ptrs)
        v_max = tl.maximum(tl.max(v_scale, 0), 1e-30)
        # p <= 1 and v_scale / v_max <= 1: the folded weights use the whole e4m3 range.
        pv = (p * (v_scale * (448.0 / v_max))[None, :]).to(tl.float8e4nv)
        acc += tl.dot(pv, v) * (v_max / 448.0)
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _key_set(acc, m_i, l_i, q, q_scale, K, V, KS, VS, stride_k, stride_v, stride_s, length, offs_n, offs_d,
             BLOCK_N: tl.constexpr, QK8: tl.constexpr, PV8: tl.constexpr):
    """All keys of one set: whole tiles unmasked, then the partial last tile."""
    full = (length // BLOCK_N) * BLOCK_N
    for start in range(0, full, BLOCK_N):
        rows = start + offs_n
        acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, q_scale, K + rows[:, None] * stride_k + offs_d[None, :],
                                  V + rows[:, None] * stride_v + offs_d[None, :], KS + rows * stride_s,
                                  VS + rows * stride_s, offs_n < BLOCK_N, False, QK8, PV8)
    if full < length:
        rows = tl.minimum(full + offs_n, length - 1)
        acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, q_scale, K + rows[:, None] * stride_k + offs_d[None, :],
                                  V + rows[:, None] * stride_v + offs_d[None, :], KS + rows * stride_s,
                                  VS + rows * stride_s, full + offs_n < length, True, QK8, PV8)
    return acc, m_i, l_i


@triton.jit
def _two_set_attention(Q, K1, V1, KS1, VS1, K2, V2, KS2, VS2, Out,
                       sq_b, sq_l, sq_h, sk1_b, sk1_l, sk1_h, sv1_b, sv1_l, sv1_h, ss1_b, ss1_l, ss1_h,
                       sk2_b, sk2_l, sk2_h, sv2_b, sv2_l, sv2_h, ss2_b, ss2_l, ss2_h, so_b, so_l, so_h,
                       heads, q_len, len1, len2, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       QK8: tl.constexpr, PV8: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < q_len
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :], mask=in_q[:, None], other=0.0)
    if QK8:
        q, q_scale = _rows_int8(q.to(tl.float32))
        q_scale = q_scale * qk_scale
    else:
        q_scale = qk_scale
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = _key_set(acc, m_i, l_i, q, q_scale, K1 + b * sk1_b + h * sk1_h, V1 + b * sv1_b + h * sv1_h,
                             KS1 + b * ss1_b + h * ss1_h, VS1 + b * ss1_b + h * ss1_h, sk1_l, sv1_l, ss1_l,
                             len1, offs_n, offs_d, BLOCK_N, QK8, PV8)
    acc, m_i, l_i = _key_set(acc, m_i, l_i, q, q_scale, K2 + b * sk2_b + h * sk2_h, V2 + b * sv2_b + h * sv2_h,
                             KS2 + b * ss2_b + h * ss2_h, VS2 + b * ss2_b + h * ss2_h, sk2_l, sv2_l, ss2_l,
                             len2, offs_n, offs_d, BLOCK_N, QK8, PV8)
    out = acc / l_i[:, None]
    tl.store(Out + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=in_q[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per mode, chosen on an H100/H200 at the model's shapes.
CONFIGS = {"exact": (128, 128, 8, 3), "int8": (128, 128, 8, 3), "int8_fp8": (128, 128, 8, 3)}
MODES = tuple(CONFIGS)


@dataclass(frozen=True)
class CodedRows:
    """Keys or values `[B, L, H, D]` as 8-bit codes with one fp32 scale per head row `[B, L, H]`."""

    codes: torch.Tensor
    scale: torch.Tensor


def _code_rows(x: torch.Tensor, dtype: torch.dtype, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float() if shift is None else x.float() - shift
    top = 127.0 if dtype == torch.int8 else E4M3_MAX
    scale = x.abs().amax(dim=-1).clamp_min(1e-30) / top
    y = x / scale.unsqueeze(-1)
    codes = y.round().clamp(-127, 127).to(torch.int8) if dtype == torch.int8 else y.to(dtype)
    return codes, scale


_coder = None


def code_rows(x: torch.Tensor, dtype: torch.dtype, shift: torch.Tensor | None = None) -> CodedRows:
    """`x - shift` as int8 or e4m3 codes with one scale per head row (one compiled kernel on CUDA)."""
    global _coder
    if _coder is None:
        _coder = torch.compile(_code_rows, dynamic=True)
    return CodedRows(*(_coder if x.is_cuda else _code_rows)(x, dtype, shift))


def _set_args(k, v, dtype):
    """Kernel arguments of one key set: tensors, scales (the tensors themselves where unused),
    and strides."""
    k, v = (t if isinstance(t, CodedRows) or (t.dtype == dtype and t.stride(-1) == 1) else t.to(dtype).contiguous()
            for t in (k, v))
    kc, ks = (k.codes, k.scale) if isinstance(k, CodedRows) else (k, k)
    vc, vs = (v.codes, v.scale) if isinstance(v, CodedRows) else (v, ks)
    if ks is not k and vs is not ks and ks.stride() != vs.stride():
        vs = vs.contiguous()
        ks = ks.contiguous()
    s_strides = ks.stride()[:3] if ks is not kc else (0, 0, 0)
    return (kc, vc, ks, vs), (*kc.stride()[:3], *vc.stride()[:3], *s_strides), kc.shape[1]


def two_set_attention(q: torch.Tensor, segments, mode: str = "exact", config: tuple | None = None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V of `q` `[B, Lq, H, D]` over one or two (k, v) sets `[B, Lk, H, D]`
    taken as one concatenated set, without concatenating them; bf16/fp16 in, `q`'s dtype out.

    `mode`: `exact` (bf16 operands), `int8` (int8 QK^T, keys given as int8 `CodedRows`),
    `int8_fp8` (also e4m3 PV, values given as e4m3 `CodedRows`)."""
    if not 1 <= len(segments) <= 2:
        raise ValueError(f"two_set_attention takes one or two key sets, got {len(segments)}")
    b, q_len, heads, head_dim = q.shape
    sets = [_set_args(k, v, q.dtype) for k, v in segments]
    first, second = sets[0], sets[-1]
    out = torch.empty_like(q)
    block_m, block_n, warps, stages = config or CONFIGS[mode]
    grid = (triton.cdiv(q_len, block_m), b * heads)
    _two_set_attention[grid](
        q, *first[0], *second[0], out, *q.stride()[:3], *first[1], *second[1], *out.stride()[:3],
        heads, q_len, first[2], second[2] if len(sets) == 2 else 0, LOG2E / math.sqrt(head_dim),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, QK8=mode != "exact", PV8=mode == "int8_fp8",
        num_warps=warps, num_stages=stages)
    return out


def quantized_attention(q: torch.Tensor, segments, mode: str, smooth: bool = True,
                        config: tuple | None = None) -> torch.Tensor:
    """`two_set_attention` in a quantised `mode` from bf16 key sets, coded here once per call.

    `smooth` subtracts the keys' mean over both sets before coding them (softmax is unchanged by
    a shift shared by all keys of a query) and, in `int8_fp8`, the values' mean (added back after)."""
    keys = [k for k, _ in segments]
    k_mean = v_mean = None
    if smooth:
        total = sum(k.shape[1] for k in keys)
        k_mean = sum(k.float().sum(1, keepdim=True) for k in keys) / total
        if mode == "int8_fp8":
            v_mean = sum(v.float().sum(1, keepdim=True) for _, v in segments) / total
    coded = [(code_rows(k, torch.int8, k_mean),
              code_rows(v, E4M3, v_mean) if mode == "int8_fp8" else v) for k, v in segments]
    out = two_set_attention(q, coded, mode, config)
    return out if v_mean is None else (out.float() + v_mean).to(q.dtype)
