"""Everything a run needs checked before a weight is read: the preflight of `generate` and `plan`.

`preflight(RunRequest(...))` validates every setting, the checkpoint folder (its config and
tensor headers only), the LoRA path, the GPU's abilities, the reference image and the audio, picks
the output size the image search gives for that image, and plans the memory per device at that
size. It reads no weight, so a wrong setting fails in about a second instead of after the
encoders and the DiT have loaded. `python -m liveavatar_core plan` prints its result.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .config import DEFAULT_FRAMES_PER_CLIP
from .encoders.audio import SAMPLE_RATE, check_audio_length
from .encoders.audio_stream import check_audio_source, expected_samples
from .encoders.image import DEFAULT_SIZE, choose_output_size, describe_output_size, load_image
from .errors import InputError, LiveAvatarError
from .health import DEFAULT_HEALTH, check_health
from .loading import OfficialFolder, compute_dtype, official_folder, plan_for_device, resolve_compile
from .ops.attention import get_attention
from .ops.fp8 import check_fp8_support
from .pipeline import GenerationSettings
from .parallel.cost import measure_link_bps
from .parallel.layout import check_shard, step_layout
from .parallel.planner import ParallelPlan, choose_devices, plan_parallel
from .plan import DeviceSpec, RunPlan, check_kv_cache_dtype, detect_devices
from .sampling.config import OFFICIAL_STEPS
from .weights.check import check_run_files
from .weights.dit import load_dit_checkpoint
from .weights.io import open_checkpoint
from .weights.layout import LORA_FILE, LORA_REPO, WAV2VEC2_WEIGHT_FILES

log = logging.getLogger("liveavatar")



@dataclass(frozen=True)
class RunRequest:
    """The arguments of one `generate` run (the CLI's flags, in core names)."""

    ckpt_dir: Path
    image: object
    audio: object
    prompt: str = ""
    lora: Path | None = None
    size: str = DEFAULT_SIZE
    num_clip: int = 0
    infer_frames: int = DEFAULT_FRAMES_PER_CLIP
    sample_steps: int = OFFICIAL_STEPS
    seed: int = 420
    mode: str = "streaming"
    online_decode: bool = False
    device: str = "cpu"
    precision: str = "bf16"
    attention: str = "sdpa"
    offload: str = "none"
    blocks_on_gpu: int | None = None
    kv_cache_location: str = "gpu"
    kv_cache_dtype: str = "auto"
    compile: str = "auto"
    t5_cpu: bool = False
    devices: tuple[str, ...] | str = ()  # several: one worker process per DiT rank; "auto": every GPU
    vae_gpu: str | None = None  # a device for the VAE alone (parallel runs)
    layout: str = "steps"
    shard: str = "none"  # "fsdp": the DiT's block units sharded over the DiT ranks (step layout)
    attach: tuple[str, int] | None = None  # wait there for ranks launched elsewhere (torchrun)
    health: str = DEFAULT_HEALTH  # per-block health checks: health.HEALTH_MODES

    @property
    def parallel(self) -> bool:
        """Whether the run uses worker processes (several devices, the VAE on its own, or attached ranks)."""
        return self.devices == "auto" or len(self.devices) > 1 or self.vae_gpu is not None or self.attach is not None


@dataclass
class Preflight:
    """A validated run: its settings, files, output size and memory plan; nothing loaded."""

    request: RunRequest
    settings: GenerationSettings
    folder: OfficialFolder
    image_size: tuple[int, int]  # (W, H) of the reference image
    output_size: tuple[int, int]  # (H, W) of the video
    audio_seconds: float | None  # from the container's header (None: it declares no length)
    plan: RunPlan | ParallelPlan
    warnings: list[str] = field(default_factory=list)
    authkey: bytes | None = None  # what attached ranks present (LIVEAVATAR_AUTHKEY)

    @property
    def device(self) -> str:
        """Where this process runs the encoders: the DiT's device, or the first rank's."""
        if isinstance(self.plan, ParallelPlan):
            first = self.plan.ranks[0].device.name
            return first if first.startswith("cuda") else "cpu"
        return self.request.device

    @property
    def text_device(self) -> str:
        return "cpu" if self.request.t5_cpu else self.device

    def to_dict(self) -> dict:
        """The plan as JSON (`output_size` is [width, height]) plus the inputs it was made for."""
        out = self.plan.to_dict()
        out.update(image_size=list(self.image_size),
                   audio_seconds=None if self.audio_seconds is None else round(self.audio_seconds, 3),
                   size=self.settings.size, warnings=list(self.warnings))
        return out

    def log(self, table: bool = True) -> None:
        """Log the size, the plan table (the one the loader node logs) and every warning."""
        line, _ = describe_output_size(self.image_size, self.settings.size, self.output_size)
        log.info(line)
        if table:
            log.info("%s", self.plan.summary())
        for warning in self.warnings:
            log.warning(warning)


def _weight_bytes(path: Path, precision: str) -> int | None:
    """Bytes of an encoder's weights in the compute dtype, from its file's header (None: unreadable
    here; the planner then assumes the release encoder and the loader reports the file)."""
    if path.is_dir():
        path = next((path / n for n in WAV2VEC2_WEIGHT_FILES if (path / n).is_file()), path)
    try:
        shapes = open_checkpoint(path, "ckpt_dir").shapes()
    except (LiveAvatarError, OSError):
        return None
    return sum(math.prod(s) for s in shapes.values()) * compute_dtype(precision).itemsize


def check_device(name: str) -> torch.device:
    """The device the DiT runs on; refuse a GPU this machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError("device", f"'{name}' is not a device name.", "use cuda, cuda:N or cpu.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError("device", f"'{name}' was asked for, but PyTorch sees no CUDA GPU.",
                             "use --device cpu, or install a CUDA build of PyTorch.")
        if device.index is not None and device.index >= count:
            raise InputError("device", f"'{name}' does not exist; this machine has {count} CUDA GPU(s).",
                             f"use cuda:0..cuda:{count - 1}.")
    elif device.type != "cpu":
        raise InputError("device", f"'{name}' is neither a CUDA GPU nor the CPU.", "use cuda, cuda:N or cpu.")
    return device


def preflight(req: RunRequest, check_memory: bool = True, hardware: list[DeviceSpec] | None = None) -> Preflight:
    """Validate `req` completely and plan it at the real output size, reading no weight.

    check_memory: refuse a plan that does not fit (False: return it, `plan.fits()` tells);
    hardware: plan a parallel run for these GPUs instead of the ones present (`hypothetical_devices`).
    """
    # 1. Settings, in the order a user reads them on the command line.
    settings = GenerationSettings(size=req.size, seed=req.seed, num_clips=req.num_clip,
                                  frames_per_clip=req.infer_frames, sample_steps=req.sample_steps, mode=req.mode,
                                  online_decode=req.online_decode)
    if hardware is not None and not req.parallel:  # described GPUs without a choice among them: all
        req = replace(req, devices="auto")
    authkey = _attach_authkey(req, hardware)
    devices = None  # (DiT ranks, VAE rank or None, spare GPUs) of a parallel run
    ranks = [req.device]
    if req.parallel:
        devices = choose_devices(detect_devices() if hardware is None else hardware, req.devices or (req.device,),
                                 req.vae_gpu, req.sample_steps, layout=req.layout)
        ranks = [d.name for d in devices[0] + [devices[1]] if d is not None]
        if req.layout == "steps":  # its refusals first (the layer layout's need the DiT's layer count)
            step_layout(ranks[:len(devices[0])], req.sample_steps, devices[1] and devices[1].name)
    check_shard(req.shard, req.layout, len(devices[0]) if devices else 1)
    device = torch.device("cpu") if hardware is not None else check_device(ranks[0])
    compute_dtype(req.precision)
    check_kv_cache_dtype(req.kv_cache_dtype, req.precision)
    if req.precision == "fp8" and hardware is None:
        for name in ranks:
            check_fp8_support(torch.device(name))
    get_attention(req.attention)
    resolve_compile(req.compile, device)
    req = replace(req, health=check_health(req.health))  # "auto" resolved once, warned once
    # 2. Inputs: the image decides the output size, the audio the length.
    image = load_image(req.image)
    output = choose_output_size(image.size, settings.size)
    check_audio_source(req.audio)  # decoded later, as a stream
    samples = expected_samples(req.audio)
    audio_seconds = None if samples is None else samples / SAMPLE_RATE
    if audio_seconds is not None:
        check_audio_length(audio_seconds, settings.fps)
    # 3. Files: the folder's parts, then every file's headers and sizes (a Hugging Face id given as
    #    the LoRA is named as one, with what to download), the DiT's config (no tensor data).
    folder = official_folder(req.ckpt_dir)
    check_run_files(folder.dit, lora_path=req.lora, vae_path=folder.vae, t5_path=folder.t5,
                    wav2vec2_path=folder.wav2vec2)
    cfg = load_dit_checkpoint(folder.dit).config
    # 4. Memory at that size, refused with the cheapest fix.
    if devices is not None:
        plan = _parallel_plan(req, cfg, output, devices, check_memory, measure_link=hardware is None)
    else:
        plan = plan_for_device(cfg, device, precision=req.precision, offload=req.offload,
                               blocks_on_gpu=req.blocks_on_gpu, kv_cache_location=req.kv_cache_location,
                               kv_cache_dtype=req.kv_cache_dtype, size=output, frames_per_clip=req.infer_frames,
                               # wav2vec2 encodes in windows now: its estimate keeps the planner's default length.
                               steps=req.sample_steps,
                               # The CLI encodes on the DiT's GPU and frees the encoders before loading it.
                               text_encoder="cpu" if req.t5_cpu else "offload", audio_encoder="offload",
                               encoder_bytes=(_weight_bytes(folder.t5, req.precision),
                                              _weight_bytes(folder.wav2vec2, req.precision)),
                               validate=check_memory)
    warnings = []
    _, small = describe_output_size(image.size, settings.size, output)
    if small:
        warnings.append(small)
    if req.sample_steps != OFFICIAL_STEPS:
        warnings.append(f"--sample_steps {req.sample_steps}: the distilled Live Avatar model was made for "
                        f"{OFFICIAL_STEPS} steps; other counts run, but are not what it was trained for "
                        "(expect worse pictures, and slower ones with more steps).")
    if device.type == "cpu" and req.offload in ("auto", "model"):
        warnings.append("--offload_model True on the CPU: there is no GPU memory to save, so nothing is "
                        "offloaded; the DiT, its caches, the VAE and the encoders all run in host memory.")
    if req.lora is None:
        warnings.append("no --lora_path_dmd: the base Wan2.2-S2V model is not the 4-step distilled Live Avatar "
                        f"model; pass {LORA_FILE} from {LORA_REPO}.")
    return Preflight(req, settings, folder, image.size, output, audio_seconds, plan, warnings, authkey)


def _attach_authkey(req: RunRequest, hardware) -> bytes | None:
    """The authkey attached ranks must present; refuse what an attached run cannot plan."""
    if req.attach is None:
        return None
    key = os.environ.get("LIVEAVATAR_AUTHKEY", "")
    try:
        authkey = bytes.fromhex(key)
    except ValueError:
        authkey = b""
    if len(authkey) < 16:
        raise InputError("attach", "attached ranks prove themselves with a shared key; LIVEAVATAR_AUTHKEY holds "
                         "none (or one shorter than 32 hex digits).",
                         "export LIVEAVATAR_AUTHKEY=$(python -c 'import secrets; print(secrets.token_hex(32))') "
                         "here and where the ranks are launched.")
    names = req.devices if isinstance(req.devices, tuple) else ()
    if hardware is None and (req.devices == "auto" or any(n != "cpu" for n in names)):
        raise InputError("attach", "the GPUs of attached ranks are not visible here, so the memory plan needs "
                         "them described.", "add --gpu_memory_gib G (and --gpu_model NAME) for them, and list the "
                         "ranks with --devices cuda:0,...")
    return authkey


def _link_bps(req: RunRequest, dit) -> float | None:
    """The GPU-to-GPU bandwidth FSDP's gathers run at, measured between the first two DiT GPUs
    when they are here (None: planned from the GPU model)."""
    if req.shard != "fsdp" or len(dit) < 2 or not all(d.name.startswith("cuda") for d in dit[:2]):
        return None
    return measure_link_bps(dit[0].name, dit[1].name)


def _parallel_plan(req: RunRequest, cfg, output: tuple[int, int], devices, check_memory: bool,
                   measure_link: bool) -> ParallelPlan:
    """The multi-process plan; this process (the controller) encodes on the first rank's GPU;
    `measure_link`: the GPUs are present (not described), so their link can be measured."""
    if req.offload == "block_swap":
        raise InputError("blocks_on_gpu", "a parallel run places each rank itself.",
                         "leave --blocks_on_gpu out; --offload_model True lets every rank offload what it must.")
    dit, vae, spare = devices
    plan = plan_parallel(cfg, devices=dit, vae_device=vae, spare=spare, size=output, frames_per_clip=req.infer_frames,
                         steps=req.sample_steps, precision=req.precision,
                         kv_cache_dtype=req.kv_cache_dtype, kv_cache_location=req.kv_cache_location,
                         offload="auto" if req.offload != "none" else "none",
                         layout=req.layout, shard=req.shard, link_bps=_link_bps(req, dit) if measure_link else None)
    return plan.validate() if check_memory else plan
