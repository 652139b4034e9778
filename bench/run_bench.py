"""End-to-end GPU benchmark of the generator with random full-size weights (no download needed).

For each plan it builds the 14B DiT (random weights, fixed seeds) and the Wan 2.1 VAE with the
product's assembly steps (`loading.new_dit`, `prepare_dit`: LoRA-free FP8 conversion, placement,
compilation; `prepare_vae`; `assemble`), only the weights being random, places them as the run
planner decides (`offload="auto"` under the plan's memory cap), runs the product path
(`generate`: block sampler, streaming VAE decode on its own CUDA stream, uint8 frames in host
memory; with --mp4 also `write_mp4`, H.264/AAC on a writer thread) at 704x384 with 4 steps from
random text and audio features, the example picture and speech, and prints the steady block period,
output FPS, time to first frame (for a second video of the picture and for a new one), peak memory
against the planner's estimate, the ratio to the analytic FLOP limit of the GPU, and the ratio to
the official single-GPU baseline (spec/baseline.md).

Plans: bf16 and fp8 on the whole GPU; cap48 / cap24: bf16 under a 48 / 24 GiB budget emulated with
`torch.cuda.set_per_process_memory_fraction` (cap24fp8 / cap48fp8: the same with FP8 GEMMs);
fp8kv, cap48fp8kv, cap24fp8kv: FP8 GEMMs with an FP8 KV cache; cap16, cap16fp8, cap16fp8kv: a
16 GiB card (block swap with bf16 or FP8 blocks). Each plan runs in its own process so that peaks
and caps do not leak between plans.

With several attention backends (`--attention sdpa,sage`) every plan runs with each, on the
same random weights and inputs, and the table gives the relative L2 distance of each run's decoded
frames (the first timed clip) to those of the first backend.

Usage: python bench/run_bench.py [--plans bf16,fp8,cap48,cap24] [--clips 2] [--mp4] [--compile on|off]
                                [--attention sdpa[,sage,...]] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_inputs"
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from liveavatar_core.config import DiTConfig  # noqa: E402
from liveavatar_core.encoders.image import assumed_output_size  # noqa: E402
from liveavatar_core.errors import LiveAvatarError  # noqa: E402
from liveavatar_core.health import HEALTH_MODES  # noqa: E402
from liveavatar_core.ops.attention import attention_backends  # noqa: E402
from liveavatar_core.parallel.cost import gpu_model  # noqa: E402
from liveavatar_core.plan import RunPlan, detect_devices, plan_run  # noqa: E402
from liveavatar_core.sizes import GiB  # noqa: E402
from liveavatar_core.synthetic import RandomWeights, random_dit, random_vae  # noqa: E402

# name: (precision, memory cap in GiB, KV cache dtype; None = the compute dtype)
PLANS = {
    "bf16": ("bf16", None, None),
    "fp8": ("fp8", None, None),
    "cap48": ("bf16", 48, None),
    "cap24": ("bf16", 24, None),
    "cap48fp8": ("fp8", 48, None),
    "cap24fp8": ("fp8", 24, None),
    "fp8kv": ("fp8", None, "fp8"),
    "cap48fp8kv": ("fp8", 48, "fp8"),
    "cap24fp8kv": ("fp8", 24, "fp8"),
    "cap16": ("bf16", 16, None),
    "cap16fp8": ("fp8", 16, None),
    "cap16fp8kv": ("fp8", 16, "fp8"),
}
DEFAULT_PLANS = "bf16,fp8,cap48,cap24"
# spec/baseline.md: official single-GPU path on an H200, bf16, eager, offline decode.
OFFICIAL = {"fps": 2.91, "first_frame_s": 29.4, "peak_gib": 73.1}


# FP8 GEMMs run at twice the dense bf16 peak.
def peak_tflops(name: str, override: float | None) -> float | None:
    """Dense bf16 TFLOP/s of the GPU called `name` (the planner's catalogue), or `override`."""
    if override:
        return override
    model = gpu_model(name)
    return None if model is None else model.bf16_tflops


# --------------------------------------------------------------------------------------------
# model construction


def build_dit(cfg: DiTConfig, plan: RunPlan, attention: str, compile_blocks: bool):
    """The product's DiT steps with random weights (`random_dit`, standing for the checkpoint
    load), then `prepare_dit` (FP8, placement, compilation)."""
    from liveavatar_core.loading import prepare_dit

    device = torch.device(plan.dit_device)
    model = random_dit(RandomWeights(cfg), plan.precision, attention, device)
    swap = prepare_dit(model, plan, device, use_compile=compile_blocks)
    torch.cuda.empty_cache()  # the swapped blocks' GPU copies
    return model, swap


def build_vae(device: torch.device, compile_vae: bool = False):
    """The Wan 2.1 VAE with random weights, placed by the product's `prepare_vae`."""
    from liveavatar_core.loading import prepare_vae

    return prepare_vae(random_vae(RandomWeights(DiTConfig.wan_s2v_14b()), device, torch.bfloat16), device, compile_vae)


# --------------------------------------------------------------------------------------------
# one plan


def busy_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans."""
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy


STREAM_MARK, FIRST_CHUNK_MARK = "bench: stream", "bench: first frames in hand"


def first_frames(events: list[dict], kernels: list[dict]) -> None:
    """Print where the time to the first frames goes in a traced stream: the span from the stream's
    start to its first chunk, the GPU's busy time in it (the rest is the GPU waiting for the host),
    per tenth of the span, and the kernels that fill it, by name."""
    marks = {e["name"]: e["ts"] for e in events if e.get("name") in (STREAM_MARK, FIRST_CHUNK_MARK)}
    if len(marks) < 2:
        print("first frames: marks not in the trace")
        return
    t0, t1 = marks[STREAM_MARK], marks[FIRST_CHUNK_MARK]
    inside = [e for e in kernels if t0 <= e["ts"] < t1]
    busy = busy_us([(e["ts"], min(e["ts"] + e["dur"], t1)) for e in inside])
    print(f"first frames: {(t1 - t0) / 1e3:.0f} ms from the stream's start (profiled), GPU busy "
          f"{busy / 1e3:.0f} ms of it, {len(inside)} kernels")
    # The GPU timeline in 10 slices: which part of the span is idle.
    width = (t1 - t0) / 10
    slices = [busy_us([(max(e["ts"], t0 + i * width), min(e["ts"] + e["dur"], t0 + (i + 1) * width))
                       for e in inside if e["ts"] < t0 + (i + 1) * width and e["ts"] + e["dur"] > t0 + i * width])
              for i in range(10)]
    print("  GPU busy per tenth of the span: " + " ".join(f"{100 * b / width:.0f}%" for b in slices))
    per_name: dict = defaultdict(float)
    for e in inside:
        per_name[e["name"]] += e["dur"]
    for name, dur in sorted(per_name.items(), key=lambda kv: -kv[1])[:10]:
        print(f"    {dur / 1e3:7.1f} ms  {name[:100]}")


def gpu_busy(fn, blocks: int) -> None:
    """Profile `fn` (which makes `blocks` blocks): print the GPU busy time per block, in all and per
    CUDA stream, and each stream's costliest kernels. Busy well below the untraced block period
    means the GPU waits for the host. The traced stream's start (reference encode, sink, decoder
    warm-up) is part of the figures."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("dur")]
    streams: dict = {}
    for e in kernels:
        streams.setdefault(e["args"].get("stream"), []).append(e)
    total = busy_us([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    print(f"traced: {blocks} blocks, wall {wall:.2f} s (profiler overhead included); GPU busy "
          f"{total / 1e3 / blocks:.0f} ms per block")
    first_frames(events, kernels)
    for sid, evs in sorted(streams.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        busy = busy_us([(e["ts"], e["ts"] + e["dur"]) for e in evs])
        print(f"  stream {sid}: busy {busy / 1e3 / blocks:.0f} ms per block, "
              f"{len(evs) / blocks:.0f} kernels per block")
        per_name: dict = defaultdict(float)
        for e in evs:
            per_name[e["name"]] += e["dur"]
        for name, dur in sorted(per_name.items(), key=lambda kv: -kv[1])[:8]:
            print(f"    {dur / 1e3 / blocks:7.1f} ms  {name[:100]}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def random_inputs(cfg: DiTConfig, geo, clips: int, seed: int = 2, mirror: bool = False):
    """Random text embedding and audio features of `clips` clips (the encoders are not benchmarked),
    the example picture at the plan's size and the example speech looped to the clips' length as
    the waveform (the audio track, and what the health checks measure: with a face in the picture
    they run all their work); the same `seed` gives the same inputs; `mirror`: the picture mirrored
    (a new picture: its condition latents are not kept from an earlier video)."""

    from liveavatar_core.encoders.audio import AudioFeatures
    from liveavatar_core.health.checks import fit_reference
    from liveavatar_core.health.synthetic import read_speech
    from PIL import Image

    g = torch.Generator(device="cpu").manual_seed(seed)
    fpc = geo.frames_per_clip
    text = torch.randn(30, cfg.text_dim, generator=g)
    seconds = clips * fpc / 25
    audio = AudioFeatures(embedding=torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, clips * fpc, generator=g),
                          num_clips=clips, available_clips=clips, frames_per_clip=fpc, fps=25,
                          waveform_16k=read_speech(EXAMPLES / "liveavatar_speech.wav", seconds)[0],
                          duration_s=seconds)
    picture = np.asarray(Image.open(EXAMPLES / "liveavatar_reference.png").convert("RGB"))
    picture = np.ascontiguousarray(picture[:, ::-1]) if mirror else picture
    return text, audio, fit_reference(picture, geo.height, geo.width)


def bench_settings(size: str, geo, clips: int):
    """The generation settings every benchmark stream uses (fixed seed, the plan's steps)."""
    from liveavatar_core.pipeline import GenerationSettings

    return GenerationSettings(size=size, seed=420, num_clips=clips, frames_per_clip=geo.frames_per_clip,
                              sample_steps=geo.steps)


def run_plan(name: str, args) -> dict:
    from liveavatar_core.loading import assemble
    from liveavatar_core.pipeline import generate, write_mp4

    precision, cap_gib, kv_dtype = PLANS[name]
    devices = detect_devices()
    gpu = devices[0]
    cfg = DiTConfig.wan_s2v_14b()
    plan = plan_run(cfg, size=assumed_output_size(args.size), devices=devices, precision=precision, offload="auto",
                    memory_cap=None if cap_gib is None else cap_gib * GiB, kv_cache_dtype=kv_dtype,
                    text_encoder="cpu", audio_encoder="cpu", steps=args.sample_steps)
    print(plan.summary())
    plan.validate()
    device = torch.device(plan.dit_device)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    dit, swap = build_dit(cfg, plan, args.attention, args.compile == "on")
    vae = build_vae(device, args.compile == "on")
    model = assemble(dit, vae, plan, f"random {name}")
    print(f"  built in {time.perf_counter() - t0:.1f} s")
    torch.cuda.empty_cache()
    if cap_gib is not None:
        # After building (random weights are made whole on the GPU, then swapped out), before the
        # warm-up: compilation, cache allocation and the first clip run inside the budget, as on a
        # card of that size.
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / gpu.total_bytes), device)
    geo = plan.geometry
    fpc = geo.frames_per_clip

    kept: list[np.ndarray] = []

    def stream(clips: int, path: Path, record: list | None, mirror: bool = False) -> float:
        """The product path: VideoStream (sampler, streaming VAE on its stream, frames in host
        memory), into an MP4 with --mp4."""
        video = generate(model, *random_inputs(cfg, geo, clips, mirror=mirror), bench_settings(args.size, geo, clips))
        start = time.perf_counter()

        def on_chunk(chunk):
            if chunk.start_frame == 0:  # where the first frames are in hand, for the trace's breakdown
                with torch.profiler.record_function(FIRST_CHUNK_MARK):
                    pass
            if record is not None:
                record.append((time.perf_counter() - start, len(chunk.frames), chunk.stats.first_frame_s))
                if args.frames_out and sum(len(f) for f in kept) < fpc:
                    kept.append(chunk.frames)
        with torch.profiler.record_function(STREAM_MARK):
            if args.mp4:
                write_mp4(video, path, on_chunk=on_chunk, health=args.health)
            else:
                for chunk in video:
                    on_chunk(chunk)
        return time.perf_counter() - start

    videos = Path(tempfile.mkdtemp(prefix="liveavatar_bench_"))
    # Warm-up: one clip (compilation, kernels, cuBLAS/cuDNN plans, allocator), then a fresh stream is timed.
    stream(1, videos / "warm.mp4", None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    moved_before = (swap.bytes_moved if swap else 0)
    record: list = []
    blocks_per_clip = fpc // (4 * cfg.num_frames_per_block)
    total_s = stream(args.clips, videos / "timed.mp4", record)
    # The timed stream's picture is the warm-up's, as a user's next video of it: its condition
    # latents are kept. A new picture's first frame comes after their encode.
    new_picture: list = []
    stream(1, videos / "new.mp4", new_picture, mirror=True)
    if args.trace:
        gpu_busy(lambda: stream(1, videos / "traced.mp4", None), blocks_per_clip)
    shutil.rmtree(videos)
    if args.frames_out:
        np.save(args.frames_out, np.concatenate(kept)[:fpc])

    # Steady state: chunk-to-chunk intervals after the first clip's warm-up blocks (short caches).
    times = [t for t, _, _ in record]
    intervals = [b - a for a, b in zip(times, times[1:])]
    steady = intervals[blocks_per_clip:] or intervals
    block_s = statistics.median(steady)
    frames = sum(n for _, n, _ in record)
    calls = len(record) * geo.steps
    flops = plan.flops_per_call()
    frames_per_block = 4 * cfg.num_frames_per_block
    tflops = peak_tflops(gpu.label, args.peak_tflops)
    limit_fps = None
    if tflops:
        lin_rate = tflops * (2 if precision == "fp8" else 1) * 1e12
        call_floor = flops["linear"] / lin_rate + flops["attention"] / (tflops * 1e12)
        limit_fps = frames_per_block / (geo.steps * call_floor)
    peak = torch.cuda.max_memory_allocated(device)
    est = plan.generate_bytes(plan.dit_device)
    moved = swap.bytes_moved - moved_before if swap else 0
    first_frame_s = record[0][2]
    result = {
        "plan": name, "attention": args.attention, "health": args.health if args.mp4 else "off", "steps": geo.steps,
        "gpu": gpu.label, "precision": precision, "cap_gib": cap_gib,
        "compile": args.compile,
        "kv_cache_dtype": plan.kv_cache_dtype,
        "placement": plan.placement_words(), "blocks": len(record), "frames": frames,
        "block_latency_s": block_s, "steady_fps": frames_per_block / block_s, "run_fps": frames / total_s,
        "first_frame_s": first_frame_s, "first_frame_new_picture_s": new_picture[0][2], "peak_gib": peak / GiB,
        "reserved_gib": torch.cuda.max_memory_reserved(device) / GiB, "estimate_gib": est / GiB,
        # Times the allocator had to free its cache and retry: a run close to its budget.
        "alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0),
        "estimate_error_pct": 100.0 * (est - peak) / peak, "swap_gib_per_call": moved / calls / GiB,
        "flop_limit_fps": limit_fps,
        "flop_limit_ratio": (frames_per_block / block_s) / limit_fps if limit_fps else None,
        "vs_official_fps": (frames_per_block / block_s) / OFFICIAL["fps"],
        "vs_official_first_frame": OFFICIAL["first_frame_s"] / first_frame_s,
    }
    print(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------------------------
# driver


def compare_frames(results: list[dict], frames_dir: Path, reference: str) -> None:
    """Add to each result the relative L2 distance of its first clip's frames to the `reference`
    attention backend's frames of the same plan."""
    for r in results:
        mine = frames_dir / f"{r['plan']}_{r.get('attention')}.npy"
        ref = frames_dir / f"{r['plan']}_{reference}.npy"
        if "error" not in r and mine.is_file() and ref.is_file():
            a, b = np.load(mine).astype(np.float32), np.load(ref).astype(np.float32)
            r["frames_rel_l2_vs_" + reference] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            print(f"{r['plan']} {r['attention']}: decoded frames rel L2 vs {reference} "
                  f"{r['frames_rel_l2_vs_' + reference]:.4f}, max abs {np.abs(a - b).max():.0f}")


def table(results: list[dict]) -> str:
    head = (f"{'plan':<9}{'placement':<44}{'block s':>8}{'FPS':>7}{'run FPS':>8}"
            f"{'TTFF s':>7}{'new pic':>8}{'peak GiB':>9}{'est GiB':>8}{'err %':>7}{'%limit':>7}{'x offic':>8}")
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append(f"{r['plan']:<9}FAILED: {r['error']}")
            continue
        lim = f"{100 * r['flop_limit_ratio']:.0f}" if r["flop_limit_ratio"] else "n/a"
        rows.append(f"{r['plan']:<9}{r['placement'][:43]:<44}{r['block_latency_s']:8.3f}{r['steady_fps']:7.2f}"
                    f"{r['run_fps']:8.2f}{r['first_frame_s']:7.2f}{r['first_frame_new_picture_s']:8.2f}"
                    f"{r['peak_gib']:9.1f}{r['estimate_gib']:8.1f}{r['estimate_error_pct']:7.1f}{lim:>7}"
                    f"{r['vs_official_fps']:8.2f}")
    rows.append(f"official single-GPU baseline: {OFFICIAL['fps']} FPS, {OFFICIAL['first_frame_s']} s to first frame, "
                f"{OFFICIAL['peak_gib']} GiB (spec/baseline.md, H200)")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", default=DEFAULT_PLANS, help=f"comma list of {', '.join(PLANS)}")
    ap.add_argument("--clips", type=int, default=2, help="timed 48-frame clips per plan (after a 1-clip warm-up)")
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--sample_steps", type=int, default=4, help="denoising steps per block (3: the preview setting)")
    ap.add_argument("--attention", default="sdpa", help=f"comma list of {', '.join(attention_backends())}; "
                    "the others are compared with the first")
    ap.add_argument("--compile", choices=["on", "off"], default="on", help="regional compilation of the DiT blocks")
    ap.add_argument("--trace", action="store_true", help="profile one more clip: GPU busy time, top CPU ops")
    ap.add_argument("--mp4", action="store_true", help="also encode and write the MP4 (random weights give noise "
                    "frames, the costliest content for H.264)")
    ap.add_argument("--health", choices=HEALTH_MODES, default="off", help="with --mp4: the per-block health "
                    "checks (their cost: compare with off)")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s of this GPU if not H100/H200")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per plan")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="folder for results.json (default $OUT)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--frames-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/run_bench.py needs a CUDA GPU (it runs the full 14B model).")
    if args.clips < 1:
        sys.exit("--clips must be at least 1")
    if args.one:
        try:
            result = run_plan(args.one, args)
        except (LiveAvatarError, torch.cuda.OutOfMemoryError) as exc:
            result = {"plan": args.one, "error": f"{type(exc).__name__}: {exc}"}
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                # Where the budget ran out (sink, DiT call, decode) tells which estimate was short.
                frames = [f for f in traceback.extract_tb(exc.__traceback__) if str(ROOT) in f.filename]
                result["at"] = [f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}" for f in frames[-4:]]
            print(result["error"], *result.get("at", []), sep="\n  ")
        print("RESULT " + json.dumps(result))
        return
    names = [n.strip() for n in args.plans.split(",") if n.strip()]
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        sys.exit(f"unknown plan(s) {unknown}; choose from {', '.join(PLANS)}")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
    frames_dir = Path(tempfile.mkdtemp(prefix="liveavatar_frames_")) if len(attentions) > 1 else None
    results = []
    for name, attention in ((n, a) for n in names for a in attentions):
        print(f"\n=== plan {name}, attention {attention} ===", flush=True)
        cmd = [sys.executable, __file__, "--one", name, "--clips", str(args.clips), "--size", args.size,
               "--attention", attention, "--compile", args.compile, "--sample_steps", str(args.sample_steps)]
        cmd += (["--mp4"] if args.mp4 else []) + (["--trace"] if args.trace else []) + ["--health", args.health]
        cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        cmd += ["--frames-out", str(frames_dir / f"{name}_{attention}.npy")] if frames_dir else []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            output += f"\ntimed out after {args.timeout} s"
        print(output[-9000:], flush=True)
        line = next((ln for ln in output.splitlines()[::-1] if ln.startswith("RESULT ")), None)
        results.append(json.loads(line[len("RESULT "):]) if line else {"plan": name, "error": output.strip()
                                                                          .splitlines()[-1][:200]})
    if frames_dir:
        compare_frames(results, frames_dir, attentions[0])
        shutil.rmtree(frames_dir)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n" + table(results))


if __name__ == "__main__":
    main()
