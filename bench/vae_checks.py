"""GPU timing of the streaming VAE decoder with random full-size Wan 2.1 weights (base width 96).

Prints the time to decode one 3-latent block (12 frames) at 704x384 after the decoder has been
warmed up with the first block of the stream, in bf16 and fp32, and the ratio against the official
per-clip VAE cost (spec/baseline.md: 10.9 s per 48-frame clip, i.e. 2.7 s per 12 frames).

With --top N it also prints the N most expensive kernels of one block's decode (bf16).

Usage: python bench/vae_checks.py [--iters N] [--latents-per-pass N ...] [--layouts ncdhw,ndhwc] [--top N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.block_profile import kernel_split  # noqa: E402
from bench.timing import cuda_times  # noqa: E402
from liveavatar_core.vae.config import VAEConfig  # noqa: E402
from liveavatar_core.vae.model import WanVAE  # noqa: E402

OFFICIAL_VAE_S_PER_12_FRAMES = 10.9 / 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--latents-per-pass", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--top", type=int, default=0)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--compile", action="store_true", help="regional compilation (WanVAE.compile_regions)")
    ap.add_argument("--layouts", default="ncdhw,ndhwc",
                    help="memory layouts to time: ncdhw (contiguous), ndhwc (WanVAE.set_channels_last)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/vae_checks.py needs a CUDA GPU.")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    h, w = 384 // 8, 704 // 8
    for dtype in [{"bf16": torch.bfloat16, "fp32": torch.float32}[d] for d in args.dtypes.split(",")]:
        vae = WanVAE(VAEConfig(base_dim=96)).to(device=device, dtype=dtype).eval()
        vae.compile_regions(args.compile)
        g = torch.Generator(device=device).manual_seed(0)
        for name, p in vae.named_parameters():
            if p.dim() > 1:
                p.data.normal_(0, p[0].numel() ** -0.5, generator=g)
        runs = [(layout, lpp) for layout in args.layouts.split(",") for lpp in args.latents_per_pass]
        for layout, lpp in runs:
            vae.set_channels_last(layout == "ndhwc")
            dec = vae.stream_decoder(latents_per_pass=lpp)
            blocks = [torch.randn(1, 16, 3, h, w, device=device, generator=g) for _ in range(args.iters + 2)]
            dec.decode(blocks[0])  # first block: the official first chunk (9 frames)
            times, frames = cuda_times(lambda i: dec.decode(blocks[1 + i]), args.iters, warmup=1)
            med = times[len(times) // 2]
            print(f"streaming VAE decode, {str(dtype).replace('torch.', '')}{', compiled' if args.compile else ''}, "
                  f"{layout}, latents_per_pass={lpp}: one block "
                  f"(3 latents -> {frames.shape[2]} frames of {frames.shape[3]}x{frames.shape[4]}) median "
                  f"{med * 1000:.0f} ms (min {times[0] * 1000:.0f} ms, {len(times)} blocks); "
                  f"{frames.shape[2] / med:.1f} frames/s; {OFFICIAL_VAE_S_PER_12_FRAMES / med:.1f}x the official "
                  f"VAE cost per 12 frames; state {dec.state_bytes() / 2**20:.0f} MiB; "
                  f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            if args.top and dtype == torch.bfloat16:
                split = kernel_split(lambda: dec.decode(blocks[-1]), args.top)
                print("  GPU time: " + ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(split.items(),
                                                                                     key=lambda kv: -kv[1])))
        del vae
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
