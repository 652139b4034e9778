"""Per-stream state of the DiT: step KV caches, the condition ("sink") cache and the text cache.

* `KVCache`: one per denoising step. A ring of `cache_frames * fs` token rows per layer holding the
  already-rotated keys and the values of past blocks computed at that step's noise level
  (spec/pipeline.md 3.4, 3.6-3.8). Rows are never moved; keys carry absolute positions.
* `CondCache`: un-rotated keys and values of the reference + FramePack tokens, sized by their actual
  count (2.5 * fs), plus the RoPE layout needed to re-rotate the keys at each call. All step caches
  of a stream may share one (the single-GPU official behaviour: the four sink passes are identical).
* `TextCache`: per-layer text cross-attention keys/values; they depend only on the prompt, so they
  are computed once per stream instead of on every call.

Each of them may hold a contiguous range of layers only (a rank of the layer layout,
spec/parallel.md 2); layers are always addressed by their global index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DiTConfig
from ..errors import InputError
from ..ops.fp8 import E4M3, dequantize_kv, quantize_rows
from .rope import RopeFreqs, TokenGrid


def check_layers(layers, num_layers: int, name: str = "layers") -> range:
    """`layers` as a non-empty contiguous range inside 0..num_layers (refused otherwise)."""
    if not isinstance(layers, range) or layers.step != 1 or not 0 <= layers.start < layers.stop <= num_layers:
        raise InputError(name, f"{layers!r} is not a non-empty range of consecutive layers in 0..{num_layers}.",
                         f"pass range(a, b) with 0 <= a < b <= {num_layers}.")
    return layers


def _missing(what: str, layer: int, held: range) -> InputError:
    return InputError(what, f"layer {layer} is not among its layers {held.start}..{held.stop - 1}.",
                      "build it for a layer range covering the layers you run (layers=...).")


@dataclass
class CondCache:
    """Condition tokens per layer: k, v `[B, Lc, H, HD]`, keys not rotated; `k[j]` is layer
    `layers[j]` (default: all layers from 0)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    ref: TokenGrid  # reference group at its sink position; its time index moves per call
    motion: list[TokenGrid]  # FramePack groups; their positions never move
    layers: range | None = None

    def __post_init__(self):
        if self.layers is None:
            self.layers = range(len(self.k))

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of global layer `layer`."""
        if layer not in self.layers:
            raise _missing("cond_cache", layer, self.layers)
        j = layer - self.layers.start
        return self.k[j], self.v[j]

    @property
    def num_tokens(self) -> int:
        return self.k[0].shape[1]

    @property
    def patch_grid(self) -> tuple[int, int]:
        return len(self.ref.h), len(self.ref.w)

    def rope(self, freqs: RopeFreqs, ref_time: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of all condition keys with the reference group at time index `ref_time`."""
        ref = self.ref.shifted(ref_time - self.ref.t[0])
        return freqs.sequence([ref, *self.motion], device=device)


@dataclass
class TextCache:
    """Embedded text `[B, text_len, D]` and each layer's cross-attention (k, v) heads; `kv[j]` is
    layer `layers[j]` (default: all layers from 0)."""

    embedded: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    layers: range | None = None

    def __post_init__(self):
        if self.layers is None:
            self.layers = range(len(self.kv))

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of global layer `layer`."""
        if layer not in self.layers:
            raise _missing("text_cache", layer, self.layers)
        return self.kv[layer - self.layers.start]


class KVCache:
    """Ring buffer of rotated self-attention keys/values for one denoising step.

    It holds `num_layers` layers from `first_layer` on (default all of the model's); `update`
    takes the global layer index, the tensors' first dimension is the local one.

    `dtype` is how the ring stores them. `torch.float8_e4m3fn` (an FP8 KV cache) halves the
    memory of bf16: each key and value head of a row is kept as e4m3 codes with its own scale
    (`k_scale`, `v_scale` `[layers, B, rows, H, 1]` in `compute_dtype`) and handed to attention
    dequantised to `compute_dtype` (`fused`: by a compiled kernel where available); a block's own
    rows are attended exactly as computed.
    """

    def __init__(self, num_layers: int, batch: int, length: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None, cond: CondCache | None = None,
                 compute_dtype: torch.dtype | None = None, fused: bool = True, first_layer: int = 0):
        shape = (num_layers, batch, length, num_heads, head_dim)
        self.layers = range(first_layer, first_layer + num_layers)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cond = cond
        self.compute_dtype = kv_compute_dtype(dtype, compute_dtype)
        self.fused = fused
        self.k_scale = self.v_scale = None
        if self.quantized:
            self.k_scale = torch.zeros((*shape[:-1], 1), dtype=self.compute_dtype, device=device)
            self.v_scale = torch.zeros((*shape[:-1], 1), dtype=self.compute_dtype, device=device)

    @property
    def quantized(self) -> bool:
        """Whether the ring stores FP8 codes (see the class docstring)."""
        return self.k.dtype == E4M3

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def local(self, layer: int) -> int:
        """Index into the ring tensors of global layer `layer`."""
        if layer not in self.layers:
            raise _missing("kv_cache", layer, self.layers)
        return layer - self.layers.start

    def window(self, current_start: int, num_tokens: int) -> tuple[int, int]:
        """(write row, rows to attend) for a block of `num_tokens` starting at `current_start`.

        Before the ring is full the block attends to rows [0, start + n); afterwards the whole ring
        (spec/dit.md 3.9 step 3). Writes never wrap because the length is a multiple of the block.
        """
        if current_start < 0:
            raise InputError("current_start", f"must be >= 0, got {current_start}.",
                             "pass the block's token offset since the stream start.")
        if self.length % num_tokens:
            raise InputError("kv_cache", f"cache length {self.length} is not a multiple of the block "
                             f"length {num_tokens} tokens.",
                             "allocate cache_frames as a multiple of the frames per block.")
        if current_start >= self.length:
            return current_start % self.length, self.length
        return current_start, current_start + num_tokens

    def update(self, layer: int, current_start: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the block's rotated k and v, return the keys/values history it attends to."""
        row, visible = self.window(current_start, k.shape[1])
        j = self.local(layer)
        if self.quantized:
            return store_fp8(self.k[j], self.k_scale[j], self.v[j], self.v_scale[j], row, visible, k, v, self.fused)
        self.k[j, :, row:row + k.shape[1]] = k
        self.v[j, :, row:row + v.shape[1]] = v
        return self.k[j, :, :visible], self.v[j, :, :visible]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The ring's tensors by name (k, v, and with an FP8 ring k_scale, v_scale), for resume files."""
        names = ("k", "v", "k_scale", "v_scale") if self.quantized else ("k", "v")
        return {name: getattr(self, name) for name in names}


def store_fp8(k_ring: torch.Tensor, k_scale: torch.Tensor, v_ring: torch.Tensor, v_scale: torch.Tensor,
              row: int, visible: int, k: torch.Tensor, v: torch.Tensor, fused: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a block's k and v into one layer's FP8 rings `[B, rows, H, HD]` at `row`; return
    the first `visible` rows dequantised, the block's own rows exact."""
    n = k.shape[1]
    out = []
    for ring, scale, new in ((k_ring, k_scale, k), (v_ring, v_scale, v)):
        ring[:, row:row + n], scale[:, row:row + n] = quantize_rows(new)
        history = dequantize_kv(ring[:, :visible], scale[:, :visible], new.dtype, fused)
        history[:, row:row + n] = new
        out.append(history)
    return out[0], out[1]


def kv_compute_dtype(storage: torch.dtype, compute: torch.dtype | None) -> torch.dtype:
    """The dtype a ring stored in `storage` hands to attention; refuses FP8 rings for fp32 models."""
    if storage != E4M3:
        return compute or storage
    if compute not in (torch.bfloat16, torch.float16):
        raise InputError("kv_cache_dtype", f"an FP8 KV cache dequantises to the DiT's compute dtype, got {compute}.",
                         "use it with bf16 (or fp8) precision, or keep the cache in the model dtype.")
    return compute


# kv_cache_dtype names -> ring storage dtypes (the DiT computes in bf16 or fp32).
KV_STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": E4M3}


def tokens_per_frame(cfg: DiTConfig, lat_h: int, lat_w: int) -> int:
    """Patch tokens of one latent frame: (H_l / 2) * (W_l / 2)."""
    _, ph, pw = cfg.patch_size
    return (lat_h // ph) * (lat_w // pw)


def ring_length(cfg: DiTConfig, lat_h: int, lat_w: int, cache_frames: int) -> int:
    """Token rows of one layer's ring: `cache_frames` latent frames, a whole number of blocks."""
    if cache_frames <= 0 or cache_frames % cfg.num_frames_per_block:
        raise InputError("cache_frames", f"{cache_frames} latent frames is not a positive multiple of "
                         f"the {cfg.num_frames_per_block} frames denoised per block.",
                         "use latent frames per clip = a multiple of the block size (12 for 48-frame clips).")
    return cache_frames * tokens_per_frame(cfg, lat_h, lat_w)


def make_step_caches(cfg: DiTConfig, lat_h: int, lat_w: int, *, num_steps: int, cache_frames: int,
                     batch: int = 1, dtype: torch.dtype = torch.bfloat16, device=None,
                     storage_dtype: torch.dtype | None = None, fused: bool = True,
                     layers: range | None = None) -> list[KVCache]:
    """One `KVCache` per denoising step, `cache_frames` latent frames long (12 for 48-frame clips).

    `dtype` is the DiT's compute dtype, `storage_dtype` the rings' (default the same;
    `torch.float8_e4m3fn` for an FP8 cache; `fused`: see `KVCache`); `layers`: the range of layers
    stored (default all). The condition cache is attached by `LiveAvatarDiT.sink`, shared by all of them.
    """
    length = ring_length(cfg, lat_h, lat_w, cache_frames)
    layers = check_layers(range(cfg.num_layers) if layers is None else layers, cfg.num_layers)
    return [KVCache(len(layers), batch, length, cfg.num_heads, cfg.head_dim, storage_dtype or dtype, device,
                    compute_dtype=dtype, fused=fused, first_layer=layers.start) for _ in range(num_steps)]
