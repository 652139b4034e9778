"""Attention backend registry: default, exact equivalence, refusal of unknown or missing kernels."""

import importlib.util

import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.ops.attention import DEFAULT_BACKEND, attention_backends, get_attention

OPTIONAL = {"flash2": "flash_attn", "flash3": "flash_attn_interface", "sage": "sageattention"}


def test_default_is_sdpa_and_listed_first():
    assert DEFAULT_BACKEND == "sdpa" and attention_backends()[0] == "sdpa"
    assert set(OPTIONAL) <= set(attention_backends())


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(InputError) as err:
        get_attention("xformers")
    assert "sdpa" in str(err.value) and "attention" in str(err.value)


@pytest.mark.parametrize("name", sorted(OPTIONAL))
def test_missing_optional_backend_is_refused(name):
    if torch.cuda.is_available() and importlib.util.find_spec(OPTIONAL[name]) is not None:
        pytest.skip(f"{OPTIONAL[name]} is installed here")
    with pytest.raises(InputError) as err:
        get_attention(name)
    assert name in str(err.value) and "Fix:" in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_and_math_agree(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g).to(dtype) for n in (5, 11, 11))
    a, b = get_attention("sdpa")(q, k, v), get_attention("math")(q, k, v)
    assert a.shape == (2, 5, 3, 16) and a.dtype == b.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_result_comes_back_in_the_query_dtype():
    q = torch.randn(1, 4, 2, 8)
    kv = torch.randn(1, 6, 2, 8, dtype=torch.bfloat16)
    assert get_attention("sdpa")(q, kv, kv).dtype == torch.float32
