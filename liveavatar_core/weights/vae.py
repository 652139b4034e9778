"""Wan 2.1 VAE weight files: the official `Wan2.1_VAE.pth` and ComfyUI's `wan_2.1_vae.safetensors`.

Both carry the same 194 Wan-native keys (spec/pipeline.md 1.1); bundled checkpoints may prefix them
(`vae.`, `first_stage_model.`, ...). A file is recognised by its keys and shapes: the base width
comes from `encoder.conv1.weight`, the latent width from `conv2.weight`, and every other shape must
match the table `expected_vae_shapes` builds for those two numbers. Files of other models that users
plausibly pick by mistake (Wan 2.2 VAE, diffusers VAEs, image VAEs, a DiT, T5, a LoRA) are named.

This module knows nothing about the network itself; `liveavatar_core.vae` builds it from the facts
returned here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import WeightsError
from .keys import key_mismatch

_ANCHOR = "encoder.conv1.weight"
DIM_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
# Encoder stages 2 and 3 halve time (spec/pipeline.md 4.1); the decoder mirrors them.
TEMPORAL_DOWNSAMPLE = (False, True, True)
# Pixels per latent along height and width: every one of the len(DIM_MULT) - 1 stages halves both.
SPATIAL_STRIDE = 2 ** (len(DIM_MULT) - 1)


@dataclass(frozen=True)
class VAEFileInfo:
    """What a Wan 2.1 VAE file holds, as far as its keys and shapes tell."""

    prefix: str  # stripped from every key on load ("" for the official file)
    base_dim: int  # 96 for the released VAE
    z_dim: int  # 16
    num_tensors: int
    num_params: int
    dtype: str  # dominant float dtype, e.g. "fp32"

    def describe(self) -> str:
        prefix = f", keys prefixed '{self.prefix}'" if self.prefix else ""
        return (f"Wan 2.1 VAE (z={self.z_dim}, base width {self.base_dim}, "
                f"{self.num_params / 1e6:.1f} M params), {self.dtype}, {self.num_tensors} tensors{prefix}")


def expected_vae_shapes(base_dim: int, z_dim: int = 16) -> dict[str, tuple[int, ...]]:
    """Every key of a Wan 2.1 VAE state dict with its shape, for the given widths."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv3d(name, cin, cout, k=(3, 3, 3)):
        shapes[f"{name}.weight"] = (cout, cin, *k)
        shapes[f"{name}.bias"] = (cout,)

    def conv2d(name, cin, cout, k=3):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def res(name, cin, cout):
        shapes[f"{name}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv3d(f"{name}.residual.2", cin, cout)
        shapes[f"{name}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv3d(f"{name}.residual.6", cout, cout)
        if cin != cout:
            conv3d(f"{name}.shortcut", cin, cout, (1, 1, 1))

    def middle(name, c):
        res(f"{name}.0", c, c)
        shapes[f"{name}.1.norm.gamma"] = (c, 1, 1)
        conv2d(f"{name}.1.to_qkv", c, 3 * c, 1)
        conv2d(f"{name}.1.proj", c, c, 1)
        res(f"{name}.2", c, c)

    # Encoder: stages of residual blocks, each but the last followed by a down-sampler.
    dims = [base_dim * m for m in (1, *DIM_MULT)]
    conv3d("encoder.conv1", 3, dims[0])
    idx = 0
    for stage, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(NUM_RES_BLOCKS):
            res(f"encoder.downsamples.{idx}", cin, cout)
            cin, idx = cout, idx + 1
        if stage != len(DIM_MULT) - 1:
            conv2d(f"encoder.downsamples.{idx}.resample.1", cout, cout)
            if TEMPORAL_DOWNSAMPLE[stage]:
                conv3d(f"encoder.downsamples.{idx}.time_conv", cout, cout, (3, 1, 1))
            idx += 1
    top = dims[-1]
    middle("encoder.middle", top)
    shapes["encoder.head.0.gamma"] = (top, 1, 1, 1)
    conv3d("encoder.head.2", top, 2 * z_dim)
    conv3d("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv3d("conv2", z_dim, z_dim, (1, 1, 1))

    # Decoder: every up-sampler halves the channels, so later stages start at half width.
    dims = [base_dim * m for m in (DIM_MULT[-1], *DIM_MULT[::-1])]
    temporal_up = TEMPORAL_DOWNSAMPLE[::-1]
    conv3d("decoder.conv1", z_dim, dims[0])
    middle("decoder.middle", dims[0])
    idx = 0
    for stage, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if stage > 0:
            cin //= 2
        for _ in range(NUM_RES_BLOCKS + 1):
            res(f"decoder.upsamples.{idx}", cin, cout)
            cin, idx = cout, idx + 1
        if stage != len(DIM_MULT) - 1:
            conv2d(f"decoder.upsamples.{idx}.resample.1", cout, cout // 2)
            if temporal_up[stage]:
                conv3d(f"decoder.upsamples.{idx}.time_conv", cout, 2 * cout, (3, 1, 1))
            idx += 1
    shapes["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv3d("decoder.head.2", dims[-1], 3)
    return shapes


def inspect_vae(shapes: Mapping[str, tuple[int, ...]], input_name: str = "vae",
                dtype: str = "unknown dtype") -> VAEFileInfo:
    """Recognise a Wan 2.1 VAE from `key -> shape`; raise `WeightsError` naming what was found instead."""
    prefix = _find_prefix(shapes, input_name)
    keys = {k[len(prefix):]: tuple(s) for k, s in shapes.items() if k.startswith(prefix)}
    base_dim = keys[_ANCHOR][0]
    z_dim = keys["conv2.weight"][0] if "conv2.weight" in keys else None
    if z_dim == 48 or keys[_ANCHOR][1] == 12:
        raise WeightsError(input_name, "this is a Wan 2.2 VAE (48 latent channels, used by Wan2.2-TI2V-5B); "
                           "Live Avatar needs the Wan 2.1 VAE (16 latent channels).",
                           "select Wan2.1_VAE.pth from the Wan2.2-S2V-14B folder or ComfyUI's "
                           "wan_2.1_vae.safetensors.")
    expected = expected_vae_shapes(base_dim, z_dim or 16)
    problems = key_mismatch(expected, keys)
    if problems:
        raise WeightsError(input_name, "looks like a Wan VAE but does not match the Wan 2.1 layout: "
                           + "; ".join(problems) + ".",
                           "use the official Wan2.1_VAE.pth or ComfyUI's wan_2.1_vae.safetensors.")
    num_params = 0
    for shape in expected.values():
        n = 1
        for s in shape:
            n *= s
        num_params += n
    return VAEFileInfo(prefix, base_dim, z_dim, len(keys), num_params, dtype)


def describe_vae(keys_shapes: Mapping[str, tuple[int, ...]], dtype: str = "unknown dtype") -> str:
    """One line such as "Wan 2.1 VAE (z=16, base width 96, 126.9 M params), fp32, 194 tensors".

    Raises `WeightsError` naming the model when the keys are not a Wan 2.1 VAE.
    """
    return inspect_vae(keys_shapes, dtype=dtype).describe()


def vae_state_dict(sd: Mapping[str, torch.Tensor], info: VAEFileInfo,
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Wan-native `name -> tensor` (prefix stripped), optionally cast; reads tensors lazily one by one."""
    out = {}
    for key in sd:
        if key.startswith(info.prefix):
            t = sd[key]
            out[key[len(info.prefix):]] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def to_file_keys(sd: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of `vae_state_dict`'s renaming: Wan-native keys to a file's (prefixed) keys."""
    return {prefix + k: v for k, v in sd.items()}


def _find_prefix(shapes: Mapping[str, tuple[int, ...]], input_name: str) -> str:
    candidates = {k[: -len(_ANCHOR)] for k in shapes
                  if k.endswith(_ANCHOR) and (len(k) == len(_ANCHOR) or k[-len(_ANCHOR) - 1] == ".")}
    candidates = {p for p in candidates if len(shapes[p + _ANCHOR]) == 5}
    if len(candidates) == 1:
        return candidates.pop()
    if len(candidates) > 1:
        raise WeightsError(input_name, f"the file holds several VAEs (key prefixes {sorted(candidates)}).",
                           "extract the Wan 2.1 VAE into its own file.")
    raise WeightsError(input_name, f"not a Wan 2.1 VAE: {_what_is_it(shapes)}.",
                       "select Wan2.1_VAE.pth (Wan2.2-S2V-14B folder) or ComfyUI's wan_2.1_vae.safetensors.")


def _what_is_it(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Best guess at a wrong file's identity, for the error message."""
    keys = list(shapes)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    def find(suffix: str):
        return next((shapes[k] for k in keys if k.endswith(suffix)), None)

    if has("lora_A") or has("lora_down") or has("lora_B"):
        return "it is a LoRA"
    if has("patch_embedding.weight") or has("self_attn.q.weight") or has("double_blocks."):
        return "it is a diffusion model (DiT)"
    if has("token_embedding.weight") or has("SelfAttention.q.weight") or has("encoder.block.0.layer"):
        return "it is a T5 text encoder"
    conv_in = find("encoder.conv_in.weight")
    if conv_in is None:
        conv_in = find("encoder.conv_in.conv.weight")
    if conv_in is not None and len(conv_in) == 5:
        return "it is a video VAE in diffusers layout (conv_in/down_blocks), not the Wan-native layout"
    if conv_in is not None:
        post = find("decoder.conv_in.weight")
        z = post[1] if post is not None else "?"
        return f"it is an image VAE (Stable Diffusion / SDXL / Flux style, {z} latent channels)"
    if has("feature_extractor") or has("wav2vec2"):
        return "it is a wav2vec2 audio encoder"
    sample = ", ".join(keys[:3]) if keys else "no tensors"
    return f"no '{_ANCHOR}' key (first keys: {sample})"
