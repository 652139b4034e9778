"""The 4-step flow-matching schedule equals the one the official run used (golden/08)."""

import torch
from safetensors.torch import load_file

from liveavatar_core.sampling.scheduler import flow_match_schedule


def test_schedule_matches_official(fixtures, manifest):
    golden = load_file(str(fixtures / "golden" / "08_rollout_offline.safetensors"))
    schedule = flow_match_schedule(manifest["settings"]["sample_steps"],
                                   shift=manifest["settings"]["euler_shift_hard_coded"])
    assert torch.equal(schedule.timesteps, golden["scheduler_timesteps"])
    assert torch.equal(schedule.sigmas, golden["scheduler_sigmas"])
