"""Audio of a live session: PCM pushed as it arrives, features handed out block by block.

A live session's audio comes as segments (utterances from a TTS engine or a microphone between
pauses), pushed in chunks of any size at 16, 24 or 48 kHz. Each segment is encoded as its own
utterance, as the official code encodes a file: resampled to 16 kHz with soxr's streaming
resampler, then wav2vec2 over windows (`encoders.audio_stream.WindowedFeatures`) that see
`lookahead_s` of audio on each side, normalised by the running statistics of the segment so far.
So a block's features are ready once its own audio and the look-ahead after it have arrived, or
its segment has ended; until then the session holds. A segment ends in a partial block, which is
completed with zero features (what the official code feeds past the end of the audio) and silent
samples; the next segment starts with the next block.

What each block hands out with its features is the exact input audio it stands for: 12 video
frames at 25 fps are 7680, 11520 or 23040 samples at 16, 24 or 48 kHz.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import soxr
import torch

from ..config import FRAMES_PER_BLOCK
from ..errors import InputError
from ..encoders.audio import DEFAULT_FPS, SAMPLE_RATE, AudioEncoder
from ..encoders.audio_stream import WindowedFeatures

RATES = (16000, 24000, 48000)
DEFAULT_LOOKAHEAD_S = 0.5
# Owned audio per wav2vec2 window: one block, so the first block waits for nothing more than its
# own audio and the look-ahead.
WINDOW_S = FRAMES_PER_BLOCK / DEFAULT_FPS
DEFAULT_MAX_BUFFER_S = 60.0
# When no audio is waiting: hold (generate nothing, the video pauses on its last frame) or
# generate idle motion (blocks driven by zero features, silent), one block after each block's
# playing time without audio.
IDLE_MODES = ("hold", "generate")


@dataclass(frozen=True)
class BlockAudio:
    """The audio of one block: `features [1, L, C, 12]` for the sampler and the `samples` (float32,
    mono, at the session's input rate) that drove it; `segment` counts segments from 0, `index` the
    block within it; `last` marks the segment's last block, `voiced` how many of its samples came
    from the segment (the rest is the silence that completes it); `ready_at` when it could start."""

    features: torch.Tensor
    samples: np.ndarray
    segment: int | None  # None: an idle block (idle "generate")
    index: int
    last: bool
    voiced: int
    ready_at: float  # time.perf_counter() when its audio and look-ahead had arrived


class _Segment:
    """One utterance being encoded."""

    def __init__(self, number: int, encoder: AudioEncoder, rate: int, lookahead_s: float):
        self.number, self.rate = number, rate
        self.resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32",
                                                                                quality="HQ")
        self.features = WindowedFeatures(encoder, FRAMES_PER_BLOCK, DEFAULT_FPS, window_s=WINDOW_S,
                                         context_s=lookahead_s, stats_lookahead_s=0.0)
        self.encoder = encoder
        self.raw = np.zeros(0, np.float32)  # input-rate samples not handed out yet
        self.raw_total = 0
        self.pushed_16k = 0
        self.encoded = True  # False: ended too short for one feature frame (its block is silent)
        self.ended = False
        self.blocks_out = 0
        self.ready_at: list[float] = []  # when each block's audio and look-ahead were complete

    @property
    def blocks(self) -> int | None:
        """Blocks the segment fills (None while it may grow)."""
        if not self.ended:
            return None
        per_block = self.samples_per_block
        return -(-self.raw_total // per_block)

    @property
    def samples_per_block(self) -> int:
        return FRAMES_PER_BLOCK * self.rate // DEFAULT_FPS

    def push(self, x: np.ndarray) -> None:
        self.raw = np.concatenate([self.raw, x])
        self.raw_total += x.size
        self._encode(x if self.resampler is None else self.resampler.resample_chunk(x))

    def end(self) -> None:
        if self.resampler is not None:
            self._encode(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        self.ended = True
        self.encoded = self.pushed_16k >= self.encoder.min_samples()
        if self.encoded:
            self.features.finish()
        self._stamp()

    def _encode(self, x16: np.ndarray) -> None:
        self.pushed_16k += x16.size
        self.features.push(x16)
        self._stamp()

    def _stamp(self) -> None:
        ready = self.blocks if self.ended else self.features.available_frames // FRAMES_PER_BLOCK
        now = time.perf_counter()
        self.ready_at += [now] * (ready - len(self.ready_at))

    def ready(self) -> bool:
        """Whether the next block can be handed out."""
        blocks = self.blocks
        if blocks is not None:
            return self.blocks_out < blocks
        return self.features.available_frames >= (self.blocks_out + 1) * FRAMES_PER_BLOCK

    def take(self) -> BlockAudio:
        k, per_block = self.blocks_out, self.samples_per_block
        arch = self.encoder.arch
        # Past the end of the segment's features: zeros, what the official code feeds past the end
        # of the audio.
        feats = torch.zeros(1, arch.num_layers + 1, arch.hidden_size, FRAMES_PER_BLOCK)
        if self.encoded:
            start, stop = k * FRAMES_PER_BLOCK, min((k + 1) * FRAMES_PER_BLOCK, self.features.available_frames)
            if stop > start:
                feats[..., :stop - start] = self.features.features_until(stop)
        samples = self.raw[:per_block]
        voiced = samples.size
        if voiced < per_block:
            samples = np.concatenate([samples, np.zeros(per_block - voiced, np.float32)])
        self.raw = self.raw[per_block:]
        self.blocks_out = k + 1
        return BlockAudio(feats, samples, self.number, k, self.blocks == k + 1, voiced, self.ready_at[k])


class LiveAudio:
    """The audio side of a live session (thread-safe: pushed from a network thread, taken by
    the generating one).

    encoder: the wav2vec2 encoder; rate: the input sample rate (16, 24 or 48 kHz); lookahead_s:
    audio after a block that its features see (more: closer to whole-utterance features and
    later frames); max_buffer_s: audio that may wait, beyond which `push` is refused; idle: what
    `next_block` does when no audio is waiting (`IDLE_MODES`).
    """

    def __init__(self, encoder: AudioEncoder, rate: int, lookahead_s: float = DEFAULT_LOOKAHEAD_S,
                 max_buffer_s: float = DEFAULT_MAX_BUFFER_S, idle: str = "hold"):
        if rate not in RATES:
            raise InputError("audio_rate", f"{rate!r} Hz is not a rate a live session takes.",
                             f"send s16le mono PCM at one of {', '.join(str(r) for r in RATES)} Hz.")
        if not 0 <= lookahead_s <= 4.0:
            raise InputError("lookahead_s", f"{lookahead_s!r} s is outside 0..4 s.",
                             f"use about {DEFAULT_LOOKAHEAD_S} s (more: better features, later frames).")
        if idle not in IDLE_MODES:
            raise InputError("idle", f"unknown value {idle!r}.", f"choose one of {', '.join(IDLE_MODES)}.")
        self.encoder, self.rate, self.lookahead_s, self.max_buffer_s = encoder, rate, lookahead_s, max_buffer_s
        self.idle = idle
        self._idle_blocks = 0
        self._segments: deque[_Segment] = deque()
        self._count = 0
        self._closed = False
        self._changed = threading.Condition()

    # --- input (any thread) ----------------------------------------------------------------

    def push(self, pcm: np.ndarray | bytes) -> None:
        """Append audio to the open segment (a new one starts if none is open): s16le bytes or
        int16 / float32 samples in [-1, 1], mono."""
        x = _as_float(pcm)
        with self._changed:
            if self._closed:
                raise InputError("audio", "the session has stopped.", "start a new session.")
            if self.buffered_s + x.size / self.rate > self.max_buffer_s:
                raise InputError("audio", f"more than {self.max_buffer_s:g} s of audio would wait to be used.",
                                 "send audio at most as fast as the stats' credit allows (buffer_full).")
            if not self._segments or self._segments[-1].ended:
                self._segments.append(_Segment(self._count, self.encoder, self.rate, self.lookahead_s))
                self._count += 1
            if x.size:
                self._segments[-1].push(x)
            self._changed.notify_all()

    def end_segment(self) -> None:
        """The open segment is complete: its last blocks need no more look-ahead."""
        with self._changed:
            if self._segments and not self._segments[-1].ended:
                self._segments[-1].end()
            self._changed.notify_all()

    def clear(self) -> int | None:
        """Interrupt: drop every segment's audio not handed out yet; returns the segment cut (None
        if nothing was waiting). The block being generated is not affected."""
        with self._changed:
            cut = None
            while self._segments:
                seg = self._segments.popleft()
                if cut is None and (seg.raw.size or not seg.ended):
                    cut = seg.number
            self._changed.notify_all()
            return cut

    def close(self) -> None:
        """No more audio: `next_block` returns None once the queued blocks are taken."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def buffered_s(self) -> float:
        """Seconds of pushed audio not handed out yet."""
        return sum(s.raw.size for s in self._segments) / self.rate

    # --- output (the generating thread) -----------------------------------------------------

    def next_block(self, timeout: float | None = None) -> BlockAudio | None:
        """The next block's audio, waiting for it (at most `timeout` seconds; 0: only what is ready
        now); None on a timeout or once the session is closed and nothing is left. With idle
        "generate", a wait that finds no audio for one block's playing time gives an idle block."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                while self._segments and self._segments[0].ended and not self._segments[0].ready():
                    self._segments.popleft()  # finished (or empty) segments
                if self._segments and self._segments[0].ready():
                    return self._segments[0].take()
                if self._closed or timeout == 0:
                    return None
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if self.idle == "generate" and not self._segments and (left is None or left > WINDOW_S):
                    if not self._changed.wait(WINDOW_S) and not self._segments and not self._closed:
                        return self._idle_block()
                elif not self._changed.wait(left):
                    return None

    def _idle_block(self) -> BlockAudio:
        arch = self.encoder.arch
        self._idle_blocks += 1
        return BlockAudio(torch.zeros(1, arch.num_layers + 1, arch.hidden_size, FRAMES_PER_BLOCK),
                          np.zeros(FRAMES_PER_BLOCK * self.rate // DEFAULT_FPS, np.float32), None,
                          self._idle_blocks - 1, False, 0, time.perf_counter())


def _as_float(pcm) -> np.ndarray:
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        if len(pcm) % 2:
            raise InputError("audio", f"{len(pcm)} bytes is not whole 16-bit samples.", "send s16le mono PCM.")
        return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
    x = np.asarray(pcm)
    if x.ndim != 1:
        raise InputError("audio", f"samples of shape {x.shape}; a live session takes mono.", "send one channel.")
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    if x.dtype != np.float32:
        raise InputError("audio", f"samples of dtype {x.dtype}.", "send int16 or float32 samples.")
    return x
