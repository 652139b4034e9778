"""The health checks of a file run: each chunk of a `VideoStream` with the audio that plays with it."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import LiveAvatarError
from ..video.writer import open_audio_source
from .monitor import HealthMonitor, HealthRecord, health_paths

log = logging.getLogger("liveavatar")


class HealthStopped(LiveAvatarError):
    """A health alarm in mode "stop" ended the run (after the block in flight when it was seen)."""


class RunHealth:
    """A `HealthMonitor` writing NAME.health.jsonl and NAME.health.png beside the video `path`,
    fed the frames the MP4 keeps and the audio muxed with them (`audio` at `sample_rate`, shifted
    by `offset_frames` as the writer shifts it). `resume_frame`: see `HealthMonitor`.

    The checks run on a thread of their own, one chunk behind the stream: run between blocks on the
    caller's thread they delayed queuing the next block's GPU work by their whole cost (38 ms a
    block on the GPU machine, 5 % of the FPS), while beside it they overlap the queuing.
    """

    def __init__(self, mode: str, path: str | Path, reference: np.ndarray, fps: int, audio, sample_rate: int,
                 offset_frames: int, resume_frame: int = 0):
        sidecar, plot = health_paths(path)
        self.monitor = HealthMonitor(reference, fps, mode, sidecar=sidecar, plot_path=plot,
                                     resume_frame=resume_frame or None)
        self.sidecar, self.plot = sidecar, plot
        self.fps, self.sample_rate = Fraction(fps), int(sample_rate)
        enabled = self.monitor.enabled
        # A reader of its own: the writer's reads the same audio on the writer thread.
        self._audio = open_audio_source(audio, sample_rate, offset_frames, fps) if enabled else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="liveavatar-health") if enabled else None
        self._pending: Future | None = None

    def _sample(self, frame: int) -> int:
        return round(frame * self.sample_rate / self.fps)

    def _measure(self, frames: np.ndarray, start_frame: int) -> HealthRecord:
        n = len(frames)
        samples = self._audio.read(self._sample(start_frame), self._sample(start_frame + n)).mean(axis=0)
        return self.monitor.observe(frames, samples, self.sample_rate)

    def submit(self, frames: np.ndarray, start_frame: int, frame_limit: int | None) -> HealthRecord | None:
        """Queue the checks of one chunk (up to `frame_limit`, the frames the MP4 keeps) and return
        the record of the chunk before it (None for the first)."""
        previous = self._collect()
        n = len(frames) if frame_limit is None else min(len(frames), frame_limit - start_frame)
        if self._pool is not None and n > 0:
            self._pending = self._pool.submit(self._measure, frames[:n], start_frame)
        return previous

    def finish(self) -> HealthRecord | None:
        """The record of the last chunk submitted, once measured."""
        return self._collect()

    def _collect(self) -> HealthRecord | None:
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def stop_if_asked(self, record: HealthRecord | None) -> None:
        """Raise `HealthStopped` if `record` (from `submit` or `finish`) asks a "stop" run to end:
        the run then ends after the block in flight, the one submitted after it."""
        if record is None or not record.should_stop:
            return
        raised = "; ".join(f"{a.name} (value {a.value:.3g}, threshold {a.threshold:.3g}): {a.message}"
                           for a in record.alarms if a.state == "raised")
        last = record.block + (self._pending is not None)
        raise HealthStopped(f"health: block {record.block} ({record.time_s:.1f} s of video) raised "
                            f"{raised or ', '.join(record.active)}; the run stopped after block {last}, the "
                            f"block in flight. {self.plot.name} shows the signals.")

    def close(self) -> None:
        """Measure what was submitted, close the sidecar and write the plot (also after a stop or a
        failure)."""
        if self._pool is not None:
            try:
                self._collect()
            except Exception as exc:
                # Closing runs on the way out of a failure too: its error must not replace that one.
                log.warning("health: the checks of the last block failed (%s: %s)", type(exc).__name__, exc)
            finally:
                self._pool.shutdown()
        if self.monitor.close() is not None:
            raised = sorted({a.name for a in self.monitor.events if a.state == "raised"})
            log.info("health: %d blocks, %s; %s", len(self.monitor.series["time_s"]),
                     f"alarms {', '.join(raised)}" if raised else "no alarm", self.plot)
