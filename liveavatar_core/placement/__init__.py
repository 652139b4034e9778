"""Memory placement applied to built models: block swap, streamed KV caches, component offload."""

from .block_swap import BlockSwap, apply_block_swap
from .kv_stream import KVStreamer, StreamedKVCache, make_streamed_step_caches
from .offload import component_device, on_device

__all__ = ["BlockSwap", "apply_block_swap", "KVStreamer", "StreamedKVCache", "make_streamed_step_caches",
           "component_device", "on_device"]
