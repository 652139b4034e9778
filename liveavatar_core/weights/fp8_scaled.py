"""ComfyUI's `scaled_fp8` single files (e.g. `wan2.2_s2v_14B_fp8_scaled.safetensors`,
`umt5_xxl_fp8_e4m3fn_scaled.safetensors`).

Such a file carries a marker tensor `scaled_fp8` (empty; its dtype names the fp8 format), Linear
weights stored as float8 and, next to each of them, a per-tensor `<module>.scale_weight` (plus an
optional `<module>.scale_input` used only by ComfyUI's own fp8 matmul). The real weight is
`weight.float() * scale_weight`. `ScaledFP8View` presents such a file as a plain state dict whose
fp8 weights are dequantised lazily, one tensor at a time, so the rest of the loader never needs to
know the format.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

MARKER = "scaled_fp8"
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def is_scaled_fp8(keys) -> bool:
    """True for a ComfyUI `scaled_fp8` file, recognised by its marker key (with any prefix)."""
    return any(k == MARKER or k.endswith("." + MARKER) for k in keys)


class ScaledFP8View(Mapping):
    """Lazy dequantising view of a `scaled_fp8` state dict.

    Keys are the file's keys minus the marker and the scale tensors. A float8 weight with a
    `scale_weight` beside it is returned as `out_dtype(fp32(weight) * scale)`; every other tensor
    is returned unchanged (callers cast as they need).
    """

    def __init__(self, source: Mapping, out_dtype: torch.dtype = torch.bfloat16):
        self._src = source
        self.out_dtype = out_dtype
        self._keys = [k for k in source
                      if not (k == MARKER or k.endswith("." + MARKER) or k.endswith(_SCALE_SUFFIXES))]
        self._keyset = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keyset:
            raise KeyError(key)
        tensor = self._src[key]
        scale_key = key[: -len(".weight")] + ".scale_weight" if key.endswith(".weight") else None
        if scale_key is not None and scale_key in self._src and tensor.dtype in _FP8_DTYPES:
            scale = self._src[scale_key].to(torch.float32)
            return (tensor.to(torch.float32) * scale).to(self.out_dtype)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._src.shape(key)) if hasattr(self._src, "shape") else tuple(self[key].shape)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._keys}


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize_scaled_fp8(state_dict: Mapping[str, torch.Tensor], linear_weights,
                        fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> dict[str, torch.Tensor]:
    """Write a state dict in ComfyUI's `scaled_fp8` layout (used by tests and the demo checkpoint).

    `linear_weights` names the 2-D weights to quantise; scale = amax / fp8_max per tensor.
    """
    fp8_max = torch.finfo(fp8_dtype).max
    out: dict[str, torch.Tensor] = {MARKER: torch.empty(0, dtype=fp8_dtype)}
    wanted = set(linear_weights)
    for key, tensor in state_dict.items():
        if key in wanted:
            w = tensor.to(torch.float32)
            scale = w.abs().amax().clamp(min=1e-12) / fp8_max
            out[key] = (w / scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
            out[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            out[key] = tensor
    return out
