"""Loading the generator (DiT + LoRA + optional FP8, VAE) as ordered, documented steps.

Order, as in the official pipeline (spec/pipeline.md 1.2): base weights -> LoRA merge (fp32,
rounded once) -> FP8 conversion -> placement -> compilation. Each step is a function of its own
(`new_dit`, `prepare_dit`, `prepare_vae`, `assemble`) that `load_generator` and the benchmark
(random weights) both run, so the measured model is the product's. Every input is validated,
and the run plan checked, before any tensor is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import DEFAULT_FRAMES_PER_CLIP
from .encoders.image import DEFAULT_SIZE
from .errors import InputError, WeightsError
from .model.dit import LiveAvatarDiT, unit_of
from .ops.attention import get_attention
from .ops.fp8 import check_fp8_support, convert_to_fp8
from .ops.transfer import cuda_index
from .pipeline import LiveAvatarModel
from .placement import apply_block_swap
from .plan import (COMPUTE_DTYPES, PRECISIONS, RunPlan, check_kv_cache_dtype, detect_devices, plan_run,
                   vae_compute)
from .vae.loader import load_vae
from .weights.check import check_run_files
from .weights.dit import load_dit_checkpoint, load_into_module
from .weights.layout import T5_FILE, VAE_FILE, WAV2VEC2_DIR
from .weights.lora import DEFAULT_SCALE, load_lora, merge_lora

log = logging.getLogger("liveavatar")

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
COMPILE_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class OfficialFolder:
    """Component paths of an official `Wan2.2-S2V-14B` checkpoint folder."""

    root: Path

    @property
    def dit(self) -> Path:
        return self.root

    @property
    def t5(self) -> Path:
        return self.root / T5_FILE

    @property
    def vae(self) -> Path:
        return self.root / VAE_FILE

    @property
    def wav2vec2(self) -> Path:
        return self.root / WAV2VEC2_DIR


def official_folder(path: str | Path, input_name: str = "ckpt_dir") -> OfficialFolder:
    """Check that `path` is an official checkpoint folder; name every missing part."""
    root = Path(path)
    if not root.is_dir():
        raise WeightsError(input_name, f"{root} is not a folder.",
                           "pass the Wan2.2-S2V-14B folder downloaded from Wan-AI/Wan2.2-S2V-14B.")
    folder = OfficialFolder(root)
    wanted = {"config.json": root / "config.json", T5_FILE: folder.t5, VAE_FILE: folder.vae,
              WAV2VEC2_DIR + "/": folder.wav2vec2, "google/umt5-xxl/": root / "google" / "umt5-xxl"}
    missing = [name for name, p in wanted.items() if not p.exists()]
    if not any(root.glob("diffusion_pytorch_model*.safetensors*")):
        missing.insert(0, "diffusion_pytorch_model-*.safetensors")
    if missing:
        raise WeightsError(input_name, f"{root} lacks {', '.join(missing)}.",
                           "download the complete Wan-AI/Wan2.2-S2V-14B repository into that folder.")
    return folder


def compute_dtype(precision: str) -> torch.dtype:
    """The torch dtype the DiT computes in under `precision` (fp8 computes in bf16)."""
    if precision not in PRECISIONS:
        raise InputError("precision", f"unknown precision '{precision}'.", f"choose one of {', '.join(PRECISIONS)}.")
    return _TORCH_DTYPES[COMPUTE_DTYPES[precision]]


def vae_compute_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The torch dtype of a VAE on `device` under `precision` (`plan.vae_compute`)."""
    compute_dtype(precision)  # refuses an unknown precision
    return _TORCH_DTYPES[vae_compute(precision, torch.device(device).type)]


def plan_for_device(cfg, device: str | torch.device, *, precision: str = "bf16", offload: str = "none",
                    blocks_on_gpu: int | None = None, kv_cache_location: str = "gpu", kv_cache_dtype: str = "auto",
                    size: str | tuple[int, int] = DEFAULT_SIZE, frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP,
                    steps: int = 4, text_encoder: str = "cpu", audio_encoder: str = "cpu",
                    encoder_bytes: tuple[int | None, int | None] = (None, None), validate: bool = True,
                    shards: int = 1) -> RunPlan:
    """The run plan for a DiT on `device` (a CPU device gives a CPU-only plan), validated unless
    `validate` is False (then `plan.fits()` says whether it does).

    size: the output (height, width), or an area string when the image is not known yet (see
    `plan.plan_run`). text_encoder / audio_encoder: where the encoders run ("offload": on the GPU
    before the DiT is loaded; "cpu", the default: not on the GPU, as for the loader node); shards:
    the block units sharded over that many ranks (FSDP).
    """
    device = torch.device(device)
    check_kv_cache_dtype(kv_cache_dtype, precision)
    if device.type == "cuda":
        devices = [d for d in detect_devices() if d.name == f"cuda:{cuda_index(device)}"]
    else:
        devices = []
        if offload == "block_swap":
            raise InputError("offload", f"block swap moves DiT blocks between host memory and a GPU; the DiT "
                             f"runs on '{device}'.", "use offload 'none' or 'auto' on the CPU.")
        # On a CPU device the caches are in host memory already: nothing to stream.
        kv_cache_location = "gpu"
    plan = plan_run(cfg, size=size, frames_per_clip=frames_per_clip, steps=steps, devices=devices,
                    precision=precision, offload=offload, blocks_on_gpu=blocks_on_gpu,
                    kv_cache_location=kv_cache_location, kv_cache_dtype=kv_cache_dtype,
                    text_encoder=text_encoder, audio_encoder=audio_encoder, encoder_bytes=encoder_bytes,
                    shards=shards)
    return plan.validate() if validate else plan


def new_dit(cfg, precision: str, attention: str = "sdpa") -> LiveAvatarDiT:
    """Step 0: the DiT on the meta device, in the compute dtype of `precision` (no memory yet)."""
    with torch.device("meta"):
        return LiveAvatarDiT(cfg, attention=get_attention(attention)).to(compute_dtype(precision))


def prepare_dit(dit: LiveAvatarDiT, plan: RunPlan, device: torch.device, *, lora=None,
                lora_scale: float = DEFAULT_SCALE, use_compile: bool = False, shard_group=None):
    """Steps 2-5 on a DiT holding its base weights (in host memory if `plan` swaps blocks);
    returns the placement state: block swap's (its transfer counters), FSDP's (its gathers, with
    `plan.shards` > 1 over `shard_group`), or None.

    2. LoRA merge in place: fp32 delta, one rounding to the weight dtype.
    3. FP8 GEMMs after the merge (the merged weights are what is quantised; swapped blocks are
       still in host memory and are quantised on the GPU one at a time).
    4. Placement: block swap from pinned host memory, prefetched one block ahead; or the block
       units sharded over the ranks of `shard_group` (placement/fsdp.py).
    5. Regional compilation.
    """
    dit.eval().requires_grad_(False)
    if lora is not None:
        merged = merge_lora(dit, lora, scale=lora_scale)
        log.info("LoRA: %s; merged %d pairs at scale %g", lora.description, merged, lora_scale)
    if plan.precision == "fp8":
        log.info("FP8: %d Linear layers converted", convert_to_fp8(dit, compute_device=device, fused=use_compile))
    state = None
    if plan.shards > 1:
        from .placement.fsdp import apply_fsdp  # needs torch.distributed, which some builds lack

        state = apply_fsdp(dit, shard_group, device)
    elif plan.swapped:
        state = apply_block_swap(dit, plan.blocks_on_gpu, device, layers=plan.swapped)
    log.info("placement: %s", plan.placement_words())
    if use_compile:
        dit.compile_regions()
        log.info("regional compilation on: the first call at each size compiles (about 15 s on an H200)")
    return state


def prepare_vae(vae, device: torch.device, use_compile: bool = False):
    """Place a loaded VAE: channels-last convolutions on CUDA, compiled with the DiT."""
    vae.eval().requires_grad_(False)
    if device.type == "cuda":
        vae.set_channels_last()
        if use_compile:
            vae.compile_regions()
    return vae


def assemble(dit: LiveAvatarDiT, vae, plan: RunPlan, description: str, weights: str = "",
             placement=None) -> LiveAvatarModel:
    """The generator the pipeline runs, with the plan it was placed by (re-checked per video size);
    `weights`: the part of the description that sets the numbers (see `LiveAvatarModel.identity`);
    `placement`: `prepare_dit`'s state."""
    return LiveAvatarModel(dit, vae, description, kv_cache_location=plan.kv_cache_location,
                           kv_cache_dtype="fp8" if plan.kv_cache_dtype == "fp8" else None, plan=plan,
                           weights=weights, placement=placement)


def load_generator(dit_path: str | Path, vae_path: str | Path | None, lora_path: str | Path | None = None, *,
                   precision: str = "bf16", attention: str = "sdpa", dit_device: str | torch.device = "cpu",
                   vae_device: str | torch.device | None = None, vae_dtype: torch.dtype | None = None,
                   lora_scale: float = DEFAULT_SCALE, offload: str = "none", blocks_on_gpu: int | None = None,
                   kv_cache_location: str = "gpu", kv_cache_dtype: str = "auto",
                   plan_size: str | tuple[int, int] = DEFAULT_SIZE,
                   frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP, steps: int = 4,
                   compile: str = "auto", plan: RunPlan | None = None,
                   layers: range | None = None, shard_group=None) -> LiveAvatarModel:
    """Plan, load, merge, convert and place the DiT and the VAE.

    dit_path: official folder, shard index or single file; vae_path: the VAE file (None: no VAE,
    for a pipeline rank that does not decode); lora_path: `liveavatar.safetensors`
    (None: base model only, which is not the distilled 4-step model); precision: bf16, fp8
    (bf16 compute with FP8 GEMMs) or fp32 (CPU parity); offload: none, block_swap (keep
    `blocks_on_gpu` blocks resident) or auto (the planner picks the cheapest placement that fits);
    plan_size: the output (height, width) to plan for, or an area string when the reference image
    is not known yet (the default: 704*384 as for a 704x384 image); `generate` re-checks the plan at
    the real size of each video. kv_cache_location: gpu, or cpu (pinned host memory streamed per
    layer); kv_cache_dtype: auto (the compute dtype) or fp8 (half the cache memory and streamed
    bytes; the cached keys and values are quantised, so results move slightly);
    compile: regional compilation of the DiT and of a CUDA VAE (`compile_regions`): on, off, or
    auto (on for a CUDA DiT when Triton is installed). The first call at each size compiles.
    plan: a plan already made for these settings (the CLI's preflight); None = plan here.
    layers: load only these layers' block units besides the base (a layer layout rank); the other
    units stay on the meta device and must not be run. shard_group: the process group a plan with
    `shards` > 1 shards the block units over (every rank of it loads the same files).
    """
    dit_device = torch.device(dit_device)
    vae_device = torch.device(vae_device) if vae_device is not None else dit_device
    vae_dtype = vae_dtype or vae_compute_dtype(precision, vae_device)  # refuses an unknown precision
    check_kv_cache_dtype(kv_cache_dtype, precision)
    if precision == "fp8":
        check_fp8_support(dit_device)
    get_attention(attention)
    use_compile = resolve_compile(compile, dit_device)

    # 1. Base weights (validated against the config before any tensor is read), then the run
    #    plan: memory per device, refused with the cheapest fix before anything is loaded.
    if plan is None:  # else a preflight (the CLI's) has checked every file already
        check_run_files(dit_path, lora_path=lora_path, vae_path=vae_path)  # every file's header and size, first
    ckpt = load_dit_checkpoint(dit_path)
    log.info("DiT: %s", ckpt.description)
    planned_here = plan is None
    if plan is None:
        shards = 1 if shard_group is None else shard_group.size()
        plan = plan_for_device(ckpt.config, dit_device, precision=precision, offload=offload,
                               blocks_on_gpu=blocks_on_gpu, kv_cache_location=kv_cache_location,
                               kv_cache_dtype=kv_cache_dtype, size=plan_size, frames_per_clip=frames_per_clip,
                               steps=steps, shards=shards)
        if isinstance(plan_size, str):
            log.info("planned for %dx%d, the output of a %s image at size %s; each video is re-checked at "
                     "its own size before it starts", plan.geometry.width, plan.geometry.height,
                     plan_size.replace("*", "x"), plan_size)
        log.info("%s", plan.summary())
    lora = load_lora(lora_path, ckpt.shapes()) if lora_path else None
    keep = None if layers is None else layer_filter(ckpt.config, layers, plan)
    if keep is not None and lora is not None:
        lora = replace(lora, pairs={k: v for k, v in lora.pairs.items() if keep(k)})
    dit = new_dit(ckpt.config, precision, attention)
    # Swapped or sharded blocks must start in host memory: load everything there, place at the end.
    load_device = torch.device("cpu") if plan.swapped or plan.shards > 1 else dit_device
    load_into_module(dit, ckpt.state_dict, device=load_device, only=keep)  # one tensor at a time, cast to dtype
    if lora is None and planned_here:  # a preflight has said so already
        log.warning("no LoRA given: the base Wan2.2-S2V model is not the 4-step distilled Live Avatar model")
    placement = prepare_dit(dit, plan, dit_device, lora=lora, lora_scale=lora_scale, use_compile=use_compile,
                            shard_group=shard_group)
    vae = None
    if vae_path is not None:
        vae = prepare_vae(load_vae(vae_path, device=vae_device, dtype=vae_dtype), vae_device, use_compile)
        log.info("VAE: %s", vae.description)
    files = f"{ckpt.description}; {lora.description if lora else 'no LoRA'}"
    vae_words = f"; {vae.description}" if vae is not None else ""
    part_words = f"; layers {layers.start}-{layers.stop - 1} loaded" if layers is not None else ""
    return assemble(dit, vae, plan, *model_words(files, precision, plan, use_compile, part_words + vae_words),
                    placement=placement)


def model_words(source: str, precision: str, plan: RunPlan, use_compile: bool, extra: str = "") -> tuple[str, str]:
    """(description, weights) of a generator built from `source` (its files, or random weights):
    what is loaded and how it is placed, and what sets its numbers (`LiveAvatarModel.weights`)."""
    kv = ", FP8 KV cache" if plan.kv_cache_dtype == "fp8" else ""
    description = f"{source}; {precision}{', compiled' if use_compile else ''}{kv}; {plan.placement_words()}{extra}"
    weights = f"{source}; {precision}{kv}"
    return description, weights


def drop_other_layers(dit: LiveAvatarDiT, layers: range, plan: RunPlan) -> None:
    """Free every block unit outside `layers` (its parameters go back to the meta device): a layer
    layout rank built whole, from random weights, keeps only what it runs."""
    keep = layer_filter(dit.cfg, layers, plan)
    for name, param in list(dit.named_parameters()):
        if not keep(name):
            owner_name, _, leaf = name.rpartition(".")
            owner = dit.get_submodule(owner_name)
            owner.register_parameter(leaf, torch.nn.Parameter(param.to("meta"), requires_grad=False))


def layer_filter(cfg, layers: range, plan: RunPlan):
    """Which state-dict names a rank holding `layers` loads: the base and those layers' units
    (`plan` may swap some of them: they must be among `layers`)."""
    if not set(plan.swapped) <= set(layers):
        raise InputError("plan", f"it swaps blocks {list(plan.swapped)}, not all among the layers {layers.start}-"
                         f"{layers.stop - 1} this rank holds.", "plan the rank for its own layers (plan_parallel).")

    def keep(name: str) -> bool:
        unit = unit_of(name, cfg)
        return unit is None or unit in layers
    return keep


def resolve_compile(choice: str, device: torch.device) -> bool:
    """Whether to compile the DiT's blocks: `choice` is on, off or auto (on for CUDA with Triton)."""
    if choice not in COMPILE_CHOICES:
        raise InputError("compile", f"unknown choice '{choice}'.", f"choose one of {', '.join(COMPILE_CHOICES)}.")
    if choice == "off":
        return False
    problem = None
    if device.type != "cuda":
        problem = f"the DiT runs on '{device}'; compiled blocks are built for CUDA GPUs"
    elif not _has_triton():
        problem = "Triton, which torch.compile needs on CUDA, is not installed"
    if problem is None:
        return True
    if choice == "on":
        raise InputError("compile", f"{problem}.", "set compile to 'auto' or 'off' (or install triton).")
    return False


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
