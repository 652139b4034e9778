"""Model loader node: the DiT with the Live Avatar LoRA merged, and the VAE."""

from __future__ import annotations

from ..liveavatar_core.loading import COMPILE_CHOICES, VAE_FILE, load_generator, resolve_compile
from ..liveavatar_core.ops.attention import DEFAULT_BACKEND, attention_backends
from ..liveavatar_core.ops.fp8 import check_fp8_support
from ..liveavatar_core.plan import KV_CACHE_DTYPES, KV_LOCATIONS, PRECISIONS, check_kv_cache_dtype
from ..liveavatar_core.weights.dit import OFFICIAL_INDEX
from . import host

MODEL = "LIVEAVATAR_MODEL"
LORA_NONE = "none"
LORA_FILE = r"liveavatar\.safetensors"
VAE_SAME = "same as DiT"
OFFLOAD_CHOICES = ("none", "auto", "block_swap")


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
            "attention": (list(attention_backends()), {"default": DEFAULT_BACKEND, "tooltip": "Attention kernel; "
                                                       "flash/sage need their package installed."}),
            "dit_device": (devices, {"default": "auto", "tooltip": "GPU that runs the DiT ('auto' = ComfyUI's "
                                     "device)."}),
            "vae_device": ([VAE_SAME] + devices, {"default": VAE_SAME, "tooltip": "Where the VAE encodes and "
                                                  "decodes: another GPU splits the work, 'cpu' saves VRAM."}),
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
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, precision, dit_device, vae_device, offload="none", kv_cache="gpu", compile="auto",
                        kv_cache_dtype="auto"):
        # Raises rather than returns: see queue_checks (one message, not one per input).
        types = cls.INPUT_TYPES()
        spec = {**types["required"], **types["optional"]}
        host.check_declared(spec, dict(precision=precision, offload=offload, kv_cache=kv_cache, compile=compile,
                                       kv_cache_dtype=kv_cache_dtype))
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
             compile: str = "auto", kv_cache_dtype: str = "auto", unique_id=None):
        dit_path = host.resolve("diffusion_models", dit, "dit")
        lora_path = None if lora == LORA_NONE else host.resolve("loras", lora, "lora")
        vae_path = host.resolve("vae", vae, "vae", VAE_FILE)
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
