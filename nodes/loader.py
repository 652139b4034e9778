"""Model loader node: the DiT with the Live Avatar LoRA merged, and the VAE."""

from __future__ import annotations

import torch

from ..liveavatar_core.encoders.image import DEFAULT_SIZE
from ..liveavatar_core.errors import InputError
from ..liveavatar_core.loading import COMPILE_CHOICES, VAE_FILE, load_generator, resolve_compile
from ..liveavatar_core.ops.attention import DEFAULT_BACKEND, attention_backends
from ..liveavatar_core.ops.fp8 import check_fp8_support
from ..liveavatar_core.parallel.cost import measure_link_bps
from ..liveavatar_core.parallel.layout import LAYOUTS, SHARDS, check_shard, step_layout
from ..liveavatar_core.parallel.planner import choose_devices, plan_parallel
from ..liveavatar_core.plan import KV_CACHE_DTYPES, KV_LOCATIONS, PRECISIONS, check_kv_cache_dtype, detect_devices
from ..liveavatar_core.weights.dit import OFFICIAL_INDEX, load_dit_checkpoint
from . import host

MODEL = "LIVEAVATAR_MODEL"
LORA_NONE = "none"
LORA_FILE = r"liveavatar\.safetensors"
VAE_SAME = "same as DiT"
OFFLOAD_CHOICES = ("none", "auto", "block_swap")
# off: one process (dit_device); auto: the step layout when `gpus` gives several devices; or a layout.
PARALLEL_CHOICES = ("off", "auto", *LAYOUTS)
VAE_LAST = "last DiT GPU"


def dit_choices() -> list[str]:
    return host.list_files("diffusion_models") + host.own_entries(OFFICIAL_INDEX, want_dir=True)


def lora_choices() -> list[str]:
    return [LORA_NONE] + host.list_files("loras") + host.own_entries(LORA_FILE, want_dir=False)


def vae_choices() -> list[str]:
    return host.list_files("vae") + host.own_entries(VAE_FILE, want_dir=True)


class LiveAvatarModelLoader:
    DESCRIPTION = ("Loads the Wan2.2-S2V-14B DiT, merges the Live Avatar LoRA (the 4-step distilled "
                   "streaming model), optionally converts it to FP8, and loads the Wan 2.1 VAE.")
    CATEGORY = "LiveAvatar/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Live Avatar generator (DiT + VAE, placed on their devices).",)

    @classmethod
    def INPUT_TYPES(cls):
        devices = list(host.DEVICE_CHOICES)
        return {"required": {
            "dit": (dit_choices(), {"tooltip": "Wan2.2-S2V-14B diffusion model: a file in models/diffusion_models "
                                    "(bf16 or fp8_scaled) or the official folder in models/liveavatar."}),
            "lora": (lora_choices(), {"tooltip": "Live Avatar LoRA (liveavatar.safetensors) from models/loras or "
                                      "models/liveavatar. 'none' runs the base model, which is not the 4-step "
                                      "streaming model."}),
            "vae": (vae_choices(), {"tooltip": "Wan 2.1 VAE: a file in models/vae or the official folder in "
                                    "models/liveavatar."}),
            "precision": (list(PRECISIONS), {"default": "bf16", "tooltip": "bf16 (official), fp8 (bf16 with FP8 "
                                             "matmuls, less memory, needs an Ada/Hopper GPU), fp32 (CPU checks)."}),
            "attention": (list(attention_backends()), {"default": DEFAULT_BACKEND, "tooltip": "Attention kernel. "
                                                       "sdpa: the default, parity-tested. flash3: 2-5 % faster on "
                                                       "Hopper with a FlashAttention 3 build (frames differ by under "
                                                       "1 %). flash2/sage need their package installed."}),
            "dit_device": (devices, {"default": "auto", "tooltip": "GPU that runs the DiT ('auto' = ComfyUI's "
                                     "device)."}),
            "vae_device": ([VAE_SAME] + devices, {"default": VAE_SAME, "tooltip": "Where the VAE encodes and "
                                                  "decodes: another GPU splits the work. 'cpu' saves about 3 GB of VRAM "
                                                  "but decodes in float32 on the CPU: minutes a block at 704*384."}),
        }, "optional": {
            "offload": (list(OFFLOAD_CHOICES), {"default": "none", "tooltip": "none: everything on the DiT GPU. "
                        "auto: the run planner picks the cheapest placement that fits this GPU (KV caches streamed "
                        "from host memory first, then block swap), planned for 704*384 here and checked again "
                        "at the sampler's real size before a video starts. block_swap: keep only "
                        "blocks_on_gpu DiT blocks on the GPU, the rest prefetched from pinned host memory."}),
            "blocks_on_gpu": ("INT", {"default": 20, "min": 0, "max": 40, "tooltip": "With offload=block_swap: "
                              "DiT blocks kept resident on the GPU (40 = all); fewer saves ~0.8 GB each."}),
            "kv_cache": (list(KV_LOCATIONS), {"default": "gpu", "tooltip": "Where the 4 step KV caches live "
                         "(10.4 GB each at 704*384 in bf16): gpu, or cpu = pinned host memory streamed layer by "
                         "layer ahead of use."}),
            "compile": (list(COMPILE_CHOICES), {"default": "auto", "tooltip": "Regional compilation of the DiT "
                        "blocks: about 1.4x faster per call. auto = on for a CUDA GPU with Triton. The first run "
                        "at each size compiles for about 15 s; later runs reuse the on-disk cache."}),
            "kv_cache_dtype": (list(KV_CACHE_DTYPES), {"default": "auto", "tooltip": "auto: the KV caches in "
                               "the DiT's dtype (exact). fp8: e4m3 with a scale per head row: half the memory "
                               "(20 GiB instead of 39 GiB at 704*384) and half the bytes streamed with kv_cache=cpu; "
                               "results move slightly. Needs precision bf16 or fp8."}),
            "parallel": (list(PARALLEL_CHOICES), {"default": "off", "tooltip": "off: one GPU (dit_device). "
                         "steps: one worker process per GPU in gpus, each running whole denoising steps of every "
                         "block and passing it on (timestep-forcing pipeline: 4 GPUs make about 3x the frames of "
                         "one). layers: each GPU runs a share of the DiT layers for every step and holds only "
                         "their weights and caches (24-48 GB cards). auto: steps when gpus gives several GPUs, "
                         "else one GPU. The node shows the plan: memory per GPU and the FPS estimate."}),
            "gpus": ("STRING", {"default": "auto", "tooltip": "With parallel: auto = every visible GPU (at most "
                     "one per step; with 5 GPUs the fifth runs the VAE, the official 4 + 1 layout), or a list such "
                     "as 0,1 or cuda:0,cuda:2 (cpu,cpu runs CPU processes, for tests)."}),
            "vae_gpu": ([VAE_LAST] + [d for d in devices if d.startswith("cuda")], {"default": VAE_LAST,
                        "tooltip": "With parallel: a GPU for the VAE alone (decoding then leaves the last DiT "
                        "GPU, which is the slowest stage otherwise)."}),
            "shard": (list(SHARDS), {"default": "none", "tooltip": "With parallel steps: fsdp shards the DiT's "
                      "blocks over the GPUs (each holds a quarter with 4 GPUs and gathers every block per call "
                      "over the GPU link: fits cards too small for a whole model, fast over NVLink only; the plan "
                      "shows the cost). none: each GPU holds the whole DiT. The layers layout divides the "
                      "weights by itself."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, precision, dit_device, vae_device, offload="none", kv_cache="gpu", compile="auto",
                        kv_cache_dtype="auto", parallel="off", gpus="auto", vae_gpu=VAE_LAST, shard="none"):
        # Raises rather than returns: see queue_checks (one message, not one per input).
        types = cls.INPUT_TYPES()
        spec = {**types["required"], **types["optional"]}
        host.check_declared(spec, dict(precision=precision, offload=offload, kv_cache=kv_cache, compile=compile,
                                       kv_cache_dtype=kv_cache_dtype, parallel=parallel, vae_gpu=vae_gpu,
                                       shard=shard))
        ranks = _ranks(parallel, gpus, vae_gpu, offload)
        check_shard(shard, _layout(parallel), 1 if ranks is None else len(ranks[0]))
        if ranks is not None:
            dit, vae, _ = ranks
            if parallel != "layers":  # the layer layout's refusals need the DiT's layer count: at load
                step_layout([d.name for d in dit], vae_device=vae and vae.name, input_name="gpus")
            for d in dit + ([vae] if vae else []):
                if precision == "fp8":
                    check_fp8_support(torch.device(d.name))
            check_kv_cache_dtype(kv_cache_dtype, precision)
            return True
        device = host.torch_device(dit_device, "dit_device")
        if vae_device != VAE_SAME:
            host.check_device(vae_device, "vae_device")
        if precision == "fp8":
            check_fp8_support(device)
        resolve_compile(compile, device)
        check_kv_cache_dtype(kv_cache_dtype, precision)
        return True

    def load(self, dit: str, lora: str, vae: str, precision: str, attention: str, dit_device: str,
             vae_device: str, offload: str = "none", blocks_on_gpu: int = 20, kv_cache: str = "gpu",
             compile: str = "auto", kv_cache_dtype: str = "auto", parallel: str = "off", gpus: str = "auto",
             vae_gpu: str = VAE_LAST, shard: str = "none", unique_id=None):
        dit_path = host.resolve("diffusion_models", dit, "dit")
        lora_path = None if lora == LORA_NONE else host.resolve("loras", lora, "lora")
        vae_path = host.resolve("vae", vae, "vae", VAE_FILE)
        ranks = _ranks(parallel, gpus, vae_gpu, offload)
        if ranks is not None:
            return (_load_parallel(dit_path, vae_path, lora_path, ranks, _layout(parallel), precision=precision,
                                   attention=attention, offload=offload, kv_cache=kv_cache, compile=compile,
                                   kv_cache_dtype=kv_cache_dtype, shard=shard, unique_id=unique_id),)
        device = host.torch_device(dit_device, "dit_device")
        vae_dev = device if vae_device == VAE_SAME else host.torch_device(vae_device, "vae_device")
        host.free_comfy_models()
        model = load_generator(dit_path, vae_path, lora_path, precision=precision, attention=attention,
                               dit_device=device, vae_device=vae_dev, offload=offload,
                               blocks_on_gpu=blocks_on_gpu if offload == "block_swap" else None,
                               kv_cache_location=kv_cache, kv_cache_dtype=kv_cache_dtype, compile=compile)
        # The node shows the plan table the log holds: placement and memory per device.
        host.Progress(unique_id).status(model.plan.summary(), {"plan": model.plan.to_dict()})
        return (model,)


def _layout(parallel: str) -> str:
    """The layout a `parallel` choice runs ("auto": the step layout)."""
    return parallel if parallel in LAYOUTS else "steps"


def _ranks(parallel: str, gpus: str, vae_gpu: str, offload: str):
    """(DiT devices, VAE device, spare GPUs) when the run is parallel, else None (one process)."""
    if parallel == "off":
        return None
    available = detect_devices()
    try:
        dit, vae, spare = choose_devices(available, gpus.strip(), None if vae_gpu == VAE_LAST else vae_gpu,
                                         input_name="gpus", layout=_layout(parallel))
    except InputError:
        if parallel == "auto":  # fewer than two GPUs: one process, as with parallel off
            return None
        raise
    if parallel == "auto" and len(dit) < 2 and vae is None:
        return None
    if len(dit) < 2 and vae is None:
        raise InputError("gpus", f"parallel '{parallel}' needs several devices; gpus gives {len(dit)}.",
                         "list two or more GPUs (e.g. 0,1), choose a vae_gpu, or set parallel to off.")
    if offload == "block_swap":
        raise InputError("offload", "block_swap with parallel: each worker places itself.",
                         "use offload 'auto' (each GPU streams its caches or swaps blocks only if it must).")
    return dit, vae, spare


def _load_parallel(dit_path, vae_path, lora_path, ranks, layout: str, *, precision, attention, offload, kv_cache,
                   compile, kv_cache_dtype, shard, unique_id):
    """Plan (refused with its fix before any weight is read), then start the workers."""
    from ..liveavatar_core.parallel.remote import load_parallel

    dit, vae, spare = ranks
    cfg = load_dit_checkpoint(dit_path).config
    controller = host.torch_device("auto", "dit_device")
    plan = plan_parallel(cfg, devices=dit, vae_device=vae, spare=spare, size=DEFAULT_SIZE, precision=precision,
                         layout=layout,
                         kv_cache_dtype=kv_cache_dtype, kv_cache_location=kv_cache,
                         offload="auto" if offload == "auto" else "none", shard=shard,
                         link_bps=measure_link_bps(dit[0].name, dit[1].name) if shard == "fsdp" else None,
                         controller=str(controller) if controller.type == "cuda" else None).validate()
    host.free_comfy_models()
    model = load_parallel(dit_path, vae_path, lora_path, layout=plan.layout, precision=precision, attention=attention,
                          compile=compile, kv_cache_dtype=kv_cache_dtype, plan=plan, log_dir=host.worker_log_dir(),
                          shard=shard)
    host.Progress(unique_id).status(plan.summary(), {"plan": plan.to_dict()})
    return model
