"""Step KV caches in pinned host memory, streamed to the GPU one layer ahead of use.

The official `--offload_kv_cache` copies a whole 10 GB step cache to the GPU and back around every
call, synchronously (spec/pipeline.md 5.6, 8.9). Here each step's ring lives in pinned host memory
and the GPU holds `KV_STREAM_SLOTS` single-layer staging buffers shared by all step caches:

1. when a call announces its window (`window`, which the DiT calls before its first layer), layer
   0's visible rows start copying on a side stream;
2. `update(layer, ...)` waits for that layer's copy, writes the block's new rows into the staging
   buffer, queues the write-back of only those rows to the host, and starts copying the next
   layer into the other buffer while this layer attends.

Reads and writes of the host ring go through one side stream, so a write-back always lands before
a later read of the same rows. `k` / `v` return the host ring after its pending write-backs, and
forget staged copies of this cache (the caller may write the ring, e.g. when resuming a state).
On the CPU the same steps run synchronously, which is what the tests check bit for bit.

An FP8 ring (`torch.float8_e4m3fn`, see `model.cache.KVCache`) streams its codes and scales,
half the bytes of bf16, and is dequantised on the GPU after staging.
"""

from __future__ import annotations

import torch

from ..config import DiTConfig
from ..errors import InputError
from ..model.cache import CondCache, KVCache, check_layers, kv_compute_dtype, ring_length, store_fp8
from ..ops.fp8 import E4M3
from ..plan import KV_STREAM_SLOTS
from .copier import Copier


class KVStreamer:
    """GPU staging buffers and the side stream shared by the streamed caches of one stream."""

    def __init__(self, device: str | torch.device, layer_shape: tuple[int, ...], dtype: torch.dtype,
                 slots: int = KV_STREAM_SLOTS, compute_dtype: torch.dtype | None = None):
        if slots < 2:
            raise InputError("kv_stream_slots", f"needs at least 2 staging buffers, got {slots}.",
                             "use 2 (one in use, one in flight).")
        self.copier = Copier(device)
        self.k = [torch.empty(layer_shape, dtype=dtype, device=device) for _ in range(slots)]
        self.v = [torch.empty(layer_shape, dtype=dtype, device=device) for _ in range(slots)]
        self.quantized = dtype == E4M3
        scale_shape = (*layer_shape[:-1], 1)
        self.k_scale = [torch.empty(scale_shape, dtype=compute_dtype, device=device) if self.quantized else None
                        for _ in range(slots)]
        self.v_scale = [torch.empty(scale_shape, dtype=compute_dtype, device=device) if self.quantized else None
                        for _ in range(slots)]
        self.tag: list[tuple[int, int, int] | None] = [None] * slots  # (cache id, layer, visible rows)
        self.loaded: list[torch.cuda.Event | None] = [None] * slots
        self.fetches = 0

    def find(self, key: tuple[int, int, int]) -> int | None:
        return next((s for s, t in enumerate(self.tag) if t == key), None)

    def fetch(self, cache: "StreamedKVCache", layer: int, visible: int, keep: int | None) -> int:
        """Stage rows [0, visible) of `layer` of `cache` (unless already staged); returns the slot."""
        key = (id(cache), layer, visible)
        slot = self.find(key)
        if slot is not None:
            return slot
        free = [s for s in range(len(self.tag)) if s != keep]
        slot = next((s for s in free if self.tag[s] is None), free[0])
        c = self.copier
        # after_compute: the slot's previous layer may still be attending on the compute stream.
        c.copy(self.k[slot][:, :visible], cache.host_k[layer, :, :visible], after_compute=True)
        if self.quantized:
            c.copy(self.k_scale[slot][:, :visible], cache.host_k_scale[layer, :, :visible])
            c.copy(self.v_scale[slot][:, :visible], cache.host_v_scale[layer, :, :visible])
        self.loaded[slot] = c.copy(self.v[slot][:, :visible], cache.host_v[layer, :, :visible])
        self.tag[slot] = key
        self.fetches += 1
        return slot

    def forget(self, cache: "StreamedKVCache") -> None:
        for s, t in enumerate(self.tag):
            if t is not None and t[0] == id(cache):
                self.tag[s] = None

    @property
    def bytes_moved(self) -> int:
        return self.copier.bytes_moved


class StreamedKVCache(KVCache):
    """A `KVCache` whose ring lives in (pinned) host memory; see the module docstring."""

    def __init__(self, streamer: KVStreamer, num_layers: int, batch: int, length: int, num_heads: int,
                 head_dim: int, dtype: torch.dtype, cond: CondCache | None = None,
                 compute_dtype: torch.dtype | None = None, fused: bool = True, first_layer: int = 0):
        shape = (num_layers, batch, length, num_heads, head_dim)
        self.layers = range(first_layer, first_layer + num_layers)
        self.streamer = streamer
        self.host_k = streamer.copier.host_like(shape, dtype)
        self.host_v = streamer.copier.host_like(shape, dtype)
        self.cond = cond
        self.compute_dtype = kv_compute_dtype(dtype, compute_dtype)
        self.fused = fused
        self.host_k_scale = self.host_v_scale = None
        if dtype == E4M3:
            self.host_k_scale = streamer.copier.host_like((*shape[:-1], 1), self.compute_dtype)
            self.host_v_scale = streamer.copier.host_like((*shape[:-1], 1), self.compute_dtype)
        self._written: torch.cuda.Event | None = None

    @property
    def k(self) -> torch.Tensor:
        self._to_host()
        return self.host_k

    @property
    def v(self) -> torch.Tensor:
        self._to_host()
        return self.host_v

    @property
    def k_scale(self) -> torch.Tensor | None:
        self._to_host()
        return self.host_k_scale

    @property
    def v_scale(self) -> torch.Tensor | None:
        self._to_host()
        return self.host_v_scale

    @property
    def quantized(self) -> bool:
        return self.host_k.dtype == E4M3

    @property
    def length(self) -> int:
        return self.host_k.shape[2]

    def _to_host(self) -> None:
        Copier.host_wait(self._written)
        self.streamer.forget(self)

    def window(self, current_start: int, num_tokens: int) -> tuple[int, int]:
        row, visible = super().window(current_start, num_tokens)
        self.streamer.fetch(self, 0, visible, keep=None)  # the call's first (local) layer, ahead of use
        return row, visible

    def update(self, layer: int, current_start: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the block's rows (staging + host write-back), return the staged history."""
        st = self.streamer
        row, visible = KVCache.window(self, current_start, k.shape[1])
        layer = self.local(layer)  # the host rings and staging tags use the local index
        slot = st.fetch(self, layer, visible, keep=None)
        st.copier.wait(st.loaded[slot])
        n = k.shape[1]
        sk, sv = st.k[slot], st.v[slot]
        if self.quantized:
            history = store_fp8(sk, st.k_scale[slot], sv, st.v_scale[slot], row, visible, k, v, self.fused)
            st.copier.copy(self.host_k_scale[layer, :, row:row + n], st.k_scale[slot][:, row:row + n],
                           after_compute=True)
            st.copier.copy(self.host_v_scale[layer, :, row:row + n], st.v_scale[slot][:, row:row + n])
        else:
            sk[:, row:row + n] = k
            sv[:, row:row + n] = v
            history = sk[:, :visible], sv[:, :visible]
        st.copier.copy(self.host_k[layer, :, row:row + n], sk[:, row:row + n], after_compute=True)
        self._written = st.copier.copy(self.host_v[layer, :, row:row + n], sv[:, row:row + n])
        if layer + 1 < self.host_k.shape[0]:
            st.fetch(self, layer + 1, visible, keep=slot)
        return history


def make_streamed_step_caches(cfg: DiTConfig, lat_h: int, lat_w: int, *, num_steps: int, cache_frames: int,
                              device: str | torch.device, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                              storage_dtype: torch.dtype | None = None, fused: bool = True,
                              layers: range | None = None) -> list[StreamedKVCache]:
    """Drop-in replacement for `model.cache.make_step_caches` with the rings in host memory."""
    length = ring_length(cfg, lat_h, lat_w, cache_frames)
    layers = check_layers(range(cfg.num_layers) if layers is None else layers, cfg.num_layers)
    storage = storage_dtype or dtype
    compute = kv_compute_dtype(storage, dtype)
    streamer = KVStreamer(device, (batch, length, cfg.num_heads, cfg.head_dim), storage, compute_dtype=compute)
    return [StreamedKVCache(streamer, len(layers), batch, length, cfg.num_heads, cfg.head_dim, storage,
                            compute_dtype=compute, fused=fused, first_layer=layers.start) for _ in range(num_steps)]
