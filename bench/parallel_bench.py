"""Benchmark of the multi-process runtime (step layout) with random full-size weights.

Each rank count of `--ranks` is one run in a process of its own: `load_parallel(random_weights=...)`
starts the workers, every rank builds the same random weights (one seed) with the product's
assembly steps (`random_dit` standing for the checkpoint load, then `prepare_dit`; the VAE on the
VAE rank), and the controller runs the product path (`pipeline.generate` -> `RemoteStream`) on
random text, audio features and reference image (`run_bench.random_inputs`). One warm-up clip
(compilation, allocator), then `--clips` timed clips on a fresh stream.

Printed per run: the layout, the steady block period and FPS (the slope of chunk arrival times
after the first timed clip, which fills the pipeline), the run FPS, the time to first frame, each
rank's allocation once loaded beside the planned resident bytes and its peak
`torch.cuda.max_memory_allocated` after the warm-up (read in the worker) beside the planned bytes,
and the ratios to our single-GPU figure (measured here by `--check_exact`, else spec/baseline.md),
to the official 45 FPS five-GPU claim and to the official single-GPU 2.91 FPS (spec/baseline.md).

--check_exact first runs the single-process path (`VideoStream`, one model in one process) with the
same weights, inputs and seed, and compares every decoded frame of each run with it.

--share_gpus puts every rank on cuda:0 (over gloo, tensors staged through host memory): the
one-H200 mode, chosen by itself when fewer GPUs are visible than ranks. NCCL p2p and the FPS of
separate GPUs need one GPU per rank.

Usage: python bench/parallel_bench.py [--ranks 2,4] [--vae_gpu] [--layout steps|layers] [--shard none|fsdp]
           [--precision bf16|fp8] [--size 704*384]
           [--clips 2] [--share_gpus] [--compile auto|on|off] [--memory_cap_gib G] [--check_exact] [--out DIR]
       python bench/parallel_bench.py --config tiny --device cpu --ranks 2 --clips 2 --check_exact   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.run_bench import OFFICIAL, bench_settings, random_inputs  # noqa: E402
from liveavatar_core.config import DEFAULT_FRAMES_PER_CLIP, DiTConfig  # noqa: E402
from liveavatar_core.encoders.image import assumed_output_size  # noqa: E402
from liveavatar_core.errors import LiveAvatarError  # noqa: E402
from liveavatar_core.sizes import GiB, geometry  # noqa: E402
from liveavatar_core.synthetic import TINY_DIT, RandomWeights  # noqa: E402
from liveavatar_core.vae.config import VAEConfig  # noqa: E402

CONFIGS = {
    "full": lambda: RandomWeights(DiTConfig.wan_s2v_14b()),
    # The fixture checkpoint's architecture (synthetic.write_tiny_checkpoint): CPU smoke tests.
    "tiny": lambda: RandomWeights(TINY_DIT, VAEConfig(base_dim=8)),
}
DEFAULT_SIZES = {"full": "704*384", "tiny": "64*64"}
# spec/baseline.md: bench/run_bench.py on one H200 in the lease that re-measured the official path.
SINGLE_GPU_FPS = {"fp8": 16.13, "bf16": 12.90}
# The Live Avatar paper's claim: 45 FPS, 1.21 s to first frame on 5 x H800 (spec/live.md [LA-paper]).
OFFICIAL_MULTI = {"fps": 45.0, "first_frame_s": 1.21, "gpus": 5}
STEPS = 4
REFERENCE = "single"  # the name of the single-process run


# --------------------------------------------------------------------------------------------
# one run (in its own process)


def _geometry(weights: RandomWeights, size: str):
    return geometry(weights.dit, *assumed_output_size(size), DEFAULT_FRAMES_PER_CLIP, STEPS)


def _layout(n: int, weights: RandomWeights, args):
    from liveavatar_core.parallel.layout import layer_layout, step_layout

    share = args.device != "cpu" and _shares_gpus(n, args)
    if args.device == "cpu":
        devices, vae = ["cpu"] * n, "cpu" if args.vae_gpu else None
    else:
        devices = ["cuda:0"] * n if share else [f"cuda:{i}" for i in range(n)]
        vae = None if not args.vae_gpu else ("cuda:0" if share else f"cuda:{n}")
    if args.layout == "layers":
        return layer_layout(devices, weights.dit.num_layers, STEPS, vae_device=vae, share_gpus=share,
                            input_name="ranks")
    return step_layout(devices, STEPS, vae_device=vae, share_gpus=share, input_name="ranks")


def _shares_gpus(n: int, args) -> bool:
    return args.share_gpus or torch.cuda.device_count() < n + bool(args.vae_gpu)


def _timed(model, weights: RandomWeights, args, keep_frames: bool):
    """Warm-up clip, then `args.clips` timed clips: (chunk records, frames if kept, seconds)."""
    from liveavatar_core.pipeline import generate

    geo = _geometry(weights, args.size)
    for _ in generate(model, *random_inputs(weights.dit, geo, 1), bench_settings(args.size, geo, 1)):
        pass
    if hasattr(model, "group"):
        model.rank_stats(reset_peak=True)
    elif args.device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    video = generate(model, *random_inputs(weights.dit, geo, args.clips), bench_settings(args.size, geo, args.clips))
    record, frames = [], []
    start = time.perf_counter()
    for chunk in video:
        record.append((time.perf_counter() - start, len(chunk.frames), chunk.stats.first_frame_s))
        if keep_frames:
            frames.append(chunk.frames)
    return record, frames, time.perf_counter() - start


def rank_plan(weights: RandomWeights, layout, args):
    """The planner's `ParallelPlan` for this run (validated: a run that cannot fit is refused here,
    as the CLI would refuse it); its per-rank plans place the workers."""
    from liveavatar_core.parallel.planner import plan_parallel
    from liveavatar_core.plan import detect_devices, host_device

    gpus = {d.name: d for d in detect_devices()}
    specs = [gpus[d] if d in gpus else host_device() for d in layout.devices]
    dit, vae = specs[:layout.dit_ranks], specs[layout.dit_ranks] if layout.dedicated_vae else None
    return plan_parallel(weights.dit, devices=dit, vae_device=vae, size=args.size, steps=STEPS, layout=args.layout,
                         precision=args.precision, memory_cap=_cap_bytes(args), offload="auto", shard=args.shard,
                         share_gpus=len(set(layout.devices)) < layout.world_size, controller=None).validate()


def _cap_bytes(args) -> int | None:
    return None if args.memory_cap_gib is None else int(args.memory_cap_gib * GiB)


def _steady(record: list, blocks_per_clip: int, frames_per_block: int) -> tuple[float, float]:
    """Block period and FPS after the first clip (the pipeline fill): the least-squares slope of
    each chunk's arrival time over its index. Chunks from the ranks arrive in bursts, so single
    intervals (or their median) say little, and so does a span over a few blocks: two timed clips
    of the layer layout on one GPU gave 30.7 FPS by the span, six clips 9.0 (by either measure).
    Use 4 or more timed clips."""
    times = np.array([t for t, _, _ in record[blocks_per_clip - 1:]])
    if len(times) < 3:
        return float("nan"), float("nan")
    period = float(np.polyfit(np.arange(len(times)), times, 1)[0])
    return period, frames_per_block / period


def run_single(weights: RandomWeights, args) -> tuple[dict, list]:
    """The single-process path with the same weights: the reference frames and our one-GPU figure."""
    from liveavatar_core.loading import assemble, plan_for_device, prepare_dit, prepare_vae, resolve_compile, \
        vae_compute_dtype
    from liveavatar_core.synthetic import random_dit, random_vae

    device = torch.device("cpu" if args.device == "cpu" else "cuda:0")
    plan = plan_for_device(weights.dit, device, precision=args.precision)
    use_compile = resolve_compile(args.compile, device)
    t0 = time.perf_counter()
    dit = random_dit(weights, args.precision, "sdpa", device)
    prepare_dit(dit, plan, device, use_compile=use_compile)
    vae = prepare_vae(random_vae(weights, device, vae_compute_dtype(args.precision, device)), device, use_compile)
    model = assemble(dit, vae, plan, weights.describe())
    built_s = time.perf_counter() - t0
    if device.type == "cuda" and args.memory_cap_gib is not None:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, _cap_bytes(args) / total), device)
    record, frames, total_s = _timed(model, weights, args, keep_frames=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    ranks = [{"rank": 0, "device": str(device), "peak_gib": None if peak is None else peak / GiB,
              "planned_gib": plan.generate_bytes(plan.dit_device) / GiB if device.type == "cuda" else None}]
    return _result(REFERENCE, weights, args, f"one process on {device}", record, total_s, built_s, ranks), frames


def run_parallel(n: int, weights: RandomWeights, args) -> tuple[dict, list]:
    """One rank count: workers with random weights, warm-up, timed stream, per-rank peaks."""
    from liveavatar_core.parallel.remote import load_parallel

    layout = _layout(n, weights, args)
    plan = rank_plan(weights, layout, args)
    print(plan.summary(), flush=True)
    t0 = time.perf_counter()
    model = load_parallel(None, None, layout=layout, precision=args.precision, compile=args.compile,
                          random_weights=weights, memory_cap=_cap_bytes(args), plan=plan, shard=args.shard)
    built_s = time.perf_counter() - t0
    try:
        loaded = model.rank_stats()
        record, frames, total_s = _timed(model, weights, args, keep_frames=args.check_exact)
        stats = model.rank_stats()
    finally:
        model.close()
    # Each rank's allocation once loaded beside what the plan holds resident (weights), and its
    # generation phase (what a DiT + VAE run allocates) beside its measured peak.
    on_gpu = [r.device.name != "cpu" for r in plan.ranks]
    planned = [r.plan.generate_bytes(r.plan.dit_device) if g else None for r, g in zip(plan.ranks, on_gpu)]
    resident = [r.plan.resident_bytes(r.plan.dit_device) if g else None for r, g in zip(plan.ranks, on_gpu)]
    ranks = [{"rank": s["rank"], "device": s["device"], "peak_gib": _gib(s["peak_bytes"]), "planned_gib": _gib(p),
              "loaded_gib": _gib(done["allocated_bytes"]), "resident_planned_gib": _gib(res),
              "dit_weights_gib": _gib(s["dit_weight_bytes"])}
             for s, done, p, res in zip(stats, loaded, planned, resident)]
    if plan.fps is not None:
        result_estimate = {"planned_fps": plan.fps, "planned_first_frame_s": plan.first_frame_s}
    else:
        result_estimate = {}
    words = f"{layout.describe()} [{layout.backend}]"
    name = f"{n}{'+vae' if args.vae_gpu else ''}{' layers' if args.layout == 'layers' else ''}"
    result = _result(name + (" fsdp" if args.shard == "fsdp" else ""), weights,
                     args, words, record, total_s, built_s, ranks)
    result.update(ranks_dit=n, vae_gpu=bool(args.vae_gpu), world_size=layout.world_size, backend=layout.backend,
                  shared_gpu=args.device != "cpu" and _shares_gpus(n, args), **result_estimate)
    return result, frames


def _gib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / GiB


def _result(name: str, weights: RandomWeights, args, layout_words: str, record: list, total_s: float,
            built_s: float, ranks: list[dict]) -> dict:
    cfg = weights.dit
    geo = _geometry(weights, args.size)
    frames_per_block = geo.frames_per_block * 4  # 4 output frames per latent frame
    blocks_per_clip = geo.frames_per_clip // frames_per_block
    period, fps = _steady(record, blocks_per_clip, frames_per_block)
    return {"run": name, "config": args.config, "device": args.device, "precision": args.precision,
            "compile": args.compile, "size": args.size, "dit_dim": cfg.dim, "layout": layout_words,
            "built_s": built_s, "clips": args.clips, "blocks": len(record), "frames": sum(n for _, n, _ in record),
            "block_period_s": period, "steady_fps": fps, "run_fps": sum(n for _, n, _ in record) / total_s,
            "first_frame_s": record[0][2] if record else None, "ranks": ranks}


def _compare(frames: list, reference: Path) -> dict:
    """Max abs difference of every decoded frame against the single-process frames on disk."""
    got = np.concatenate(frames) if frames else np.zeros((0,), np.uint8)
    ref = np.fromfile(reference, dtype=np.uint8)
    if ref.size != got.size:
        return {"frames_compared": 0, "bit_identical": False, "max_abs_diff": None,
                "problem": f"{got.size} bytes of frames against {ref.size} in the single-process run"}
    diff = int(np.abs(got.reshape(-1).astype(np.int16) - ref.astype(np.int16)).max()) if ref.size else 0
    return {"frames_compared": len(got), "bit_identical": diff == 0, "max_abs_diff": diff}


def run_one(name: str, args) -> dict:
    """One run in this process; the single-process run writes its frames for the others."""
    weights = CONFIGS[args.config]()
    torch.manual_seed(0)
    reference = Path(args.frames_dir) / f"{REFERENCE}.u8" if args.frames_dir else None
    if name == REFERENCE:
        result, frames = run_single(weights, args)
        np.concatenate(frames).tofile(reference)
        return result
    result, frames = run_parallel(int(name), weights, args)
    if args.check_exact:
        result["exact"] = _compare(frames, reference) if reference and reference.exists() else None
    return result


# --------------------------------------------------------------------------------------------
# driver


def _ratios(result: dict, single_fps: float | None, args) -> None:
    fps = result["steady_fps"]
    result["single_fps"] = single_fps
    result["vs_single"] = fps / single_fps if single_fps else None
    on_gpu = args.device != "cpu" and args.config == "full"
    result["vs_official_5gpu"] = fps / OFFICIAL_MULTI["fps"] if on_gpu else None
    result["vs_official_single"] = fps / OFFICIAL["fps"] if on_gpu else None


def _print(result: dict) -> None:
    if "error" in result:
        print(f"run {result['run']}: FAILED: {result['error']}")
        return
    print(f"run {result['run']}: {result['layout']}")
    print(f"  steady block {result['block_period_s']:.3f} s = {result['steady_fps']:.2f} FPS; run "
          f"{result['run_fps']:.2f} FPS; first frame {result['first_frame_s']:.2f} s; built in {result['built_s']:.1f} s")
    for r in result["ranks"]:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
        planned = "n/a" if r["planned_gib"] is None else f"{r['planned_gib']:.1f} GiB"
        line = f"  rank {r['rank']} ({r['device']}): peak {peak}, planned {planned}"
        if r.get("loaded_gib") is not None:
            line += (f"; loaded {r['loaded_gib']:.2f} GiB, planned resident {r['resident_planned_gib']:.2f} GiB "
                     f"(DiT weights held {r['dit_weights_gib']:.2f} GiB)")
        print(line)
    words = []
    if result.get("vs_single"):
        words.append(f"x{result['vs_single']:.2f} the single-GPU {result['single_fps']:.2f} FPS")
    if result.get("vs_official_5gpu"):
        words.append(f"x{result['vs_official_5gpu']:.2f} the official 5-GPU {OFFICIAL_MULTI['fps']:.0f} FPS")
    if result.get("vs_official_single"):
        words.append(f"x{result['vs_official_single']:.2f} the official single-GPU {OFFICIAL['fps']} FPS")
    if words:
        print("  " + "; ".join(words))
    exact = result.get("exact")
    if exact is not None:
        print(f"  frames vs one process: {'bit-identical' if exact['bit_identical'] else 'DIFFERENT'} "
              f"(max abs diff {exact['max_abs_diff']}, {exact['frames_compared']} frames)")


def _save(results: list, result: dict, out: Path | None) -> None:
    """Add `result`; rewrite the JSON after every run, so a killed invocation keeps the runs done."""
    results.append(result)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "parallel_results.json").write_text(json.dumps(results, indent=1))


def _child(name: str, frames_dir: str, args) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name, "--frames_dir", frames_dir]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output += f"\ntimed out after {args.timeout} s"
    line = next((ln for ln in output.splitlines()[::-1] if ln.startswith("RESULT ")), None)
    if line is None:
        print(output[-6000:], flush=True)
        return {"run": name, "error": (output.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,4", help="comma list of DiT rank counts, one run each")
    ap.add_argument("--layout", choices=["steps", "layers"], default="steps",
                    help="steps: whole denoising steps per rank; layers: a share of the layers of every step")
    ap.add_argument("--vae_gpu", action="store_true", help="a dedicated VAE rank after the DiT ranks")
    ap.add_argument("--shard", choices=["none", "fsdp"], default="none",
                    help="fsdp: the block units sharded over the DiT ranks (step layout)")
    ap.add_argument("--precision", choices=["bf16", "fp8", "fp32"], help="default bf16 (fp32 with --device cpu)")
    ap.add_argument("--size", help="output area W*H (default 704*384; 64*64 with --config tiny)")
    ap.add_argument("--clips", type=int, default=4, help="timed 48-frame clips per run (after a 1-clip warm-up; "
                    "the steady figure needs 4 or more)")
    ap.add_argument("--share_gpus", action="store_true", help="every rank on cuda:0 over gloo (one-GPU mode; "
                    "automatic when fewer GPUs are visible than ranks)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="regional compilation")
    ap.add_argument("--memory_cap_gib", type=float, help="GiB each rank may allocate once built")
    ap.add_argument("--check_exact", action="store_true", help="also run one process with the same weights and "
                    "compare every decoded frame")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="full", help="tiny: the fixture's architecture")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: CPU ranks over gloo")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per run")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="folder for parallel_results.json (default $OUT)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--frames_dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    args.size = args.size or DEFAULT_SIZES[args.config]
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --device cpu (and --config tiny)")
    if args.clips < 1:
        sys.exit("--clips must be at least 1")
    if args.one:
        try:
            result = run_one(args.one, args)
        except (LiveAvatarError, torch.cuda.OutOfMemoryError) as exc:
            result = {"run": args.one, "error": f"{type(exc).__name__}: {exc}"}
        print("RESULT " + json.dumps(result))
        return
    try:
        counts = [int(n) for n in args.ranks.split(",") if n.strip()]
    except ValueError:
        sys.exit(f"--ranks takes a comma list of rank counts, not '{args.ranks}'")
    results = []
    with tempfile.TemporaryDirectory(prefix="liveavatar_pbench_") as frames_dir:
        single_fps = None if args.device == "cpu" or args.config != "full" else SINGLE_GPU_FPS.get(args.precision)
        if args.check_exact:
            print("=== one process (reference) ===", flush=True)
            ref = _child(REFERENCE, frames_dir, args)
            if "error" not in ref:
                single_fps = ref["steady_fps"]  # measured beside the runs: the fairer ratio
                _ratios(ref, single_fps, args)
            _print(ref)
            _save(results, ref, args.out)
        for n in counts:
            print(f"=== {n} DiT ranks{' + VAE rank' if args.vae_gpu else ''} ===", flush=True)
            result = _child(str(n), frames_dir, args)
            if "error" not in result:
                _ratios(result, single_fps, args)
            _print(result)
            _save(results, result, args.out)
    failed = [r for r in results if "error" in r or (r.get("exact") is not None and not r["exact"]["bit_identical"])]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
