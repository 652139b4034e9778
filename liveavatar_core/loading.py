"""Loading the generator (DiT + LoRA + optional FP8, VAE) as ordered, documented steps.

Order, as in the official pipeline (spec/pipeline.md 1.2): base weights -> LoRA merge (fp32,
rounded once) -> FP8 conversion -> placement. Each step validates its inputs before any tensor
is read, so a wrong file fails in seconds with a message naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, WeightsError
from .model.dit import LiveAvatarDiT
from .ops.attention import get_attention
from .ops.fp8 import check_fp8_support, convert_to_fp8
from .ops.transfer import cuda_index
from .pipeline import LiveAvatarModel
from .placement import apply_block_swap
from .plan import RunPlan, detect_devices, plan_run
from .vae.loader import load_vae
from .weights.check import check_run_files
from .weights.dit import load_dit_checkpoint, load_into_module
from .weights.layout import T5_FILE, VAE_FILE, WAV2VEC2_DIR
from .weights.lora import DEFAULT_SCALE, load_lora, merge_lora

log = logging.getLogger("liveavatar")

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16}
COMPILE_CHOICES = ("auto", "on", "off")
# auto: the rings store the DiT's compute dtype (exact); fp8: e4m3 with a scale per head row.
KV_CACHE_DTYPES = ("auto", "fp8")


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


def load_generator(dit_path: str | Path, vae_path: str | Path, lora_path: str | Path | None = None, *,
                   precision: str = "bf16", attention: str = "sdpa", dit_device: str | torch.device = "cpu",
                   vae_device: str | torch.device | None = None, vae_dtype: torch.dtype | None = None,
                   lora_scale: float = DEFAULT_SCALE, offload: str = "none", blocks_on_gpu: int | None = None,
                   kv_cache_location: str = "gpu", kv_cache_dtype: str = "auto", plan_size: str = "704*384",
                   frames_per_clip: int = 48, compile: str = "auto") -> LiveAvatarModel:
    """Plan, load, merge, convert and place the DiT and the VAE.

    dit_path: official folder, shard index or single file; lora_path: `liveavatar.safetensors`
    (None: base model only, which is not the distilled 4-step model); precision: bf16, fp8
    (bf16 compute with FP8 GEMMs) or fp32 (CPU parity); offload: none, block_swap (keep
    `blocks_on_gpu` blocks resident) or auto (the planner picks the cheapest placement that fits
    `plan_size`); kv_cache_location: gpu, or cpu (pinned host memory streamed per layer);
    kv_cache_dtype: auto (the compute dtype) or fp8 (half the cache memory and streamed bytes; the
    cached keys and values are quantised, so results move slightly);
    compile: regional compilation of the DiT and of a CUDA VAE (`compile_regions`): on, off, or
    auto (on for a CUDA DiT when Triton is installed). The first call at each size compiles.
    """
    if precision not in PRECISIONS:
        raise InputError("precision", f"unknown precision '{precision}'.", f"choose one of {', '.join(PRECISIONS)}.")
    check_kv_cache_dtype(kv_cache_dtype, precision)
    kv_dtype = None if kv_cache_dtype == "auto" else kv_cache_dtype  # plan and model: None = compute dtype
    dit_device = torch.device(dit_device)
    vae_device = torch.device(vae_device) if vae_device is not None else dit_device
    if precision == "fp8":
        check_fp8_support(dit_device)
    attention_fn = get_attention(attention)
    dtype = PRECISIONS[precision]
    use_compile = resolve_compile(compile, dit_device)

    # 1. Base weights (validated against the config before any tensor is read), then the run
    #    plan: memory per device, refused with the cheapest fix before anything is loaded.
    check_run_files(dit_path, lora_path=lora_path, vae_path=vae_path)  # every file's header and size, first
    ckpt = load_dit_checkpoint(dit_path)
    log.info("DiT: %s", ckpt.description)
    plan = _plan(ckpt.config, dit_device, precision, offload, blocks_on_gpu, kv_cache_location, kv_dtype,
                 plan_size, frames_per_clip)
    swapping = plan.blocks_on_gpu < ckpt.config.num_layers
    lora = load_lora(lora_path, ckpt.shapes()) if lora_path else None
    with torch.device("meta"):
        dit = LiveAvatarDiT(ckpt.config, attention=attention_fn).to(dtype)
    # Swapped blocks must start in host memory: load everything there, place at the end.
    load_device = torch.device("cpu") if swapping else dit_device
    load_into_module(dit, ckpt.state_dict, device=load_device)  # one tensor at a time, cast to dtype
    dit.eval().requires_grad_(False)
    # 2. LoRA merge in place on the DiT's device: fp32 delta, one rounding to the weight dtype.
    if lora:
        merged = merge_lora(dit, lora, scale=lora_scale)
        log.info("LoRA: %s; merged %d pairs at scale %g", lora.description, merged, lora_scale)
    else:
        log.warning("no LoRA given: the base Wan2.2-S2V model is not the 4-step distilled Live Avatar model")
    # 3. FP8 GEMMs after the merge (the merged weights are what is quantised; with block swap they
    #    are still in host memory and are quantised on the GPU one at a time).
    if precision == "fp8":
        log.info("FP8: %d Linear layers converted", convert_to_fp8(dit, compute_device=dit_device, fused=use_compile))
    # 4. Placement: block swap from pinned host memory, prefetched one block ahead.
    if swapping:
        apply_block_swap(dit, plan.blocks_on_gpu, dit_device, layers=plan.swapped)
    log.info("placement: %s", plan.placement_words())
    if use_compile:
        dit.compile_regions()
        log.info("regional compilation on: the first call at each size compiles (about 15 s on an H200)")
    vae = load_vae(vae_path, device=vae_device, dtype=vae_dtype or (torch.float32 if precision == "fp32"
                                                                     else torch.bfloat16))
    log.info("VAE: %s", vae.description)
    if vae_device.type == "cuda":
        vae.set_channels_last()
    if use_compile and vae_device.type == "cuda":
        vae.compile_regions()
    return LiveAvatarModel(dit, vae, f"{ckpt.description}; {lora.description if lora else 'no LoRA'}; "
                                     f"{precision}{', compiled' if use_compile else ''}"
                                     f"{', FP8 KV cache' if kv_dtype == 'fp8' else ''}; "
                                     f"{plan.placement_words()}; {vae.description}",
                           kv_cache_location=plan.kv_cache_location,
                           kv_cache_dtype=kv_dtype)


def check_kv_cache_dtype(choice: str, precision: str) -> None:
    """Refuse an unknown KV cache dtype, or FP8 rings for an fp32 DiT (they dequantise to bf16)."""
    if choice not in KV_CACHE_DTYPES:
        raise InputError("kv_cache_dtype", f"unknown choice '{choice}'.",
                         f"choose one of {', '.join(KV_CACHE_DTYPES)}.")
    if choice == "fp8" and precision == "fp32":
        raise InputError("kv_cache_dtype", "an FP8 KV cache needs a bf16 or fp8 DiT; this one computes in fp32.",
                         "use kv_cache_dtype 'auto' with fp32, or precision bf16/fp8.")


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


def _plan(cfg, device: torch.device, precision: str, offload: str, blocks_on_gpu: int | None,
          kv_cache_location: str, kv_cache_dtype: str | None, size: str, frames_per_clip: int) -> RunPlan:
    """The validated run plan for the DiT's device (CPU runs: a CPU-only plan)."""
    if device.type == "cuda":
        devices = [d for d in detect_devices() if d.name == f"cuda:{cuda_index(device)}"]
    else:
        devices = []
        if offload == "block_swap":
            raise InputError("offload", f"block swap moves DiT blocks between host memory and a GPU; the DiT "
                             f"runs on '{device}'.", "use offload 'none' or 'auto' on the CPU.")
        # On a CPU device the caches are in host memory already: nothing to stream.
        kv_cache_location = "gpu"
    plan = plan_run(cfg, size=size, frames_per_clip=frames_per_clip, devices=devices, precision=precision,
                    offload=offload, blocks_on_gpu=blocks_on_gpu, kv_cache_location=kv_cache_location,
                    kv_cache_dtype=kv_cache_dtype, text_encoder="cpu", audio_encoder="cpu")
    return plan.validate()

