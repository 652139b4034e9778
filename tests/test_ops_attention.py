"""Attention backend registry: default, exact equivalence, refusal of unknown or missing kernels."""

import importlib.util

import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.ops.attention import (DEFAULT_BACKEND, WithLse, attend, attention_backends,
                                           get_attention, math_with_lse, merge_attention)

OPTIONAL = {"flash2": "flash_attn", "flash3": "flash_attn_interface",
            "sage": "sageattention"}


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


def _segments(g, lengths, heads=3, dim=16, dtype=torch.float32, offsets=None):
    """Key/value segments; `offsets` scales each segment's keys (a segment that dominates the
    softmax mass, or one that hardly counts)."""
    offsets = offsets or [1.0] * len(lengths)
    return [(torch.randn(2, n, heads, dim, generator=g).mul(o).to(dtype), torch.randn(2, n, heads, dim, generator=g)
             .to(dtype)) for n, o in zip(lengths, offsets)]


def _math_lse_kernel():
    run = get_attention("math")
    lse_run = (lambda q, k, v: run(q, k, v))
    lse_run.with_lse = WithLse(math_with_lse, lambda q: True)
    return lse_run


@pytest.mark.parametrize("offsets", [None, [4.0, 0.25], [0.25, 4.0, 1.0]])
def test_merged_segments_equal_attention_over_their_concatenation(offsets):
    """Attending per segment and merging by log-sum-exp is the softmax over the union of keys."""
    g = torch.Generator().manual_seed(1)
    lengths = [23, 7] if offsets is None or len(offsets) == 2 else [23, 7, 12]
    q = torch.randn(2, 5, 3, 16, generator=g) * 3
    segments = _segments(g, lengths, offsets=offsets)
    whole = get_attention("math")(q, torch.cat([k for k, _ in segments], 1), torch.cat([v for _, v in segments], 1))
    merged = attend(_math_lse_kernel(), q, segments)
    torch.testing.assert_close(merged, whole, atol=1e-6, rtol=1e-5)
    _, lse_whole = math_with_lse(q, torch.cat([k for k, _ in segments], 1), torch.cat([v for _, v in segments], 1))
    lses = [math_with_lse(q, k, v)[1] for k, v in segments]
    torch.testing.assert_close(torch.stack(lses).logsumexp(0), lse_whole, atol=1e-5, rtol=1e-6)


def test_kernels_without_log_sum_exp_get_the_segments_concatenated_in_order():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 3, 16, generator=g)
    segments = _segments(g, [9, 5])
    seen = []

    def kernel(q, k, v):
        seen.append(k.shape[1])
        return get_attention("math")(q, k, v)

    out = attend(kernel, q, segments)
    assert seen == [14]
    assert torch.equal(out, get_attention("math")(q, torch.cat([segments[0][0], segments[1][0]], 1),
                                                  torch.cat([segments[0][1], segments[1][1]], 1)))
    assert torch.equal(attend(kernel, q, segments[:1]), kernel(q, *segments[0]))


def test_merge_keeps_the_output_dtype_and_survives_extreme_masses():
    """Log-sum-exps far apart (one segment carries all the mass) must not overflow or give NaN."""
    o1, o2 = torch.ones(1, 2, 1, 4, dtype=torch.bfloat16), -torch.ones(1, 2, 1, 4, dtype=torch.bfloat16)
    l1, l2 = torch.full((1, 2, 1), 1e4), torch.full((1, 2, 1), -1e4)
    out = merge_attention([o1, o2], [l1, l2])
    assert out.dtype == torch.bfloat16 and torch.equal(out, o1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sdpa_on_gpu_merges_cudnn_segments_like_one_concatenated_call():
    """The DiT's real case on a GPU: history and condition keys attended where they lie."""
    kernel = get_attention("sdpa")
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, 300, 4, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    segments = [(torch.randn(1, n, 4, 128, generator=g, device="cuda", dtype=torch.bfloat16),
                 torch.randn(1, n, 4, 128, generator=g, device="cuda", dtype=torch.bfloat16)) for n in (1200, 264)]
    if not kernel.with_lse.accepts(q):
        pytest.skip("cuDNN attention is not available on this GPU")
    out, lse = kernel.with_lse.run(q, *segments[0])
    ref_out, ref_lse = math_with_lse(q, *segments[0])
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    whole = get_attention("math")(q.float(), torch.cat([k for k, _ in segments], 1).float(),
                                  torch.cat([v for _, v in segments], 1).float())
    merged = attend(kernel, q, segments)
    assert merged.dtype == torch.bfloat16
    rel = ((merged.float() - whole).norm() / whole.norm()).item()
    assert rel < 1e-2, rel


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn_interface") is None,
                    reason="needs a CUDA GPU and FlashAttention 3")
def test_flash3_merges_segments_close_to_exact():
    """History and condition keys attended apart by FlashAttention 3 and merged by log-sum-exp."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 300, 4, 128, generator=g)
    segments = _segments(g, [500, 140], heads=4, dim=128)
    exact = get_attention("math")(q, torch.cat([k for k, _ in segments], 1), torch.cat([v for _, v in segments], 1))
    cuda = [(k.cuda().bfloat16(), v.cuda().bfloat16()) for k, v in segments]
    out = attend(get_attention("flash3"), q.cuda().bfloat16(), cuda).float().cpu()
    rel = ((out - exact).norm() / exact.norm()).item()
    assert rel < 1e-2, rel
