"""Audio of any length as a stream: decoded and resampled in packets, wav2vec2 over overlapping
windows, features handed out clip by clip as the sampler asks for them (issue 15).

The whole-file path (`AudioEncoder.encode`, official mode) runs wav2vec2 once over the whole
utterance: its attention makes the cost quadratic in the length and the waveform and embedding stay
in memory. Here time and memory are linear and flat:

1. `AudioReader` decodes with PyAV packet by packet, averages the channels and resamples with soxr's
   streaming resampler: the same samples as `load_audio` (soxr's stream is bit-identical to its
   one-shot call; the total is trimmed/padded to `ceil(n * 16000 / sr)` as librosa does).
2. `WindowedFeatures` (`push` / `features_until` / `finish`) runs wav2vec2 on windows that own
   `window_s` seconds of 50 Hz frames and see `context_s` more on each side. A window starts on the
   global 320-sample grid, so its conv features are exactly the whole-file ones; only the
   transformer's attention is cut to the window plus context.
3. What differs from whole-file encoding, by design (README "Hours of audio"):
   * normalisation: the official code normalises by the mean/variance of the whole utterance,
     which a stream cannot know up front; each window uses the running statistics of every sample
     up to its right context plus a look-ahead (30 s), which converge to the whole-file ones;
   * 50 -> 30 Hz: the official `interpolate(align_corners=True)` over the whole sequence places
     30 Hz frame i at 50 Hz position `i * (T50 - 1) / (T30 - 1)`, which needs the total length;
     here it sits at the nominal `i * 50 / 30`: the same linear interpolation, shifted by at most
     2 frames of 50 Hz (40 ms) at the very end of the file and proportionally less before;
   * the 25 fps bucketing (frame k takes 30 Hz frame round(1.2 k), zeros past the end, one extra
     clip) is exactly the official one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import av
import numpy as np
import soxr
import torch

from ..errors import InputError
from .audio import (DEFAULT_FPS, DEFAULT_FRAMES_PER_CLIP, FEATURE_RATE, SAMPLE_RATE, VIDEO_RATE, AudioEncoder,
                    AudioFeatures, _frame_to_float, _from_comfy_audio, _NORM_EPS, check_frames_per_clip,
                    clips_available)

logger = logging.getLogger("liveavatar")

# Chosen from measurements on speech-like audio (README "Hours of audio"): with 8 s owned and 4 s of
# context on each side, a window computes 16 s of audio (what wav2vec2 saw in pre-training crops)
# for every 8 s it hands out, twice the whole-file work but linear, and the first clip waits for
# 12 s of audio (about 0.1 s of wav2vec2-large on a GPU).
DEFAULT_WINDOW_S = 8.0
DEFAULT_CONTEXT_S = 4.0
# The running normalisation statistics of a window include this much audio past it: the first
# windows' statistics then come from half a minute of speech instead of a few seconds (README:
# it cuts the normalisation part of the difference several-fold), for 1.9 MB of buffered samples
# and the decoding of 30 s of audio before the first window. A live session with little
# look-ahead sets it to 0.
DEFAULT_STATS_LOOKAHEAD_S = 30.0
# Decoded audio handed out per chunk by the reader (the packets of most codecs are much smaller).
_CHUNK = 1 << 15


# ---------------------------------------------------------------------------------------------
# Decoding and resampling as a stream


def check_audio_source(source, input_name: str = "audio") -> None:
    """Cheap checks before any weight is read: the file exists and has an audio stream, or the
    AUDIO dict is well formed. Decoding errors (corrupt packets, silence) surface while reading."""
    if isinstance(source, Mapping):
        _from_comfy_audio(source, input_name)
        return
    path = _check_path(source, input_name)
    with _open(path, input_name):
        pass


def expected_samples(source, input_name: str = "audio") -> int | None:
    """16 kHz length of a source before decoding it: exact for a ComfyUI AUDIO dict; for a file
    what its container declares (exact for WAV, FLAC and MP3 with a length header, a few ms off
    for Opus and AAC), None when it declares nothing."""
    if isinstance(source, Mapping):
        channels, rate = _from_comfy_audio(source, input_name)
        return _resampled_length(channels.shape[-1], rate)
    with _open(_check_path(source, input_name), input_name) as (_, stream):
        rate = stream.codec_context.sample_rate
        if not stream.duration or not stream.time_base or not rate:
            return None
        return _resampled_length(round(stream.duration * stream.time_base * rate), rate)


class AudioReader:
    """Mono float32 16 kHz chunks of a file or a ComfyUI AUDIO dict, decoded as a stream.

    Iterate once. Refuses (while reading) NaN/infinite samples, empty audio and digital silence,
    like `load_audio`. `samples` counts what has been handed out.
    """

    def __init__(self, source, input_name: str = "audio"):
        self.input_name = input_name
        if isinstance(source, Mapping):
            _from_comfy_audio(source, input_name)
        else:
            source = _check_path(source, input_name)
        self.source = source
        self.samples = 0
        self.done = False
        self._pending: list[np.ndarray] = []
        self._held = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        blocks = self._comfy_blocks() if isinstance(self.source, Mapping) else self._file_blocks()
        stream, rate, n_in, first, varied = None, None, 0, None, False
        for channels, block_rate in blocks:
            if rate is None:
                rate = block_rate
                if rate != SAMPLE_RATE:
                    stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            mono = np.mean(channels, axis=0) if channels.shape[0] > 1 else channels[0]
            mono = np.ascontiguousarray(mono, dtype=np.float32)
            if not mono.size:
                continue
            if not np.all(np.isfinite(mono)):
                raise InputError(self.input_name, "the audio contains NaN or infinite samples.",
                                 "re-export the audio file.")
            first = mono[0] if first is None else first
            varied = varied or bool(np.any(mono != first))
            n_in += mono.size
            out = stream.resample_chunk(mono) if stream is not None else mono
            yield from self._hand_out(out, final=False)
        if n_in == 0:
            raise InputError(self.input_name, "the audio has no samples (zero length).",
                             "use an audio file that contains speech.")
        if not varied:
            raise InputError(self.input_name, "the audio is digital silence (every sample has the same value). "
                             "wav2vec2 normalises the audio to zero mean and unit variance, so silence yields "
                             "all-zero features and the avatar would not move.",
                             "use the speech audio you want lip-synced.")
        tail = stream.resample_chunk(np.zeros(0, np.float32), last=True) if stream is not None else np.zeros(0)
        # librosa's length rule: trim or zero-pad the whole to ceil(n * 16000 / sr). The resampler
        # lags its input, so only what is held back here can be too long.
        rest = np.concatenate(self._pending + [np.asarray(tail, np.float32)])
        self._pending, self._held = [], 0
        want = max(0, _resampled_length(n_in, rate) - self.samples)
        rest = np.pad(rest[:want], (0, max(0, want - rest.size)))
        yield from self._hand_out(rest, final=True)
        self.done = True

    def _hand_out(self, out: np.ndarray, final: bool) -> Iterator[np.ndarray]:
        """Hand out chunks of at least `_CHUNK` samples: codecs decode in packets of 10-20 ms, and
        consumers that append each piece to a buffer would copy it once per packet."""
        if out.size:
            self._pending.append(np.asarray(out, np.float32))
            self._held += out.size
        if self._held and (final or self._held >= _CHUNK):
            chunk = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending, self._held = [], 0
            self.samples += chunk.size
            yield chunk

    def _file_blocks(self) -> Iterator[tuple[np.ndarray, int]]:
        path, rate = self.source, None
        with _open(path, self.input_name) as (container, stream):
            try:
                for frame in container.decode(stream):
                    if rate is None:
                        rate = frame.sample_rate
                    elif frame.sample_rate != rate:
                        raise InputError(self.input_name, f"{path.name} changes sample rate mid-stream.",
                                         "re-export it as a plain wav file.")
                    yield _frame_to_float(frame, self.input_name), rate
            except av.error.FFmpegError as exc:
                raise _decode_error(path, exc, self.input_name) from None

    def _comfy_blocks(self) -> Iterator[tuple[np.ndarray, int]]:
        channels, rate = _from_comfy_audio(self.source, self.input_name)
        for start in range(0, channels.shape[-1], _CHUNK):
            yield channels[:, start:start + _CHUNK], rate


def _resampled_length(n: int, rate: int) -> int:
    return n if rate == SAMPLE_RATE else int(np.ceil(n * float(SAMPLE_RATE) / rate))


def _check_path(source, input_name: str) -> Path:
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(input_name, f"expected a file path or a ComfyUI AUDIO dict, got {type(source).__name__}.",
                         "connect a Load Audio node or pass the path of a wav/flac/mp3/ogg/m4a file.")
    path = Path(source)
    if not path.exists():
        raise InputError(input_name, f"file not found: {path}.", "check the path of the audio file.")
    if path.is_dir():
        raise InputError(input_name, f"{path} is a folder.", "pass the audio file itself.")
    return path


class _open:
    """`with _open(path) as (container, audio_stream)`, with the errors of `load_audio`."""

    def __init__(self, path: Path, input_name: str):
        self.path, self.input_name = path, input_name

    def __enter__(self):
        try:
            self.container = av.open(str(self.path))
        except av.error.FFmpegError as exc:
            raise _decode_error(self.path, exc, self.input_name) from None
        streams = [s for s in self.container.streams if s.type == "audio"]
        if not streams:
            self.container.close()
            raise InputError(self.input_name, f"{self.path.name} has no audio stream.",
                             "use a wav, flac, mp3, ogg or m4a file with sound in it.")
        return self.container, streams[0]

    def __exit__(self, *exc_info):
        self.container.close()


def _decode_error(path: Path, exc, input_name: str) -> InputError:
    return InputError(input_name, f"cannot decode {path.name} ({exc.strerror or type(exc).__name__}); the file "
                      "is corrupt or not an audio format.", "use a wav, flac, mp3, ogg or m4a file.")


# ---------------------------------------------------------------------------------------------
# Windowed wav2vec2


def video_feature_index(frames: np.ndarray, fps: int) -> np.ndarray:
    """30 Hz feature frame of each video frame: round-half-even(k / fps * 30), as `bucket_frames`."""
    return np.round(np.asarray(frames, np.float64) / fps * VIDEO_RATE).astype(np.int64)


class WindowedFeatures:
    """Incremental encoder of one utterance: push 16 kHz samples, take bucketed features.

    `features_until(frame)` returns the 25 fps features `[1, L, C, n]` (float32, CPU) of the video
    frames from the last call's end up to `frame`; `available_frames` says how far that can go with
    the samples pushed so far (a window needs its right context first). After `finish()` the
    frames past the end of the audio are zeros up to `total_frames` (the official extra clip).
    `expected_samples` (the 16 kHz length, when known up front) puts the 30 Hz frames on the
    official whole-sequence grid; without it they sit on the nominal 50/30 grid. `stats` fixes the
    normalisation's (mean, variance) instead of the running ones (for measurements).
    Memory: the samples of one window and the 50 Hz states of about two windows.
    """

    def __init__(self, encoder: AudioEncoder, frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP,
                 fps: int = DEFAULT_FPS, window_s: float = DEFAULT_WINDOW_S, context_s: float = DEFAULT_CONTEXT_S,
                 expected_samples: int | None = None, stats: tuple[float, float] | None = None,
                 stats_lookahead_s: float = DEFAULT_STATS_LOOKAHEAD_S, input_name: str = "audio"):
        check_frames_per_clip(frames_per_clip)
        if not isinstance(fps, int) or fps <= 0:
            raise InputError("fps", f"{fps!r} is not a positive integer frame rate.", "use 25.")
        self.window = round(window_s * FEATURE_RATE)
        self.context = round(context_s * FEATURE_RATE)
        if self.window < 1 or self.context < 0:
            raise InputError("window_s", f"window {window_s} s / context {context_s} s: the window must hold at "
                             "least one 50 Hz frame and the context must not be negative.",
                             f"use the defaults ({DEFAULT_WINDOW_S} s / {DEFAULT_CONTEXT_S} s).")
        self.encoder, self.arch = encoder, encoder.arch
        self.frames_per_clip, self.fps, self.input_name = frames_per_clip, fps, input_name
        self.stride = self.arch.samples_per_frame
        self.fixed_stats = stats
        self.lookahead = round(stats_lookahead_s * SAMPLE_RATE)
        self.expected_samples = expected_samples
        self._scale = None  # float32 50 Hz position of 30 Hz frame 1 on the official grid
        if expected_samples is not None and expected_samples >= encoder.min_samples():
            t50 = self.arch.num_frames(expected_samples)
            t30 = int(t50 / float(FEATURE_RATE) * VIDEO_RATE)
            self._scale = np.float32((t50 - 1) / (t30 - 1)) if t30 > 1 else np.float32(0)
        self.total_frames: int | None = None  # video frames, known after finish()
        self.frames_out = 0  # video frames handed out
        self.t50: int | None = None
        self._pushed = 0
        self._buf = np.zeros(0, np.float32)
        self._buf0 = 0  # absolute index of _buf[0]
        self._stat = [0, 0.0, 0.0]  # end (= count), sum, sum of squares (float64) of samples [0, end)
        self._next_window = 0
        self._states: torch.Tensor | None = None  # [L, n, C] 50 Hz states from frame _state0
        self._state0 = 0
        self._finished = False

    # --- input -----------------------------------------------------------------------------

    def push(self, samples: np.ndarray) -> None:
        """Append mono float32 16 kHz samples (any chunk size; the result does not depend on it)."""
        if self._finished:
            raise InputError(self.input_name, "samples pushed after finish().", "start a new encoder.")
        samples = np.ascontiguousarray(samples, np.float32).reshape(-1)
        self._buf = np.concatenate([self._buf, samples]) if self._buf.size else samples
        self._pushed += samples.size
        self._run_windows()

    def finish(self) -> None:
        """End of the utterance: the last windows run and the clip count is fixed."""
        if self._finished:
            return
        if self._pushed < self.encoder.min_samples():
            raise InputError(self.input_name, f"the audio is {self._pushed / SAMPLE_RATE * 1000:.0f} ms long, "
                             f"shorter than the {self.encoder.min_samples() / SAMPLE_RATE * 1000:.0f} ms wav2vec2 "
                             "needs for one feature frame.", "use a longer audio clip.")
        if self.expected_samples is not None and self.expected_samples != self._pushed:
            logger.info("audio: %d samples decoded, %d declared by the file: the 30 Hz grid was the "
                        "declared length's", self._pushed, self.expected_samples)
        self._finished = True
        self.t50 = self.arch.num_frames(self._pushed)
        nr = clips_available(self.t30, self.frames_per_clip, self.fps)
        self.total_frames = nr * self.frames_per_clip
        self._run_windows()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def t30(self) -> int | None:
        return None if self.t50 is None else int(self.t50 / float(FEATURE_RATE) * VIDEO_RATE)

    # --- windows ---------------------------------------------------------------------------

    def _window_span(self, k: int) -> tuple[int, int, int, int] | None:
        """(first input frame, owned start, owned end, input end) of window k, None if not runnable."""
        own0, own1 = k * self.window, (k + 1) * self.window
        f0, f1 = max(0, own0 - self.context), own1 + self.context
        if self._finished:
            if own0 >= self.t50:
                return None
            own1, f1 = min(own1, self.t50), min(f1, self.t50)
        elif self._pushed < self.arch.samples_for_frames(f1) + self.lookahead:
            return None
        return f0, own0, own1, f1

    def _run_windows(self) -> None:
        while (span := self._window_span(self._next_window)) is not None:
            f0, own0, own1, f1 = span
            # The window starts on the global frame grid, so its conv features are the whole-file ones.
            s0 = f0 * self.stride
            s1 = s0 + self.arch.samples_for_frames(f1 - f0)
            x = self._normalise(self._buf[s0 - self._buf0:s1 - self._buf0], min(s1 + self.lookahead, self._pushed))
            states = self.encoder.window_states(x, own0 - f0, own1 - f0)
            self._states = states if self._states is None else torch.cat([self._states, states], dim=1)
            self._next_window += 1
            # Samples before the next window's input (and already counted in the statistics) go.
            nxt = max(0, self._next_window * self.window - self.context) * self.stride
            cut = min(nxt, self._stat[0]) - self._buf0
            if cut > 0:
                self._buf, self._buf0 = self._buf[cut:].copy(), self._buf0 + cut

    def _normalise(self, x: np.ndarray, end: int) -> np.ndarray:
        """The official zero-mean/unit-variance step, with the statistics of samples [0, end)
        (the window, everything before it and the look-ahead)."""
        done = self._stat[0]
        if end > done:
            new = self._buf[done - self._buf0:end - self._buf0].astype(np.float64)
            self._stat = [end, self._stat[1] + float(new.sum()), self._stat[2] + float(np.dot(new, new))]
        if not self.encoder.do_normalize:
            return x
        if self.fixed_stats is not None:
            mean, var = self.fixed_stats
        else:
            n, total, squares = self._stat
            mean = total / n
            var = max(squares / n - mean * mean, 0.0)
        return (x - np.float32(mean)) / np.float32(math.sqrt(var + _NORM_EPS))

    # --- output ----------------------------------------------------------------------------

    def _grid(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(left 50 Hz frame, weight of the right one) of 30 Hz frames i."""
        i = np.asarray(i, np.int64)
        if self._scale is None:
            return i * FEATURE_RATE // VIDEO_RATE, (i * FEATURE_RATE % VIDEO_RATE) / np.float32(VIDEO_RATE)
        # torch's align_corners source index, in its float32 arithmetic.
        real = self._scale * i.astype(np.float32)
        j0 = real.astype(np.int64)
        return j0, real - j0.astype(np.float32)

    @property
    def available_frames(self) -> int:
        """Video frames that `features_until` can return now (counted from the stream start)."""
        computed = self._state0 + (0 if self._states is None else self._states.shape[1])
        if self._finished and computed >= self.t50:
            return self.total_frames
        # 30 Hz frame i reads 50 Hz frames j0 and j0 + 1 and lies before the end of the audio
        # (T30 is at least 0.6 times the frames of what was pushed).
        limit = int(self.arch.num_frames(self._pushed) / float(FEATURE_RATE) * VIDEO_RATE)
        n30 = min(limit, max(0, computed * VIDEO_RATE // FEATURE_RATE + 1))
        while n30 > 0 and self._grid(n30 - 1)[0] + 1 >= computed:
            n30 -= 1
        # Video frames k with round(k * 30 / fps) < n30.
        k = n30 * self.fps // VIDEO_RATE
        while video_feature_index(k, self.fps) < n30:
            k += 1
        while k > 0 and video_feature_index(k - 1, self.fps) >= n30:
            k -= 1
        return k

    def features_until(self, frame: int) -> torch.Tensor:
        """Bucketed features `[1, L, C, frame - frames_out]` of video frames [frames_out, frame)."""
        if frame > self.available_frames:
            raise InputError(self.input_name, f"features up to video frame {frame} asked for, but only "
                             f"{self.available_frames} are computable from the audio pushed so far.",
                             "push more audio (or call finish() at its end) before asking for them.")
        k = np.arange(self.frames_out, frame)
        i30 = video_feature_index(k, self.fps)
        valid = i30 < self.t30 if self.t30 is not None else np.ones(k.shape, bool)
        out = torch.zeros(self.arch.num_layers + 1, self.arch.hidden_size, k.size, dtype=torch.float32)
        if valid.any():
            j0, w = self._grid(i30[valid])
            s, last = self._states, self._state0 + self._states.shape[1] - 1
            dev = s.device
            a = s[:, torch.from_numpy(j0 - self._state0).to(dev)].float()
            b = s[:, torch.from_numpy(np.minimum(j0 + 1, last) - self._state0).to(dev)].float()
            w1 = torch.from_numpy(np.asarray(w, np.float32)).to(dev)[None, :, None]
            # torch's linear upsampling, w0 * x0 + w1 * x1 in float32, rounded to the model dtype
            # because the official code interpolates in it, then widened.
            picked = ((1 - w1) * a + w1 * b).to(s.dtype).float().cpu()
            out[:, :, torch.from_numpy(valid)] = picked.transpose(1, 2)
        self.frames_out = frame
        self._drop_states()
        return out.unsqueeze(0)

    def _drop_states(self) -> None:
        if self._states is None:
            return
        j0 = int(self._grid(video_feature_index(self.frames_out, self.fps))[0])
        cut = min(j0 - self._state0, self._states.shape[1] - 1)
        if cut > 0:
            self._states = self._states[:, cut:].clone()
            self._state0 += cut


# ---------------------------------------------------------------------------------------------
# Features for the sampler, pulled clip by clip


class StreamedAudioFeatures:
    """Audio features computed window by window while the sampler pulls clips (streaming mode).

    `clips(start)` reads the source from its beginning with a fresh `WindowedFeatures` and yields
    one `[1, L, C, frames_per_clip]` tensor per clip; it reads only as far as those clips need (a
    window, its context and the statistics look-ahead). `available_clips` is exact for an AUDIO
    dict and once the end has been read, before that what the file's declared length gives (None
    if it declares none); `num_clips` is the request capped by it. `waveform_16k` is a lazily read
    track for the MP4 writer. Nothing proportional to the audio's length is kept.
    """

    def __init__(self, encoder: AudioEncoder, source, frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP,
                 num_clips: int | None = None, fps: int = DEFAULT_FPS, window_s: float = DEFAULT_WINDOW_S,
                 context_s: float = DEFAULT_CONTEXT_S, stats_lookahead_s: float = DEFAULT_STATS_LOOKAHEAD_S,
                 input_name: str = "audio"):
        check_frames_per_clip(frames_per_clip)
        check_audio_source(source, input_name)
        self.encoder, self.source, self.input_name = encoder, source, input_name
        self.frames_per_clip, self.fps, self.requested = frames_per_clip, fps, num_clips
        self.window_s, self.context_s, self.stats_lookahead_s = window_s, context_s, stats_lookahead_s
        self.available_clips: int | None = None
        self.expected_samples = expected_samples(source, input_name)
        if self.expected_samples is not None and self.expected_samples >= encoder.min_samples():
            t30 = int(encoder.arch.num_frames(self.expected_samples) / float(FEATURE_RATE) * VIDEO_RATE)
            self.available_clips = clips_available(t30, frames_per_clip, fps)
        self.waveform_16k = StreamedWaveform(source, input_name)
        self.samples_read = 0  # 16 kHz samples the last `clips` call has decoded so far
        # 16 kHz length: the declared one until the end has been read, then the decoded one.
        self.total_samples: int | None = self.expected_samples
        self._digest: str | None = None

    @property
    def num_clips(self) -> int | None:
        if self.available_clips is None:
            return self.requested
        return self.available_clips if self.requested is None else min(self.requested, self.available_clips)

    def clips(self, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
        """Features of clips [start, stop) (stop: the requested count; both ends capped by the
        audio). Earlier clips are computed and dropped: the running normalisation and the windows
        depend on everything before."""
        stop = self.requested if stop is None else stop
        encoder = WindowedFeatures(self.encoder, self.frames_per_clip, self.fps, self.window_s, self.context_s,
                                   self.expected_samples, stats_lookahead_s=self.stats_lookahead_s,
                                   input_name=self.input_name)
        reader = AudioReader(self.source, self.input_name)
        chunks = iter(reader)
        f, r = self.frames_per_clip, 0
        while stop is None or r < stop:
            while encoder.available_frames < (r + 1) * f and not encoder.finished:
                chunk = next(chunks, None)
                if chunk is None:
                    encoder.finish()
                    self.available_clips = encoder.total_frames // f
                    self.total_samples = reader.samples
                else:
                    encoder.push(chunk)
                self.samples_read = reader.samples
            if encoder.finished and encoder.total_frames <= r * f:
                return
            clip = encoder.features_until((r + 1) * f)
            if r >= start:
                yield clip
            r += 1

    def digest(self) -> str:
        """Identity of the audio for resume files: a hash of the file's bytes (or the AUDIO waveform)
        and the window geometry. Read on demand, not before the first block."""
        if self._digest is None:
            key = (f"windowed:{self.window_s}:{self.context_s}:{self.stats_lookahead_s}:{self.frames_per_clip}:{self.fps}:"
                   f"{self.encoder.description}:{source_crc32(self.source):08x}")
            self._digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self._digest


class AudioInput:
    """Audio prepared for either mode; the stream picks (`features(mode)`).

    Official mode gets the exact whole-file `AudioFeatures` (computed once, then kept); streaming
    mode gets fresh `StreamedAudioFeatures` for every run. ComfyUI's Audio Encode node returns this,
    because the mode is the sampler's setting.
    """

    def __init__(self, encoder: AudioEncoder, source, frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP,
                 num_clips: int | None = None, fps: int = DEFAULT_FPS, input_name: str = "audio"):
        self._streamed = StreamedAudioFeatures(encoder, source, frames_per_clip, num_clips, fps,
                                               input_name=input_name)
        self._whole: AudioFeatures | None = None
        self.frames_per_clip = frames_per_clip

    @property
    def num_clips(self) -> int | None:
        """Clips covered (None for a file, whose length is known only once read)."""
        return self._streamed.num_clips

    def features(self, mode: str) -> AudioFeatures | StreamedAudioFeatures:
        s = self._streamed
        if mode != "official":
            return StreamedAudioFeatures(s.encoder, s.source, s.frames_per_clip, s.requested, s.fps,
                                         s.window_s, s.context_s, s.stats_lookahead_s, s.input_name)
        if self._whole is None:
            self._whole = s.encoder.encode(s.source, s.frames_per_clip, s.requested, s.fps, s.input_name)
        return self._whole


def features_for_mode(audio, mode: str):
    """`AudioFeatures` / `StreamedAudioFeatures` as given; an `AudioInput` resolved for `mode`."""
    return audio.features(mode) if isinstance(audio, AudioInput) else audio


def audio_identity(features) -> torch.Tensor | str:
    """What resume files record of the audio: the embedding (whole file) or the source's digest."""
    return features.digest() if isinstance(features, StreamedAudioFeatures) else features.embedding


# ---------------------------------------------------------------------------------------------
# The track for the MP4 writer, read a second time in packets


class StreamedWaveform:
    """The 16 kHz mono track of a source, read lazily for muxing (`StreamingMP4Writer(audio=...)`).

    The writer reads forward in small steps; `open_source(offset)` gives it a reader that decodes
    the source again from the start and keeps only the samples not yet read.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, source, input_name: str = "audio"):
        self.source, self.input_name = source, input_name

    def open_source(self, offset: int) -> "StreamedSource":
        return StreamedSource(self, offset)


class StreamedSource:
    """`video.encode.AudioSource`'s interface over a `StreamedWaveform`: output sample t plays
    source sample t + offset, silence outside. `clamp(n)` = min(n, length) reads just far enough
    to tell; `length` reads to the end. Reads go forward (the AAC encoder's order): samples more
    than `_HISTORY` before the last read's start are dropped, so a resumed writer starting late holds
    no prefix; a read further back (a writer rolled back after a failed write) decodes again from
    the start."""

    channels = 1
    _HISTORY = 4 * SAMPLE_RATE  # a rolled-back writer re-reads its last fragment and AAC pre-roll

    def __init__(self, track: StreamedWaveform, offset: int):
        self.track, self.offset = track, offset
        self.sample_rate = track.sample_rate
        self._open()

    def _open(self) -> None:
        self._reader = AudioReader(self.track.source, self.track.input_name)
        self._chunks = iter(self._reader)
        self._buf = np.zeros(0, np.float32)
        self._buf0 = 0  # source index of _buf[0]
        self._keep_from = 0  # source index the next read may start at, at the earliest
        self._total: int | None = None

    @property
    def length(self) -> int:
        while self._total is None:
            self._pull()
        return self._total - self.offset

    @property
    def known_length(self) -> int | None:
        return None if self._total is None else self._total - self.offset

    def clamp(self, n: int) -> int:
        while self._total is None and self._buf0 + self._buf.size < n + self.offset:
            self._pull()
        return n if self._total is None else min(n, self._total - self.offset)

    def _pull(self) -> None:
        chunk = next(self._chunks, None)
        if chunk is None:
            self._total = self._reader.samples
            return
        self._buf = np.concatenate([self._buf, chunk]) if self._buf.size else chunk
        cut = min(self._keep_from - self._buf0, self._buf.size)
        if cut > 0:
            self._buf, self._buf0 = self._buf[cut:], self._buf0 + cut

    def read(self, start: int, stop: int) -> np.ndarray:
        """Float32 `[1, stop - start]`; a read must not start before an earlier read's start."""
        lo, hi = start + self.offset, stop + self.offset
        if lo < self._buf0 and hi > 0:
            self._open()
        self._keep_from = max(lo - self._HISTORY, 0)
        self.clamp(stop)
        out = np.zeros((1, stop - start), np.float32)
        a, b = max(lo, self._buf0), min(hi, self._buf0 + self._buf.size)
        if b > a:
            out[0, a - lo:b - lo] = self._buf[a - self._buf0:b - self._buf0]
        cut = max(0, min(self._keep_from - self._buf0, self._buf.size))
        if cut:
            self._buf, self._buf0 = self._buf[cut:], self._buf0 + cut
        return out

    def identity(self) -> dict:
        """What a resumed writer must match: a checksum of the source (file bytes or AUDIO waveform)
        instead of one of the decoded samples, which would need the whole track up front."""
        return {"sample_rate": self.sample_rate, "channels": 1, "samples": None,
                "crc32": source_crc32(self.track.source)}


def source_crc32(source) -> int:
    """CRC-32 of a file's bytes, read in blocks, or of an AUDIO dict's waveform and rate."""
    if isinstance(source, Mapping):
        crc = zlib.crc32(source["waveform"].detach().cpu().contiguous().numpy().tobytes())
        return zlib.crc32(str(source["sample_rate"]).encode(), crc)
    crc = 0
    with open(source, "rb") as f:
        while block := f.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc
