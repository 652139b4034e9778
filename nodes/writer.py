"""Online-decode video writer node: runs the stream and appends each decoded block to the MP4."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from ..liveavatar_core.health import DEFAULT_HEALTH, HEALTH_MODES, HealthRecord, health_paths
from ..liveavatar_core.pipeline import FrameChunk, Stats, write_mp4
from ..liveavatar_core.video import WriterSettings
from . import host
from .sampler import STREAM

DEFAULT_PREFIX = "video/LiveAvatar"


def status_line(stats: Stats, health: HealthRecord | None = None) -> str:
    """'block 3/8 · 21.4 fps · first frame 2.1 s · ETA 12 s' (and '· health: seam' while a health
    alarm is active) for the node and the logs."""
    parts = [f"block {stats.blocks_done}/{stats.blocks_total or '?'}", f"{stats.fps:.1f} fps"]
    if stats.first_frame_s is not None:
        parts.append(f"first frame {stats.first_frame_s:.1f} s")
    if stats.eta_s is not None:
        parts.append(f"ETA {stats.eta_s:.0f} s")
    if health is not None and health.active:
        parts.append(f"health: {', '.join(health.active)}")
    return " · ".join(parts)


def video_metadata(prompt: dict | None, extra_pnginfo: dict | None) -> dict[str, str]:
    """The tags core SaveVideo stores: each extra_pnginfo entry (the UI's "workflow") and "prompt".

    Empty when ComfyUI runs with --disable-metadata, as for its own savers.
    """
    if host.in_comfyui():
        from comfy.cli_args import args
        if args.disable_metadata:
            return {}
    tags = dict(extra_pnginfo or {})
    if prompt is not None:
        tags["prompt"] = prompt
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in tags.items()}


class _FirstFrames:
    """Keeps at most `limit` frames, so returning a preview never holds the whole video."""

    def __init__(self, limit: int):
        self.limit, self.frames = limit, []

    def add(self, frames: np.ndarray) -> None:
        room = self.limit - sum(len(f) for f in self.frames)
        if room > 0:
            self.frames.append(frames[:room])

    def image(self, height: int, width: int) -> torch.Tensor:
        if not self.frames:
            return torch.zeros((0, height, width, 3))
        return torch.from_numpy(np.concatenate(self.frames)).float() / 255


class LiveAvatarVideoWriter:
    DESCRIPTION = ("Generates the video: samples and decodes it block by block and appends every block to an "
                   "MP4 (H.264 + AAC) in ComfyUI's output folder, so memory stays flat however long the audio. "
                   "Cancel stops within a block and leaves a playable file.")
    CATEGORY = "LiveAvatar/output"
    FUNCTION = "write"
    OUTPUT_NODE = True
    RETURN_TYPES = ("VIDEO", "IMAGE", "STRING")
    RETURN_NAMES = ("video", "first_frames", "path")
    OUTPUT_TOOLTIPS = ("The MP4 as a video for ComfyUI's own video nodes.",
                       "The first frames as an IMAGE batch (as many as return_frames; empty for 0).",
                       "Absolute path of the MP4.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "stream": (STREAM, {"tooltip": "From Live Avatar Sampler."}),
                "filename_prefix": ("STRING", {"default": DEFAULT_PREFIX, "tooltip": "File name inside the "
                                               "output folder; a counter and .mp4 are appended."}),
                "return_frames": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "How many of the "
                                          "first frames to also return as IMAGE (kept in memory)."}),
                "health": (list(HEALTH_MODES), {"default": DEFAULT_HEALTH, "tooltip": "Per-block health checks "
                           "(colour drift, face and identity, lip-sync offset, seams, freezes, black frames) "
                           "into NAME.health.jsonl and a plot NAME.health.png beside the MP4, shown on the node. "
                           "warn: alarms in the log and the status line; stop: end the run after the block in "
                           "flight when an alarm is raised (the MP4 stays playable); auto: warn where OpenCV "
                           "can run the checks, else none (the log says why); off: none."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def write(self, stream, filename_prefix: str, return_frames: int, health: str = DEFAULT_HEALTH, unique_id=None,
              prompt=None, extra_pnginfo=None):
        path, name, subfolder = host.new_output_path(filename_prefix, stream.width, stream.height)
        file_info = {"filename": name, "subfolder": subfolder, "type": "output"}
        progress = host.Progress(unique_id)
        first = _FirstFrames(return_frames)

        def on_chunk(chunk: FrameChunk) -> None:
            first.add(chunk.frames)
            stats = chunk.stats
            progress.update(stats.blocks_done, stats.blocks_total or stats.blocks_done,
                            Image.fromarray(chunk.frames[-1]))
            progress.status(status_line(stats, chunk.health), {
                "blocks_done": stats.blocks_done, "blocks_total": stats.blocks_total, "fps": stats.fps,
                "first_frame_s": stats.first_frame_s, "eta_s": stats.eta_s, "frames": stats.frames_done,
                "file": file_info, "health": chunk.health.active if chunk.health is not None else None})

        settings = WriterSettings(metadata=video_metadata(prompt, extra_pnginfo))
        write_mp4(stream, path, on_chunk=on_chunk, writer_settings=settings, health=health)
        host.raise_if_interrupted()  # a cancelled stream ends cleanly; ComfyUI still reports the cancel
        ui = {"images": [file_info], "animated": [True]}
        plot = health_paths(path)[1]
        if plot.is_file():  # this run's: the file name is new
            # A key of the pack's own: ComfyUI's player keeps the video; the extension shows the plot.
            ui["liveavatar_health"] = [{**file_info, "filename": plot.name}]
        return {"ui": ui, "result": (host.video_output(path), first.image(stream.height, stream.width), str(path))}
