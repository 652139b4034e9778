"""Health modes, alarm thresholds (with hysteresis) and the alarms themselves.

A value past a limit's `on` threshold raises its alarm at once (or after `raise_after` blocks in a
row, for the noisy signals); the alarm clears only after `clear_after` blocks back past `off`, so a
value hovering around one threshold cannot make an alarm flicker. Defaults are first guesses from
synthetic video and the literature (spec/live.md 6); a long real run is still needed to calibrate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError

# auto: warn where OpenCV can run the checks, else off with one warning saying why (so a missing
# or too new OpenCV never stops a run nobody asked to check); off: no checks (OpenCV not needed);
# warn: log and record alarms; stop: also ask the caller to end the run (after the block in
# flight). warn and stop refuse to start without a usable OpenCV.
HEALTH_MODES = ("auto", "off", "warn", "stop")
DEFAULT_HEALTH = "auto"  # what the CLI, the nodes and live sessions run unless told otherwise
HEALTH_FIX = "pip install 'opencv-python-headless>=4.8,<5' (5.x wheels ship no Haar cascades) or set health to off."


def check_health_mode(value, input_name: str = "health") -> str:
    """`value` if it is one of HEALTH_MODES, else InputError naming `input_name`."""
    if value not in HEALTH_MODES:
        raise InputError(input_name, f"{value!r} is not a health mode.", f"use one of {', '.join(HEALTH_MODES)}.")
    return value


@dataclass(frozen=True)
class Limit:
    """Hysteresis thresholds of one alarm. `on` > `off`: high values are bad (raise at value >= on,
    clear at value <= off); `on` < `off`: low values are bad (raise at <= on, clear at >= off)."""

    on: float
    off: float
    raise_after: int = 1  # blocks in a row past `on` before the alarm is raised
    clear_after: int = 3  # blocks in a row back past `off` before it clears

    def __post_init__(self):
        if self.on == self.off or self.raise_after < 1 or self.clear_after < 1:
            raise InputError("health thresholds", f"{self} needs on != off and counts >= 1.",
                             "give an `off` threshold on the healthy side of `on`.")

    def breached(self, value: float) -> bool:
        """Whether `value` is past the `on` threshold."""
        return value >= self.on if self.on > self.off else value <= self.on

    def recovered(self, value: float) -> bool:
        """Whether `value` is back past the `off` threshold."""
        return value <= self.off if self.on > self.off else value >= self.off


# What each alarm most likely means, for the log line and the sidecar.
CAUSES = {
    "colour_frame": "colour drift: the frame's mean colour moved away from the baseline",
    "colour_face": "skin-tone drift: the face's mean colour moved away from the baseline",
    "identity": "the upper face no longer matches the reference (identity drift, or the face box is misplaced)",
    "face_size": "the face grew or shrank against the reference (zoom drift)",
    "face_lost": "no frontal face found: the face left the frame, turned away, or the frames are broken",
    "av_offset": "audio and mouth out of step (wrong audio offset or sample rate, or lip-sync drift)",
    "seam": "a jump at the block boundary (the motion context between blocks was lost)",
    "freeze": "the picture stopped moving during speech (stalled or repeated frames)",
    "black": "black or constant frames (decoder failure, NaN output, or a dropped block)",
}


@dataclass(frozen=True)
class HealthThresholds:
    """Alarm limits and the measurement windows of the health checks (defaults documented inline)."""

    # Colour: CIE76 distance of the mean L*a*b* from the baseline; 2.3 is just noticeable, 6 a clear cast.
    colour_frame: Limit = Limit(6.0, 4.0)
    # The face box mean also moves with the mouth, teeth and box placement: a wider margin.
    colour_face: Limit = Limit(8.0, 5.0)
    # SSIM of the 64x64 upper-face crop against the reference's: 0.87-0.99 on clean synthetic runs,
    # 0.25-0.4 with the hair recoloured; real blinks and expressions cost more than the former.
    identity: Limit = Limit(0.5, 0.6, raise_after=2)
    # |face width / reference face width - 1|.
    face_size: Limit = Limit(0.35, 0.2, raise_after=2)
    # 1 when neither detection frame of the block (middle, then last) has a face: Haar misses
    # single frames, so 3 blocks in a row (1.4 s).
    face_lost: Limit = Limit(1.0, 0.0, raise_after=3, clear_after=2)
    # |lag| in frames; ITU-R BT.1359 detectability is +45/-125 ms, 2 frames = 80 ms; sustained over
    # 4 windows (each block moves the window by 12 frames).
    av_offset: Limit = Limit(2.0, 1.0, raise_after=4, clear_after=4)
    # Boundary difference over the typical within-block difference: 0.3-1.9 on clean synthetic runs,
    # 5.5 for a 20 px jump of the picture.
    seam: Limit = Limit(4.0, 2.5)
    # Median within-block motion (mean absolute difference, 8-bit levels) during speech: 1.2-2.3 on
    # clean synthetic runs (jitter and noise alone), 0 for a repeated frame.
    freeze: Limit = Limit(0.3, 0.6)
    # Black or constant frames in the block.
    black: Limit = Limit(1.0, 0.0)

    # Colour baseline: the first blocks without a colour, black or seam alarm; 20 blocks = 240 frames
    # = 9.6 s at 25 fps.
    baseline_blocks: int = 20
    # A/V offset: 8 s window, lags -10..+10 frames, reported once the window holds 3 s of speech and
    # only counted towards the alarm at a confidence (peak - median correlation) of at least this
    # (clean synthetic runs: 0.55-0.7; audio of another moment: 0.14-0.19).
    av_window_frames: int = 200
    av_max_lag: int = 10
    av_min_speech_frames: int = 75
    av_min_confidence: float = 0.25
    # A video frame "has speech" when its audio RMS is above this (dBFS); freezes count in blocks
    # where at least half of the frames have speech.
    speech_floor_dbfs: float = -40.0

    def limits(self) -> dict[str, Limit]:
        """The limit of every alarm, by alarm name (the keys of CAUSES)."""
        return {name: getattr(self, name) for name in CAUSES}


@dataclass(frozen=True)
class Alarm:
    """An alarm raised or cleared at a block: `value` of the signal against `threshold`."""

    name: str
    block: int
    value: float
    threshold: float
    state: str  # "raised" or "cleared"
    message: str

    def to_json(self) -> dict:
        """The alarm as plain JSON types."""
        return {"name": self.name, "block": self.block, "value": round(float(self.value), 4),
                "threshold": self.threshold, "state": self.state, "message": self.message}


@dataclass
class _State:
    active: bool = False
    run: int = 0  # blocks in a row past `on` (inactive) or back past `off` (active)


@dataclass
class AlarmTracker:
    """Hysteresis state of every alarm; `update` turns one block's alarm values into raised/cleared alarms."""

    thresholds: HealthThresholds
    _states: dict[str, _State] = field(default_factory=dict)

    @property
    def active(self) -> list[str]:
        """Names of the alarms raised and not cleared yet."""
        return [name for name, state in self._states.items() if state.active]

    def restore(self, active: list[str]) -> None:
        """Start with the alarms `active` raised (a resumed run)."""
        for name in active:
            self._states[name] = _State(active=True)

    def update(self, block: int, values: dict[str, float | None]) -> list[Alarm]:
        """Alarms raised or cleared by this block. A value of None (not measurable) changes nothing."""
        events = []
        for name, limit in self.thresholds.limits().items():
            value = values.get(name)
            if value is None:
                continue
            state = self._states.setdefault(name, _State())
            moved = limit.recovered(value) if state.active else limit.breached(value)
            state.run = state.run + 1 if moved else 0
            if state.run < (limit.clear_after if state.active else limit.raise_after):
                continue
            state.active, state.run = not state.active, 0
            if state.active:
                events.append(Alarm(name, block, value, limit.on, "raised", CAUSES[name]))
            else:
                events.append(Alarm(name, block, value, limit.off, "cleared", f"{name} back to normal"))
        return events
