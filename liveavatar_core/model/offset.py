"""Where the reference frame sits in RoPE time at each denoising call (spec/dit.md 3.4, 6.1).

The official DiT draws `d = random.randint(4, 30)` from Python's unseeded global RNG on every
inference call and places the cached reference keys `d` frames ahead of the block once the stream
is past frame `30 - d`. Here `d` is an explicit argument of `denoise_block`; this policy produces
the sequence of `d` values, one `draw()` per denoising call, in call order.

Modes:
* "seeded" (default): a dedicated numpy generator seeded from the run seed; same seed, same video.
* "fixed": the constant `value` on every call.
* "official": `random.Random(seed).randint(4, 30)` per call, i.e. what the official code draws
  after `random.seed(seed)` (reproduces the golden fixtures with their python_random_seed).
* "recorded": the explicit `draws` list, in order (e.g. values logged from an official run).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

D_MIN, D_MAX = 4, 30  # official randint bounds, inclusive
MODES = ("seeded", "fixed", "official", "recorded")


@dataclass
class RefOffsetPolicy:
    """Source of the per-call reference RoPE distance `d`."""

    mode: str = "seeded"
    seed: int = 0
    value: int = D_MAX
    draws: tuple[int, ...] = ()
    calls: int = field(default=0, init=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError("ref_offset_mode", f"unknown mode '{self.mode}'.", f"choose one of {', '.join(MODES)}.")
        if self.mode == "fixed" and (not isinstance(self.value, int) or self.value < 0):
            raise InputError("ref_offset", f"fixed distance must be a non-negative integer, got {self.value!r}.",
                             f"use a value in {D_MIN}..{D_MAX} (the trained range).")
        self.draws = tuple(int(d) for d in self.draws)
        self._py = random.Random(self.seed)
        self._np = np.random.default_rng(self.seed)

    def draw(self) -> int:
        """The `d` of the next denoising call."""
        if self.mode == "recorded" and self.calls >= len(self.draws):
            raise InputError("ref_offset_draws", f"only {len(self.draws)} recorded draws, call "
                             f"{self.calls + 1} needs another.", "record one draw per denoising call.")
        self.calls += 1
        if self.mode == "fixed":
            return self.value
        if self.mode == "official":
            return self._py.randint(D_MIN, D_MAX)
        if self.mode == "recorded":
            return self.draws[self.calls - 1]
        return int(self._np.integers(D_MIN, D_MAX + 1))


def reference_time(ref_index: int, block_frame: int, d: int) -> int:
    """RoPE time index of the reference keys for a block starting at latent frame `block_frame`.

    Official rule: shift by `max(0, block_frame - (ref_index - d))`, so the reference stays at
    `ref_index` early in the stream and later sits `d` frames ahead of the block.
    """
    return ref_index + max(0, block_frame - (ref_index - d))
