"""CPU timing of the VAE where `vae_device cpu` puts it: why a CPU VAE computes in float32.

Prints the time of one 96-channel 3x3x3 convolution over 4x64x64 in bf16 and in fp32 (the kind of
conv the decoder is made of; `plan.vae_compute` quotes it), then the streaming decode of 3-latent
blocks (12 frames each after the first) at 704x384 with random full-size Wan 2.1 weights in fp32.
No GPU needed; the figures depend on the CPU's cores (`--threads`, default all).

    python bench/cpu_vae_block.py [--blocks 2] [--height 384 --width 704] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liveavatar_core.config import DiTConfig  # noqa: E402
from liveavatar_core.loading import prepare_vae  # noqa: E402
from liveavatar_core.synthetic import RandomWeights, random_vae  # noqa: E402

LATENTS_PER_BLOCK = 3


def conv_seconds(dtype: torch.dtype, repeats: int = 3) -> float:
    """Mean time of one 96-channel 3x3x3 conv over [1, 96, 4, 64, 64] in `dtype` (after one untimed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 96, 4, 64, 64, generator=g).to(dtype)
    w = torch.randn(96, 96, 3, 3, 3, generator=g).to(dtype)
    torch.nn.functional.conv3d(x, w, padding=(0, 1, 1))
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.conv3d(x, w, padding=(0, 1, 1))
    return (time.perf_counter() - t0) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=704)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU threads: {torch.get_num_threads()}")
    bf16, fp32 = conv_seconds(torch.bfloat16, repeats=1), conv_seconds(torch.float32)
    print(f"one 96-channel 3x3x3 conv over 4x64x64: bf16 {bf16:.3f} s, fp32 {fp32:.4f} s ({bf16 / fp32:.0f}x)")

    weights = RandomWeights(DiTConfig.wan_s2v_14b())
    vae = prepare_vae(random_vae(weights, torch.device("cpu"), torch.float32), torch.device("cpu"))
    decoder = vae.stream_decoder()
    latents = torch.randn(1, weights.vae.z_dim, LATENTS_PER_BLOCK, args.height // 8, args.width // 8,
                          generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for block in range(args.blocks):
            t0 = time.perf_counter()
            frames = decoder.decode(latents)
            print(f"block {block}: {frames.shape[2]} frames at {args.width}x{args.height} in "
                  f"{time.perf_counter() - t0:.1f} s (fp32)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
