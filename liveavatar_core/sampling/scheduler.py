"""Flow-matching Euler schedule of the distilled 4-step sampler (spec/pipeline.md section 3.3).

The official pipeline uses diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
shift=3)`, whose `set_timesteps` applies the shift to a sigma range that is already shifted. We
reproduce that arithmetic (float32 training table, float64 inference linspace, float32 result)
instead of depending on diffusers, which ComfyUI does not ship.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Timesteps `t_i` (model input, in [0, 1000]) and sigmas `s_0..s_S` (with a final 0)."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def step(self, sample: torch.Tensor, velocity: torch.Tensor, i: int) -> torch.Tensor:
        """One Euler step `x + (s_{i+1} - s_i) * v` with the official dtype flow.

        The 0-dim float32 sigma difference times a bf16 velocity stays bf16 (0-dim tensors do not
        promote), the sum is float32, and the result is cast back to the velocity's dtype.
        """
        d_sigma = self.sigmas[i + 1] - self.sigmas[i]
        return (sample.to(torch.float32) + d_sigma * velocity).to(velocity.dtype)


def flow_match_schedule(num_steps: int = 4, shift: float = 3.0,
                        num_train_timesteps: int = 1000) -> FlowMatchSchedule:
    """The official schedule; 4 steps give timesteps 1000 / 857.69 / 602.15 / 8.93."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise InputError("sample_steps", f"must be a positive integer, got {num_steps!r}.",
                         "use 4 (the distilled model was trained for 4 steps).")
    train_t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
    train_sigmas = torch.from_numpy(train_t) / num_train_timesteps
    train_sigmas = shift * train_sigmas / (1 + (shift - 1) * train_sigmas)
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = t / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    timesteps = sigmas * num_train_timesteps
    return FlowMatchSchedule(timesteps=timesteps, sigmas=torch.cat([sigmas, torch.zeros(1)]))
