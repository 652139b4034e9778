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


for _cls in (LiveAvatarError, InputError, WeightsError):
    _cls.__module__ = _STABLE_MODULE
del _cls
