"""Fragmented MP4 bytes of a live session: the init segment, then one fragment per block.

The same boxes, H.264 GOPs and AAC encoder as the file writer (`video/`), written to memory: each
block's frames are one closed GOP starting with an IDR frame, so a fragment can be played, or
dropped, on its own, and the concatenation of the init segment and any run of fragments is a
playable file (a browser appends them to a Media Source Extensions buffer one by one).

The AAC encoder reads a little past what it encodes, so a fragment carries the audio up to two
AAC frames (2048 samples) before the end of its block's audio; the rest goes with the next
fragment, and `close` ends the track where the video ends.
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

from ..video.encode import (AAC_FRAME, AacStream, AudioCodecSettings, VideoCodecSettings, audio_config, encode_gop,
                            video_extradata)
from ..video.fmp4 import AUDIO_TRACK_ID, VIDEO_TRACK_ID, AudioTrack, TrackRun, VideoTrack, fragment, init_segment, \
    parameter_sets
from ..video.writer import WriterSettings, video_timescale

# The AAC encoder releases a packet this far behind what it has been fed (AacStream).
_AUDIO_HOLDBACK = 2 * AAC_FRAME


class _GrowingAudio:
    """Mono samples appended block by block, read as `AacStream` reads its source."""

    channels = 1

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.chunks: list[np.ndarray] = []
        self.start = 0  # index of chunks[0][0]
        self.length = 0

    def append(self, samples: np.ndarray) -> None:
        self.chunks.append(np.asarray(samples, np.float32).reshape(-1))
        self.length += self.chunks[-1].size

    def read(self, start: int, stop: int) -> np.ndarray:
        """Float32 `[1, stop - start]`, zeros past what was appended."""
        held = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        out = np.zeros((1, stop - start), np.float32)
        lo, hi = max(start, self.start), min(stop, self.start + held.size)
        if hi > lo:
            out[0, lo - start:hi - start] = held[lo - self.start:hi - self.start]
        # Only samples the encoder may still read stay: it never reads before `start`.
        keep = max(0, start - self.start)
        if keep and self.chunks:
            self.chunks, self.start = [held[keep:]], self.start + keep
        return out


class LiveMP4:
    """fMP4 of `width` x `height` frames at `fps` with mono AAC at `sample_rate` (16, 24 or 48 kHz)."""

    def __init__(self, width: int, height: int, fps: int, sample_rate: int, settings: WriterSettings | None = None):
        s = settings or WriterSettings(preset="veryfast")
        self.fps = Fraction(fps)
        self._video = VideoCodecSettings(width, height, self.fps, s.crf, s.preset, s.threads, s.max_gop_frames)
        self._timescale, self._ticks = video_timescale(self.fps)
        self._extradata = video_extradata(self._video)
        sps, pps = parameter_sets(self._extradata)
        self._audio = _GrowingAudio(sample_rate)
        bitrate = min(s.audio_bitrate, 6 * sample_rate)
        cfg = AudioCodecSettings(sample_rate, 1, bitrate, s.audio_preroll_frames * AAC_FRAME)
        config, self._priming = audio_config(cfg)
        self._aac = AacStream(cfg, self._audio)
        self.init = init_segment(VideoTrack(width, height, self._timescale, sps, pps),
                                 AudioTrack(sample_rate, 1, config, self._priming, bitrate))
        # What a browser's MediaSource needs: H.264 profile, constraints and level from the SPS.
        self.mime = f'video/mp4; codecs="avc1.{sps[1]:02x}{sps[2]:02x}{sps[3]:02x}, mp4a.40.2"'
        self.frames = 0
        self._sequence = 0
        self._audio_out = 0

    def block(self, frames: np.ndarray, samples: np.ndarray) -> list[bytes]:
        """The fragment of one block (one message): uint8 frames `[n, H, W, 3]` and the float32
        samples they play with."""
        self._audio.append(samples)
        runs = [TrackRun(VIDEO_TRACK_ID, self.frames * self._ticks,
                         encode_gop(self._video, frames, self.frames, self._timescale, self._extradata))]
        self.frames += len(frames)
        stop = (self._audio.length - _AUDIO_HOLDBACK) // AAC_FRAME * AAC_FRAME
        if stop > self._audio_out:
            runs.append(self._audio_run(stop, final=False))
        return [self._fragment(runs)]

    def close(self) -> list[bytes]:
        """The last fragment: the audio up to the end of the video."""
        end = int(self.frames * self._audio.sample_rate / self.fps)
        return [self._fragment([self._audio_run(end, final=True)])] if end > self._audio_out else []

    def _audio_run(self, stop: int, final: bool) -> TrackRun:
        first_pts, samples = self._aac.take(stop, final)
        self._audio_out = stop
        return TrackRun(AUDIO_TRACK_ID, first_pts + self._priming, samples)

    def _fragment(self, runs: list[TrackRun]) -> bytes:
        self._sequence += 1
        return fragment(self._sequence, runs)


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as s16le bytes."""
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


class RawBlocks:
    """The `raw` video mode, for adapters on the same machine: per block two messages, its frames
    as RGB24 bytes (`[n, H, W, 3]` uint8, row-major) and its audio as s16le mono PCM."""

    init = b""
    mime = None

    def block(self, frames: np.ndarray, samples: np.ndarray) -> list[bytes]:
        return [np.ascontiguousarray(frames, np.uint8).tobytes(), pcm16(samples)]

    def close(self) -> list[bytes]:
        return []


class JpegBlocks(RawBlocks):
    """The `jpeg` video mode, for adapters across a network: per block one JPEG message per frame
    (baseline, 4:2:0, `quality`), then its audio as s16le mono PCM."""

    def __init__(self, quality: int = 85):
        self.quality = quality

    def block(self, frames: np.ndarray, samples: np.ndarray) -> list[bytes]:
        from PIL import Image

        out = []
        for frame in frames:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(frame, np.uint8)).save(buf, "JPEG", quality=self.quality)
            out.append(buf.getvalue())
        return out + [pcm16(samples)]
