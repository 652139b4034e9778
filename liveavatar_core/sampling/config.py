"""Configuration of the block sampler: one dataclass, modes as data (spec/pipeline.md 3.5-3.9, 3.13).

Two modes share one rollout; they differ only in defaults:
* "official": the single-GPU release pipeline. Sink once at stream start (Mode S), or, with
  `online_decode`, refreshed by the caller before clip 1 with the first latent of clip 0 and the
  re-encoded motion latents (Mode S+). The reference RoPE offset is drawn like the official code's
  `random.randint(4, 30)` after `random.seed(ref_offset_seed)`, and only 4 steps are accepted.
* "streaming" (the user default): the same rollout with a seeded offset generator and a
  configurable sink refresh; by default the first latent of clip 0 becomes the reference before
  clip 1 (the official real-time pipeline's refresh, spec 3.5 "Mode T").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from ..config import DEFAULT_FRAMES_PER_CLIP, check_frames_per_clip
from ..errors import InputError
from ..model.offset import D_MAX, MODES as OFFSET_MODES

MODES = ("official", "streaming")
# The distilled Live Avatar model was made for exactly this many denoising steps.
OFFICIAL_STEPS = 4

# What happens to the condition ("sink") cache before clip 1 (spec 3.5, 3.13):
# "never": Mode S; "first_clip_output": reference := first latent of clip 0, motion unchanged
# (Mode T); "caller": the caller must call `refresh_condition` (Mode S+, online decode).
SINK_REFRESH = ("never", "first_clip_output", "caller")

_DEFAULTS = {
    "official": {"ref_offset": "official", "sink_refresh": "never"},
    "streaming": {"ref_offset": "seeded", "sink_refresh": "first_clip_output"},
}


@dataclass(frozen=True)
class SamplerConfig:
    """How to roll out the causal DiT over clips and blocks.

    mode: "official" or "streaming" (see module docstring).
    frames_per_clip: video frames per clip, a multiple of 12 (48 in the release: 12 latent frames,
        4 blocks of 3).
    steps / shift: flow-matching Euler schedule (4 / 3.0: the distilled model).
    seed: noise seed; clip r draws its noise from a CPU generator seeded `seed + r`.
    num_clips: at most this many clips (official `--num_clip`: the minimum with what the audio
        covers); None = as many as the audio covers.
    online_decode: official mode only, Mode S+ (the caller refreshes the sink before clip 1).
    sink_refresh: streaming mode only; None = the mode's default. One of SINK_REFRESH.
    ref_offset: source of the per-call reference RoPE distance (model/offset.py modes); None = the
        mode's default ("official" in official mode, "seeded" in streaming mode).
    ref_offset_seed: seed of that source; None = `seed`.
    ref_offset_value: the distance used by the "fixed" source.
    ref_offset_draws: the values used by the "recorded" source, one per denoising call.
    dtype: latent and cache dtype, e.g. "bfloat16"; None = the model's dtype (they must agree).
    """

    mode: str = "streaming"
    frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP
    steps: int = OFFICIAL_STEPS
    shift: float = 3.0
    seed: int = 420
    num_clips: int | None = None
    online_decode: bool = False
    sink_refresh: str | None = None
    ref_offset: str | None = None
    ref_offset_seed: int | None = None
    ref_offset_value: int = D_MAX
    ref_offset_draws: tuple[int, ...] = ()
    dtype: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError("mode", f"unknown sampler mode {self.mode!r}.", f"choose one of {', '.join(MODES)}.")
        check_frames_per_clip(self.frames_per_clip)
        _positive_int("steps", self.steps, "use 4 (the distilled model was trained for 4 steps).")
        if self.mode == "official" and self.steps != OFFICIAL_STEPS:
            raise InputError("steps", f"official mode runs the distilled {OFFICIAL_STEPS}-step schedule, got "
                             f"{self.steps} steps.", f"use steps={OFFICIAL_STEPS}, or mode='streaming' to experiment.")
        if not isinstance(self.shift, (int, float)) or self.shift <= 0:
            raise InputError("shift", f"must be a positive number, got {self.shift!r}.", "use 3.0 (official).")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 63:
            raise InputError("seed", f"must be an integer in [0, 2**63), got {self.seed!r}.",
                             "pick a non-negative seed (the release scripts use 420).")
        if self.num_clips is not None:
            _positive_int("num_clips", self.num_clips, "use a positive integer, or None to follow the audio.")
        if self.online_decode and self.mode != "official":
            raise InputError("online_decode", "only applies to mode='official' (Mode S+).",
                             "in streaming mode use sink_refresh='caller' instead.")
        defaults = _DEFAULTS[self.mode]
        if self.mode == "official":
            wanted = "caller" if self.online_decode else "never"
            if self.sink_refresh not in (None, wanted):
                raise InputError("sink_refresh", f"official mode fixes the sink refresh to {wanted!r} "
                                 f"(online_decode={self.online_decode}), got {self.sink_refresh!r}.",
                                 "leave sink_refresh unset, or use mode='streaming'.")
            object.__setattr__(self, "sink_refresh", wanted)
        elif self.sink_refresh is None:
            object.__setattr__(self, "sink_refresh", defaults["sink_refresh"])
        if self.sink_refresh not in SINK_REFRESH:
            raise InputError("sink_refresh", f"unknown policy {self.sink_refresh!r}.",
                             f"choose one of {', '.join(SINK_REFRESH)}.")
        if self.ref_offset is None:
            object.__setattr__(self, "ref_offset", defaults["ref_offset"])
        if self.ref_offset not in OFFSET_MODES:
            raise InputError("ref_offset", f"unknown reference offset source {self.ref_offset!r}.",
                             f"choose one of {', '.join(OFFSET_MODES)}.")
        if self.ref_offset_seed is None:
            object.__setattr__(self, "ref_offset_seed", self.seed)
        object.__setattr__(self, "ref_offset_draws", tuple(int(d) for d in self.ref_offset_draws))
        if self.dtype is not None and not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise InputError("dtype", f"{self.dtype!r} is not a torch dtype name.", "use 'bfloat16' or 'float32'.")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else getattr(torch, self.dtype)

    def latent_frames_per_clip(self, motion_frames: int = 73, lat_motion_frames: int = 19) -> int:
        """Official `(F_clip + 3 + motion_frames) // 4 - lat_motion_frames` (12 for 48 frames)."""
        return (self.frames_per_clip + 3 + motion_frames) // 4 - lat_motion_frames

    def to_dict(self) -> dict:
        """JSON-able form (resolved defaults included)."""
        d = asdict(self)
        d["ref_offset_draws"] = list(self.ref_offset_draws)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "SamplerConfig":
        """Inverse of `to_dict`; unknown keys are refused so a stale file is not half-read."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError("sampler_config", f"unknown keys {unknown}.", "write the file with this version.")
        return cls(**{k: tuple(v) if k == "ref_offset_draws" else v for k, v in data.items()})


def _positive_int(name: str, value, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(name, f"must be a positive integer, got {value!r}.", fix)
