"""Per-block quality health of long runs (spec/live.md 6): colour drift, face presence, size and
identity, audio-to-mouth offset, seams, freezes and broken frames, with alarms in modes off, warn
or stop. Weight-free: numpy, OpenCV's bundled Haar cascade and Pillow; OpenCV is only imported when
a monitor is built in a mode other than "off"."""

from .alarms import DEFAULT_HEALTH, HEALTH_MODES, Alarm, HealthThresholds, Limit, check_health_mode
from .monitor import HealthMonitor, HealthRecord, check_health, health_paths

__all__ = [
    "DEFAULT_HEALTH",
    "HEALTH_MODES",
    "Alarm",
    "HealthMonitor",
    "HealthRecord",
    "HealthThresholds",
    "Limit",
    "check_health",
    "check_health_mode",
    "health_paths",
]
