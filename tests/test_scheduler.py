"""Euler update dtype flow (spec/pipeline.md 3.3) and input validation."""

import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.sampling.scheduler import flow_match_schedule


def test_bf16_step_rounds_product_then_sum():
    s = flow_match_schedule(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 4, 4, generator=g).to(torch.bfloat16)
    v = torch.randn(16, 3, 4, 4, generator=g).to(torch.bfloat16)
    out = s.step(x, v, 1)
    # PyTorch casts the 0-dim float32 sigma difference to the bf16 operand's dtype before the product.
    d = (s.sigmas[2] - s.sigmas[1]).to(torch.bfloat16).float()
    product = (d * v.float()).to(torch.bfloat16)
    expected = (x.float() + product.float()).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_fp32_step_and_final_sigma():
    s = flow_match_schedule(4)
    x = torch.ones(2)
    v = torch.full((2,), 2.0)
    assert s.sigmas[-1] == 0 and s.num_steps == 4
    assert torch.allclose(s.step(x, v, 3), x - 2 * s.sigmas[3])


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_bad_step_count(steps):
    with pytest.raises(InputError, match="sample_steps"):
        flow_match_schedule(steps)
