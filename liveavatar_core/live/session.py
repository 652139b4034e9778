"""A live session: push audio in, take the avatar's video out block by block as it is made.

`LiveSession(model, text, image, audio_encoder, ...)` encodes the reference picture and runs the
sink at once (outside the time to first frame), then generates a block whenever a block of audio
and its look-ahead have arrived (`live/audio.py`). When the audio runs out it holds: nothing is
generated, the caches stay, and the next segment continues the same stream, from the next block,
with the same timeline. Iterating the session yields `LiveBlock`s (the frames, the exact input
samples that drove them, timings) and `SegmentEnded` events, until `close()`.

The generation runs on a thread of its own (the DiT calls release the GIL), so pushing audio never
waits for a block. A block's frames go out as soon as they are decoded; while a block is decoded
the next one is already being denoised if its audio is there.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..decoding import DROPPED_START_FRAMES, start_decoder
from ..encoders.audio import DEFAULT_FPS, AudioEncoder
from ..encoders.image import preprocess_reference, reference_uint8
from ..errors import InputError
from ..pipeline import GenerationSettings, LiveAvatarModel, check_size
from ..sampling.generator import BlockSampler
from .audio import DEFAULT_LOOKAHEAD_S, DEFAULT_MAX_BUFFER_S, BlockAudio, LiveAudio

_END = object()  # the generating thread has finished


@dataclass(frozen=True)
class LiveBlock:
    """One generated block: `frames` uint8 `[n, H, W, 3]` (12, the first block 9: the official
    start drops 3), `audio` the float32 samples at the session's rate that drove exactly those
    frames, its place (`segment`, None for idle motion, `index` within it, `frame0` on the stream's
    timeline) and timings
    in seconds: `generate_s` (from its audio to the sampler's last call, host time) and `decode_s`
    (from then until its frames are on the host; on a GPU both overlap the next block's work),
    `latency_s` (from the arrival of the block's audio and look-ahead to its frames), `queued_s`
    (audio waiting behind it) and `rtf`: the time this block took once it could start (its audio
    there and the previous block out) over the time it plays; above 1 the video falls behind."""

    frames: np.ndarray
    audio: np.ndarray
    segment: int | None
    index: int
    frame0: int
    generate_s: float
    decode_s: float
    latency_s: float
    queued_s: float
    rtf: float


@dataclass(frozen=True)
class SegmentEnded:
    """A segment's last block went out (`interrupted` False), or `clear()` cut it short (True);
    `position_s`: where on the stream's timeline it ended."""

    segment: int
    interrupted: bool
    position_s: float


@dataclass
class _InFlight:
    audio: BlockAudio
    started: float
    sampled: float = 0.0
    decoded: object = field(default=None)


class LiveSession:
    """A live avatar stream (see the module docstring).

    model: a loaded `LiveAvatarModel` (one process); text: the umT5 embedding of the prompt;
    image: the reference picture (path, PIL image, array or ComfyUI IMAGE); audio_encoder: the
    wav2vec2 encoder; settings: size and seed (streaming mode; the clip count is unbounded);
    audio_rate: 16000, 24000 or 48000; lookahead_s, max_buffer_s, idle: see `LiveAudio` (idle
    "generate": idle motion while no audio comes, blocks with `segment` None).
    """

    def __init__(self, model: LiveAvatarModel, text: torch.Tensor, image, audio_encoder: AudioEncoder,
                 settings: GenerationSettings | None = None, audio_rate: int = 16000,
                 lookahead_s: float = DEFAULT_LOOKAHEAD_S, max_buffer_s: float = DEFAULT_MAX_BUFFER_S,
                 idle: str = "hold"):
        settings = settings or GenerationSettings()
        if settings.mode != "streaming":
            raise InputError("mode", "a live session runs the streaming mode (the official mode decodes whole "
                             "clips after they are sampled).", "use mode 'streaming'.")
        if settings.fps != DEFAULT_FPS:
            raise InputError("fps", f"a live session plays at {DEFAULT_FPS} fps, the rate the model was trained "
                             f"at; {settings.fps} was asked for.", f"use fps {DEFAULT_FPS}.")
        self.settings, self.model = settings, model
        self.audio = LiveAudio(audio_encoder, audio_rate, lookahead_s, max_buffer_s, idle)
        self.rate = audio_rate
        pixels, (self.height, self.width) = preprocess_reference(image, settings.size)
        self.picture = reference_uint8(pixels)  # the reference as the video frames see it (uint8 [H, W, 3])
        keep_warm = check_size(model, self.height, self.width, settings)
        t0 = time.perf_counter()
        with torch.no_grad():
            ref_lat, motion_lat, self._decoder = start_decoder(model.vae, pixels, settings,
                                                               model.dit.cfg.motion_frames[0], lambda _n: True,
                                                               keep_warm=keep_warm)
            self._sampler = BlockSampler(model.dit, text, ref_lat, motion_lat, settings.sampler_config(),
                                         cache_factory=model.cache_factory())
            self._sampler.prime()
        self.ready_s = time.perf_counter() - t0
        self.fps = DEFAULT_FPS
        self._out: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # the blocks in flight, against clear() from another thread
        self._taken: list[_InFlight] = []  # audio handed to the sampler, its block not yet sampled
        self._pending: _InFlight | None = None  # sampled, its frames being decoded
        self._frames_out = 0
        self._last_out = 0.0  # when the previous block's frames went out
        self._interrupted: set[int] = set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="liveavatar-live", daemon=True)
        self._thread.start()

    # --- input ------------------------------------------------------------------------------

    def push_audio(self, pcm, rate: int | None = None) -> None:
        """Audio of the current segment: s16le bytes or int16 / float32 mono samples at the
        session's rate (`rate`, if given, must be that rate)."""
        if rate is not None and rate != self.rate:
            raise InputError("audio_rate", f"{rate} Hz pushed into a session started at {self.rate} Hz.",
                             f"resample to {self.rate} Hz, or start the session at {rate} Hz.")
        self.audio.push(pcm)

    def end_segment(self) -> None:
        """The current segment (utterance) is complete: its last block is generated at once."""
        self.audio.end_segment()

    def clear(self) -> None:
        """Interrupt: drop the queued audio; the block in flight is finished and sent, then the
        segment ends with `SegmentEnded(interrupted=True)`."""
        cut = self.audio.clear()
        if cut is None:
            return
        with self._lock:
            flying = [i.audio.segment for i in self._taken] + ([self._pending.audio.segment] if self._pending else [])
            if cut in flying:
                self._interrupted.add(cut)  # announced after that block's frames
            else:
                self._out.put(SegmentEnded(cut, True, self._frames_out / self.fps))

    def close(self) -> None:
        """End the session once the blocks already queued are out (iteration then stops)."""
        self.audio.close()

    # --- output -----------------------------------------------------------------------------

    def __iter__(self):
        while True:
            item = self._out.get()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def _run(self) -> None:
        try:
            with torch.no_grad():
                clips = (_LiveClip(self) for _ in itertools.count())
                for block in self._sampler.stream(clips):
                    with self._lock:
                        item = self._taken.pop(0)
                    item.sampled = time.perf_counter()
                    self._flush()  # the previous block's frames: decoded while this one was sampled
                    item.decoded = self._decoder.launch(self._sampler, block)
                    with self._lock:
                        self._pending = item
                self._flush()
        except BaseException as exc:  # handed to the iterating thread
            self._error = exc
        finally:
            self._out.put(_END)

    def _next_audio(self) -> BlockAudio | None:
        """Block audio for the sampler; the frames of the block in flight go out before waiting."""
        block = self.audio.next_block(timeout=0)
        if block is None:
            self._flush()
            block = self.audio.next_block()
        if block is not None:
            with self._lock:
                self._taken.append(_InFlight(block, started=time.perf_counter()))
        return block

    def _flush(self) -> None:
        with self._lock:
            item = self._pending
        if item is None:
            return
        frames = item.decoded.result()
        done = time.perf_counter()
        samples = item.audio.samples
        if self._frames_out == 0:  # the official start drops the first frames, and their audio
            samples = samples[DROPPED_START_FRAMES * self.rate // self.fps:]
        played = len(frames) / self.fps
        generate_s, decode_s = item.sampled - item.started, done - item.sampled
        busy = done - max(self._last_out, item.started)
        self._last_out = done
        with self._lock:
            self._out.put(LiveBlock(frames, samples, item.audio.segment, item.audio.index, self._frames_out,
                                    generate_s, decode_s, done - item.audio.ready_at, self.audio.buffered_s,
                                    busy / played))
            self._frames_out += len(frames)
            self._pending = None
            segment, position = item.audio.segment, self._frames_out / self.fps
            flying = {i.audio.segment for i in self._taken}
            if item.audio.last:
                self._out.put(SegmentEnded(segment, False, position))
            elif segment in self._interrupted and segment not in flying:
                self._interrupted.discard(segment)
                self._out.put(SegmentEnded(segment, True, position))


class _LiveClip:
    """A clip's audio for the sampler, block by block from the session (`BlockSampler.stream`)."""

    def __init__(self, session: LiveSession):
        self.session = session

    def block(self, _index: int) -> torch.Tensor | None:
        got = self.session._next_audio()
        return None if got is None else got.features
