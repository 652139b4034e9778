"""Eager vs fused (torch.compile) FP8 activation quantiser on the GPU: codes, scales and time.

The official code always compiles its quantiser; this prints how far the fused kernel's codes and
scale are from the eager single-rounding form, and the time per [3168, 5120] activation.

Then, per linear shape of a DiT block (3,168 tokens), the time of a LayerNorm (or GELU) followed by
the FP8 linear, compiled as one region, with the official per-tensor activation scale and with one
scale per token row (`torch._scaled_mm` rowwise): a per-row amax fuses into the producer's
kernel, a per-tensor one needs a reduction over the whole activation first. Also the relative L2
of each against the bf16 linear.
Usage: python bench/fp8_quant_check.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import cuda_times  # noqa: E402
from liveavatar_core.ops.fp8 import E4M3, E4M3_MAX, quantize_activation, quantize_e4m3  # noqa: E402

# (name, in, out, producer) of the block's linears: attention projections, FFN in and out.
SHAPES = (("qkv/o 5120x5120", 5120, 5120, "norm"), ("ffn in 5120x13824", 5120, 13824, "norm"),
          ("ffn out 13824x5120", 13824, 5120, "gelu"))


def _produce(x, kind):
    return torch.nn.functional.layer_norm(x, x.shape[-1:]) if kind == "norm" else torch.nn.functional.gelu(x)


def _tensorwise(x, w, w_inv, kind):
    xq, x_inv = quantize_e4m3(_produce(x, kind))
    return torch._scaled_mm(xq, w.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16, use_fast_accum=True)


def _rowwise(x, w, w_inv, kind):
    y = _produce(x, kind).float()
    s = (E4M3_MAX / y.abs().amax(-1, keepdim=True).clamp_min(1e-12)).clamp_max(E4M3_MAX)
    xq = (y * s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    w_rows = w_inv.reshape(1, 1).expand(1, w.shape[0]).contiguous()
    return torch._scaled_mm(xq, w.t(), scale_a=(1.0 / s), scale_b=w_rows, out_dtype=torch.bfloat16,
                            use_fast_accum=True)


def gemm_scales() -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    for name, k, n, kind in SHAPES:
        x = torch.randn(3168, k, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) / k ** 0.5
        wq, w_inv = quantize_e4m3(w)
        ref = _produce(x, kind) @ w.t()
        line = [name]
        for label, fn in (("per tensor", _tensorwise), ("per row", _rowwise)):
            run = torch.compile(fn)
            times, out = cuda_times(lambda _i: run(x, wq, w_inv, kind), 20, warmup=3)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            line.append(f"{label} {times[len(times) // 2] * 1e3:.3f} ms (rel L2 {err:.2e})")
        print(": ".join(line[:1]) + ": " + ", ".join(line[1:]), flush=True)


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for scale in (0.5, 3.0, 40.0):
        x = torch.randn(3168, 5120, device="cuda", dtype=torch.bfloat16, generator=g) * scale
        a, sa = quantize_e4m3(x)
        b, sb = quantize_activation(x)
        diff = (a.float() - b.float()).abs()
        print(f"x*{scale}: scale eager {sa.item():.9g} fused {sb.item():.9g} (rel {abs(sa - sb).item() / sa.item():.2e}); "
              f"codes differing {(diff > 0).float().mean().item() * 100:.4f} %, max code diff {diff.max().item():.4g}")
    for f in (quantize_e4m3, quantize_activation):
        for _ in range(3):
            f(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            f(x)
        torch.cuda.synchronize()
        print(f"{f.__name__}: {(time.perf_counter() - t) / 50 * 1e3:.3f} ms per [3168, 5120] bf16 activation")
    gemm_scales()


if __name__ == "__main__":
    main()
