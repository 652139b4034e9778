"""Where the time of one full-size DiT block call goes, and what each speed option buys.

Random full-size weights (no download), 704x384, steady state (the ring cache is full: 3,168
queries over 15,312 keys). For each variant it prints the median time of one denoising call, the
achieved TFLOP/s, the GPU time split into GEMM / attention / copies / other kernels (one profiled
call), and the relative L2 distance of the prediction to the eager bf16 one. Then it times the
attention kernel alone per SDPA backend, and the streaming VAE decode of one block run alone and
concurrently with the four DiT calls of the next block on a second CUDA stream.

Variants (comma list): eager (SDPA, PyTorch's backend choice), cudnn / flash / efficient (SDPA
restricted to that backend), compile (regional compilation of the blocks), fp8, fp8compile; a
backend name inside a variant restricts it too (compile-cudnn, fp8compile-cudnn), and `+NAME` runs
it with the pack's attention backend NAME (fp8compile+sage). `--attention` lists the pack's
backends to time alone over the history and condition segments (as the model calls them, and
copied into one key set), with their error against the fp32 softmax.

Usage: python bench/block_profile.py [--variants eager,cudnn,compile,fp8,fp8compile] [--iters 5]
                                     [--attention sdpa,sage]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run_bench import build_vae, peak_tflops  # noqa: E402
from bench.timing import cuda_times  # noqa: E402
from liveavatar_core.config import DiTConfig  # noqa: E402
from liveavatar_core.model.cache import make_step_caches, tokens_per_frame  # noqa: E402
from liveavatar_core.errors import LiveAvatarError  # noqa: E402
from liveavatar_core.model.dit import LiveAvatarDiT  # noqa: E402
from liveavatar_core.ops.attention import attend, get_attention, math_with_lse  # noqa: E402
from liveavatar_core.ops.fp8 import convert_to_fp8  # noqa: E402
from liveavatar_core.synthetic import random_init_  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
CATEGORIES = (("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
              ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "scaled_mm", "matmul", "sm90", "sm100")),
              ("copy", ("cat", "copy", "memcpy", "memset")))


def variant_backend(variant: str):
    """The SDPA backend a variant's name restricts it to, or None."""
    return next((b for n, b in BACKENDS.items() if n in variant), None)


def category(kernel: str) -> str:
    name = kernel.lower()
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def kernel_split(fn, top: int = 0) -> dict[str, float]:
    """GPU milliseconds per kernel category for one call of `fn`; prints the `top` kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    split: dict[str, float] = defaultdict(float)
    kernels = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if t and evt.device_type == torch.autograd.DeviceType.CUDA:
            split[category(evt.key)] += t / 1000.0
            kernels.append((t / 1000.0, evt.count, evt.key))
    for t, count, key in sorted(kernels, reverse=True)[:top]:
        print(f"    {t:7.1f} ms {count:4d}x [{category(key)}] {key[:110]}")
    return dict(split)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def attention_alone(q_len: int, k_len: int, heads: int, head_dim: int, iters: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(3)
    # The model's [B, L, H, D] layout, transposed as ops/attention.py does.
    q = torch.randn(1, q_len, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(1, k_len, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(1, k_len, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    flop = 4 * q_len * k_len * heads * head_dim
    ref = None
    for name, backend in [("default", None), *BACKENDS.items()]:
        ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        try:
            with ctx:
                times, out = cuda_times(lambda _i: F.scaled_dot_product_attention(q, k, v), iters, warmup=2)
        except RuntimeError as exc:
            print(f"  attention {name}: not available ({str(exc).splitlines()[0][:100]})")
            continue
        ref = out if ref is None else ref
        med = times[len(times) // 2]
        print(f"  attention {name}: {med * 1000:.2f} ms per layer, {flop / med / 1e12:.0f} TFLOP/s, "
              f"x40 layers = {40 * med * 1000:.1f} ms; rel L2 vs default {rel_l2(out, ref):.1e}")


def segments_alone(names: list[str], q_len: int, history: int, cond: int, heads: int, head_dim: int,
                   iters: int) -> None:
    """Each pack attention backend over the two key segments of a call, as the model runs it:
    time per layer and relative L2 of the output to the fp32 softmax over all keys."""
    g = torch.Generator(device="cuda").manual_seed(4)

    def rand(n):
        return torch.randn(1, n, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    q, segments = rand(q_len), [(rand(history), rand(history)), (rand(cond), rand(cond))]
    k, v = (torch.cat([s[i] for s in segments], dim=1) for i in (0, 1))
    # The reference in fp32 by heads, so the full score matrix fits.
    ref = torch.cat([math_with_lse(q[:, :, h:h + 8], k[:, :, h:h + 8], v[:, :, h:h + 8])[0]
                     for h in range(0, heads, 8)], 2)
    flop = 4 * q_len * (history + cond) * heads * head_dim

    def concatenated(attn):
        # The segments copied into one key set: one kernel call, no merge.
        return attn(q, torch.cat([s[0] for s in segments], dim=1), torch.cat([s[1] for s in segments], dim=1))

    for name in names:
        for how, run in (("", lambda attn: attend(attn, q, segments)), (" concatenated", concatenated)):
            try:
                attn = get_attention(name)
                times, out = cuda_times(lambda _i: run(attn), iters, warmup=2)
            except (LiveAvatarError, RuntimeError) as exc:
                print(f"  {name}{how}: not available ({str(exc).splitlines()[0][:160]})")
                break
            med = times[len(times) // 2]
            print(f"  {name}{how}: {med * 1000:.2f} ms per layer, {flop / med / 1e12:.0f} TFLOP/s, x40 layers = "
                  f"{40 * med * 1000:.1f} ms; rel L2 vs fp32 softmax {rel_l2(out, ref):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="eager,cudnn,compile,fp8,fp8compile")
    ap.add_argument("--attention", default="", help="pack attention backends to time alone (comma list)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=0, help="print the N most expensive kernels of each variant")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the compile variants")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/block_profile.py needs a CUDA GPU.")
    torch._dynamo.config.cache_size_limit = 64
    name = torch.cuda.get_device_name()
    tflops = peak_tflops(name, None)
    print(f"device: {name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")

    cfg = DiTConfig.wan_s2v_14b()
    with torch.device("meta"):
        model = LiveAvatarDiT(cfg, attention="sdpa")
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    random_init_(model, torch.Generator(device="cuda").manual_seed(0))
    model.eval().requires_grad_(False)
    lat_h, lat_w = 384 // 8, 704 // 8
    fs = tokens_per_frame(cfg, lat_h, lat_w)
    cache = make_step_caches(cfg, lat_h, lat_w, num_steps=1, cache_frames=12, device="cuda")[0]
    g = torch.Generator(device="cuda").manual_seed(2)
    text = model.encode_text(torch.randn(30, cfg.text_dim, device="cuda", dtype=torch.bfloat16, generator=g))
    model.sink(torch.randn(1, 16, 1, lat_h, lat_w, device="cuda", generator=g),
               torch.randn(1, 16, 19, lat_h, lat_w, device="cuda", generator=g), text, cache)
    x = torch.randn(1, 16, 3, lat_h, lat_w, device="cuda", dtype=torch.bfloat16, generator=g)
    audio = torch.randn(1, 25, 1024, 12, device="cuda", dtype=torch.bfloat16, generator=g)
    start = 15 * fs  # ring full: every call attends 12 frames of history + the condition tokens
    keys = 12 * fs + cache.cond.num_tokens
    q_len = 3 * fs
    # Linear FLOPs per query token and layer: q, k, v, o, cross q, o (text K/V cached), FFN.
    lin = 2 * q_len * cfg.num_layers * (6 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.ffn_dim)
    att = 4 * q_len * (keys + cfg.text_len) * cfg.dim * cfg.num_layers
    print(f"one call: {q_len} queries over {keys} keys; {lin / 1e12:.1f} TFLOP linear + {att / 1e12:.1f} TFLOP "
          f"attention")

    def call(_i=0):
        return model.denoise_block(x, 500.0, text, audio, None, cache, start, 17)

    reference = None
    fp8_done = False
    results = {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant.startswith("fp8") and not fp8_done:
            n = convert_to_fp8(model)
            fp8_done = True
            print(f"(FP8: {n} Linear layers converted; the bf16 variants must come first)")
        compiled = "compile" in variant
        opts = {} if args.compile_mode is None else {"mode": args.compile_mode}
        model.compile_regions(compiled, **opts)
        model.set_attention(variant.partition("+")[2] or "sdpa")
        backend = variant_backend(variant.partition("+")[0])
        ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        with ctx:
            t0 = time.perf_counter()
            call()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            times, out = cuda_times(call, args.iters, warmup=1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()
            launch = time.perf_counter() - t0  # CPU time to enqueue one call; near the wall time = CPU-bound
            torch.cuda.synchronize()
            split = kernel_split(call, args.top)
        med = times[len(times) // 2]
        reference = out.float().clone() if reference is None else reference
        rate = (lin + att) / med / 1e12
        limit = ""
        if tflops:
            floor = lin / (tflops * (2 if variant.startswith("fp8") else 1) * 1e12) + att / (tflops * 1e12)
            limit = f", {100 * floor / med:.0f}% of the FLOP limit ({floor * 1000:.0f} ms)"
        parts = ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(split.items(), key=lambda kv: -kv[1]))
        print(f"{variant:>11}: {med * 1000:.1f} ms per call (min {times[0] * 1000:.1f}; first call {first:.1f} s; "
              f"CPU enqueue {launch * 1000:.0f} ms), "
              f"{rate:.0f} TFLOP/s{limit}; GPU time: {parts}; rel L2 vs first variant {rel_l2(out, reference):.2e}")
        results[variant] = med
    print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    print("attention kernel alone, one layer:")
    attention_alone(q_len, keys, cfg.num_heads, cfg.head_dim, args.iters)
    names = [n.strip() for n in args.attention.split(",") if n.strip()]
    if names:
        print("pack attention backends over the history and condition segments, one layer:")
        segments_alone(names, q_len, keys - cache.cond.num_tokens, cache.cond.num_tokens, cfg.num_heads,
                       cfg.head_dim, args.iters)

    # VAE decode of one block alone, and on a side stream while the next block's 4 calls run.
    best = min(results, key=results.get)
    print(f"VAE overlap (DiT in the '{best}' variant):")
    model.compile_regions("compile" in best, **opts)
    vae = build_vae(torch.device("cuda"))
    vae.compile_regions("compile" in best)
    dec = vae.stream_decoder()
    lat = [torch.randn(1, 16, 3, lat_h, lat_w, device="cuda", generator=g) for _ in range(12)]
    dec.decode(lat[0])
    best_backend = variant_backend(best)

    def dit_block():
        # The backend restriction covers the DiT only: the VAE's attention has shapes cuDNN refuses.
        with sdpa_kernel([best_backend]) if best_backend is not None else contextlib.nullcontext():
            for _ in range(4):
                call()
    side = torch.cuda.Stream()
    vae_t, _ = cuda_times(lambda i: dec.decode(lat[1 + i]), 3, warmup=1)
    dit_t, _ = cuda_times(lambda i: dit_block(), 3, warmup=0)

    def both(i):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            frames = dec.decode(lat[5 + i])
        dit_block()
        torch.cuda.current_stream().wait_stream(side)
        return frames
    both_t, _ = cuda_times(both, 3, warmup=1)
    # The same with the DiT on a high-priority stream: the decode only gets the SMs the DiT leaves idle.
    urgent = torch.cuda.Stream(priority=-1)

    def both_urgent(i):
        urgent.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(urgent):
            both(i)
        torch.cuda.current_stream().wait_stream(urgent)
    urgent_t, _ = cuda_times(both_urgent, 3, warmup=1)
    v, d, bt, ut = (t[len(t) // 2] for t in (vae_t, dit_t, both_t, urgent_t))
    print(f"  VAE block {v * 1000:.0f} ms, 4 DiT calls {d * 1000:.0f} ms, serial {1000 * (v + d):.0f} ms "
          f"({12 / (v + d):.2f} FPS); concurrent {bt * 1000:.0f} ms ({12 / bt:.2f} FPS); concurrent with the "
          f"DiT at high priority {ut * 1000:.0f} ms ({12 / ut:.2f} FPS)")


if __name__ == "__main__":
    main()
