"""Eager vs fused (torch.compile) FP8 activation quantiser on the GPU: codes, scales and time.

The official code always compiles its quantiser; this prints how far the fused kernel's codes and
scale are from the eager single-rounding form, and the time per [3168, 5120] activation.
Usage: python bench/fp8_quant_check.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liveavatar_core.ops.fp8 import quantize_activation, quantize_e4m3  # noqa: E402


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


if __name__ == "__main__":
    main()
