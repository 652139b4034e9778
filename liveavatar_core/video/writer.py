"""Streaming MP4 writer: frames and audio are appended to a fragmented MP4 as blocks arrive.

Why the file is always playable: it starts with a complete init segment and every `append` ends
with a complete `moof` + `mdat` fragment holding those frames (one closed H.264 GOP) and the AAC
audio up to the same time. Earlier fragments are never touched again, and a fragment only becomes
visible once all of its bytes are in the file (see `_write`), so a reader of the growing file, or
of the file left by a killed process, sees a valid MP4 of everything appended before.

Why resuming gives the same file: every video fragment is a closed GOP from a fresh encoder (see
`encode.py`), so its bytes depend only on its own frames. `state()` records the byte length after
the last fragment; `resume` truncates back to it and carries on with the same numbering and
times. The video is then byte-identical to an uninterrupted run; the audio is identical up to the
resume point and re-encoded from there (one inaudible splice, warmed up by a pre-roll).

Why a full disk costs nothing already written: writes are unbuffered and an append that the OS
refuses part way (no space, a quota, a file-size limit) is rolled back, file and counters, to the
last complete fragment (`_rolling_back`), then reported as an InputError naming the file; the file
plays, `state()` describes it, and the writer can append again or be resumed once there is room.

Memory stays flat: the writer holds one append's frames and its packets, never the video, and
reads the audio through a view of the caller's array.
"""

from __future__ import annotations

import contextlib
import errno
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .encode import (
    AAC_FRAME,
    AudioCodecSettings,
    AacStream,
    AudioSource,
    VideoCodecSettings,
    audio_config,
    encode_gop,
    video_extradata,
)
from .fmp4 import (
    AUDIO_TRACK_ID,
    VIDEO_TRACK_ID,
    AudioTrack,
    TrackRun,
    VideoTrack,
    fragment,
    init_segment,
    parameter_sets,
)
from .frames import to_uint8_frames

_STATE_FORMAT = "liveavatar-streaming-mp4"
_STATE_VERSION = 1
_X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo",
)
_TRIM_POLICIES = ("shortest", "video")


@dataclass(frozen=True)
class WriterSettings:
    """Encoding choices. Defaults follow the official writer (spec section 6) where it has one.

    crf: libx264 constant rate factor; the official `quality=8` is CRF 10.
    preset: libx264 speed/size preset (official: the default, "medium").
    threads: libx264 threads. Fixed rather than "auto" because x264 output is only reproducible
        for a fixed thread count, and resuming on another machine must give the same bytes.
    max_gop_frames: longest GOP (= fragment). Every `append` also ends a GOP, so pipeline blocks
        (9 to 48 frames) become one fragment each; appending single frames wastes bits on IDRs.
    audio_bitrate: AAC bit rate (official 192k), capped to what AAC-LC allows at the sample rate.
    audio_preroll_frames: AAC frames fed to the audio encoder before the resume point when a file
        is resumed, so the splice there is inaudible.
    trim: "shortest" (official `-shortest`): frames whose start lies past the end of the audio
        are dropped and the audio stops at the last frame; "video": every frame is kept and the
        audio stops where it runs out.
    audio_offset_frames: output frame k plays with the audio at source time (k + offset) / fps.
        The official pipeline drops its first 3 generated frames but not the audio, so its sound
        lags the picture by 3 frames (spec 8.22); 3 corrects that. 0 reproduces the official file.
    """

    crf: int = 10
    preset: str = "medium"
    threads: int = 4
    max_gop_frames: int = 48
    audio_bitrate: int = 192_000
    audio_preroll_frames: int = 8
    trim: str = "shortest"
    audio_offset_frames: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        checks = [
            ("crf", 0 <= self.crf <= 51, "Use a value from 0 (lossless) to 51; 10-18 looks transparent."),
            ("preset", self.preset in _X264_PRESETS, f"Use one of {', '.join(_X264_PRESETS)}."),
            ("threads", self.threads >= 1, "Use 1 or more."),
            ("max_gop_frames", self.max_gop_frames >= 1, "Use 1 or more (48 = one clip)."),
            ("audio_bitrate", self.audio_bitrate >= 8000, "Use at least 8000 bit/s (192000 is official)."),
            ("audio_preroll_frames", self.audio_preroll_frames >= 1, "Use 1 or more (8 is the default)."),
            ("trim", self.trim in _TRIM_POLICIES, f"Use one of {', '.join(_TRIM_POLICIES)}."),
            ("metadata", isinstance(self.metadata, Mapping) and all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in self.metadata.items()),
             "Use a dict of non-empty text keys to text values (JSON-encode other values)."),
        ]
        for name, ok, fix in checks:
            if not ok:
                raise InputError(name, f"{getattr(self, name)!r} is not a valid value.", fix)


def audio_offset_samples(offset_frames: int, sample_rate: int, fps: int | Fraction) -> int:
    """Samples skipped at the start of the audio for `WriterSettings.audio_offset_frames`."""
    return round(offset_frames * sample_rate / _as_fps(fps))


def open_audio_source(audio, sample_rate: int, offset_frames: int, fps: int | Fraction):
    """The audio as it plays with the video (output sample t = source sample t + the offset): an
    `AudioSource` over samples, or the reader of a track read lazily (`StreamedWaveform`)."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    offset = audio_offset_samples(offset_frames, int(sample_rate), fps)
    if hasattr(audio, "open_source"):  # a track read lazily (encoders.audio_stream.StreamedWaveform)
        if sample_rate != audio.sample_rate:
            raise InputError("sample_rate", f"{sample_rate} Hz given for a {audio.sample_rate} Hz track.",
                             f"Pass sample_rate={audio.sample_rate}.")
        return audio.open_source(offset)
    return AudioSource(audio, int(sample_rate), offset)


def frames_within_audio(samples: int, sample_rate: int, fps: int | Fraction, offset_frames: int = 0) -> int:
    """Frames the "shortest" trim keeps: those whose start lies before the end of the audio.

    `samples` is the source audio length; output frame k plays from source time (k + offset) / fps.
    """
    fps = _as_fps(fps)
    length = samples - audio_offset_samples(offset_frames, sample_rate, fps)
    return max(0, math.ceil(Fraction(length) * fps / sample_rate))


# Why a write failed, in words, for the errors that mean "no room"; others give their strerror.
_NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "the file reached the largest size allowed (by the file system or a process limit)"}


def video_timescale(fps: Fraction) -> tuple[int, int]:
    """(video track timescale, ticks per frame): 512 ticks a frame keeps every frame time exact."""
    return 512 * fps.numerator, 512 * fps.denominator


def _as_fps(fps: int | float | Fraction | str) -> Fraction:
    try:
        value = Fraction(str(fps)) if isinstance(fps, float) else Fraction(fps)
    except (TypeError, ValueError):
        value = None
    if value is None or value <= 0:
        raise InputError("fps", f"{fps!r} is not a positive frame rate.", "Use 25 (the Live Avatar rate).")
    return value


class StreamingMP4Writer:
    """Append-only H.264 (+ AAC) fragmented MP4 writer; see the module docstring for guarantees.

    `audio` is float mono `[n]` or stereo `[2, n]` / `[n, 2]` at `sample_rate`, read lazily.
    Use as a context manager: leaving the block (also by an exception) finalises the file.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: int | Fraction = 25,
                 audio: np.ndarray | torch.Tensor | None = None, sample_rate: int | None = None,
                 settings: WriterSettings | None = None, overwrite: bool = False):
        self._configure(Path(path), width, height, fps, audio, sample_rate, settings or WriterSettings())
        try:
            # Unbuffered: a write the disk refuses leaves nothing behind in Python's buffer that a
            # later flush or close would try to write again (see `_rolling_back`).
            self._file = open(self.path, "wb" if overwrite else "xb", buffering=0)
        except FileExistsError:
            raise InputError(
                "output path", f"{self.path} already exists.",
                "Pick a new name (safe_output_path numbers them) or pass overwrite=True.",
            ) from None
        except OSError as exc:
            raise InputError("output path", f"cannot create {self.path}: {exc.strerror}.",
                             "Choose a folder you can write to.") from None
        try:
            self._write_all(self._init)
        except OSError as exc:
            self._file.close()
            self.path.unlink(missing_ok=True)
            raise self._write_error(exc) from None

    def _configure(self, path: Path, width: int, height: int, fps, audio, sample_rate, settings: WriterSettings):
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, numbers.Integral) or value <= 0 or value % 2:
                raise InputError(
                    name, f"{value!r} is not a positive even number of pixels; H.264 4:2:0 needs even sizes.",
                    "Use the pipeline's output size (a multiple of 64) or crop one pixel.",
                )
        width, height = int(width), int(height)
        if not path.parent.is_dir():
            raise InputError("output path", f"folder {path.parent} does not exist.",
                             "Create it first, or use safe_output_path, which does.")
        self.path = path.resolve()  # the state must still point here from another working folder
        self.width, self.height = width, height
        self.fps = _as_fps(fps)
        self.settings = settings
        self._video_cfg = VideoCodecSettings(
            width, height, self.fps, settings.crf, settings.preset, settings.threads, settings.max_gop_frames,
        )
        self._timescale, self._frame_ticks = video_timescale(self.fps)
        self._extradata = video_extradata(self._video_cfg)
        sps, pps = parameter_sets(self._extradata)
        video_track = VideoTrack(width, height, self._timescale, sps, pps)

        self._audio: AudioSource | None = None
        audio_track = None
        if audio is not None:
            if sample_rate is None:
                raise InputError("sample_rate", "audio was given without its sample rate.", "Pass sample_rate=...")
            self._audio = open_audio_source(audio, sample_rate, settings.audio_offset_frames, self.fps)
            channels = self._audio.channels
            # FFmpeg's AAC-LC encoder cannot spend more than 6144 bits per channel per frame.
            bitrate = min(settings.audio_bitrate, 6 * self._audio.sample_rate * channels)
            self._audio_cfg = AudioCodecSettings(
                self._audio.sample_rate, channels, bitrate, settings.audio_preroll_frames * AAC_FRAME,
            )
            config, self._priming = audio_config(self._audio_cfg)
            self._aac = AacStream(self._audio_cfg, self._audio)
            audio_track = AudioTrack(self._audio.sample_rate, channels, config, self._priming, bitrate)
        self._init = init_segment(video_track, audio_track, settings.metadata)

        self.frames_written = 0
        self.frames_dropped = 0
        self.audio_samples_written = 0
        self._sequence = 0
        self._bytes = len(self._init)
        self._closed = False

    # --- appending -------------------------------------------------------------------------

    def append(self, frames: torch.Tensor | np.ndarray) -> int:
        """Encode and write frames (float `[3, n, H, W]` in [-1, 1] or uint8 `[n, H, W, 3]`).

        Returns how many were written; frames past the end of the audio are dropped under the
        "shortest" policy. When this returns, they are in the file as complete fragments.
        """
        if self._closed:
            raise InputError("writer", f"{self.path.name} is already closed.", "Open a new writer or resume().")
        pictures = to_uint8_frames(frames)
        if pictures.shape[1:3] != (self.height, self.width):
            raise InputError(
                "frames", f"frame size {pictures.shape[2]}x{pictures.shape[1]} (WxH) does not match the "
                f"writer's {self.width}x{self.height}.", "Open the writer with the pipeline's output size.",
            )
        keep = len(pictures)
        if self._audio is not None and self.settings.trim == "shortest":
            keep = self._frames_within_audio(keep)
        with self._rolling_back():
            self.frames_dropped += len(pictures) - keep
            gop = self.settings.max_gop_frames
            for start in range(0, keep, gop):
                chunk = pictures[start:min(start + gop, keep)]
                video = encode_gop(self._video_cfg, chunk, self.frames_written, self._timescale, self._extradata)
                runs = [TrackRun(VIDEO_TRACK_ID, self.frames_written * self._frame_ticks, video)]
                if self._audio is not None:
                    # Audio in whole AAC frames up to the end of this chunk; the rest waits.
                    end = self._audio.clamp(self._video_end_sample(self.frames_written + len(chunk)))
                    runs.append(self._audio_run((end // AAC_FRAME) * AAC_FRAME, final=False))
                self._write(runs)
                self.frames_written += len(chunk)
        return keep

    @contextlib.contextmanager
    def _rolling_back(self):
        """Undo an append (or the closing audio) that fails part way: disk full, a size limit, I/O.

        The file is cut back to its last complete fragment and every counter to match, so the
        file still plays, `state()` describes it and a later append or resume continues there;
        the error becomes an InputError naming the file and what it holds.
        """
        mark = (self._bytes, self._sequence, self.frames_written, self.frames_dropped, self.audio_samples_written)
        try:
            yield
        except OSError as exc:
            self._bytes, self._sequence, self.frames_written, self.frames_dropped, self.audio_samples_written = mark
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), self._bytes)  # also frees what the cut fragment took
            self._file.seek(self._bytes)
            if self._audio is not None:  # the encoder ran ahead into the lost fragment
                self._aac = AacStream(self._audio_cfg, self._audio, start=self.audio_samples_written)
            raise self._write_error(exc) from None

    def _write_error(self, exc: OSError) -> InputError:
        reason = _NO_ROOM.get(exc.errno, f"writing failed ({exc.strerror or exc})")
        return InputError("output", f"{reason} while writing {self.path}; it holds and plays the "
                          f"{self.frames_written} frames ({self.duration_s:.2f} s) written before.",
                          "free space on that disk or choose a folder on another one, then run again (or "
                          "resume, where a resume file was saved).")

    def _write_all(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:  # an unbuffered write may take only part of the data
            view = view[self._file.write(view):]

    def _frames_within_audio(self, n: int) -> int:
        """How many of the next `n` frames start before the end of the audio (`frames_within_audio`).
        Asks the source only that far: a streamed track need not know its length yet."""
        rate, first = self._audio.sample_rate, self.frames_written
        # Frame k starts at output sample k * rate / fps and is kept while that lies before the end.
        need = math.floor(Fraction(first + n - 1) * rate / self.fps) + 1
        have = self._audio.clamp(need)
        if have >= need:
            return n
        return max(0, min(n, math.ceil(Fraction(have) * self.fps / rate) - first))

    def _video_end_sample(self, frames: int) -> int:
        return math.floor(Fraction(frames) * self._audio.sample_rate / self.fps)

    def _audio_run(self, stop: int, final: bool) -> TrackRun:
        first_pts, samples = self._aac.take(stop, final)
        self.audio_samples_written = max(self.audio_samples_written, stop)
        # Media time = presentation time + priming (the edit list subtracts it again).
        return TrackRun(AUDIO_TRACK_ID, first_pts + self._priming, samples)

    def _write(self, runs: list[TrackRun]) -> None:
        if not any(r.samples for r in runs):
            return
        data = bytearray(fragment(self._sequence + 1, runs))
        # Readers give up on the whole file when its last `moof` is cut short, which a kill in
        # the middle of this write could leave. So the fragment goes out typed as a `free` box
        # (skipped by every reader, whole or cut) and becomes a `moof` only once all of it is in
        # the file, by rewriting 4 bytes in one page: a kill leaves either state, never a mix.
        data[4:8] = b"free"
        self._write_all(data)  # unbuffered: in the OS's hands now, so it outlives a killed process
        os.pwrite(self._file.fileno(), b"moof", self._bytes + 4)
        self._sequence += 1
        self._bytes += len(data)

    # --- finishing -------------------------------------------------------------------------

    def close(self) -> None:
        """Write the remaining audio up to the end of the video and close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._audio is not None:
                end = self._audio.clamp(self._video_end_sample(self.frames_written))
                with self._rolling_back():
                    self._write([self._audio_run(end, final=True)])
            try:
                os.fsync(self._file.fileno())
            except OSError as exc:
                raise self._write_error(exc) from None
        finally:
            self._file.close()

    def __enter__(self) -> StreamingMP4Writer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def frame_limit(self) -> int | None:
        """Most frames the file takes (the "shortest" trim at the end of the audio); None: no limit,
        or not known yet (a streamed track whose end has not been read)."""
        if self._audio is None or self.settings.trim != "shortest" or self._audio.known_length is None:
            return None
        return max(0, math.ceil(Fraction(self._audio.known_length) * self.fps / self._audio.sample_rate))

    @property
    def duration_s(self) -> float:
        """Seconds of video written so far."""
        return float(self.frames_written / self.fps)

    # --- resuming --------------------------------------------------------------------------

    def state(self) -> dict:
        """A small JSON-able record of the file so far, for `resume` after a crash or restart.

        Everything it describes is flushed to disk before it is returned.
        """
        if not self._closed:
            os.fsync(self._file.fileno())
        audio = None
        if self._audio is not None:
            audio = self._audio.identity()
        return {
            "format": _STATE_FORMAT, "version": _STATE_VERSION, "path": str(self.path),
            "width": self.width, "height": self.height, "fps": str(self.fps),
            "settings": asdict(self.settings), "audio": audio,
            "frames_written": self.frames_written, "frames_dropped": self.frames_dropped,
            "audio_samples_written": self.audio_samples_written,
            "fragments": self._sequence, "bytes": self._bytes,
        }

    @classmethod
    def resume(cls, state: dict, audio: np.ndarray | torch.Tensor | None = None,
               sample_rate: int | None = None) -> StreamingMP4Writer:
        """Reopen the file described by `state` and continue appending after its last fragment.

        Pass the same audio as the original run (checked by length and checksum). Anything the
        file holds past the recorded position (a fragment cut by a crash, or written after the
        state was taken) is discarded, so the finished file equals an uninterrupted run.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise InputError("state", "is not a Live Avatar video writer state.",
                             "Pass the dict from writer.state().")
        if state.get("version") != _STATE_VERSION:
            raise InputError("state", f"has version {state.get('version')!r}; this build reads {_STATE_VERSION}.",
                             "Start a new video.")
        expected = state["audio"]
        if (expected is None) != (audio is None):
            raise InputError("audio", "must be given exactly when the original run had audio.",
                             "Pass the same audio (or none) as the interrupted run.")
        self = cls.__new__(cls)
        self._configure(Path(state["path"]), state["width"], state["height"], Fraction(state["fps"]),
                        audio, sample_rate, WriterSettings(**state["settings"]))
        if expected is not None:
            actual = self._audio.identity()
            if actual != expected:
                raise InputError("audio", "differs from the audio of the interrupted run.",
                                 "Pass the same samples and sample rate.")
        size = self.path.stat().st_size if self.path.is_file() else -1
        if size < state["bytes"]:
            raise InputError("state",
                             f"{self.path} is missing or shorter than the recorded {state['bytes']} bytes.",
                             "The partial video was moved or damaged; start a new video.")
        self._file = open(self.path, "r+b", buffering=0)
        if self._file.read(len(self._init)) != self._init:
            self._file.close()
            raise InputError("state",
                             f"the header of {self.path} does not match these settings or this encoder build.",
                             "Resume with the same software, or start a new video.")
        self._file.truncate(state["bytes"])
        self._file.seek(state["bytes"])
        self.frames_written = state["frames_written"]
        self.frames_dropped = state["frames_dropped"]
        self.audio_samples_written = state["audio_samples_written"]
        if self._audio is not None:
            self._aac = AacStream(self._audio_cfg, self._audio, start=self.audio_samples_written)
        self._sequence = state["fragments"]
        self._bytes = state["bytes"]
        return self
