"""GPU checks of the DiT with random full-size weights (no download needed).

Prints:
  1. FP8-vs-bf16 relative L2 error of random full-width Linear layers (5120x5120, 5120->13824,
     13824->5120) and of one full-width transformer block;
  2. the per-forward time of one full-size (5120-wide, 40-layer) block call at 704x384 in bf16 with
     SDPA, in the steady (rolling-cache) regime, and its ratio against the official per-forward
     time (spec/baseline.md: 0.31-0.37 s on an H200);
  3. the tiny fixture model run on the GPU in bf16 and in FP8 (finite outputs, difference vs fp32).

Usage: python bench/dit_checks.py [--fixtures DIR] [--iters N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import cuda_times  # noqa: E402
from liveavatar_core.config import DiTConfig  # noqa: E402
from liveavatar_core.model.cache import make_step_caches, tokens_per_frame  # noqa: E402
from liveavatar_core.model.dit import LiveAvatarDiT  # noqa: E402
from liveavatar_core.ops.fp8 import convert_to_fp8  # noqa: E402
from liveavatar_core.synthetic import random_init_  # noqa: E402

OFFICIAL_FORWARD_S = (0.31, 0.37)  # spec/baseline.md, H200, bf16, eager


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp8_layer_errors(device: torch.device) -> None:
    from liveavatar_core.ops.fp8 import FP8Linear

    g = torch.Generator(device=device).manual_seed(1)
    tokens = 3168
    for fin, fout in [(5120, 5120), (5120, 13824), (13824, 5120)]:
        lin = torch.nn.Linear(fin, fout, device=device, dtype=torch.bfloat16)
        lin.weight.data.normal_(0, fin ** -0.5, generator=g)
        lin.bias.data.normal_(0, 0.02, generator=g)
        x = torch.randn(tokens, fin, device=device, dtype=torch.bfloat16, generator=g)
        ref = lin(x)
        out = FP8Linear.from_linear(lin)(x)
        print(f"fp8 vs bf16 Linear {fin}->{fout} on [{tokens},{fin}]: rel L2 {rel_l2(out, ref):.4f}")


def full_size_block_timing(device: torch.device, iters: int) -> None:
    cfg = DiTConfig.wan_s2v_14b()
    with torch.device("meta"):
        model = LiveAvatarDiT(cfg, attention="sdpa")
    model = model.to_empty(device=device).to(torch.bfloat16)
    random_init_(model, torch.Generator(device=device).manual_seed(0))
    model.eval()
    lat_h, lat_w = 384 // 8, 704 // 8
    fs = tokens_per_frame(cfg, lat_h, lat_w)
    caches = make_step_caches(cfg, lat_h, lat_w, num_steps=1, cache_frames=12, dtype=torch.bfloat16,
                              device=device)
    g = torch.Generator(device=device).manual_seed(2)
    ctx = torch.randn(30, cfg.text_dim, device=device, dtype=torch.bfloat16, generator=g)
    ref = torch.randn(1, 16, 1, lat_h, lat_w, device=device, generator=g)
    motion = torch.randn(1, 16, 19, lat_h, lat_w, device=device, generator=g)
    text = model.encode_text(ctx)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.sink(ref, motion, text, caches)
    torch.cuda.synchronize()
    print(f"full-size sink call ({caches[0].cond.num_tokens} cond tokens): {time.perf_counter() - t0:.3f} s")
    x = torch.randn(1, 16, 3, lat_h, lat_w, device=device, dtype=torch.bfloat16, generator=g)
    audio = torch.randn(1, 25, 1024, 12, device=device, dtype=torch.bfloat16, generator=g)
    # Steady state: the ring is full (clip >= 1), so every call attends 12 frames + the cond tokens.
    start = 12 * fs + 3 * fs
    def block_call(_i):
        return model.denoise_block(x, 500.0, text, audio, None, caches[0], start, 17)

    times, out = cuda_times(block_call, iters, warmup=2)
    med = times[len(times) // 2]
    print(f"full-size block call 704x384 (3 latent frames, {3 * fs} queries, {12 * fs + caches[0].cond.num_tokens} "
          f"keys), bf16 SDPA: median {med:.3f} s, min {times[0]:.3f} s over {len(times)} calls; "
          f"finite={bool(torch.isfinite(out).all())}")
    print(f"  ratio vs official per-forward {OFFICIAL_FORWARD_S[0]}-{OFFICIAL_FORWARD_S[1]} s: "
          f"{OFFICIAL_FORWARD_S[0] / med:.2f}x-{OFFICIAL_FORWARD_S[1] / med:.2f}x faster")
    print(f"  peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    # FP8 on the same full-size model: the block output against bf16, and its time.
    ref_out = out.float().clone()
    n = convert_to_fp8(model)
    times, out8 = cuda_times(block_call, iters, warmup=2)
    print(f"full-size FP8 ({n} Linear layers converted): median {times[len(times) // 2]:.3f} s per block call; "
          f"prediction rel L2 vs bf16 over 40 layers: {rel_l2(out8, ref_out):.4f}")


def tiny_model_on_gpu(fixtures: Path, device: torch.device) -> None:
    from safetensors.torch import load_file

    from liveavatar_core.weights.dit import load_dit_checkpoint, load_into_module
    from liveavatar_core.weights.lora import load_lora, merge_lora

    ckpt_dir = fixtures / "ckpt" / "Wan2.2-S2V-14B"
    ckpt = load_dit_checkpoint(ckpt_dir)
    lora = load_lora(fixtures / "ckpt" / "LiveAvatar" / "liveavatar.safetensors", ckpt.shapes())
    g1 = load_file(str(fixtures / "golden" / "01_text.safetensors"))
    g4 = load_file(str(fixtures / "golden" / "04_vae.safetensors"))
    g7 = load_file(str(fixtures / "golden" / "07_dit_clip0_blocks01.safetensors"))
    preds = {}
    for label, dtype, fp8 in [("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                              ("fp8", torch.bfloat16, True)]:
        # Built as loading.load_generator builds it: meta, streamed load, LoRA merged in the weight dtype.
        with torch.device("meta"):
            m = LiveAvatarDiT(ckpt.config, attention="sdpa").to(dtype)
        load_into_module(m, ckpt.state_dict, device=device)
        merge_lora(m, lora, scale=0.5)
        if fp8:
            convert_to_fp8(m)
        lat_h, lat_w = g4["ref_latents"].shape[-2:]
        caches = make_step_caches(ckpt.config, lat_h, lat_w, num_steps=1, cache_frames=12, dtype=dtype,
                                  device=device)
        text = m.encode_text(g1["context"].to(device, dtype))
        m.sink(g4["ref_latents"].to(device), g4["motion_latents"].to(device), text, caches)
        pred = m.denoise_block(g7["clip0.block0.step0.x"][None].to(device, dtype), g7["clip0.block0.step0.t"],
                               text, g7["clip0.block0.step0.audio_input"].to(device, dtype), None, caches[0], 0, 17)
        preds[label] = pred.float().cpu()
    golden = g7["clip0.block0.step0.pred"]
    for label, p in preds.items():
        print(f"tiny model on GPU, {label}: finite={bool(torch.isfinite(p).all())}, "
              f"max abs diff vs golden fp32 {float((p[0] - golden).abs().max()):.2e}, rel L2 {rel_l2(p[0], golden):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=Path(__file__).resolve().parents[1] / "shared" / "fixtures"
                    / "liveavatar_tiny")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/dit_checks.py needs a CUDA GPU.")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    if args.fixtures.exists():
        tiny_model_on_gpu(args.fixtures, device)
    else:
        print(f"(tiny model check skipped: no fixtures at {args.fixtures})")
    fp8_layer_errors(device)
    full_size_block_timing(device, args.iters)


if __name__ == "__main__":
    main()
