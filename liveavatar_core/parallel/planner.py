"""Multi-GPU plans: memory per rank, the bottleneck rank, and an FPS / first-frame estimate.

`plan_parallel(...)` lays the denoising steps over the devices (layout.py), then plans every rank as
`plan.py` plans one GPU, for what that rank holds: the whole DiT weights (a step-layout rank runs
every layer), the KV caches of its own steps only, the condition and text caches, and the VAE on
the VAE rank. The process that drives the run (the CLI or ComfyUI) keeps a CUDA context and the
streaming audio encoder on its own GPU, which that rank cannot use. With `offload="auto"` a rank
that does not fit gets the cheapest placement that does (KV caches streamed from pinned host
memory, then block swap), as on one GPU; the pinned buffers of all ranks share the host's memory.

Nothing is read but the config: hardware that is not present is planned from its description
(`hypothetical_devices`), so "will 4 x 24 GB run this size?" has an answer. `validate()` refuses a
plan that does not fit before anything loads, with the fixes that would fit, cheapest first, each
with its memory and speed (cost.py's estimate).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from ..config import DEFAULT_FRAMES_PER_CLIP, DiTConfig
from ..encoders.image import DEFAULT_SIZE, assumed_output_size
from ..errors import InputError
from ..plan import (CONTEXT_BYTES, COMPUTE_DTYPES, DEFAULT_AUDIO_SECONDS, FRAGMENTATION, KV_LOCATIONS, PRECISIONS,
                    DeviceSpec, RunPlan, _auto, _build, _cap_bytes, _choice, check_kv_cache_dtype, host_device)
from ..sizes import BYTES, GiB, audio_encoder_bytes, geometry
from ..weights.vae import TEMPORAL_DOWNSAMPLE
from .cost import (GPUModel, call_seconds, decode_seconds, gpu_for_memory, gpu_model, hop_seconds, link_between,
                   start_seconds)
from .layout import LAYOUTS, LayerLayout, StepLayout, check_shard, layer_layout, step_layout

PARALLEL_OFFLOAD = ("none", "auto")
# Video frames per latent frame (the VAE's temporal stride).
_FRAMES_PER_LATENT = 2 ** sum(TEMPORAL_DOWNSAMPLE)


def hypothetical_devices(count: int, memory_gib: float, label: str = "") -> list[DeviceSpec]:
    """`count` GPUs of `memory_gib` each (usable memory as the driver reports it), for planning
    hardware that is not present; `label` names the model (speed), else it is guessed from the size."""
    if not isinstance(count, int) or count < 1:
        raise InputError("gpu_count", f"must be a positive whole number, got {count!r}.", "give the GPU count, e.g. 4.")
    if not memory_gib or memory_gib <= 0:
        raise InputError("gpu_memory_gib", f"must be positive, got {memory_gib!r}.", "give each GPU's memory, e.g. 24.")
    name = label or f"{gpu_for_memory(memory_gib).name} class ({memory_gib:g} GiB, assumed)"
    return [DeviceSpec(f"cuda:{i}", int(memory_gib * GiB), name) for i in range(count)]


@dataclass(frozen=True)
class RankPlan:
    """What one rank holds (`plan`, a single-device plan) and how long it takes per block."""

    rank: int
    device: DeviceSpec
    plan: RunPlan
    gpu: GPUModel | None  # None: a CPU rank (no speed estimate)
    seconds_per_block: float | None
    reserved_bytes: int = 0  # held by the controlling process on this GPU

    @property
    def required_bytes(self) -> int:
        return self.plan.required_bytes(self.device.name)

    @property
    def budget_bytes(self) -> int | None:
        return self.plan.budget_bytes(self.device.name)

    @property
    def fits(self) -> bool:
        budget = self.budget_bytes
        return budget is None or self.required_bytes <= budget


@dataclass(frozen=True)
class ParallelPlan:
    """A multi-process plan. Build with `plan_parallel`."""

    layout: StepLayout | LayerLayout
    ranks: tuple[RankPlan, ...]
    host: DeviceSpec
    first_frame_s: float | None
    frames_per_block: int
    request: dict = field(repr=False)  # plan_parallel's arguments, to re-plan at another size or with a fix
    notes: tuple[str, ...] = ()

    @property
    def rank_plans(self) -> tuple[RunPlan, ...]:
        """One single-device plan per rank, in rank order (what each worker loads with)."""
        return tuple(r.plan for r in self.ranks)

    @property
    def geometry(self):
        return self.ranks[0].plan.geometry

    @property
    def precision(self) -> str:
        return self.ranks[0].plan.precision

    @property
    def bottleneck(self) -> RankPlan | None:
        """The slowest rank, which sets the pace (None without an estimate)."""
        timed = [r for r in self.ranks if r.seconds_per_block is not None]
        return max(timed, key=lambda r: r.seconds_per_block) if len(timed) == len(self.ranks) else None

    @property
    def fps(self) -> float | None:
        """Estimated steady output frames per second."""
        slow = self.bottleneck
        return None if slow is None else self.frames_per_block / slow.seconds_per_block

    def host_bytes(self) -> int:
        """Pinned host memory of every rank (swapped blocks, streamed KV caches), with fragmentation."""
        return sum(r.plan.required_bytes("cpu") for r in self.ranks if r.device.name != "cpu")

    def shortfall(self) -> list[tuple[str, int, int]]:
        """(what, required, budget) for every rank, shared GPU or host memory that does not fit."""
        out = [(f"rank {r.rank} ({r.device.name})", r.required_bytes, r.budget_bytes) for r in self.ranks
               if not r.fits]
        if self.host.total_bytes and self.host_bytes() > self.host.total_bytes:
            out.append(("host memory", self.host_bytes(), self.host.total_bytes))
        return out

    def fits(self) -> bool:
        return not self.shortfall()

    def validate(self) -> "ParallelPlan":
        """Return self if every rank fits, else raise InputError with the fixes that fit."""
        no_fp8 = [r for r in self.ranks if self.precision == "fp8" and r.gpu is not None and not r.gpu.fp8]
        if no_fp8:
            r = no_fp8[0]
            raise InputError("precision", f"fp8 needs FP8 GEMMs (Ada, Hopper or newer); rank {r.rank} runs on "
                             f"{r.device.label or r.device.name}, which has none.",
                             "use precision bf16, or leave that GPU out.")
        short = self.shortfall()
        if not short:
            return self
        what, need, budget = short[0]
        problem = (f"{what} needs {need / GiB:.1f} GiB, has {budget / GiB:.1f} GiB "
                   f"({self._describe()}: {self.layout.describe()}).")
        raise InputError("memory", problem, self.suggest_fix())

    def replanned(self, height: int, width: int, frames_per_clip: int | None = None, steps: int | None = None,
                  audio_seconds: float | None = None) -> "ParallelPlan":
        """The same devices and settings at another output size (the ranks' steps cannot change)."""
        if steps is not None and steps != self.layout.num_steps:
            raise InputError("sample_steps", f"the model was loaded with {self.layout.num_steps} steps laid over "
                             f"{self.layout.dit_ranks} GPUs; this run asks for {steps}.",
                             f"use sample_steps={self.layout.num_steps}, or load the model again for {steps} steps.")
        changes = {"size": (height, width)}
        if frames_per_clip is not None:
            changes["frames_per_clip"] = frames_per_clip
        if audio_seconds is not None:
            changes["audio_seconds"] = audio_seconds
        return plan_parallel(**{**self.request, **changes})

    def suggest_fix(self) -> str:
        """The changes that make this plan fit, cheapest first, with memory and speed after each."""
        req, fixes = self.request, []
        spare = list(req.get("spare", ()))
        tries = []
        vae_rank = self.ranks[self.layout.vae_rank]
        if not self.layout.dedicated_vae and not vae_rank.fits and spare:
            tries.append((f"put the VAE on its own GPU (vae_gpu {spare[0].name})",
                          {"vae_device": spare[0], "spare": tuple(spare[1:])}))
        if req["precision"] == "bf16" and all(r.gpu is None or r.gpu.fp8 for r in self.ranks):
            tries.append(("use fp8 weights", {"precision": "fp8"}))
        if req["offload"] == "none":
            auto = "offload 'auto' (KV caches streamed from host memory, then block swap)"
            tries.append((f"use {auto}", {"offload": "auto"}))
            if req["precision"] == "bf16":
                tries.append((f"use fp8 weights and {auto}", {"offload": "auto", "precision": "fp8"}))
        if req["precision"] != "fp32" and req["kv_cache_dtype"] != "fp8":
            tries.append(("use kv_cache_dtype 'fp8' (cached keys and values in FP8: results move slightly)",
                          {"kv_cache_dtype": "fp8"}))
        if req["layout"] == "steps" and len(req["devices"]) > 1 and req["vae_device"] is None:
            tries.append(("use the layer layout (each GPU holds a share of the layers: their weights and caches)",
                          {"layout": "layers", "shard": "none"}))
        if req["layout"] == "steps" and len(req["devices"]) > 1 and req["shard"] == "none":
            tries.append(("shard the weights over the GPUs (shard 'fsdp': each holds a share, gathered per call)",
                          {"shard": "fsdp"}))
        most = self.layout.num_steps if req["layout"] == "steps" else req["cfg"].num_layers
        if spare and self.layout.dit_ranks < most:
            more = (*req["devices"], spare[0])
            tries.append((f"add a GPU ({', '.join(d.name for d in more)})",
                          {"devices": more, "spare": tuple(spare[1:])}))
        for words, change in tries:
            try:
                alt = plan_parallel(**{**req, **change})
            except InputError:
                continue
            if alt.fits():
                worst = max(alt.ranks, key=lambda r: r.required_bytes)
                speed = f", about {alt.fps:.1f} FPS" if alt.fps else ""
                fixes.append((-(alt.fps or 0.0),
                              f"{words}: at most {worst.required_bytes / GiB:.1f} GiB per GPU{speed}"))
        # Cheapest first: the fix that keeps the most speed.
        fixes = [text for _, text in sorted(fixes, key=lambda f: f[0])]
        if not fixes:
            fixes.append("use a smaller output size, or GPUs with more memory")
        return "; or ".join(fixes) + "."

    def placement_words(self) -> str:
        """The layout and each rank's placement, for messages and logs."""
        return "; ".join(f"rank {r.rank} ({r.device.name}): {self._rank_words(r)}" for r in self.ranks)

    def _rank_words(self, r: RankPlan) -> str:
        lay = self.layout
        what = []
        if isinstance(lay, LayerLayout):
            owned = lay.layers[r.rank]
            what.append(f"layers {owned.start}-{owned.stop - 1} of every step")
        elif r.rank < lay.dit_ranks:
            owned = lay.steps[r.rank]
            what.append(f"step{'s' if len(owned) > 1 else ''} {','.join(map(str, owned))}")
        if r.rank == lay.vae_rank:
            what.append("VAE")
        words = " + ".join(what)
        if r.plan.has_dit and (r.plan.swapped or r.plan.streamed_kv_layers() or r.plan.shards > 1):
            words += f" ({r.plan.placement_words()})"
        return words

    def _describe(self) -> str:
        g = self.geometry
        return f"{g.width}x{g.height}, {self.precision}, {self.layout.world_size} processes"

    def summary(self) -> str:
        """A readable table: per rank its work, planned memory against its budget, and time per block."""
        shard = ", weights sharded (FSDP)" if self.request["shard"] == "fsdp" else ""
        lines = [f"Parallel plan ({self.request['layout']} layout{shard}): {self._describe()}"]
        fps, slow = self.fps, self.bottleneck
        if fps is not None:
            lines.append(f"  estimate: {fps:.1f} FPS steady (bottleneck rank {slow.rank}, "
                         f"{slow.seconds_per_block:.3f} s per block), first frame after {self.first_frame_s:.2f} s")
        for note in self.notes:
            lines.append(f"  note: {note}")
        for r in self.ranks:
            budget = r.budget_bytes
            has = f" of {budget / GiB:.1f} GiB usable" if budget is not None else ""
            verdict = "" if budget is None else ("  OK" if r.fits else "  DOES NOT FIT")
            speed = f", {r.seconds_per_block:.3f} s per block" if r.seconds_per_block is not None else ""
            gpu = f" [{r.device.label}]" if r.device.label else ""
            lines.append(f"  rank {r.rank} {r.device.name}{gpu}: {self._rank_words(r)}{speed}")
            for i in r.plan.items:
                if i.device == r.plan.dit_device:
                    lines.append(f"    {i.name:<34} {i.bytes / GiB:8.2f} GiB")
            if r.reserved_bytes:
                lines.append(f"    {'controller (CUDA context, wav2vec2)':<34} {r.reserved_bytes / GiB:8.2f} GiB")
            lines.append(f"    {'peak (+' + str(int(FRAGMENTATION * 100)) + '% fragmentation)':<34} "
                         f"{r.required_bytes / GiB:8.2f} GiB{has}{verdict}")
        if self.host_bytes():
            lines.append(f"  host: {self.host_bytes() / GiB:.1f} GiB pinned of {self.host.total_bytes / GiB:.0f} GiB")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able plan: layout, per rank its device, work, memory and time; the estimate."""
        g, slow = self.geometry, self.bottleneck
        return {"layout": self.request["layout"], "shard": self.request["shard"],
                "output_size": [g.width, g.height], "precision": self.precision,
                "world_size": self.layout.world_size, "fits": self.fits(),
                "fps": self.fps, "first_frame_s": self.first_frame_s,
                "bottleneck_rank": None if slow is None else slow.rank, "notes": list(self.notes),
                "host_pinned_bytes": self.host_bytes(), "host_bytes": self.host.total_bytes,
                "placement": self.placement_words(),
                "ranks": [{"rank": r.rank, "device": r.device.name, "gpu": r.device.label,
                           "steps": list(self.layout.part(r.rank)[0]) if r.plan.has_dit else [],
                           "layers": _range_list(r.plan.owned_layers) if r.plan.has_dit else [],
                           "vae": r.rank == self.layout.vae_rank, "seconds_per_block": r.seconds_per_block,
                           "planned_bytes": r.required_bytes, "budget_bytes": r.budget_bytes, "fits": r.fits,
                           "reserved_bytes": r.reserved_bytes, "plan": r.plan.to_dict()} for r in self.ranks]}


def plan_parallel(cfg: DiTConfig, *, devices, size=DEFAULT_SIZE, frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP,
                  steps: int = 4, vae_device: DeviceSpec | None = None, precision: str = "bf16",
                  kv_cache_dtype: str | None = None, kv_cache_location: str = "gpu", offload: str = "auto",
                  memory_cap=None,
                  host: DeviceSpec | None = None, share_gpus: bool = False, layout: str = "steps",
                  controller: str | None = "first", spare=(), audio_seconds: float = DEFAULT_AUDIO_SECONDS,
                  shard: str = "none", link_bps: float | None = None) -> ParallelPlan:
    """Plan a run over `devices` (DeviceSpecs, one DiT rank each; not validated: call `.validate()`).

    size: the output (height, width), or a "W*H" area (planned as for an image of that shape);
    vae_device: a GPU for the VAE alone (None: the last DiT rank); offload: none or auto (per rank,
    the cheapest placement that fits); memory_cap: usable bytes per GPU, or a fraction of each;
    share_gpus: ranks may share a GPU (tests, benchmarks on one GPU: each gets an equal share);
    controller: the device of the process that drives the run ("first": the first rank's; None:
    not on a GPU of this plan); spare: GPUs present but not used, which fixes may suggest;
    shard: "fsdp" shards the block units over the DiT ranks (step layout; `layout.check_shard`),
    their gathers timed over `link_bps` (bytes per second between two GPUs, as `measure_link_bps`
    finds it; None: the catalogue's figure for the GPU model).
    """
    request = dict(cfg=cfg, devices=tuple(devices), size=size, frames_per_clip=frames_per_clip, steps=steps,
                   vae_device=vae_device, precision=precision, kv_cache_dtype=kv_cache_dtype,
                   kv_cache_location=kv_cache_location, offload=offload,
                   memory_cap=memory_cap, host=host, share_gpus=share_gpus, layout=layout, controller=controller,
                   spare=tuple(spare), audio_seconds=audio_seconds, shard=shard, link_bps=link_bps)
    _choice("layout", layout, LAYOUTS)
    check_shard(shard, layout, len(devices))
    _choice("precision", precision, PRECISIONS)
    _choice("offload", offload, PARALLEL_OFFLOAD)
    _choice("kv_cache_location", kv_cache_location, KV_LOCATIONS)
    check_kv_cache_dtype(kv_cache_dtype or "auto", precision)
    devices = tuple(devices)
    everything = devices + ((vae_device,) if vae_device is not None else ())
    names = [d.name for d in devices]
    if layout == "layers":
        lay = layer_layout(names, cfg.num_layers, steps, None if vae_device is None else vae_device.name, share_gpus)
    else:
        lay = step_layout(names, steps, None if vae_device is None else vae_device.name, share_gpus)
    host = host or host_device()
    height, width = assumed_output_size(size) if isinstance(size, str) else (int(size[0]), int(size[1]))
    controller = (devices[0].name if controller == "first" else controller)
    sharing = Counter(d.name for d in everything if d.name.startswith("cuda"))
    notes = []
    labels = {d.label for d in everything if d.name.startswith("cuda")}
    if spare:
        notes.append(f"{', '.join(d.name for d in spare)} not used: the step layout gives each GPU whole steps "
                     f"(at most {steps} DiT GPUs and one for the VAE); a second job can run on "
                     f"{'them' if len(spare) > 1 else 'it'}")
    if len(labels) > 1:
        notes.append(f"mixed GPU models ({', '.join(sorted(labels))}): the slowest sets the pace, and kernels "
                     "may differ between models, so frames are not bit-identical to one GPU")
    ranks = []
    for r, spec in enumerate(everything):
        reserved = 0
        if spec.name.startswith("cuda") and spec.name == controller and r == everything.index(spec):
            reserved = CONTEXT_BYTES + audio_encoder_bytes()
        ranks.append(_rank(cfg, lay, r, spec, sharing[spec.name] or 1, reserved, host, memory_cap, height, width,
                           frames_per_clip, precision, kv_cache_dtype, kv_cache_location, offload, audio_seconds,
                           lay.dit_ranks if shard == "fsdp" else 1, link_bps))
    timed = all(r.gpu is not None for r in ranks)
    first = None
    if timed:
        geo, hidden = ranks[0].plan.geometry, cfg.dim if layout == "layers" else 0
        hops = sum(hop_seconds(geo, link_between(a.name, b.name), _latent_bytes(precision), hidden)
                   for a, b in zip(everything, everything[1:])) * (steps if hidden else 1)
        vae = ranks[lay.vae_rank]
        # The first block passes every rank at every step (hops of the layer layout overlap compute
        # in steady state, not for the first block).
        calls = sum(call_seconds(r.plan, r.gpu, link_bps) * len(lay.part(r.rank)[0]) for r in ranks if r.plan.has_dit)
        first = start_seconds(vae.plan.geometry, vae.gpu) + calls + hops + decode_seconds(vae.plan.geometry, vae.gpu)
    frames_per_block = cfg.num_frames_per_block * _FRAMES_PER_LATENT
    return ParallelPlan(lay, tuple(ranks), host, first, frames_per_block, request, tuple(notes))


def _rank(cfg, lay: StepLayout, r: int, spec: DeviceSpec, sharing: int, reserved: int, host: DeviceSpec, memory_cap,
          height: int, width: int, frames_per_clip: int, precision: str, kv_cache_dtype, kv_cache_location: str,
          offload: str, audio_seconds: float, shards: int, link_bps: float | None) -> RankPlan:
    """One rank's single-device plan, its budget (a share of a shared GPU, less what the controller
    holds there) and its time per block (`shards`: the DiT ranks its block units are sharded over)."""
    is_dit = r < lay.dit_ranks
    steps_here, owned = lay.part(r) if is_dit else ((), None)
    geo = geometry(cfg, height, width, frames_per_clip, len(steps_here) if is_dit else 1)
    on_gpu = spec.name.startswith("cuda")
    budget_spec = replace(spec, total_bytes=spec.total_bytes // sharing - reserved) if on_gpu else spec
    gpu_devices = (budget_spec,) if on_gpu else ()
    cap = _cap_bytes(memory_cap, (spec,)) if on_gpu else None
    layers = cfg.num_layers if owned is None else len(owned)
    plan = _build(cfg, geo, gpu_devices, host, cap, spec.name if on_gpu else "cpu", precision=precision,
                  blocks_on_gpu=layers, kv_layers_on_gpu=0 if on_gpu and kv_cache_location == "cpu" else layers,
                  kv_cache_dtype=kv_cache_dtype, owned=owned,
                  vae="gpu" if r == lay.vae_rank else "none", text_encoder="none", audio_encoder="none",
                  audio_seconds=audio_seconds, has_dit=is_dit, shards=shards if is_dit else 1)
    if offload == "auto" and on_gpu and is_dit and not plan.fits():
        plan = _auto(plan) or plan
    gpu = (gpu_model(spec.label) or gpu_for_memory(spec.total_bytes / GiB)) if on_gpu else None
    seconds = None
    if gpu is not None:
        seconds = len(steps_here) * call_seconds(plan, gpu, link_bps) if is_dit else 0.0
        if r == lay.vae_rank:
            seconds += decode_seconds(geo, gpu)
    return RankPlan(r, spec, plan, gpu, seconds, reserved)


def _range_list(r: range) -> list[int]:
    return [r.start, r.stop]


def _latent_bytes(precision: str) -> int:
    return BYTES[COMPUTE_DTYPES[precision]]


def choose_devices(available, requested: tuple[str, ...] | str, vae_gpu: str | None = None, steps: int = 4,
                   input_name: str = "devices", layout: str = "steps"):
    """(DiT devices, VAE device or None, spare GPUs) from the GPUs present (`available`, DeviceSpecs).

    requested: device names (`parse_devices` forms) or "auto": every GPU present; in the step
    layout at most one DiT rank per step and one more for the VAE (with 5 GPUs the official 4 + 1
    layout), the GPUs left over spare (it has no work for them). "cpu" names a rank on the host."""
    from .layout import parse_devices

    by_name = {d.name: d for d in available}
    if requested == "auto":
        gpus = [d for d in available if d.name.startswith("cuda")]
        if len(gpus) < 2:
            raise InputError(input_name, f"'auto' needs several GPUs; {len(gpus)} {'is' if len(gpus) == 1 else 'are'} "
                             "visible.", "run on one GPU (parallel off), or list the devices.")
        most = len(gpus) if layout == "layers" else steps
        dit = gpus[:most]
        vae = gpus[most] if len(gpus) > most and vae_gpu is None else None
        rest = gpus[len(dit) + (vae is not None):]
    else:
        names = parse_devices(",".join(requested) if not isinstance(requested, str) else requested, input_name)
        dit = [_spec(n, by_name, input_name) for n in names]
        vae, rest = None, [d for d in available if d.name.startswith("cuda") and d.name not in names]
    if vae_gpu is not None:
        vae = _spec(parse_devices(vae_gpu, "vae_gpu")[0], by_name, "vae_gpu")
        rest = [d for d in rest if d.name != vae.name]
    return dit, vae, rest


def _spec(name: str, by_name: dict, input_name: str) -> DeviceSpec:
    if name == "cpu":
        return replace(host_device(), label="CPU")
    if name not in by_name:
        gpus = sorted(n for n in by_name if n.startswith("cuda"))
        have = f"the GPUs are {', '.join(gpus)}" if gpus else "no CUDA GPU is visible"
        raise InputError(input_name, f"{name} does not exist here: {have}.",
                         "list only GPUs this machine has (nvidia-smi, CUDA_VISIBLE_DEVICES), or plan for "
                         "hardware that is not present with --gpu_count and --gpu_memory_gib.")
    return by_name[name]
