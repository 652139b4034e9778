"""Run plan: what goes where, how much memory each device needs, and whether it fits.

`plan_run(...)` is called before anything is loaded (loader node, CLI, benchmarks). It turns the
chosen settings into an itemised estimate per device, computed from exact tensor counts (sizes.py):

* DiT weights; with block swap, the blocks kept resident plus two staging slots; sharded (FSDP),
  the base, this rank's share of the units and two whole units;
* one KV ring per denoising step, on the host when streamed, plus the GPU staging buffers;
* the condition cache and the per-layer text keys/values;
* the activation peak of one block call, the VAE weights, its streaming state and decode peak,
  and the umT5 / wav2vec2 encoders, placed or offloaded independently.

`offload="auto"` picks the placement that fits and moves the fewest bytes per DiT call; it never
changes numerics (precision and KV dtype stay as chosen). `RunPlan.validate()` refuses a plan that
does not fit with the numbers and the cheapest fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from .config import DEFAULT_FRAMES_PER_CLIP, DiTConfig
from .encoders.image import DEFAULT_SIZE, assumed_output_size
from .errors import InputError
from .sizes import (GiB, Geometry, audio_encoder_activation_bytes, audio_encoder_bytes, block_call_activation_bytes,
                    cond_cache_bytes, dit_unit_bytes, flops_per_call, geometry, kv_layer_bytes, sink_activation_bytes,
                    text_cache_bytes, text_encoder_bytes, vae_decode_peak_bytes, vae_decoder_state_bytes,
                    vae_weight_bytes)

# bf16 (official), fp8 (bf16 compute with FP8 GEMMs), fp32 (CPU parity): the name of each
# precision and of the dtype the DiT computes in.
PRECISIONS = ("bf16", "fp8", "fp32")
COMPUTE_DTYPES = {"bf16": "bf16", "fp8": "bf16", "fp32": "fp32"}
OFFLOAD_MODES = ("none", "model", "block_swap", "auto")
KV_LOCATIONS = ("gpu", "cpu")
# KV cache dtype choices: auto = the DiT's compute dtype (exact); fp8 = e4m3 with a scale per head row.
KV_CACHE_DTYPES = ("auto", "fp8")
# gpu: resident for the whole run; offload: kept in host memory, on the GPU only while used;
# cpu: runs on the CPU.
PLACEMENTS = ("gpu", "offload", "cpu")


def vae_compute(precision: str, device: str) -> str:
    """The dtype name the VAE computes in on `device`: the DiT's on a GPU, fp32 on the CPU, where
    PyTorch's bf16 3-D convolutions are about 970x slower than fp32 ones (`bench/cpu_vae_block.py`:
    one 96-channel 3x3x3 conv over 4x64x64, 20.6 s against 0.021 s on 2 EPYC cores)."""
    return "fp32" if device == "cpu" else COMPUTE_DTYPES[precision]


# Phases of a run: the encoders run before generation starts (and, offloaded, leave the GPU).
_ENCODE, _GENERATE, _ALWAYS = "encode", "generate", "always"
# Whole units or KV layers on the GPU at once for block swap, FSDP gathers and the streamed KV
# cache (current + one in flight).
SWAP_SLOTS = 2
KV_STREAM_SLOTS = 2
# Device memory not available to PyTorch's allocator (CUDA context, cuBLAS/cuDNN workspaces).
CONTEXT_BYTES = GiB
# Allocator fragmentation allowance on top of the estimated peak.
FRAGMENTATION = 0.04
# Audio length assumed for the wav2vec2 estimate when none is given (the encoder sees it all at once).
DEFAULT_AUDIO_SECONDS = 60.0

@dataclass(frozen=True)
class DeviceSpec:
    """A device the plan may place work on: `cuda:N` or `cpu`, with its total memory."""

    name: str
    total_bytes: int
    label: str = ""


def detect_devices() -> list[DeviceSpec]:
    """The CUDA devices present (empty on CPU-only machines)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(DeviceSpec(f"cuda:{i}", int(props.total_memory), props.name))
    return out


def host_device() -> DeviceSpec:
    """Host RAM as a device (pinned buffers of block swap and streamed KV caches live there)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return DeviceSpec("cpu", int(total), "host memory")


@dataclass(frozen=True)
class MemoryItem:
    """One line of the estimate: `bytes` on `device` during `phase` (encode, generate or always)."""

    device: str
    name: str
    bytes: int
    phase: str = _ALWAYS
    note: str = ""


def swapped_layers(num_layers: int, blocks_on_gpu: int) -> tuple[int, ...]:
    """Which units are swapped: spread evenly, so each transfer overlaps resident compute."""
    n_swap = num_layers - blocks_on_gpu
    if n_swap <= 0:
        return ()
    return tuple(sorted({int((j + 0.5) * num_layers / n_swap) for j in range(n_swap)}))


@dataclass(frozen=True)
class RunPlan:
    """A resolved placement with its memory estimate. Build with `plan_run`."""

    cfg: DiTConfig
    geometry: Geometry
    precision: str
    offload: str
    blocks_on_gpu: int
    swapped: tuple[int, ...]
    kv_cache_location: str
    kv_layers_on_gpu: int  # all or none: partial residency is not implemented by placement/
    kv_cache_dtype: str
    vae: str
    text_encoder: str
    audio_encoder: str
    dit_device: str
    devices: tuple[DeviceSpec, ...]
    host: DeviceSpec
    memory_cap_bytes: int | None
    items: tuple[MemoryItem, ...]
    note: str = ""
    audio_seconds: float = DEFAULT_AUDIO_SECONDS
    encoder_bytes: tuple[int | None, int | None] = (None, None)  # (umT5, wav2vec2) weights; None = release
    has_dit: bool = True  # False: a pipeline rank that only runs the VAE
    owned: range | None = None  # the DiT layers this plan holds (a layer-layout rank); None: all
    shards: int = 1  # ranks the block units are sharded over (FSDP, placement/fsdp.py); 1: whole
    keep_warm_decoder: bool = False  # the warmed streaming decoder state is kept per picture (decoding.py)

    @property
    def owned_layers(self) -> range:
        return range(self.cfg.num_layers) if self.owned is None else self.owned

    # --- numbers ---------------------------------------------------------------------------

    def device_names(self) -> list[str]:
        names = [d.name for d in self.devices]
        return names + ([self.host.name] if self.host.name not in names else [])

    def peak_bytes(self, device: str) -> int:
        """Estimated allocator peak on `device`: always-resident items + the larger phase."""
        def total(phase):
            return sum(i.bytes for i in self.items if i.device == device and i.phase == phase)
        return total(_ALWAYS) + max(total(_ENCODE), total(_GENERATE))

    def resident_bytes(self, device: str) -> int:
        """Estimated allocation on `device` between runs: the always-resident items (weights)."""
        return sum(i.bytes for i in self.items if i.device == device and i.phase == _ALWAYS)

    def generate_bytes(self, device: str) -> int:
        """Estimated peak during generation only (what a DiT + VAE benchmark measures)."""
        return sum(i.bytes for i in self.items if i.device == device and i.phase in (_ALWAYS, _GENERATE))

    def budget_bytes(self, device: str) -> int | None:
        """Usable bytes on `device` (None: not checked)."""
        spec = next((d for d in (*self.devices, self.host) if d.name == device), None)
        if spec is None or spec.total_bytes <= 0:
            return None
        if device == "cpu":
            return spec.total_bytes
        budget = spec.total_bytes - CONTEXT_BYTES
        if self.memory_cap_bytes is not None:
            budget = min(budget, self.memory_cap_bytes)
        return budget

    def required_bytes(self, device: str) -> int:
        """Peak plus the fragmentation allowance."""
        return int(self.peak_bytes(device) * (1 + FRAGMENTATION))

    def transfer_bytes_per_call(self) -> int:
        """Host-to-GPU bytes one block call moves (swapped weights + streamed KV ring)."""
        if self.dit_device == "cpu":
            return 0
        _, units = dit_unit_bytes(self.cfg, self.precision)
        moved = sum(units[i] for i in self.swapped)
        moved += self.streamed_kv_layers() * kv_layer_bytes(self.cfg, self.geometry, self.kv_cache_dtype)
        return moved

    def gather_bytes_per_call(self) -> int:
        """GPU-to-GPU bytes one block call receives: the other ranks' shares of every unit (FSDP)."""
        if self.shards == 1:
            return 0
        _, units = dit_unit_bytes(self.cfg, self.precision)
        return sum(units) * (self.shards - 1) // self.shards

    def streamed_kv_layers(self) -> int:
        """Layers whose KV rings live in host memory and are streamed to the GPU per call."""
        return len(self.owned_layers) - self.kv_layers_on_gpu

    def flops_per_call(self) -> dict[str, float]:
        return flops_per_call(self.cfg, self.geometry)

    def shortfall(self) -> list[tuple[str, int, int]]:
        """(device, required, budget) for every device that does not fit."""
        out = []
        for name in self.device_names():
            budget = self.budget_bytes(name)
            need = self.required_bytes(name)
            if budget is not None and need > budget:
                out.append((name, need, budget))
        return out

    def fits(self) -> bool:
        return not self.shortfall()

    # --- checks and display ----------------------------------------------------------------

    def validate(self) -> "RunPlan":
        """Return self if every device fits, else raise InputError with the cheapest fix."""
        short = self.shortfall()
        if not short:
            return self
        name, need, budget = short[0]
        problem = f"needs {need / GiB:.1f} GiB on {name}, has {budget / GiB:.1f} GiB ({self._describe()})."
        raise InputError("memory", problem, _suggest_fix(self, name, need))

    def placement_words(self) -> str:
        """The offload choices in words, for messages and logs."""
        sharded = f"block units sharded over {self.shards} ranks (FSDP)" if self.shards > 1 else ""
        if self.dit_device == "cpu":
            return "everything on the CPU (no GPU in this plan)" + (f"; {sharded}" if sharded else "")
        words = [sharded] if sharded else []
        if self.swapped:
            words.append(f"block_swap with {self.blocks_on_gpu} blocks on GPU")
        if self.streamed_kv_layers():
            words.append("kv_cache_location='cpu'")
        if not words:
            off = [n for n, p in (("umT5", self.text_encoder), ("wav2vec2", self.audio_encoder)) if p != "gpu"]
            words.append("DiT, caches and VAE on the GPU" if self.vae == "gpu"
                         else "DiT and caches on the GPU, VAE on the CPU")
            if off:
                words[-1] += f"; {', '.join(off)} off it"
        return " and ".join(words)

    def replanned(self, height: int, width: int, frames_per_clip: int | None = None, steps: int | None = None,
                  audio_seconds: float | None = None) -> "RunPlan":
        """This placement (precision, blocks, caches, encoders) at another output size."""
        g = self.geometry
        geo = geometry(self.cfg, height, width, frames_per_clip or g.frames_per_clip, steps or g.steps, g.batch)
        return _warm_decoder_kept(_rebuild(self, geometry=geo, keep_warm_decoder=False,
                                           **({} if audio_seconds is None else {"audio_seconds": audio_seconds})))

    def _where(self, placement: str) -> str:
        """A placement in device words: "gpu" is the DiT's device (the CPU in a CPU-only plan)."""
        if self.dit_device == "cpu":
            return "cpu"
        return self.dit_device if placement == "gpu" else placement

    def to_dict(self) -> dict:
        """JSON-able plan: output size, placement, and per device the planned peak, budget and items."""
        g = self.geometry
        devices = []
        for name in self.device_names():
            budget = self.budget_bytes(name)
            devices.append({
                "device": name, "planned_bytes": self.required_bytes(name), "peak_bytes": self.peak_bytes(name),
                "budget_bytes": budget, "fits": budget is None or self.required_bytes(name) <= budget,
                "items": [{"name": i.name, "bytes": i.bytes, "phase": i.phase, "note": i.note}
                          for i in self.items if i.device == name]})
        return {"output_size": [g.width, g.height], "frames_per_clip": g.frames_per_clip, "steps": g.steps,
                "precision": self.precision, "kv_cache_dtype": self.kv_cache_dtype,
                "kv_cache_location": self._where(self.kv_cache_location), "blocks_on_gpu": self.blocks_on_gpu,
                "swapped_blocks": list(self.swapped), "dit_device": self.dit_device, "vae": self._where(self.vae),
                "text_encoder": self._where(self.text_encoder), "audio_encoder": self._where(self.audio_encoder),
                "placement": self.placement_words(), "transfer_bytes_per_call": self.transfer_bytes_per_call(),
                "shards": self.shards, "gather_bytes_per_call": self.gather_bytes_per_call(),
                "fits": self.fits(), "note": self.note, "devices": devices}

    def _describe(self) -> str:
        g = self.geometry
        parts = [f"{g.width}x{g.height}", self.precision]
        if self.swapped:
            parts.append(f"block swap {self.blocks_on_gpu}/{self.cfg.num_layers} blocks on GPU")
        where = "cpu" if self.dit_device == "cpu" else self.kv_cache_location
        parts.append(f"KV cache {self.kv_cache_dtype} on {where}")
        if self.memory_cap_bytes is not None:
            parts.append(f"cap {self.memory_cap_bytes / GiB:.1f} GiB")
        return ", ".join(parts)

    def summary(self) -> str:
        """A readable table: every item per device, totals against the budget."""
        g = self.geometry
        if self.dit_device == "cpu":
            where = "DiT, VAE, umT5 and wav2vec2 on cpu"
        else:
            where = (f"DiT on {self.dit_device}; VAE {self.vae}; umT5 {self.text_encoder}; "
                     f"wav2vec2 {self.audio_encoder}")
        lines = [f"Run plan: {self._describe()}; {where}",
                 f"  tokens/frame {g.tokens_per_frame}, block {g.block_tokens}, KV ring {g.cache_tokens}, "
                 f"condition {g.cond_tokens}; {self.flops_per_call()['linear'] / 1e12 + self.flops_per_call()['attention'] / 1e12:.1f} "
                 f"TFLOP per block call; host->GPU per call {self.transfer_bytes_per_call() / GiB:.2f} GiB"]
        if self.note:
            lines.append(f"  {self.note}")
        for name in self.device_names():
            items = [i for i in self.items if i.device == name]
            if not items:
                continue
            lines.append(f"  {name}:")
            for i in items:
                phase = "" if i.phase == _ALWAYS else f" [{i.phase}]"
                note = f"  ({i.note})" if i.note else ""
                lines.append(f"    {i.name:<34} {i.bytes / GiB:8.2f} GiB{phase}{note}")
            budget = self.budget_bytes(name)
            has = f" of {budget / GiB:.1f} GiB usable" if budget is not None else ""
            verdict = "" if budget is None else ("  OK" if self.required_bytes(name) <= budget else "  DOES NOT FIT")
            lines.append(f"    {'peak (+' + str(int(FRAGMENTATION * 100)) + '% fragmentation)':<34} "
                         f"{self.required_bytes(name) / GiB:8.2f} GiB{has}{verdict}")
        return "\n".join(lines)


def _suggest_fix(plan: RunPlan, device: str, need: int) -> str:
    if plan.dit_device == "cpu":
        return ("free host memory, use a smaller output size" + (" or bf16 instead of fp32" if plan.precision == "fp32"
                else "") + ", or run on a GPU.")
    fixes = []
    best = _auto(plan)
    fp8 = _rebuild(plan, precision="fp8") if plan.precision == "bf16" else None
    if fp8 is not None and fp8.fits():
        saved = plan.peak_bytes(device) - fp8.peak_bytes(device)
        fixes.append(f"use fp8 (saves {saved / GiB:.1f} GiB)")
    if best is not None:
        fixes.append(f"use {best.placement_words()} (offload='auto' picks it)")
    elif fp8 is not None:
        best8 = _auto(fp8)
        if best8 is not None:
            fixes.append(f"use fp8 with {best8.placement_words()}")
    if plan.precision != "fp32" and plan.kv_cache_dtype != "fp8":
        fp8_kv = _rebuild(plan, kv_cache_dtype="fp8")
        if fp8_kv.fits():
            saved = plan.peak_bytes(device) - fp8_kv.peak_bytes(device)
            fixes.append(f"use kv_cache_dtype='fp8' (saves {saved / GiB:.1f} GiB; cached keys and values in FP8)")
    if not fixes:
        fixes.append("use a smaller output size or a GPU with more memory")
    return " or ".join(fixes) + "."


def _rebuild(plan: RunPlan, geometry: Geometry | None = None, **changes) -> RunPlan:
    args = dict(precision=plan.precision, blocks_on_gpu=plan.blocks_on_gpu,
                kv_layers_on_gpu=plan.kv_layers_on_gpu, kv_cache_dtype="fp8" if plan.kv_cache_dtype == "fp8" else None,
                vae=plan.vae, text_encoder=plan.text_encoder, audio_encoder=plan.audio_encoder,
                audio_seconds=plan.audio_seconds, encoder_bytes=plan.encoder_bytes, has_dit=plan.has_dit,
                owned=plan.owned, shards=plan.shards, keep_warm_decoder=plan.keep_warm_decoder)
    args.update(changes)
    return _build(plan.cfg, geometry or plan.geometry, plan.devices, plan.host, plan.memory_cap_bytes,
                  plan.dit_device, **args)


def _auto(plan: RunPlan) -> RunPlan | None:
    """The fitting placement with the fewest host->GPU bytes per call (numerics unchanged).

    Streaming the KV rings frees `steps` rings on the GPU for one ring moved per call, swapping a
    block frees its weights for the same bytes moved: so stream the KV cache first and swap blocks
    only when that is not enough. Encoders leave the GPU after use, or run on the CPU when even
    that does not fit.
    """
    layers = len(plan.owned_layers)
    best = None
    for enc_rank, enc in enumerate(("offload", "cpu")):
        text = plan.text_encoder if plan.text_encoder in ("cpu", "none") else enc
        audio = plan.audio_encoder if plan.audio_encoder in ("cpu", "none") else enc
        options = [dict(blocks_on_gpu=layers, kv_layers_on_gpu=k) for k in (layers, 0)]
        if plan.shards == 1:  # sharded units are gathered, never swapped
            options += [dict(blocks_on_gpu=n, kv_layers_on_gpu=0) for n in range(layers - 1, -1, -1)]
        for opt in options:
            cand = _rebuild(plan, text_encoder=text, audio_encoder=audio, **opt)
            if cand.fits():
                key = (cand.transfer_bytes_per_call(), enc_rank)
                if best is None or key < best[0]:
                    best = (key, cand)
                break
    return None if best is None else best[1]


def _offloaded(placement: str) -> str:
    return "offload" if placement == "gpu" else placement


def plan_run(cfg: DiTConfig, *, size: str | tuple[int, int] = DEFAULT_SIZE,
             frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP,
             steps: int = 4, batch: int = 1, devices: list[DeviceSpec] | None = None,
             host: DeviceSpec | None = None, precision: str = "bf16", offload: str = "none",
             blocks_on_gpu: int | None = None, kv_cache_location: str = "gpu", kv_cache_dtype: str | None = None, vae: str = "gpu", text_encoder: str = "gpu",
             audio_encoder: str = "gpu", memory_cap: float | int | None = None,
             audio_seconds: float = DEFAULT_AUDIO_SECONDS,
             encoder_bytes: tuple[int | None, int | None] = (None, None), shards: int = 1) -> RunPlan:
    """Resolve settings into a `RunPlan` (not validated: call `.validate()`).

    size: the output (height, width) in pixels, as `encoders.image.choose_output_size` picks it
    for the reference image; or a "W*H" area string when the image is not known yet, planned as
    for an image of that shape (`assumed_output_size`); devices: the GPUs
    (default: detected; empty = CPU-only plan); memory_cap: usable bytes per GPU (int) or a
    fraction of its memory (float <= 1), as `torch.cuda.set_per_process_memory_fraction` imposes;
    offload: none, model (encoders leave the GPU after use), block_swap (also keep only
    `blocks_on_gpu` DiT blocks resident) or auto (the cheapest fitting placement);
    kv_cache_location "cpu" keeps the KV rings in pinned host memory and streams them layer by
    layer ahead of use; encoder_bytes: the (umT5, wav2vec2) weight bytes read from their file
    headers (None: the release encoders); kv_cache_dtype: None or "auto" (the compute dtype) or "fp8";
    shards: the block units sharded over that many ranks (FSDP; the plan of one of them).
    """
    _choice("precision", precision, PRECISIONS)
    check_kv_cache_dtype(kv_cache_dtype or "auto", precision)
    _choice("offload", offload, OFFLOAD_MODES)
    _choice("kv_cache_location", kv_cache_location, KV_LOCATIONS)
    for name, value in (("vae", vae), ("text_encoder", text_encoder), ("audio_encoder", audio_encoder)):
        _choice(name, value, PLACEMENTS)
    height, width = assumed_output_size(size) if isinstance(size, str) else (int(size[0]), int(size[1]))
    geo = geometry(cfg, height, width, frames_per_clip, steps, batch)
    devices = tuple(detect_devices() if devices is None else devices)
    host = host or host_device()
    dit_device = devices[0].name if devices else "cpu"
    cap = _cap_bytes(memory_cap, devices)
    layers = cfg.num_layers
    if blocks_on_gpu is not None and (not isinstance(blocks_on_gpu, int) or not 0 <= blocks_on_gpu <= layers):
        raise InputError("blocks_on_gpu", f"{blocks_on_gpu!r} is outside 0..{layers}.",
                         f"use a count between 0 and {layers}.")
    if offload == "block_swap" and blocks_on_gpu is None:
        raise InputError("blocks_on_gpu", "block_swap needs the number of blocks to keep on the GPU.",
                         "set blocks_on_gpu, or use offload='auto'.")
    if offload in ("none", "model") and blocks_on_gpu not in (None, layers):
        raise InputError("blocks_on_gpu", f"{blocks_on_gpu} blocks on the GPU needs offload='block_swap'.",
                         "set offload='block_swap' (or 'auto').")
    if not devices and (kv_cache_location == "cpu" or offload == "block_swap"):
        raise InputError("offload", "block swap and KV streaming move data between host and GPU; "
                         "this plan has no GPU.", "use offload='none' and kv_cache_location='gpu' on CPU.")
    if offload == "model":
        text_encoder, audio_encoder = _offloaded(text_encoder), _offloaded(audio_encoder)
    n_blocks = blocks_on_gpu if offload == "block_swap" else layers
    n_kv = layers if kv_cache_location == "gpu" else 0
    plan = _build(cfg, geo, devices, host, cap, dit_device, precision=precision, blocks_on_gpu=n_blocks,
                  kv_layers_on_gpu=n_kv, kv_cache_dtype=kv_cache_dtype, vae=vae, text_encoder=text_encoder,
                  audio_encoder=audio_encoder, audio_seconds=audio_seconds, encoder_bytes=encoder_bytes,
                  shards=shards)
    if offload != "auto" or not devices:
        return _warm_decoder_kept(plan)
    if plan.fits():
        return replace(_warm_decoder_kept(plan), note="auto: fits without offload")
    best = _auto(plan)
    if best is None:
        return replace(plan, note="auto: no placement fits")
    return replace(_warm_decoder_kept(best), note=f"auto: {best.placement_words()}")


def _warm_decoder_kept(plan: RunPlan) -> RunPlan:
    """`plan` keeping the warmed decoder state per picture where that still fits: a second video
    of a picture then starts without the decoder's warm-up (time to first frame)."""
    if plan.vae == "none" or not plan.has_dit or not plan.fits():
        return plan
    kept = _rebuild(plan, keep_warm_decoder=True)
    return kept if kept.fits() else plan


def _build(cfg: DiTConfig, geo: Geometry, devices: tuple[DeviceSpec, ...], host: DeviceSpec, cap: int | None,
           dit_device: str, *, precision: str, blocks_on_gpu: int, kv_layers_on_gpu: int,
           kv_cache_dtype: str | None, vae: str, text_encoder: str, audio_encoder: str,
           audio_seconds: float = DEFAULT_AUDIO_SECONDS,
           encoder_bytes: tuple[int | None, int | None] = (None, None), has_dit: bool = True,
           owned: range | None = None, shards: int = 1, keep_warm_decoder: bool = False) -> RunPlan:
    """The itemised plan. A pipeline rank (parallel/planner.py) plans its own steps (`geo.steps`) or
    layers (`owned`: their weights and their share of every cache; `blocks_on_gpu` and
    `kv_layers_on_gpu` then count owned layers), and `vae` / `text_encoder` / `audio_encoder` "none"
    or `has_dit` False for what runs elsewhere; `shards` > 1: the block units sharded over that many
    ranks (each holds its share and two whole units while gathering)."""
    check_kv_cache_dtype(kv_cache_dtype or "auto", precision)
    if dit_device == "cpu":  # one memory: an encoder "offloaded" to the host is just on the CPU
        text_encoder, audio_encoder = "cpu", "cpu"
    compute = COMPUTE_DTYPES[precision]
    kv_dtype = "fp8" if kv_cache_dtype == "fp8" else compute
    gpu, cpu = dit_device, "cpu"
    layers = cfg.num_layers
    mine = range(layers) if owned is None else owned
    swapped = tuple(mine[i] for i in swapped_layers(len(mine), blocks_on_gpu)) if shards == 1 else ()
    base, units = dit_unit_bytes(cfg, precision)
    items = []
    streamed = len(mine) - kv_layers_on_gpu if has_dit else 0
    if has_dit:
        if shards > 1:
            items.append(MemoryItem(gpu, "DiT weights (base + shards)", base + -(-sum(units) // shards),
                                    note=f"1/{shards} of {layers} blocks, {precision}"))
            items.append(MemoryItem(gpu, "FSDP gathered units", SWAP_SLOTS * max(units), note=f"{SWAP_SLOTS} units"))
        else:
            items.append(MemoryItem(gpu, "DiT weights (resident)",
                                    base + sum(units[i] for i in mine if i not in swapped),
                                    note=f"{len(mine) - len(swapped)} of {layers} blocks, {precision}"))
        if swapped:
            slot = max(units[i] for i in swapped)
            items.append(MemoryItem(gpu, "block swap staging", SWAP_SLOTS * slot, note=f"{SWAP_SLOTS} slots"))
            items.append(MemoryItem(cpu, "swapped DiT blocks (pinned)", sum(units[i] for i in swapped),
                                    note=f"{len(swapped)} blocks"))
        ring = kv_layer_bytes(cfg, geo, kv_dtype)
        if kv_layers_on_gpu:
            items.append(MemoryItem(gpu, "KV caches", geo.steps * kv_layers_on_gpu * ring, _GENERATE,
                                    f"{geo.steps} steps x {kv_layers_on_gpu} layers x {ring / GiB:.3f} GiB"))
        if streamed:
            items.append(MemoryItem(cpu, "KV caches (pinned)", geo.steps * streamed * ring, _GENERATE,
                                    f"{geo.steps} steps x {streamed} layers"))
            items.append(MemoryItem(gpu, "KV streaming staging", KV_STREAM_SLOTS * ring, _GENERATE,
                                    f"{KV_STREAM_SLOTS} layers"))
        items.append(MemoryItem(gpu, "condition cache", cond_cache_bytes(cfg, geo, compute) // layers * len(mine),
                                _GENERATE,
                                f"{geo.cond_tokens} tokens"))
        rows = 2 * len(mine) + 1  # each layer's keys and values, and the embedded prompt
        items.append(MemoryItem(gpu, "text keys/values", text_cache_bytes(cfg, geo, compute) // (2 * layers + 1) * rows,
                                _GENERATE))
        items.append(MemoryItem(gpu, "activations (block call)",
                                max(block_call_activation_bytes(cfg, geo, precision, kv_dtype),
                                    sink_activation_bytes(cfg, geo, precision)), _GENERATE))
    if vae != "none":
        # On the DiT's GPU a block's decode runs on its own stream while the next block is sampled:
        # both transients count.
        vae_dev = gpu if vae == "gpu" else cpu
        vae_dtype = vae_compute(precision, vae_dev)
        items.append(MemoryItem(vae_dev, "VAE weights", vae_weight_bytes(dtype=vae_dtype)))
        items.append(MemoryItem(vae_dev, "VAE streaming state",
                                vae_decoder_state_bytes(geo.height, geo.width, dtype=vae_dtype, batch=geo.batch),
                                _GENERATE))
        items.append(MemoryItem(vae_dev, "VAE decode activations",
                                vae_decode_peak_bytes(geo.height, geo.width, dtype=vae_dtype, batch=geo.batch,
                                                      taps=vae == "gpu"), _GENERATE))
        if keep_warm_decoder:
            items.append(MemoryItem(vae_dev, "VAE warmed state (per picture)",
                                    vae_decoder_state_bytes(geo.height, geo.width, dtype=vae_dtype, batch=geo.batch),
                                    note="kept for the next video of the picture"))
    text_bytes, audio_bytes = encoder_bytes
    for name, placement, weights, act in (
            ("umT5 encoder", text_encoder, text_bytes or text_encoder_bytes(), 0),
            ("wav2vec2 encoder", audio_encoder, audio_bytes or audio_encoder_bytes(),
             audio_encoder_activation_bytes(audio_seconds))):
        if placement == "none":
            continue
        if placement == "gpu":
            items.append(MemoryItem(gpu, name, weights))
        else:
            items.append(MemoryItem(cpu, name + " (host)", weights))
            if placement == "offload":
                items.append(MemoryItem(gpu, name + " (while encoding)", weights, _ENCODE))
        if act:
            items.append(MemoryItem(gpu if placement != "cpu" else cpu, name + " activations", act, _ENCODE))
    if dit_device == "cpu":
        items = [replace(i, device="cpu") for i in items]
    return RunPlan(cfg, geo, precision, "block_swap" if swapped else "none", blocks_on_gpu, swapped,
                   "cpu" if streamed else "gpu", kv_layers_on_gpu, kv_dtype, vae, text_encoder, audio_encoder,
                   dit_device, devices, host, cap, tuple(items), audio_seconds=audio_seconds,
                   encoder_bytes=encoder_bytes, has_dit=has_dit, owned=owned, shards=shards,
                   keep_warm_decoder=keep_warm_decoder)


def _cap_bytes(memory_cap, devices) -> int | None:
    if memory_cap is None:
        return None
    if isinstance(memory_cap, float) and 0 < memory_cap <= 1:
        if not devices:
            raise InputError("memory_cap", "a fractional cap needs a GPU to take the fraction of.",
                             "give the cap in bytes, or leave it unset on CPU.")
        return int(memory_cap * devices[0].total_bytes)
    if memory_cap <= 0:
        raise InputError("memory_cap", f"must be positive, got {memory_cap}.", "give bytes or a fraction in (0, 1].")
    return int(memory_cap)


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise InputError(name, f"unknown value {value!r}.", f"choose one of {', '.join(options)}.")



def check_kv_cache_dtype(choice: str | None, precision: str) -> None:
    """Refuse an unknown KV cache dtype, or FP8 rings for an fp32 DiT (they dequantise to bf16)."""
    _choice("kv_cache_dtype", choice, KV_CACHE_DTYPES)
    if choice == "fp8" and COMPUTE_DTYPES.get(precision) != "bf16":
        raise InputError("kv_cache_dtype", f"an FP8 KV cache needs a bf16 or fp8 DiT; this one computes in "
                         f"{precision}.", "use kv_cache_dtype 'auto' with fp32, or precision bf16/fp8.")
