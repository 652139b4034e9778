"""Model loader node: the DiT with the Live Avatar LoRA merged, and the VAE."""

from __future__ import annotations

from ..liveavatar_core.errors import InputError
from ..liveavatar_core.loading import PRECISIONS, VAE_FILE, load_generator
from ..liveavatar_core.ops.attention import DEFAULT_BACKEND, attention_backends
from ..liveavatar_core.ops.fp8 import check_fp8_support
from ..liveavatar_core.weights.dit import OFFICIAL_INDEX
from . import host

MODEL = "LIVEAVATAR_MODEL"
LORA_NONE = "none"
LORA_FILE = r"liveavatar\.safetensors"
VAE_SAME = "same as DiT"


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
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, precision, dit_device, vae_device):
        try:
            if precision not in PRECISIONS:
                raise InputError("precision", f"unknown precision '{precision}'.",
                                 f"choose one of {', '.join(PRECISIONS)}.")
            device = host.torch_device(dit_device, "dit_device")
            if vae_device != VAE_SAME:
                host.check_device(vae_device, "vae_device")
            if precision == "fp8":
                check_fp8_support(device)
        except InputError as exc:
            return str(exc)
        return True

    def load(self, dit: str, lora: str, vae: str, precision: str, attention: str, dit_device: str,
             vae_device: str):
        dit_path = host.resolve("diffusion_models", dit, "dit")
        lora_path = None if lora == LORA_NONE else host.resolve("loras", lora, "lora")
        vae_path = host.resolve("vae", vae, "vae", VAE_FILE)
        device = host.torch_device(dit_device, "dit_device")
        vae_dev = device if vae_device == VAE_SAME else host.torch_device(vae_device, "vae_device")
        host.free_comfy_models()
        model = load_generator(dit_path, vae_path, lora_path, precision=precision, attention=attention,
                               dit_device=device, vae_device=vae_dev)
        return (model,)
