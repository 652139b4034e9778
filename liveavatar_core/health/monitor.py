"""`HealthMonitor`: per-block quality health of a long run (spec/live.md 6), with alarms, a JSON-lines
sidecar written as the run goes and a PNG plot at the end.

Baselines: colour is compared with the run's own first `baseline_blocks` blocks (the generator's
look, which need not be the reference's exactly), block 0 with the reference image; a block with
an active colour, black-frame or seam alarm never enters the baseline, so a fault in the first
seconds cannot become the norm.
Identity and face size are compared with the reference image itself, A/V offset and seams are
absolute.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .alarms import HEALTH_FIX, Alarm, AlarmTracker, HealthThresholds, check_health_mode
from .colour import delta_e76

logger = logging.getLogger("liveavatar")

HEALTH_SUFFIX = ".health"
# A block enters the colour baseline only while none of these is active.
_BASELINE_GUARDS = ("colour_frame", "colour_face", "black", "seam")
SERIES = ("time_s", "colour_de_frame", "colour_de_face", "identity_ssim", "face_size", "av_offset", "av_confidence",
          "seam_ratio", "motion", "black_frames")


def health_paths(mp4_path: str | Path) -> tuple[Path, Path]:
    """(sidecar, plot) of a video: NAME.mp4 -> NAME.health.jsonl and NAME.health.png, side by side."""
    path = Path(mp4_path)
    stem = path.with_suffix("") if path.suffix.lower() == ".mp4" else path
    return (stem.with_name(stem.name + HEALTH_SUFFIX + ".jsonl"), stem.with_name(stem.name + HEALTH_SUFFIX + ".png"))


@dataclass
class HealthRecord:
    """Everything measured on one block; a signal is None when it could not be measured."""

    block: int
    start_frame: int
    frames: int
    time_s: float  # start of the block in the video
    cost_ms: float  # time `observe` took for this block (the sidecar write excluded)
    colour_de_frame: float | None = None  # CIE76 of the frame's mean L*a*b* against the baseline
    colour_de_face: float | None = None  # the same for the face box
    lab_frame: list | None = None  # [L, a, b] mean, then [L, a, b] spread (standard deviation)
    lab_face: list | None = None
    face_found: bool | None = None  # None when the reference has no detectable face
    face_box: list | None = None  # [x, y, w, h] in frame pixels (the last one found)
    face_size: float | None = None  # face width / the reference's
    identity_ssim: float | None = None
    av_offset: int | None = None  # frames, positive = video lags audio
    av_confidence: float | None = None
    seam_ratio: float | None = None  # boundary difference / typical within-block difference
    motion: float | None = None  # median within-block mean absolute difference, 8-bit levels
    freeze_motion: float | None = None  # `motion` when the block has speech, else None
    speech_fraction: float | None = None
    audio_dbfs: float | None = None
    black_frames: int = 0
    alarms: list[Alarm] = field(default_factory=list)  # raised or cleared at this block
    active: list[str] = field(default_factory=list)  # alarms active after this block
    should_stop: bool = False

    def to_json(self) -> dict:
        """The record as plain JSON types, floats rounded to 4 decimals."""
        out = asdict(self)
        out["alarms"] = [alarm.to_json() for alarm in self.alarms]
        return {key: _rounded(value) for key, value in out.items()}


def _rounded(value):
    if isinstance(value, (float, np.floating)):
        return round(float(value), 4) if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value


def check_health(mode, input_name: str = "health") -> str:
    """The mode a run gets for `mode` ("auto" resolved to "warn", or to "off" with a warning where
    OpenCV cannot run the checks); InputError naming `input_name` for an unknown mode, or for
    "warn" / "stop" without a usable OpenCV. Called before a run starts."""
    return _resolve(mode, input_name)[0]


def _resolve(mode, input_name: str):
    """(the mode a run gets, the face detector its checks use, or None when off): see `check_health`."""
    mode = check_health_mode(mode, input_name)
    if mode == "off":
        return mode, None
    try:
        detector = _face_detector(input_name)
    except InputError as exc:
        if mode != "auto":
            raise
        logger.warning("health checks off: %s", exc)
        return "off", None
    return "warn" if mode == "auto" else mode, detector


def _face_detector(input_name: str):
    try:
        importlib.import_module("cv2")
    except ImportError as exc:
        raise InputError(input_name, f"the health checks need OpenCV, which cannot be imported ({exc}).",
                         HEALTH_FIX) from None
    from .face import FaceDetector

    return FaceDetector()  # loads the cascade file: OpenCV 5 has none


def _open_checks(reference: np.ndarray, thresholds: HealthThresholds, detector):
    from .checks import BlockChecks

    return BlockChecks(reference, thresholds, detector)


class _ColourBaseline:
    """Mean L*a*b* of the first accepted blocks; the reference's until the first block is in."""

    def __init__(self, frame: np.ndarray, face: np.ndarray | None, blocks: int):
        self.blocks, self.count = blocks, 0
        self.reference = {"frame": frame, "face": face}
        self.sums = {"frame": np.zeros(3), "face": np.zeros(3)}
        self.face_count = 0

    def mean(self, kind: str) -> np.ndarray | None:
        count = self.count if kind == "frame" else self.face_count
        return self.sums[kind] / count if count else self.reference[kind]

    def add(self, frame: np.ndarray, face: np.ndarray | None) -> None:
        if self.count >= self.blocks:
            return
        self.count += 1
        self.sums["frame"] += frame
        if face is not None:
            self.sums["face"] += face
            self.face_count += 1


class HealthMonitor:
    """Per-block health of one stream. `observe` each block in order; `close` at the end (or at a stop).

    reference: uint8 [H, W, 3] RGB (fitted to the frames' size with the pack's resize-and-crop rule
    if it differs); mode: one of HEALTH_MODES (see `check_health`; "off" measures nothing and
    needs no OpenCV);
    sidecar / plot_path: where to write NAME.health.jsonl / NAME.health.png (see `health_paths`);
    resume_frame: the frame a resumed run starts at: the records of the interrupted run's sidecar
    before it are kept (and plotted) and the block count goes on from them, with the colour baseline
    and the active alarms they record; the A/V window starts empty again.
    """

    def __init__(self, reference: np.ndarray, fps: float, mode: str = "warn",
                 thresholds: HealthThresholds | None = None, sidecar: str | Path | None = None,
                 plot_path: str | Path | None = None, resume_frame: int | None = None):
        self.mode, detector = _resolve(mode, "health")
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0:
            raise InputError("fps", f"{fps!r} is not a positive frame rate.", "pass the video's frame rate, e.g. 25.")
        self.fps = float(fps)
        self.thresholds = thresholds or HealthThresholds()
        self.plot_path = Path(plot_path) if plot_path else None
        self.should_stop = False
        # What the plot draws, one float per block (NaN: not measured): 80 bytes a block, 6 MB for 10 h.
        self.series = {key: array("d") for key in SERIES}
        self.events: list[Alarm] = []
        self._block = 0
        # A resumed run measures from where it starts, with or without the earlier sidecar.
        self._frame = resume_frame or 0
        self._sidecar = None
        if self.mode == "off":
            return
        reference = np.asarray(reference)
        if reference.dtype != np.uint8 or reference.ndim != 3 or reference.shape[2] != 3:
            raise InputError("reference image", f"got an array of {reference.dtype} {reference.shape}.",
                             "pass the reference as uint8 [H, W, 3] RGB.")
        self._checks = _open_checks(reference, self.thresholds, detector)
        self._tracker = AlarmTracker(self.thresholds)
        self._new_baseline()
        if self._checks.ref_box is None:
            logger.warning("health: no frontal face found in the reference image; face size, identity and "
                           "A/V offset are not measured.")
        if sidecar:
            sidecar = Path(sidecar)
            sidecar.parent.mkdir(parents=True, exist_ok=True)
            resuming = resume_frame is not None and sidecar.is_file()
            if resuming:
                self._resume(sidecar, resume_frame)
            self._sidecar = open(sidecar, "a" if resuming else "w", encoding="utf-8")

    def _resume(self, sidecar: Path, before_frame: int) -> None:
        """Take back the records of `sidecar` that start before `before_frame`; the file keeps only those."""
        kept, last = [], None
        for line in sidecar.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # the line a killed process left unfinished
                break
            if rec["start_frame"] >= before_frame:
                break
            kept.append(line + "\n")
            last = rec
            for key in SERIES:
                self.series[key].append(math.nan if rec.get(key) is None else float(rec[key]))
            self.events.extend(Alarm(**alarm) for alarm in rec["alarms"])
            if not set(rec["active"]) & set(_BASELINE_GUARDS):
                face = rec["lab_face"]
                self._baseline.add(np.array(rec["lab_frame"][:3]), None if face is None else np.array(face[:3]))
        sidecar.write_text("".join(kept), encoding="utf-8")
        if last is not None:
            self._block, self._frame = last["block"] + 1, last["start_frame"] + last["frames"]
            self._tracker.restore(last["active"])

    @property
    def enabled(self) -> bool:
        """False in mode "off": `observe` returns None and nothing is written."""
        return self.mode != "off"

    def _new_baseline(self) -> None:
        self._baseline = _ColourBaseline(self._checks.ref_lab_frame, self._checks.ref_lab_face,
                                         self.thresholds.baseline_blocks)

    def observe(self, frames: np.ndarray, audio: np.ndarray, sample_rate: int) -> HealthRecord | None:
        """Measure one block (uint8 [n, H, W, 3] RGB and the mono samples that drove it), update the
        alarms, append a sidecar line. None in mode "off"."""
        if not self.enabled:
            return None
        start = time.perf_counter()
        frames, audio = self._checked(frames, audio, sample_rate)
        if frames.shape[1:3] != self._checks.size:
            self._checks.prepare(*frames.shape[1:3])
            self._new_baseline()
        raw = self._checks.measure(frames, audio)
        n = frames.shape[0]
        (frame_mean, frame_spread), face_stats = raw.pop("lab_frame"), raw.pop("lab_face", None)
        record = HealthRecord(self._block, self._frame, n, self._frame / self.fps, 0.0, **raw)
        record.lab_frame = [*frame_mean, *frame_spread]
        face_mean = None
        if face_stats is not None:
            face_mean = face_stats[0]
            record.lab_face = [*face_stats[0], *face_stats[1]]
        record.colour_de_frame = delta_e76(frame_mean, self._baseline.mean("frame"))
        base_face = self._baseline.mean("face")
        if face_mean is not None and base_face is not None:
            record.colour_de_face = delta_e76(face_mean, base_face)

        record.alarms = self._tracker.update(record.block, self._alarm_values(record))
        record.active = self._tracker.active
        if not set(record.active) & set(_BASELINE_GUARDS):
            self._baseline.add(frame_mean, face_mean)
        self._report(record)
        record.cost_ms = (time.perf_counter() - start) * 1e3
        self._write(record)
        self._block += 1
        self._frame += n
        return record

    def _checked(self, frames, audio, sample_rate) -> tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] == 0:
            raise InputError("health frames", f"got {frames.dtype} {frames.shape}.", "pass uint8 [n, H, W, 3] RGB.")
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise InputError("health audio", f"sample rate {sample_rate!r} is not a positive integer.",
                             "pass the rate of the samples, e.g. 16000.")
        sample_rate = int(sample_rate)
        expected = frames.shape[0] * sample_rate / self.fps
        if abs(audio.size - expected) > sample_rate / self.fps:
            raise InputError("health audio", f"{audio.size} samples at {sample_rate} Hz do not span the block's "
                             f"{frames.shape[0]} frames at {self.fps:g} fps ({expected:.0f} samples).",
                             "pass exactly the samples that drove the block's frames.")
        return frames, audio

    def _alarm_values(self, r: HealthRecord) -> dict[str, float | None]:
        t = self.thresholds
        confident = r.av_offset is not None and r.av_confidence >= t.av_min_confidence
        return {
            "colour_frame": r.colour_de_frame,
            "colour_face": r.colour_de_face,
            "identity": r.identity_ssim,
            "face_size": abs(r.face_size - 1.0) if r.face_size is not None else None,
            "face_lost": None if r.face_found is None else float(not r.face_found),
            "av_offset": float(abs(r.av_offset)) if confident else None,
            "seam": r.seam_ratio,
            "freeze": r.freeze_motion,
            "black": float(r.black_frames),
        }

    def _report(self, record: HealthRecord) -> None:
        for alarm in record.alarms:
            if alarm.state == "raised":
                stop = self.mode == "stop"
                self.should_stop |= stop
                logger.warning("health alarm %s at block %d (%.1f s): value %.3g, threshold %.3g; likely cause: %s%s",
                               alarm.name, alarm.block, record.time_s, alarm.value, alarm.threshold, alarm.message,
                               "; the run stops after the block in flight" if stop else "")
            else:
                logger.info("health alarm %s cleared at block %d: value %.3g, threshold %.3g",
                            alarm.name, alarm.block, alarm.value, alarm.threshold)
        record.should_stop = self.should_stop
        self.events.extend(record.alarms)
        for key in SERIES:
            value = getattr(record, key)
            self.series[key].append(math.nan if value is None else float(value))

    def _write(self, record: HealthRecord) -> None:
        if self._sidecar is None:
            return
        try:
            self._sidecar.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
            # Flushed per block: a killed run keeps every block it measured.
            self._sidecar.flush()
        except OSError as exc:
            self._drop_sidecar(exc)

    def _drop_sidecar(self, exc: OSError) -> None:
        # The video is what the run is for: a sidecar that cannot be written (a full disk) is given
        # up with one line, and the checks and alarms go on.
        logger.warning("health: cannot write %s (%s); the checks go on without it", self._sidecar.name,
                       exc.strerror or exc)
        try:
            self._sidecar.close()
        except OSError:
            pass
        self._sidecar = None

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write the PNG plot of the signals so far to `path`."""
        from .plot import plot_health

        name = title or (self.plot_path.name.removesuffix(HEALTH_SUFFIX + ".png") if self.plot_path else "run")
        return plot_health(self.series, self.events, self.thresholds, Path(path), name, self._frame / self.fps,
                           self.should_stop)

    def close(self) -> Path | None:
        """Close the sidecar and write the plot to `plot_path` (if set); returns the plot's path, or
        None when there is none (a plot that cannot be written, on a full disk, is one log line)."""
        if self._sidecar is not None:
            try:
                self._sidecar.close()
                self._sidecar = None
            except OSError as exc:
                self._drop_sidecar(exc)
        if not self.enabled or self.plot_path is None:
            return None
        try:
            return self.plot(self.plot_path)
        except OSError as exc:
            logger.warning("health: cannot write the plot %s (%s)", self.plot_path, exc.strerror or exc)
            self.plot_path.unlink(missing_ok=True)
            return None
