"""The health checks of a file run: each chunk of a `VideoStream` with the audio that plays with it."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import LiveAvatarError
from ..video.writer import open_audio_source
from .monitor import HealthMonitor, HealthRecord, health_paths

log = logging.getLogger("liveavatar")


class HealthStopped(LiveAvatarError):
    """A health alarm in mode "stop" ended the run after the block that raised it."""


class RunHealth:
    """A `HealthMonitor` writing NAME.health.jsonl and NAME.health.png beside the video `path`,
    fed the frames the MP4 keeps and the audio muxed with them (`audio` at `sample_rate`, shifted
    by `offset_frames` as the writer shifts it). `resume_frame`: see `HealthMonitor`."""

    def __init__(self, mode: str, path: str | Path, reference: np.ndarray, fps: int, audio, sample_rate: int,
                 offset_frames: int, resume_frame: int = 0):
        sidecar, plot = health_paths(path)
        self.monitor = HealthMonitor(reference, fps, mode, sidecar=sidecar, plot_path=plot,
                                     resume_frame=resume_frame or None)
        self.sidecar, self.plot = sidecar, plot
        self.fps, self.sample_rate = Fraction(fps), int(sample_rate)
        # A reader of its own: the writer's reads the same audio on the writer thread.
        self._audio = open_audio_source(audio, sample_rate, offset_frames, fps) if self.monitor.enabled else None

    def _sample(self, frame: int) -> int:
        return round(frame * self.sample_rate / self.fps)

    def observe(self, frames: np.ndarray, start_frame: int, frame_limit: int | None) -> HealthRecord | None:
        """Measure one chunk (up to `frame_limit`, the frames the MP4 keeps); raise `HealthStopped`
        once an alarm asks a "stop" run to end."""
        n = len(frames) if frame_limit is None else min(len(frames), frame_limit - start_frame)
        if self._audio is None or n <= 0:
            return None
        samples = self._audio.read(self._sample(start_frame), self._sample(start_frame + n)).mean(axis=0)
        record = self.monitor.observe(frames[:n], samples, self.sample_rate)
        if record.should_stop:
            raised = "; ".join(f"{a.name} (value {a.value:.3g}, threshold {a.threshold:.3g}): {a.message}"
                               for a in record.alarms if a.state == "raised")
            raise HealthStopped(f"health: stopped after block {record.block} ({record.time_s:.1f} s of video) by "
                                f"{raised or ', '.join(record.active)}. {self.plot.name} shows the signals.")
        return record

    def close(self) -> None:
        """Close the sidecar and write the plot (also after a stop or a failure)."""
        if self.monitor.close() is not None:
            raised = sorted({a.name for a in self.monitor.events if a.state == "raised"})
            log.info("health: %d blocks, %s; %s", len(self.monitor.series["time_s"]),
                     f"alarms {', '.join(raised)}" if raised else "no alarm", self.plot)
