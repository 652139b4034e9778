"""The causal S2V DiT: module, per-stream caches, reference-offset policy."""

from .cache import CondCache, KVCache, TextCache, make_step_caches, tokens_per_frame
from .dit import LiveAvatarDiT
from .offset import RefOffsetPolicy

__all__ = ["CondCache", "KVCache", "LiveAvatarDiT", "RefOffsetPolicy", "TextCache", "make_step_caches",
           "tokens_per_frame"]
