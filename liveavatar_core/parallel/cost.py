"""Speed estimates for plans: seconds per DiT block call, per VAE block decode and per hop.

Anchored on what one H200 measured (README, bench/run_bench.py at 704x384, compiled, SDPA): a
steady block call takes 0.157 s with FP8 GEMMs and 0.210 s in bf16, a streaming decode of one
12-frame block 0.082 s, and the first frame comes 0.53 s plus one block period after the start
(reference and motion encode, sink). Another size scales the call by its FLOPs and the decode by
its pixels; another GPU by its dense bf16 tensor peak against the H200's (the same efficiency is
assumed: an estimate until measured there). Host<->GPU traffic of block swap and streamed KV
caches overlaps compute: a call takes the longer of the two. So do the gathers of sharded weights
(FSDP), over the link between the GPUs, except the first unit's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import DiTConfig
from ..plan import RunPlan
from ..sizes import Geometry, flops_per_call, geometry

# Dense bf16 tensor peaks with fp32 accumulation (vendor figures, TFLOP/s), the usable memory a
# driver reports (GiB), FP8 GEMM support, and the GPU-to-GPU bandwidth assumed between two of them
# in one host (GB/s, one direction, 80 % of the link: NVLink on SXM parts; PCIe otherwise, halved
# where consumer cards have no peer-to-peer and NCCL stages through host memory); longer names
# match first. `measure_link_bps` replaces the last figure on the machine itself.
GPU_MODELS = {
    "H200": (989.0, 139.8, True, 360.0),
    "H100 PCIe": (756.0, 79.1, True, 40.0),
    "H100": (989.0, 79.1, True, 360.0),
    "H800": (989.0, 79.1, True, 160.0),
    "H20": (148.0, 95.0, True, 360.0),
    "A100 40GB": (312.0, 39.4, False, 240.0),
    "A100": (312.0, 79.1, False, 240.0),
    "L40S": (362.0, 44.4, True, 20.0),
    "RTX 6000 Ada": (364.0, 47.5, True, 20.0),
    "RTX A6000": (155.0, 47.5, False, 20.0),
    "RTX 5090": (209.0, 31.4, True, 20.0),
    "RTX 4090": (165.0, 23.6, True, 10.0),
    "RTX 3090": (71.0, 23.6, False, 10.0),
}
REFERENCE_GPU = "H200"
# One H200, 704x384 (384x704 output), 48-frame clips: see the module docstring.
_REFERENCE_SIZE = (384, 704)
_REFERENCE_CALL_S = {"fp8": 0.157, "bf16": 0.210}
_REFERENCE_DECODE_S = 0.082
_REFERENCE_START_S = 0.53
# Bytes per second: host<->GPU copies (PCIe 5 as measured on the H200 host, pinned), GPU<->GPU
# (PCIe assumed: a step-layout hop is 0.4 MB, so NVLink would not change the estimate), and gloo
# through host memory (ranks sharing a GPU, CPU ranks).
HOST_LINK_BPS = 40e9
LINKS_BPS = {"gpu": 20e9, "host": 5e9}
HOP_LATENCY_S = 2e-4


@dataclass(frozen=True)
class GPUModel:
    """A GPU's speed and size as the planner assumes them."""

    name: str
    bf16_tflops: float
    memory_gib: float
    fp8: bool
    link_gbps: float  # to another GPU of this model in one host (see GPU_MODELS)

    @property
    def speed(self) -> float:
        """Compute relative to the reference H200."""
        return self.bf16_tflops / GPU_MODELS[REFERENCE_GPU][0]


def gpu_model(label: str) -> GPUModel | None:
    """The catalogue entry whose name is in `label` (a CUDA device name such as 'NVIDIA H200')."""
    for name in sorted(GPU_MODELS, key=len, reverse=True):
        if name.lower() in label.lower():
            return GPUModel(name, *GPU_MODELS[name])
    return None


def gpu_for_memory(gib: float) -> GPUModel:
    """The GPU assumed for hardware described only by its memory (`plan --gpu_count N
    --gpu_memory_gib G`): of the catalogue models with about that memory, the slowest one with FP8
    GEMMs (the current generation), else the slowest."""
    models = [GPUModel(n, *v) for n, v in GPU_MODELS.items()]
    near = [g for g in models if abs(g.memory_gib - gib) <= 0.15 * gib]
    near = near or [min(models, key=lambda g: abs(g.memory_gib - gib))]
    return min(near, key=lambda g: (not g.fp8, g.bf16_tflops))


def call_seconds(plan: RunPlan, gpu: GPUModel, link_bps: float | None = None) -> float:
    """One steady block call of `plan`'s DiT layers (all, or a layer-layout rank's) on `gpu`, with
    its host traffic and its gathers (over `link_bps`, default the catalogue's) overlapped."""
    work = sum(flops_per_call(plan.cfg, plan.geometry).values()) / _reference_flops(plan.geometry)
    work *= len(plan.owned_layers) / plan.cfg.num_layers
    compute = _REFERENCE_CALL_S["fp8" if plan.precision == "fp8" else "bf16"] * work / gpu.speed
    seconds = max(compute, plan.transfer_bytes_per_call() / HOST_LINK_BPS)
    gathered = plan.gather_bytes_per_call()
    if gathered:
        link = link_bps or gpu.link_gbps * 1e9
        # A cycle starts with a gather nothing overlaps: the first unit's.
        seconds = max(seconds, gathered / link) + gathered / plan.cfg.num_layers / link
    return seconds


def decode_seconds(geo: Geometry, gpu: GPUModel) -> float:
    """The streaming VAE decode of one block on `gpu`."""
    pixels = geo.height * geo.width / (_REFERENCE_SIZE[0] * _REFERENCE_SIZE[1])
    return _REFERENCE_DECODE_S * pixels * geo.batch / gpu.speed


def start_seconds(geo: Geometry, gpu: GPUModel) -> float:
    """Reference and motion encode plus the sink pass, before the first block call."""
    pixels = geo.height * geo.width / (_REFERENCE_SIZE[0] * _REFERENCE_SIZE[1])
    return _REFERENCE_START_S * pixels / gpu.speed


def hop_seconds(geo: Geometry, link: str, dtype_bytes: int, hidden_dim: int = 0) -> float:
    """Passing one block's latents to the next rank; with `hidden_dim`, also its hidden state
    (the layer layout's hop within a step)."""
    block = geo.batch * 16 * geo.frames_per_block * geo.latent_h * geo.latent_w * dtype_bytes
    block += geo.batch * geo.block_tokens * hidden_dim * dtype_bytes
    return HOP_LATENCY_S + block / LINKS_BPS[link]


def measure_link_bps(a: str, b: str, nbytes: int = 256 * 2 ** 20, repeats: int = 5) -> float | None:
    """Copy bandwidth from GPU `a` to GPU `b` measured here (bytes per second), or None when they
    are not two distinct CUDA devices (nothing to measure: the catalogue's figure stands)."""
    import torch

    if a == b or not (a.startswith("cuda") and b.startswith("cuda")) or not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=a)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=b)
    dst.copy_(src)  # warm-up: peer access set up, clocks up
    torch.cuda.synchronize(a)
    torch.cuda.synchronize(b)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(a)
    torch.cuda.synchronize(b)
    return nbytes * repeats / (time.perf_counter() - start)


def link_between(a: str, b: str) -> str:
    """The link two ranks' devices share: host memory for CPU ranks or one shared GPU."""
    if a == b or not (a.startswith("cuda") and b.startswith("cuda")):
        return "host"
    return "gpu"


def _reference_flops(geo: Geometry) -> float:
    """FLOPs of the measured call: the 14B model at the reference size (batch and clip length as `geo`)."""
    cfg = DiTConfig.wan_s2v_14b()
    return sum(flops_per_call(cfg, geometry(cfg, *_REFERENCE_SIZE, geo.frames_per_clip, 1, geo.batch)).values())
