"""The attention of one DiT layer at the steady-state shapes, per kernel and per precision.

3,168 queries over 12,672 history and 2,640 condition keys (704x384, 40 heads of 128), random bf16
inputs: cuDNN as the model runs it (each key set, merged by log-sum-exp) and on the sets copied
into one, then the Triton kernels over both sets in one pass (liveavatar_core/ops/triton_attention.py)
in each mode and tile configuration, alone (keys already coded) and with the per-call coding.
Prints the median time per layer, TFLOP/s, the time for 40 layers and the relative L2 distance to
an fp32 softmax over all keys.

Usage: python bench/attention_kernels.py [--iters 20] [--configs 128x128x8x3,128x64x4x3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import cuda_times  # noqa: E402
from liveavatar_core.ops.attention import attend, get_attention, math_with_lse  # noqa: E402
from liveavatar_core.ops.triton_attention import (CONFIGS, E4M3, MODES, code_rows,  # noqa: E402
                                                  quantized_attention, two_set_attention)

Q_LEN, HISTORY, COND, HEADS, HEAD_DIM = 3168, 12672, 2640, 40, 128


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--configs", default="", help="BLOCK_MxBLOCK_Nxwarpsxstages list (default: each mode's)")
    ap.add_argument("--key_bias", type=float, default=0.0,
                    help="add a per-channel bias of this size to the keys (what smoothing removes)")
    args = ap.parse_args()
    import triton
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    g = torch.Generator(device="cuda").manual_seed(4)

    def rand(n, bias=None):
        x = torch.randn(1, n, HEADS, HEAD_DIM, device="cuda", generator=g)
        return (x if bias is None else x + bias).bfloat16()
    bias = args.key_bias * torch.randn(1, 1, HEADS, HEAD_DIM, device="cuda", generator=g)
    q = rand(Q_LEN)
    segments = [(rand(HISTORY, bias), rand(HISTORY)), (rand(COND, bias), rand(COND))]
    k, v = (torch.cat([s[i] for s in segments], dim=1) for i in (0, 1))
    ref = torch.cat([math_with_lse(q[:, :, h:h + 8], k[:, :, h:h + 8], v[:, :, h:h + 8])[0]
                     for h in range(0, HEADS, 8)], 2)
    flop = 4 * Q_LEN * (HISTORY + COND) * HEADS * HEAD_DIM

    def report(name, fn, shift=0.0):
        try:
            times, out = cuda_times(lambda _i: fn(), args.iters, warmup=3)
        except Exception as exc:  # a configuration the compiler refuses is reported, not fatal
            print(f"  {name}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
            return
        med = times[len(times) // 2]
        print(f"  {name}: {med * 1000:.3f} ms, {flop / med / 1e12:.0f} TFLOP/s, x40 = {40 * med * 1000:.1f} ms, "
              f"rel L2 {rel_l2(out.float() + shift, ref):.2e}", flush=True)

    sdpa = get_attention("sdpa")
    report("cudnn, two sets merged by lse", lambda: attend(sdpa, q, segments))
    report("cudnn, one concatenated set (kernel alone)", lambda: sdpa(q, k, v))
    configs = ([tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")] if args.configs
               else None)
    smooth_k = sum(kk.float().sum(1, keepdim=True) for kk, _ in segments) / (HISTORY + COND)
    smooth_v = sum(vv.float().sum(1, keepdim=True) for _, vv in segments) / (HISTORY + COND)
    for mode in MODES:
        if mode == "exact":
            coded = segments
        else:
            coded = [(code_rows(kk, torch.int8, smooth_k),
                      code_rows(vv, E4M3, smooth_v) if mode == "int8_fp8" else vv) for kk, vv in segments]
        shift = smooth_v if mode == "int8_fp8" else 0.0
        for config in configs or [CONFIGS[mode]]:
            report(f"triton {mode} {'x'.join(map(str, config))}, kernel alone",
                   lambda: two_set_attention(q, coded, mode, config), shift)
        if mode != "exact":
            for smooth in (False, True):
                report(f"triton {mode}, coded per call, smooth={smooth}",
                       lambda: quantized_attention(q, segments, mode, smooth=smooth))


if __name__ == "__main__":
    main()
