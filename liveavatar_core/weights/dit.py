"""The S2V DiT checkpoint: its key/shape contract, the file formats it ships in, and detection.

Canonical names are the official Wan names (spec/dit.md section 2); every other format is a key
map onto them:

| format               | where it comes from                              | key map                          |
|----------------------|--------------------------------------------------|----------------------------------|
| `official`           | `Wan-AI/Wan2.2-S2V-14B` folder: config.json,     | identity                         |
|                      | sharded safetensors + index                      |                                  |
| `comfyui`            | `wan2.2_s2v_14B_bf16.safetensors` (single file)  | optional `model.diffusion_model.`|
|                      |                                                  | or `diffusion_model.` prefix     |
| `comfyui_fp8_scaled` | `wan2.2_s2v_14B_fp8_scaled.safetensors`          | same prefixes; fp8 weights are   |
|                      |                                                  | dequantised lazily to bf16       |

Single files carry no config: the architecture is read from tensor shapes. The injector->layer
mapping is not visible in shapes, so it is taken from the 14B release when the shapes are the
14B's and from a config.json next to the file otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DiTConfig
from ..errors import WeightsError
from .fp8_scaled import ScaledFP8View, is_scaled_fp8
from .io import open_checkpoint
from .keys import key_mismatch
from .layout import DIT_CONFIG, DIT_INDEX, DIT_SINGLE
from .layout import DIT_INDEX as OFFICIAL_INDEX  # noqa: F401  (the name nodes/loader.py imports from here)

INPUT_NAME = "dit_checkpoint"

# Longest first: "model.diffusion_model." also ends with "diffusion_model.".
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FORMAT_PREFIX = {"official": "", "comfyui": "model.diffusion_model.", "comfyui_short": "diffusion_model."}


# Width of the only released S2V DiT; a single file of this width can only be the 14B release.
_RELEASE_DIM = 5120


def expected_dit_keys(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the S2V DiT state_dict with its shape (spec/dit.md 2.1-2.3), in file order."""
    d, p = cfg.dim, tuple(cfg.patch_size)
    patch_out = cfg.out_dim * p[0] * p[1] * p[2]
    # The audio encoder's convs work on quarter-width channels (spec/dit.md 2.1: 1280 = D/4).
    quarter = d // 4
    keys: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, cfg.in_dim, *p),
        "patch_embedding.bias": (d,),
        "cond_encoder.weight": (d, cfg.cond_dim, *p),
        "cond_encoder.bias": (d,),
        "trainable_cond_mask.weight": (3, d),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d),
        "head.head.weight": (patch_out, d),
        "head.head.bias": (patch_out,),
        # FramePack convs see VAE latents, which have out_dim channels like the noisy input.
        "frame_packer.proj.weight": (d, cfg.out_dim, 1, 2, 2),
        "frame_packer.proj.bias": (d,),
        "frame_packer.proj_2x.weight": (d, cfg.out_dim, 2, 4, 4),
        "frame_packer.proj_2x.bias": (d,),
        "frame_packer.proj_4x.weight": (d, cfg.out_dim, 4, 8, 8),
        "frame_packer.proj_4x.bias": (d,),
        "casual_audio_encoder.weights": (1, cfg.num_wav2vec_layers, 1, 1),
        "casual_audio_encoder.encoder.conv1_local.conv.weight": (quarter * cfg.num_audio_token, cfg.audio_dim, 3),
        "casual_audio_encoder.encoder.conv1_local.conv.bias": (quarter * cfg.num_audio_token,),
        "casual_audio_encoder.encoder.conv1_global.conv.weight": (quarter, cfg.audio_dim, 3),
        "casual_audio_encoder.encoder.conv1_global.conv.bias": (quarter,),
        "casual_audio_encoder.encoder.conv2.conv.weight": (d // 2, quarter, 3),
        "casual_audio_encoder.encoder.conv2.conv.bias": (d // 2,),
        "casual_audio_encoder.encoder.conv3.conv.weight": (d, d // 2, 3),
        "casual_audio_encoder.encoder.conv3.conv.bias": (d,),
        "casual_audio_encoder.encoder.final_linear.weight": (d, d),
        "casual_audio_encoder.encoder.final_linear.bias": (d,),
        "casual_audio_encoder.encoder.padding_tokens": (1, 1, 1, d),
    }
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        keys[b + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                keys[f"{b}{attn}.{proj}.weight"] = (d, d)
                keys[f"{b}{attn}.{proj}.bias"] = (d,)
            keys[f"{b}{attn}.norm_q.weight"] = (d,)
            keys[f"{b}{attn}.norm_k.weight"] = (d,)
        keys[b + "norm3.weight"] = (d,)
        keys[b + "norm3.bias"] = (d,)
        keys[b + "ffn.0.weight"] = (cfg.ffn_dim, d)
        keys[b + "ffn.0.bias"] = (cfg.ffn_dim,)
        keys[b + "ffn.2.weight"] = (d, cfg.ffn_dim)
        keys[b + "ffn.2.bias"] = (d,)
    for k in range(len(cfg.audio_inject_layers)):
        a = f"audio_injector.injector.{k}."
        for proj in ("q", "k", "v", "o"):
            keys[f"{a}{proj}.weight"] = (d, d)
            keys[f"{a}{proj}.bias"] = (d,)
        keys[a + "norm_q.weight"] = (d,)
        keys[a + "norm_k.weight"] = (d,)
        keys[f"audio_injector.injector_adain_layers.{k}.linear.weight"] = (2 * d, d)
        keys[f"audio_injector.injector_adain_layers.{k}.linear.bias"] = (2 * d,)
    return keys


# --- key maps -------------------------------------------------------------------------------------

def to_canonical(key: str) -> str:
    """File key -> official Wan name (strips a ComfyUI prefix if there is one)."""
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def from_canonical(key: str, fmt: str = "official") -> str:
    """Official Wan name -> the key as format `fmt` (a key of FORMAT_PREFIX) stores it."""
    return FORMAT_PREFIX[fmt] + key


class _CanonicalView(Mapping):
    """Lazy `canonical name -> tensor` view over a file mapping; renames, never copies."""

    def __init__(self, source: Mapping, canonical_to_file: dict[str, str]):
        self._src = source
        self._names = canonical_to_file

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._src[self._names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._src.shape(self._names[key]))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._names}


def _canonical_names(keys, input_name: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for key in keys:
        canon = to_canonical(key)
        if canon in names:
            raise WeightsError(input_name, f"the file holds both '{names[canon]}' and '{key}', which are the "
                               "same DiT tensor under two prefixes.", "use an unmodified checkpoint file.")
        names[canon] = key
    return names


# --- detection ------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_SELF_Q_RE = re.compile(r"^blocks\.(\d+)\.self_attn\.q\.weight$")
_LORA_RE = re.compile(r"(^|\.)(lora_A|lora_B|lora_down|lora_up)(\.|$)")

# Markers of Wan DiT variants that are not S2V (names as in the official/ComfyUI checkpoints).
_WAN_VARIANT_MARKERS = (
    ("vace_patch_embedding.weight", "Wan VACE DiT"),
    ("control_adapter.conv.weight", "Wan Fun-Camera DiT"),
    ("audio_proj.audio_proj_glob_1.layer.bias", "Wan HuMo DiT"),
    ("face_adapter.fuser_blocks.0.k_norm.weight", "Wan2.2 Animate DiT"),
)
_WAN_SIZES = {1536: "1.3B", 3072: "5B", 5120: "14B"}


@dataclass(frozen=True)
class DiTDetection:
    """What a set of (canonical) keys and shapes is: `kind` is 's2v' for our model.

    `name` says which model ("Wan2.2-S2V DiT (14B)"), `description` adds dtype and tensor count.
    """

    kind: str
    description: str
    name: str = ""


def _count_indices(keys, pattern: re.Pattern) -> int:
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _size_name(dim: int) -> str:
    return _WAN_SIZES.get(dim, f"dim {dim}")


def _dit_width(shapes: Mapping[str, tuple]) -> int:
    """The model width from whichever tensor that carries it is present (a shard may hold few)."""
    for key, shape in shapes.items():
        if key == "patch_embedding.weight" or _SELF_Q_RE.match(key) or key.endswith(".final_linear.weight"):
            return shape[0]
    return 0


def detect_dit(keys_shapes: Mapping[str, tuple], dtype: str | None = None) -> DiTDetection:
    """Classify a checkpoint by keys and shapes (prefixes allowed) and describe it in words.

    `keys_shapes` maps names to shapes; a lazy checkpoint (anything with `.shapes()`) works too.
    """
    if hasattr(keys_shapes, "shapes"):
        if dtype is None and hasattr(keys_shapes, "dtype_summary"):
            dtype = keys_shapes.dtype_summary()
        keys_shapes = keys_shapes.shapes()
    shapes = {to_canonical(k): tuple(v) for k, v in keys_shapes.items()}
    n = len(shapes)
    tail = f", {dtype}, {n} tensors" if dtype else f", {n} tensors"
    keys = list(shapes)

    def found(kind: str, name: str) -> DiTDetection:
        return DiTDetection(kind, name + tail, name)

    if not keys:
        return DiTDetection("empty", "an empty checkpoint (0 tensors)", "an empty checkpoint")
    if any(_LORA_RE.search(k) for k in keys):
        return found("lora", "a LoRA file (adapter factors only)")
    if "casual_audio_encoder.encoder.final_linear.weight" in shapes or (
            "frame_packer.proj.weight" in shapes and "blocks.0.self_attn.q.weight" in shapes):
        dim = _dit_width(shapes)
        layers = _count_indices(keys, _BLOCK_RE)
        return found("s2v", f"Wan2.2-S2V DiT ({'14B' if dim == _RELEASE_DIM else f'dim {dim}, {layers} layers'})")
    if "head.modulation" in shapes and "blocks.0.self_attn.q.weight" in shapes:
        dim = shapes["blocks.0.self_attn.q.weight"][0]
        for marker, name in _WAN_VARIANT_MARKERS:
            if marker in shapes:
                return found("wan_variant", f"{name} ({_size_name(dim)})")
        in_dim = shapes.get("patch_embedding.weight", (0, 0))[1]
        if in_dim == 48:
            return found("wan_ti2v", "Wan2.2 TI2V-5B DiT (in_dim 48)")
        if in_dim == 36 or "img_emb.proj.0.bias" in shapes:
            return found("wan_i2v", f"Wan 2.1/2.2 I2V DiT ({_size_name(dim)}, in_dim {in_dim})")
        return found("wan_t2v", f"Wan 2.1/2.2 T2V DiT ({_size_name(dim)}, in_dim {in_dim})")
    if any(k.startswith(("encoder.downsamples.", "decoder.upsamples.")) for k in keys):
        return found("vae", "a Wan video VAE")
    if ("token_embedding.weight" in shapes and "blocks.0.attn.q.weight" in shapes) or any(
            k.startswith("encoder.block.0.layer.0.SelfAttention.") for k in keys):
        return found("t5", "a umT5 text encoder")
    if any("feature_extractor.conv_layers." in k for k in keys):
        return found("wav2vec2", "a wav2vec2 audio encoder")
    if any(_SELF_Q_RE.match(k) for k in keys):
        blocks = sorted({int(m.group(1)) for k in keys if (m := _BLOCK_RE.match(k))})
        return found("dit_part", f"a Wan DiT (width {_dit_width(shapes)}; this file holds blocks "
                                 f"{blocks[0]}-{blocks[-1]} only)")
    return DiTDetection("unknown", f"an unrecognised checkpoint{tail} (e.g. {', '.join(keys[:3])})",
                        "an unrecognised checkpoint")


def describe_dit(keys_shapes: Mapping[str, tuple], dtype: str | None = None) -> str:
    """One line such as "Wan2.2-S2V DiT (14B), bf16, 1260 tensors" (or what the file is instead)."""
    return detect_dit(keys_shapes, dtype).description


# --- config from shapes ---------------------------------------------------------------------------

def infer_dit_config(shapes: Mapping[str, tuple], config_json: Path | None = None,
                     input_name: str = INPUT_NAME) -> DiTConfig:
    """DiTConfig of a single-file S2V checkpoint (canonical keys).

    The 14B release mapping is used for release-width files; other widths need `config_json`,
    because the injector->layer mapping and the head count cannot be read from shapes.
    """
    if config_json is not None:
        return DiTConfig.from_json(config_json)

    if "patch_embedding.weight" not in shapes:
        raise WeightsError(input_name, "the S2V DiT tensor 'patch_embedding.weight' is missing, so the "
                           "architecture cannot be read from the file.", "use a complete checkpoint file.")
    dim = shapes["patch_embedding.weight"][0]
    if dim != _RELEASE_DIM:
        raise WeightsError(
            input_name,
            f"this Wan2.2-S2V DiT has width {dim}, not the 14B release's {_RELEASE_DIM}; the audio "
            "injector->layer mapping and the head count cannot be read from tensor shapes.",
            "put the model's config.json next to the file (as <file name>.json or config.json).")
    # The release is the only S2V DiT of this width, so any other difference (layers, ffn, audio
    # width) is damage, which check_dit_shapes reports against the release table.
    return DiTConfig.wan_s2v_14b()


# --- loading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiTCheckpoint:
    """A validated S2V DiT checkpoint.

    `state_dict` is a lazy mapping in canonical Wan names (nothing is read until indexed; fp8_scaled
    weights are dequantised to bf16 on access). `source_dtype` is the dominant stored dtype.
    """

    state_dict: Mapping[str, torch.Tensor]
    config: DiTConfig
    description: str
    source_dtype: torch.dtype
    format: str
    path: Path

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.state_dict.shapes()


def _dominant_dtype(lazy) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for key in lazy:
        dtype = lazy.dtype(key)
        if dtype.is_floating_point:
            numel = 1
            for s in lazy.shape(key):
                numel *= s
            counts[dtype] = counts.get(dtype, 0) + numel
    return max(counts, key=counts.get) if counts else torch.float32


def resolve_dit_files(path: str | Path, input_name: str = INPUT_NAME) -> tuple[Path, Path | None, bool]:
    """(weights file or index, config.json or None, is_official_folder_layout) of a DiT path."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(input_name, f"{path} does not exist.",
                           "point to the Wan2.2-S2V-14B folder, its index json or a single .safetensors file.")
    if path.is_dir():
        for name in (DIT_INDEX, DIT_SINGLE):
            if (path / name).exists():
                config = path / DIT_CONFIG
                return path / name, (config if config.exists() else None), True
        raise WeightsError(input_name, f"the folder {path} holds neither {DIT_INDEX} nor {DIT_SINGLE}.",
                           "point to the Wan2.2-S2V-14B folder (or pass the weight file itself).")
    if path.name.endswith(".index.json"):
        config = path.parent / DIT_CONFIG
        return path, (config if config.exists() else None), True
    for candidate in (path.with_suffix(".json"), path.parent / DIT_CONFIG):
        if candidate.exists():
            return path, candidate, False
    return path, None, False


def check_dit_shapes(shapes: Mapping[str, tuple], cfg: DiTConfig, description: str,
                     input_name: str = INPUT_NAME) -> None:
    """Refuse a checkpoint whose canonical keys/shapes differ from `expected_dit_keys(cfg)`."""
    problems = key_mismatch(expected_dit_keys(cfg), shapes)
    if problems:
        raise WeightsError(input_name, f"{description} does not match the expected architecture: "
                           + "; ".join(problems) + ".",
                           "download the checkpoint again, or fix config.json if it does not belong to these "
                           "weights.")


def load_dit_checkpoint(path: str | Path, input_name: str = INPUT_NAME) -> DiTCheckpoint:
    """Open an S2V DiT in any supported format, validate it completely, and return a lazy view.

    `path` may be the official folder, its `*.index.json`, or a single (bf16/fp32 or ComfyUI
    fp8_scaled) file. Wrong models, incomplete or damaged files raise WeightsError naming the problem.
    """
    path = Path(path)
    weights_path, config_json, official_layout = resolve_dit_files(path, input_name)
    lazy = open_checkpoint(weights_path, input_name)
    raw_keys = list(lazy)
    source_dtype = _dominant_dtype(lazy)
    if any(k.endswith(".comfy_quant") for k in raw_keys):
        raise WeightsError(input_name, f"{weights_path.name} uses ComfyUI's mixed-precision quantisation "
                           "(comfy_quant), which this loader does not read.",
                           "use wan2.2_s2v_14B_bf16.safetensors, the fp8_scaled file or the official folder.")
    scaled = is_scaled_fp8(raw_keys)
    source: Mapping = ScaledFP8View(lazy, torch.bfloat16) if scaled else lazy
    names = _canonical_names(source, input_name)
    view = _CanonicalView(source, names)
    shapes = view.shapes()
    dtype_word = lazy.dtype_summary() + (" scaled" if scaled else "")
    detection = detect_dit(shapes, dtype_word)
    if detection.kind != "s2v":
        raise WeightsError(input_name, f"{weights_path.name} is {detection.description}, not the Wan2.2-S2V-14B "
                           "DiT that Live Avatar needs.",
                           "select the Wan2.2-S2V-14B diffusion model (official folder, "
                           "wan2.2_s2v_14B_bf16.safetensors or wan2.2_s2v_14B_fp8_scaled.safetensors).")
    cfg = infer_dit_config(shapes, config_json, input_name)
    check_dit_shapes(shapes, cfg, detection.description, input_name)
    if official_layout and not any(k != to_canonical(k) for k in names.values()) and not scaled:
        fmt = "official"
    else:
        fmt = "comfyui_fp8_scaled" if scaled else "comfyui"
    return DiTCheckpoint(view, cfg, detection.description, source_dtype, fmt, weights_path)


def load_into_module(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                     device: torch.device | str | None = None, input_name: str = INPUT_NAME,
                     only: Callable[[str], bool] | None = None) -> None:
    """Copy a (lazy) state dict into `module` one tensor at a time, casting to each parameter's dtype.

    `module.load_state_dict` would first materialise the whole mapping, i.e. a second full copy of
    the model. Parameters on the meta device are replaced by real ones on `device`. `only`: the
    names to load (the others are neither read nor checked, and stay as they are).
    """
    params = {k: v for k, v in module.named_parameters() if only is None or only(k)}
    problems = key_mismatch(list(params), [k for k in state_dict if only is None or only(k)])
    if problems:
        raise WeightsError(input_name, "the checkpoint does not fit the model's parameters: " + "; ".join(problems)
                           + ".", "load a checkpoint of the same architecture as the model config.")
    with torch.no_grad():
        for name, param in params.items():
            tensor = state_dict[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise WeightsError(input_name, f"{name} has shape {tuple(tensor.shape)} in the checkpoint but "
                                   f"{tuple(param.shape)} in the model.",
                                   "load a checkpoint of the same architecture as the model config.")
            if param.is_meta:
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                target = device if device is not None else "cpu"
                real = tensor.to(device=target, dtype=param.dtype)
                owner.register_parameter(leaf, torch.nn.Parameter(real, requires_grad=param.requires_grad))
            else:
                param.copy_(tensor)
