"""Errors the pack raises on purpose.

Every user-facing failure is one of these, raised before heavy work starts, with a message that
names the offending input and the fix. ComfyUI shows the message verbatim, so it must stand alone.
"""

from __future__ import annotations

# ComfyUI names an error's type as `__module__ + "." + __qualname__`, and it imports this package
# under a module name made of the install's folder path: the stable name of the core package
# keeps that path out of the UI (the CLI imports the classes under this very name).
_STABLE_MODULE = "liveavatar_core.errors"


class LiveAvatarError(Exception):
    """Base class for every error this pack raises deliberately."""


class InputError(LiveAvatarError, ValueError):
    """A user-supplied input (file, size string, audio, setting) cannot be used as given."""

    def __init__(self, input_name: str, problem: str, fix: str | None = None):
        self.input_name = input_name
        self.problem = problem
        self.fix = fix
        message = f"{input_name}: {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)


class WeightsError(InputError):
    """A checkpoint file or folder is missing, corrupt, incomplete or of the wrong model."""


class WorkerError(LiveAvatarError):
    """A worker process of a multi-GPU run died or failed; names its rank, device and exit cause."""

    def __init__(self, rank: int, device: str, cause: str, log_tail: str = ""):
        self.rank, self.device, self.cause, self.log_tail = rank, device, cause, log_tail
        message = f"worker rank {rank} ({device}) {cause}"
        if log_tail:
            message += f"\nlast lines of its log:\n{log_tail}"
        super().__init__(message)


for _cls in (LiveAvatarError, InputError, WeightsError, WorkerError):
    _cls.__module__ = _STABLE_MODULE
del _cls
