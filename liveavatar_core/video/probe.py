"""Reading an MP4 back with PyAV: counts, rates, durations and the first decoded frames."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class ProbeResult:
    """What a player gets from the file.

    `audio_duration_s` is the presentation length from the packet timestamps (encoder priming
    excluded); `audio`, when decoded, is cut to that length, as a player would play it.
    """

    width: int
    height: int
    frame_count: int
    fps: Fraction
    duration_s: float
    frames: np.ndarray = field(repr=False)  # uint8 [k, H, W, 3]: the first `max_frames` frames
    sample_rate: int | None = None
    channels: int | None = None
    audio_duration_s: float | None = None
    audio: np.ndarray | None = field(default=None, repr=False)  # float32 [channels, n]

    @property
    def has_audio(self) -> bool:
        return self.sample_rate is not None


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    try:
        return av.open(os.fspath(path))
    except (OSError, av.error.FFmpegError) as exc:
        raise InputError("video file", f"cannot open {path}: {exc}.",
                         "Check that the path is an MP4 file.") from None


def probe_mp4(path: str | os.PathLike, max_frames: int = 8, decode_audio: bool = False) -> ProbeResult:
    """Decode every video frame of `path` (to count them), keeping the first `max_frames`.

    `decode_audio` also decodes the whole audio track into memory (meant for tests and short
    clips). Raises InputError if the file cannot be opened or has no video stream.
    """
    with _open(path) as container:
        if not container.streams.video:
            raise InputError("video file", f"{path} has no video stream.", "Pass a video file.")
        stream = container.streams.video[0]
        kept, count = [], 0
        for frame in container.decode(stream):
            if len(kept) < max_frames:
                kept.append(frame.to_ndarray(format="rgb24"))
            count += 1
        fps = Fraction(stream.average_rate or stream.guessed_rate or 0)
        width, height = stream.codec_context.width, stream.codec_context.height
    frames = np.stack(kept) if kept else np.zeros((0, height, width, 3), np.uint8)
    result = dict(width=width, height=height, frame_count=count, fps=fps,
                  duration_s=float(count / fps) if fps else 0.0, frames=frames)

    with _open(path) as container:
        if container.streams.audio:
            stream = container.streams.audio[0]
            end = 0
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    end = max(end, (packet.pts + packet.duration) * packet.time_base)
            result.update(sample_rate=stream.codec_context.sample_rate,
                          channels=stream.codec_context.channels, audio_duration_s=float(end))
    if decode_audio and "sample_rate" in result:
        length = round(result["audio_duration_s"] * result["sample_rate"])
        result["audio"] = _decode_audio(path, result["channels"])[:, :length]
    return ProbeResult(**result)


def _decode_audio(path: str | os.PathLike, channels: int) -> np.ndarray:
    """Every decoded audio sample as float32 [channels, n] (FFmpeg already drops the priming)."""
    chunks = []
    with _open(path) as container:
        for frame in container.decode(container.streams.audio[0]):
            data = frame.to_ndarray()
            if not frame.format.is_planar:
                data = data.reshape(-1, channels).T
            chunks.append(data.astype(np.float32))
    return np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
