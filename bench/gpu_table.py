"""What the run planner picks on common GPUs, and the memory it plans: the README's GPU table.

No GPU needed: each card is a `DeviceSpec` of its memory, planned as the CLI and the loader node
plan a run (`offload="auto"`, encoders off the GPU while the DiT runs) at the release settings
(704*384 area, 48-frame clips, 4 steps, the official 9:16-class output 384x704 of a portrait
image). FP8 GEMMs for cards that have them (Ada, Hopper, Blackwell), bf16 for the others; each with the
KV caches in the compute dtype and in FP8.

    python bench/gpu_table.py [--size 704*384]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liveavatar_core.config import DiTConfig  # noqa: E402
from liveavatar_core.encoders.image import DEFAULT_SIZE  # noqa: E402
from liveavatar_core.errors import InputError  # noqa: E402
from liveavatar_core.parallel.cost import GPU_MODELS, GPUModel  # noqa: E402
from liveavatar_core.plan import DeviceSpec, plan_run  # noqa: E402
from liveavatar_core.sizes import GiB  # noqa: E402

# (label, the planner's GPU model: its usable memory and whether it has FP8 GEMMs)
CARDS = (
    ("RTX 3090 (24 GB)", "RTX 3090"),
    ("RTX 4090 (24 GB)", "RTX 4090"),
    ("RTX 5090 (32 GB)", "RTX 5090"),
    ("A100 40 GB", "A100 40GB"),
    ("RTX A6000 (48 GB)", "RTX A6000"),
    ("L40S / RTX 6000 Ada (48 GB)", "L40S"),
    ("A100 80 GB", "A100"),
    ("H100 80 GB", "H100"),
    ("H200 (141 GB)", "H200"),
)
# Host memory assumed for the pinned KV caches and swapped blocks.
HOST_GIB = 128


def rows(size: str):
    """(card, precision, KV dtype, placement, planned GPU GiB, planned host GiB) per fitting plan."""
    cfg = DiTConfig.wan_s2v_14b()
    host = DeviceSpec("cpu", int(HOST_GIB * GiB), "host memory")
    for label, model in CARDS:
        card = GPUModel(model, *GPU_MODELS[model])
        device = DeviceSpec("cuda:0", int(card.memory_gib * GiB), label)
        for precision in ("fp8",) if card.fp8 else ("bf16",):
            for kv in (None, "fp8"):
                try:
                    plan = plan_run(cfg, size=size, devices=[device], host=host, precision=precision,
                                    offload="auto", kv_cache_dtype=kv, text_encoder="cpu", audio_encoder="cpu")
                except InputError as exc:
                    yield label, precision, kv or "auto", f"refused: {exc.problem}", None, None
                    continue
                if not plan.fits():
                    yield label, precision, kv or "auto", "does not fit", None, None
                    continue
                yield (label, precision, kv or "auto", _words(plan),
                       plan.required_bytes("cuda:0") / GiB, plan.required_bytes("cpu") / GiB)


def _words(plan) -> str:
    """The placement in a reader's words (the planner's own words name the settings)."""
    layers = plan.cfg.num_layers
    dit = ("DiT on the GPU" if not plan.swapped else
           f"{layers - len(plan.swapped)} of {layers} DiT blocks on the GPU, the rest swapped in ahead of use")
    kv = "KV caches streamed from pinned host memory" if plan.kv_cache_location == "cpu" else "KV caches on the GPU"
    return f"{dit}; {kv}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=DEFAULT_SIZE)
    args = parser.parse_args()
    print("| GPU | precision | KV cache | the planner picks | planned GPU GiB | pinned host GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, precision, kv, words, gpu, host in rows(args.size):
        gpu_s = f"{gpu:.1f}" if gpu is not None else "-"
        host_s = f"{host:.1f}" if host is not None else "-"
        print(f"| {label} | {precision} | {kv} | {words} | {gpu_s} | {host_s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
