"""Release GPUs node: stop the worker processes of parallel Live Avatar models."""

from __future__ import annotations

from ..liveavatar_core.parallel.remote import release_all
from . import host


class LiveAvatarReleaseGPUs:
    DESCRIPTION = ("Stops the worker processes of every Live Avatar model loaded with parallel on, so their GPUs "
                   "are free for other work; ComfyUI then forgets its cached outputs, and the next run loads the "
                   "model again. Connect a Video Writer's video to run it after that writer.")
    CATEGORY = "LiveAvatar/loaders"
    FUNCTION = "release"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("released",)
    OUTPUT_TOOLTIPS = ("What was stopped, one line per model.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {
            "video": ("VIDEO", {"tooltip": "Optional: a Video Writer's output, so the release waits for that video."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # never cached: each run releases what is loaded then

    def release(self, video=None, unique_id=None):
        released = release_all()
        host.drop_cached_outputs()
        text = "\n".join(f"stopped: {r}" for r in released) or "no parallel Live Avatar model was running"
        host.Progress(unique_id).status(text, {"released": released})
        return {"ui": {"text": [text]}, "result": (text,)}
