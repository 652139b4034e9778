"""H.264 and AAC encoding for the streaming writer (PyAV codec contexts, no muxer).

Every video fragment is encoded by a *fresh* libx264 encoder: a GOP starts with an IDR frame and
no rate-control state survives it, so its bytes depend only on its own frames, and a resumed run
writes the same video bytes as an uninterrupted one. Audio uses one continuous AAC encoder:
restarting it per fragment would put a splice (and a fresh rate-control warm-up) every half
second, which measurably lowers quality; a resumed run has a single splice instead.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.codec.context import Flags

from ..errors import InputError
from .fmp4 import Sample, annexb_to_length_prefixed

AAC_FRAME = 1024  # samples per AAC-LC access unit
# Sampling rates an AAC-LC AudioSpecificConfig can signal by index (14496-3 table 1.18).
AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)

# ITU-R BT.601 limited range: what FFmpeg's RGB -> yuv420p conversion produces by default (and so
# what the official imageio/ffmpeg writer produced, untagged). Tagging it lets players that would
# otherwise guess BT.709 for HD sizes show the right colours.
_BT601 = 6  # AVCOL_SPC/PRI/TRC_SMPTE170M
_LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG


@dataclass(frozen=True)
class VideoCodecSettings:
    """libx264 settings; identical settings give identical SPS/PPS, which resuming relies on."""

    width: int
    height: int
    fps: Fraction
    crf: int
    preset: str
    threads: int
    gop_frames: int


def open_video_encoder(cfg: VideoCodecSettings) -> av.VideoCodecContext:
    """An opened libx264 encoder emitting Annex B packets with SPS/PPS in `extradata` only."""
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height = cfg.width, cfg.height
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = 1 / cfg.fps
    ctx.framerate = cfg.fps
    # No B-frames: decode order equals presentation order, so fragments need no composition
    # offsets and a GOP's packets are all out once its last frame has been sent.
    ctx.max_b_frames = 0
    # The GOP length shapes the SPS (reference counts, frame_num bits), so it is fixed by the
    # settings, never by the size of one append: every fragment must match the init segment.
    ctx.gop_size = cfg.gop_frames
    ctx.thread_count = cfg.threads
    ctx.flags |= Flags.global_header
    ctx.colorspace = ctx.color_primaries = ctx.color_trc = _BT601
    ctx.color_range = _LIMITED_RANGE
    # Scene-cut detection off: with short GOPs and no B-frames, x264's scene-cut bias turns almost
    # every frame into an IDR. Each fragment starts with one IDR anyway.
    ctx.options = {"crf": str(cfg.crf), "preset": cfg.preset, "sc_threshold": "0"}
    ctx.open()
    return ctx


def video_extradata(cfg: VideoCodecSettings) -> bytes:
    """The SPS/PPS the encoder would produce for these settings (for the init segment)."""
    return bytes(open_video_encoder(cfg).extradata)


def encode_gop(cfg: VideoCodecSettings, frames: np.ndarray, first_index: int, timescale: int,
               extradata: bytes) -> list[Sample]:
    """Encode uint8 frames `[n, H, W, 3]` (at most `gop_frames`) as one closed GOP, in order.

    `extradata` is what the init segment was built from; a fresh encoder must reproduce it.
    """
    ctx = open_video_encoder(cfg)
    if bytes(ctx.extradata) != extradata:
        raise RuntimeError("libx264 produced parameter sets that differ from the file header")
    duration = int(timescale / cfg.fps)
    packets = []
    for i, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = first_index + i
        packets += ctx.encode(frame)
    packets += ctx.encode(None)
    if len(packets) != len(frames):
        raise RuntimeError(f"libx264 returned {len(packets)} packets for {len(frames)} frames")
    return [Sample(annexb_to_length_prefixed(bytes(p)), duration, p.is_keyframe) for p in packets]


class AudioSource:
    """Read-only view of the user's audio in *output* time, without copying the whole track.

    Output sample t plays source sample `t + offset`; samples outside the source read as
    silence. `length` is the output audio length (source length minus a positive offset, plus
    the silence a negative offset inserts).
    """

    def __init__(self, audio: np.ndarray, sample_rate: int, offset: int, input_name: str = "audio"):
        if not isinstance(audio, np.ndarray):
            raise InputError(input_name, f"expected a numpy array, got {type(audio).__name__}.")
        if audio.ndim == 1:
            audio = audio[None]
        elif audio.ndim == 2 and audio.shape[0] > 2 >= audio.shape[1]:
            audio = audio.T  # [n, channels] (soundfile layout) -> channels first, a view
        if audio.ndim != 2 or audio.shape[0] not in (1, 2):
            raise InputError(
                input_name, f"expected mono [n] or stereo [2, n] / [n, 2] samples, got shape {audio.shape}.",
                "Mix down to mono or stereo first.",
            )
        if not np.issubdtype(audio.dtype, np.floating):
            raise InputError(
                input_name, f"samples must be float in [-1, 1], got dtype {audio.dtype}.",
                "Convert integer PCM with audio.astype(np.float32) / 32768.",
            )
        if sample_rate not in AAC_SAMPLE_RATES:
            raise InputError(
                "sample_rate", f"{sample_rate} Hz cannot be stored as AAC.",
                f"Resample to one of {', '.join(map(str, AAC_SAMPLE_RATES))} Hz (16000 or 48000 are typical).",
            )
        if offset >= audio.shape[1]:
            raise InputError(
                "audio_offset_frames",
                f"the offset skips {offset} samples but the audio has only {audio.shape[1]}.",
                "Use a smaller offset.",
            )
        self.samples = audio
        self.sample_rate = sample_rate
        self.channels = audio.shape[0]
        self.offset = offset
        self.length = audio.shape[1] - offset
        # Checked in chunks so a long track costs no second full-size buffer.
        crc = 0
        for start in range(0, audio.shape[1], 1 << 20):
            chunk = np.ascontiguousarray(audio[:, start:start + (1 << 20)], dtype=np.float32)
            if not np.isfinite(chunk).all():
                raise InputError(input_name, "contains NaN or infinite samples.",
                                 "Check the audio decoder output.")
            crc = zlib.crc32(chunk.tobytes(), crc)
        self.crc32 = crc

    def clamp(self, n: int) -> int:
        """min(n, length): what a streamed source answers without knowing its length yet."""
        return min(n, self.length)

    @property
    def known_length(self) -> int:
        """The output length (a streamed source: None until its end has been read)."""
        return self.length

    def identity(self) -> dict:
        """What a resumed writer checks against: rate, channels, length and checksum."""
        return {"sample_rate": self.sample_rate, "channels": self.channels,
                "samples": int(self.samples.shape[1]), "crc32": self.crc32}

    def read(self, start: int, stop: int) -> np.ndarray:
        """Float32 `[channels, stop - start]` of output samples, zero outside the audio."""
        out = np.zeros((self.channels, stop - start), np.float32)
        lo, hi = max(start, 0, -self.offset), min(stop, self.length)
        if hi > lo:
            out[:, lo - start:hi - start] = self.samples[:, lo + self.offset:hi + self.offset]
        return out


@dataclass(frozen=True)
class AudioCodecSettings:
    """AAC-LC settings; `preroll` samples warm the encoder up when a file is resumed."""

    sample_rate: int
    channels: int
    bitrate: int
    preroll: int


def open_audio_encoder(cfg: AudioCodecSettings) -> av.AudioCodecContext:
    """An opened FFmpeg AAC-LC encoder."""
    ctx = av.CodecContext.create("aac", "w")
    ctx.sample_rate = cfg.sample_rate
    ctx.layout = "mono" if cfg.channels == 1 else "stereo"
    ctx.format = "fltp"
    ctx.bit_rate = cfg.bitrate
    ctx.time_base = Fraction(1, cfg.sample_rate)
    ctx.open()
    return ctx


def audio_config(cfg: AudioCodecSettings) -> tuple[bytes, int]:
    """AudioSpecificConfig and encoder delay (priming samples) for these settings."""
    ctx = open_audio_encoder(cfg)
    frame = av.AudioFrame.from_ndarray(
        np.zeros((cfg.channels, AAC_FRAME), np.float32), format="fltp", layout=ctx.layout.name,
    )
    frame.sample_rate, frame.pts = cfg.sample_rate, 0
    packets = ctx.encode(frame) + ctx.encode(None)
    return bytes(ctx.extradata), -packets[0].pts


class AacStream:
    """One continuous AAC encoder over an `AudioSource`, handing out packets by presentation time.

    The encoder releases a packet a frame or two after it was fed (the packet starting at p
    encodes the window [p, p + 2048), and FFmpeg's encoder holds one more frame), so `take` feeds
    just far enough ahead for every packet before a fragment's end to come out: audio is written
    in step with the video without waiting for the rest of the track.

    `start` > 0 resumes an interrupted file: the encoder is warmed up on `preroll` earlier samples
    whose packets are thrown away, so the splice at `start` is inaudible (the packets after it are
    close to, not bit-identical with, those of the uninterrupted encoder).
    """

    def __init__(self, cfg: AudioCodecSettings, source: AudioSource, start: int = 0):
        self._cfg, self._source = cfg, source
        self._ctx = open_audio_encoder(cfg)
        self._fed = max(0, start - cfg.preroll)
        # The very first packet is the encoder's priming, which the edit list hides.
        self._keep_from = start if start else -math.inf
        self._pending: list[av.Packet] = []
        self._released = -math.inf  # presentation end of the last packet out of the encoder

    def _feed(self, stop: int) -> None:
        end = min(self._fed + AAC_FRAME, stop)
        frame = av.AudioFrame.from_ndarray(self._source.read(self._fed, end), format="fltp",
                                           layout=self._ctx.layout.name)
        frame.sample_rate, frame.pts = self._cfg.sample_rate, self._fed
        self._collect(self._ctx.encode(frame))
        self._fed = end

    def _collect(self, packets: list[av.Packet]) -> None:
        self._pending += packets
        if packets:
            self._released = packets[-1].pts + AAC_FRAME

    def take(self, stop: int, final: bool = False) -> tuple[int, list[Sample]]:
        """(pts of the first, packets) for all not yet taken packets that start before `stop`.

        A non-final `stop` must be a multiple of 1024. `final` ends the track at `stop`: the
        encoder is drained and the last packet's duration is cut to end there.
        """
        if final:
            while self._fed < stop:
                self._feed(stop)
            self._collect(self._ctx.encode(None))
        else:
            while self._released < stop:
                self._feed(self._fed + AAC_FRAME)
        ready = [p for p in self._pending if p.pts < stop]
        self._pending = [p for p in self._pending if p.pts >= stop]
        ready = [p for p in ready if p.pts >= self._keep_from]
        samples = [Sample(bytes(p), min(AAC_FRAME, stop - p.pts), True) for p in ready]
        return (ready[0].pts if ready else stop), samples
