"""wav2vec2 checkpoints: every spelling we accept, mapped onto one canonical state dict.

Canonical form = the keys of transformers' `Wav2Vec2Model` (the base model, no CTC head) in the
installed version, built with SpecAugment off, so `load_state_dict(strict=True)` sees zero missing
and zero unexpected keys:

* no prefix (`feature_extractor...`, `encoder.layers.N...`), whatever the file used (`wav2vec2.` in
  the official HF folder, `audio_encoder.` or none in single files);
* the positional conv's weight norm as a parametrization
  (`encoder.pos_conv_embed.conv.parametrizations.weight.original0/original1`); 2021-era files use the
  legacy `weight_g/weight_v` names for the same two tensors;
* heads and training-only tensors dropped: `lm_head.*` (CTC), pre-training quantizer/projections,
  `masked_spec_embed` (SpecAugment only; never read at inference).

Accepted sources: the official folder `wav2vec2-large-xlsr-53-english/` (config.json +
model.safetensors / pytorch_model.bin / sharded index) and ComfyUI's single file
`wav2vec2_large_english_fp16.safetensors` (architecture then comes from tensor shapes).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsError
from .io import open_checkpoint, read_json_object
from .layout import WAV2VEC2_WEIGHT_FILES

# Live Avatar's DiT mixes exactly 25 hidden states (embedding output + 24 layers) with a fixed
# (1, 25, 1, 1) learned weight, so only 24-layer encoders can drive it (fixtures README section 2).
REQUIRED_LAYERS = 24

_ANCHOR = "feature_projection.projection.weight"
_POS_CONV = "encoder.pos_conv_embed.conv."
_WEIGHT_NORM_NAMES = {
    "legacy": ("weight_g", "weight_v"),
    "parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
}
_CANONICAL_WEIGHT_NORM = "parametrizations"
# Tensors that belong to heads or to training, never to the feature encoder we run.
_DROPPED_PREFIXES = ("lm_head.", "quantizer.", "project_hid.", "project_q.")
_DROPPED_NAMES = ("masked_spec_embed",)
# The conv feature encoder's strides are not visible in tensor shapes; every released wav2vec2
# uses this 320x stack (50 Hz at 16 kHz), recognised by its kernels.
_STANDARD_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
_STANDARD_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


@dataclass(frozen=True)
class Wav2Vec2KeyLayout:
    """How one file spells its keys: what precedes the model keys and which weight-norm names it uses."""

    prefix: str = ""
    weight_norm: str = _CANONICAL_WEIGHT_NORM


@dataclass(frozen=True)
class Wav2Vec2Arch:
    """Architecture of a wav2vec2 encoder; defaults are wav2vec2-large-xlsr-53-english."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = _STANDARD_CONV_KERNEL
    conv_stride: tuple[int, ...] = _STANDARD_CONV_STRIDE
    conv_bias: bool = True
    feat_extract_norm: str = "layer"
    stable_layer_norm: bool = True
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    feat_extract_activation: str = "gelu"

    def to_hf_config(self, attn_implementation: str = "sdpa"):
        """transformers `Wav2Vec2Config` for inference (dropouts and SpecAugment off)."""
        from transformers import Wav2Vec2Config

        config = Wav2Vec2Config(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            conv_dim=list(self.conv_dim),
            conv_kernel=list(self.conv_kernel),
            conv_stride=list(self.conv_stride),
            conv_bias=self.conv_bias,
            feat_extract_norm=self.feat_extract_norm,
            do_stable_layer_norm=self.stable_layer_norm,
            num_conv_pos_embeddings=self.pos_conv_kernel,
            num_conv_pos_embedding_groups=self.pos_conv_groups,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
            feat_extract_activation=self.feat_extract_activation,
            # With both probabilities at 0 the model has no `masked_spec_embed`, which we drop.
            mask_time_prob=0.0,
            mask_feature_prob=0.0,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            feat_proj_dropout=0.0,
            layerdrop=0.0,
        )
        config._attn_implementation = attn_implementation
        return config

    @property
    def samples_per_frame(self) -> int:
        """Total stride of the conv stack (320 for every released model)."""
        n = 1
        for s in self.conv_stride:
            n *= s
        return n

    def num_frames(self, num_samples: int) -> int:
        """Length of the hidden states for `num_samples` input samples (conv arithmetic, no padding)."""
        n = num_samples
        for k, s in zip(self.conv_kernel, self.conv_stride):
            n = (n - k) // s + 1 if n >= k else 0
        return n

    def samples_for_frames(self, frames: int) -> int:
        """Fewest input samples that give `frames` hidden-state frames (inverse of `num_frames`)."""
        n = frames
        for k, s in reversed(list(zip(self.conv_kernel, self.conv_stride))):
            n = (n - 1) * s + k
        return n

    def describe(self) -> str:
        return (f"wav2vec2, {self.num_layers} layers, hidden {self.hidden_size}, {self.num_heads} heads, "
                f"ffn {self.intermediate_size}")


@dataclass(frozen=True)
class LoadedWav2Vec2:
    """A checkpoint read into canonical form, with what was found, in words."""

    state_dict: dict[str, torch.Tensor]
    arch: Wav2Vec2Arch
    layout: Wav2Vec2KeyLayout
    do_normalize: bool
    description: str


# ---------------------------------------------------------------------------------------------
# Key maps


def detect_layout(keys: Iterable[str], input_name: str = "audio_encoder") -> Wav2Vec2KeyLayout:
    """Find the prefix and weight-norm spelling of a wav2vec2 state dict from its keys."""
    keys = list(keys)
    anchors = [k for k in keys if k.endswith(_ANCHOR)]
    if len(anchors) != 1:
        what = "no" if not anchors else f"{len(anchors)}"
        raise WeightsError(input_name, f"{what} '{_ANCHOR}' tensor found, so this is not a single wav2vec2 "
                           f"encoder ({len(keys)} tensors, e.g. {keys[:2]}).",
                           "pick wav2vec2-large-xlsr-53-english (the official folder or ComfyUI's "
                           "wav2vec2_large_english_fp16.safetensors).")
    prefix = anchors[0][: -len(_ANCHOR)]
    weight_norm = None
    for spelling, (g_name, _) in _WEIGHT_NORM_NAMES.items():
        if f"{prefix}{_POS_CONV}{g_name}" in keys:
            weight_norm = spelling
    if weight_norm is None:
        raise WeightsError(input_name, "the positional convolution's weight-norm tensors "
                           f"('{prefix}{_POS_CONV}weight_g' or '...parametrizations.weight.original0') are missing.",
                           "the file is incomplete or not a wav2vec2 encoder; download it again.")
    return Wav2Vec2KeyLayout(prefix=prefix, weight_norm=weight_norm)


def canonical_key(key: str, layout: Wav2Vec2KeyLayout) -> str | None:
    """Canonical name of one file key, or None for heads and training-only tensors we drop."""
    if key.startswith(layout.prefix):
        name = key[len(layout.prefix):]
    elif key.startswith(_DROPPED_PREFIXES):
        # The CTC head of Wav2Vec2ForCTC sits beside the `wav2vec2.` prefix, not under it.
        return None
    else:
        name = key
    if name.startswith(_DROPPED_PREFIXES) or name in _DROPPED_NAMES:
        return None
    source_names = _WEIGHT_NORM_NAMES[layout.weight_norm]
    canonical_names = _WEIGHT_NORM_NAMES[_CANONICAL_WEIGHT_NORM]
    for src, dst in zip(source_names, canonical_names):
        if name == _POS_CONV + src:
            return _POS_CONV + dst
    return name


def source_key(name: str, layout: Wav2Vec2KeyLayout) -> str:
    """Inverse of `canonical_key`: how a file with `layout` spells canonical key `name`."""
    canonical_names = _WEIGHT_NORM_NAMES[_CANONICAL_WEIGHT_NORM]
    source_names = _WEIGHT_NORM_NAMES[layout.weight_norm]
    for src, dst in zip(canonical_names, source_names):
        if name == _POS_CONV + src:
            name = _POS_CONV + dst
    return layout.prefix + name


def to_canonical(state_dict: Mapping[str, torch.Tensor], layout: Wav2Vec2KeyLayout) -> dict[str, torch.Tensor]:
    """Rename every kept tensor to its canonical key (tensors are not copied)."""
    out = {}
    for key in state_dict:
        name = canonical_key(key, layout)
        if name is not None:
            out[name] = state_dict[key]
    return out


def from_canonical(state_dict: Mapping[str, torch.Tensor], layout: Wav2Vec2KeyLayout) -> dict[str, torch.Tensor]:
    """Spell a canonical state dict the way a file with `layout` does (used to write test files)."""
    return {source_key(k, layout): v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------
# Architecture


def arch_from_shapes(shapes: Mapping[str, tuple[int, ...]], num_heads: int | None = None,
                     input_name: str = "audio_encoder") -> Wav2Vec2Arch:
    """Architecture from canonical tensor shapes (single files carry no config).

    Heads are hidden/64 (true for every released wav2vec2) unless `num_heads` is given.
    """
    try:
        hidden = shapes[_ANCHOR][0]
        num_layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers."))
        ffn = shapes["encoder.layers.0.feed_forward.intermediate_dense.weight"][0]
        pos_v = shapes[_POS_CONV + _WEIGHT_NORM_NAMES[_CANONICAL_WEIGHT_NORM][1]]
        n_conv = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("feature_extractor.conv_layers."))
        conv = [shapes[f"feature_extractor.conv_layers.{i}.conv.weight"] for i in range(n_conv)]
    except (KeyError, ValueError) as exc:
        raise WeightsError(input_name, f"the wav2vec2 tensors are incomplete (missing {exc}).",
                           "download the file again.") from None
    kernel = tuple(s[2] for s in conv)
    if kernel != _STANDARD_CONV_KERNEL:
        raise WeightsError(input_name, f"unusual conv feature encoder (kernels {kernel}); its strides cannot be "
                           "read from the weights.", "use the official folder with its config.json.")
    if num_heads is None:
        if hidden % 64:
            raise WeightsError(input_name, f"hidden size {hidden} is not a multiple of 64, so the head count "
                               "cannot be inferred from the weights.",
                               "pass the model's config.json (config argument) or use the official folder.")
        num_heads = hidden // 64
    # Per-layer LayerNorm in the conv stack ("layer") is only used by the stable-layer-norm models
    # (large-lv60, XLSR); the group-norm stack has a norm on the first conv only.
    layer_norm_convs = "feature_extractor.conv_layers.1.layer_norm.weight" in shapes
    return Wav2Vec2Arch(
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=ffn,
        conv_dim=tuple(s[0] for s in conv),
        conv_kernel=kernel,
        conv_stride=_STANDARD_CONV_STRIDE,
        conv_bias="feature_extractor.conv_layers.1.conv.bias" in shapes,
        feat_extract_norm="layer" if layer_norm_convs else "group",
        stable_layer_norm=layer_norm_convs,
        pos_conv_kernel=pos_v[2],
        pos_conv_groups=hidden // pos_v[1],
    )


def arch_from_config(config: Mapping, input_name: str = "audio_encoder") -> Wav2Vec2Arch:
    """Architecture from a transformers `config.json` dict."""
    if config.get("model_type", "wav2vec2") != "wav2vec2":
        raise WeightsError(input_name, f"config.json describes a '{config.get('model_type')}' model, not wav2vec2.",
                           "use wav2vec2-large-xlsr-53-english.")
    defaults = Wav2Vec2Arch()
    get = config.get
    try:
        return _arch(get, defaults)
    except TypeError as exc:
        raise WeightsError(input_name, f"config.json has a field of the wrong type ({exc}).",
                           "use the config.json that came with these weights.") from None


def _arch(get, defaults: Wav2Vec2Arch) -> Wav2Vec2Arch:
    return Wav2Vec2Arch(
        hidden_size=get("hidden_size", defaults.hidden_size),
        num_layers=get("num_hidden_layers", defaults.num_layers),
        num_heads=get("num_attention_heads", defaults.num_heads),
        intermediate_size=get("intermediate_size", defaults.intermediate_size),
        conv_dim=tuple(get("conv_dim", defaults.conv_dim)),
        conv_kernel=tuple(get("conv_kernel", defaults.conv_kernel)),
        conv_stride=tuple(get("conv_stride", defaults.conv_stride)),
        conv_bias=get("conv_bias", defaults.conv_bias),
        feat_extract_norm=get("feat_extract_norm", defaults.feat_extract_norm),
        stable_layer_norm=get("do_stable_layer_norm", defaults.stable_layer_norm),
        pos_conv_kernel=get("num_conv_pos_embeddings", defaults.pos_conv_kernel),
        pos_conv_groups=get("num_conv_pos_embedding_groups", defaults.pos_conv_groups),
        layer_norm_eps=get("layer_norm_eps", defaults.layer_norm_eps),
        hidden_act=get("hidden_act", defaults.hidden_act),
        feat_extract_activation=get("feat_extract_activation", defaults.feat_extract_activation),
    )


def check_layer_count(num_layers: int, hidden_size: int, input_name: str = "audio_encoder") -> None:
    """Refuse encoders whose hidden-state count the DiT cannot mix (checked first: it is the usual mistake)."""
    if num_layers != REQUIRED_LAYERS:
        guess = {12: " (looks like wav2vec2-base)"}.get(num_layers, "")
        raise WeightsError(input_name, f"this wav2vec2 has {num_layers} transformer layers{guess}, hidden "
                           f"{hidden_size}; Live Avatar's DiT mixes exactly {REQUIRED_LAYERS + 1} hidden "
                           f"states, so it needs a {REQUIRED_LAYERS}-layer encoder.",
                           "use wav2vec2-large-xlsr-53-english (the folder shipped in Wan2.2-S2V-14B/, or "
                           "ComfyUI's wav2vec2_large_english_fp16.safetensors).")


def check_arch(arch: Wav2Vec2Arch, shapes: Mapping[str, tuple[int, ...]], input_name: str = "audio_encoder") -> None:
    """Refuse encoders the DiT cannot use, and configs that contradict the weights."""
    check_layer_count(arch.num_layers, arch.hidden_size, input_name)
    from_weights = arch_from_shapes(shapes, num_heads=arch.num_heads, input_name=input_name)
    mismatched = [f"{f}: config {getattr(arch, f)} vs weights {getattr(from_weights, f)}"
                  for f in ("hidden_size", "num_layers", "intermediate_size", "conv_dim", "pos_conv_kernel",
                            "pos_conv_groups")
                  if getattr(arch, f) != getattr(from_weights, f)]
    if mismatched:
        raise WeightsError(input_name, "config.json does not match the weights (" + "; ".join(mismatched) + ").",
                           "use the config.json that came with these weights.")
    if arch.hidden_size % arch.num_heads:
        raise WeightsError(input_name, f"{arch.num_heads} heads do not divide hidden size {arch.hidden_size}.",
                           "fix num_attention_heads in config.json.")


# ---------------------------------------------------------------------------------------------
# Loading


def load_wav2vec2(path: str | os.PathLike, config: str | os.PathLike | Mapping | None = None,
                  input_name: str = "audio_encoder") -> LoadedWav2Vec2:
    """Read a wav2vec2 folder or single file into canonical form and validate it for Live Avatar.

    `config` (a config.json path or dict) overrides the architecture; a folder's own config.json is
    used otherwise, and a single file's architecture comes from its tensor shapes.
    """
    weights, folder_json, preprocessor_json = wav2vec2_files(path, input_name)
    folder_config = read_json_object(folder_json, input_name) if folder_json else None
    do_normalize = True
    if preprocessor_json is not None:
        do_normalize = bool(read_json_object(preprocessor_json, input_name).get("do_normalize", True))

    lazy = open_checkpoint(weights, input_name)
    layout = detect_layout(lazy.keys(), input_name)
    shapes = {canonical_key(k, layout): s for k, s in lazy.shapes().items()}
    shapes.pop(None, None)
    layers = {k.split(".")[2] for k in shapes if k.startswith("encoder.layers.")}
    check_layer_count(len(layers), shapes.get(_ANCHOR, (0,))[0], input_name)

    if isinstance(config, Mapping):
        config_dict = dict(config)
    elif config is not None:
        config_dict = read_json_object(Path(config), input_name)
    else:
        config_dict = folder_config
    if config_dict is not None:
        arch = arch_from_config(config_dict, input_name)
    else:
        arch = arch_from_shapes(shapes, input_name=input_name)
    check_arch(arch, shapes, input_name)

    state_dict = to_canonical(lazy, layout)
    source = "config.json" if config_dict is not None else "tensor shapes"
    description = (f"{arch.describe()} (from {source}), {lazy.dtype_summary()}, {len(state_dict)} tensors, "
                   f"keys prefix '{layout.prefix}', weight norm '{layout.weight_norm}'")
    return LoadedWav2Vec2(state_dict, arch, layout, do_normalize, description)


def wav2vec2_files(path: str | os.PathLike, input_name: str = "audio_encoder") -> tuple[Path, Path | None, Path | None]:
    """(weights file, config.json or None, preprocessor_config.json or None) of a folder or single file."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in WAV2VEC2_WEIGHT_FILES if (path / n).exists()), None)
        if weights is None:
            raise WeightsError(input_name, f"no weights in {path} (looked for {', '.join(WAV2VEC2_WEIGHT_FILES)}).",
                               "download the complete wav2vec2-large-xlsr-53-english folder.")
        config, preprocessor = path / "config.json", path / "preprocessor_config.json"
        return weights, (config if config.exists() else None), (preprocessor if preprocessor.exists() else None)
    if path.exists():
        return path, None, None
    raise WeightsError(input_name, f"not found: {path}.",
                       "pass the wav2vec2-large-xlsr-53-english folder or a wav2vec2 .safetensors file.")


def describe_wav2vec2(path: str | os.PathLike, input_name: str = "audio_encoder") -> str:
    """One line for a wav2vec2 folder or file from its config and tensor headers (no tensor is read)."""
    weights, config_json, _ = wav2vec2_files(path, input_name)
    lazy = open_checkpoint(weights, input_name)
    layout = detect_layout(lazy.keys(), input_name)
    shapes = {canonical_key(k, layout): s for k, s in lazy.shapes().items()}
    shapes.pop(None, None)
    if config_json is not None:
        arch, source = arch_from_config(read_json_object(config_json, input_name), input_name), "config.json"
    else:
        arch, source = arch_from_shapes(shapes, input_name=input_name), "tensor shapes"
    fit = "" if arch.num_layers == REQUIRED_LAYERS else f"; Live Avatar needs {REQUIRED_LAYERS} layers"
    return f"{arch.describe()} (from {source}), {lazy.dtype_summary()}, {len(lazy)} tensors{fit}"
