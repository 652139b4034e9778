"""FP8 KV cache: e4m3 rings with per-row scales, on the GPU or streamed from host memory.

The fixture DiT in bf16 rolls out four blocks with bf16 rings and with FP8 rings. The first block
attends only to itself, so it must agree exactly; later blocks read quantised history and stay
close. Resident and host-streamed FP8 rings, and a resumed sampler, must agree bit for bit.
"""

import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.model.cache import KVCache, make_step_caches
from liveavatar_core.ops.fp8 import E4M3, dequantize_rows, quantize_rows
from liveavatar_core.placement import make_streamed_step_caches
from liveavatar_core.sampling.config import SamplerConfig
from liveavatar_core.sampling.generator import BlockSampler

from tests.test_placement import CACHE_FRAMES, LAT_H, LAT_W, STEPS, build, inputs, rollout

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def model(ckpt_dir):
    from liveavatar_core.weights.dit import load_dit_checkpoint

    return build(load_dit_checkpoint(ckpt_dir), dtype=BF16)


def _caches(model, make=make_step_caches, storage=E4M3):
    return make(model.cfg, LAT_H, LAT_W, num_steps=STEPS, cache_frames=CACHE_FRAMES, dtype=BF16,
                device="cpu", storage_dtype=storage)


def test_row_quantisation_round_trip():
    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes, a zero row and an outlier: each row gets its own scale.
    x = torch.randn(2, 5, 3, 64, generator=g) * torch.logspace(-3, 3, 5).view(1, 5, 1, 1)
    x[0, 0, 0] = 0
    x[1, 2, 1, 7] = 1e4
    x = x.to(BF16)
    codes, scale = quantize_rows(x)
    assert codes.dtype == E4M3 and codes.shape == x.shape
    assert scale.dtype == BF16 and scale.shape == (2, 5, 3, 1)
    back = dequantize_rows(codes, scale, BF16)
    assert torch.equal(back[0, 0, 0], torch.zeros(64, dtype=BF16))
    err = (back.float() - x.float()).abs()
    # e4m3 keeps 3 mantissa bits: half a step is 1/16 of a value; values far below the row's
    # maximum fall into the subnormal range, where the step is 2^-9 of the row's maximum.
    amax = x.float().abs().amax(-1, keepdim=True)
    assert (err <= x.float().abs() / 16 + amax * 2 ** -9 + 1e-30).all()
    rel = (back.float() - x.float()).norm() / x.float().norm()
    assert rel < 0.04, rel


def test_fp8_ring_halves_memory_and_reports_its_tensors(model):
    bf16, fp8 = _caches(model, storage=BF16)[0], _caches(model)[0]
    assert not bf16.quantized and set(bf16.tensors()) == {"k", "v"}
    assert fp8.quantized and set(fp8.tensors()) == {"k", "v", "k_scale", "v_scale"}
    size = sum(t.numel() * t.element_size() for t in fp8.tensors().values())
    full = sum(t.numel() * t.element_size() for t in bf16.tensors().values())
    head_dim = model.cfg.head_dim
    assert size == full // 2 + full // head_dim  # codes + one bf16 scale per head row


def test_first_block_is_exact_and_later_blocks_stay_close(model):
    inp = inputs(model.cfg, dtype=BF16)
    want, _ = rollout(model, _caches(model, storage=BF16), inp)
    got, rings = rollout(model, _caches(model), inp)
    for a, b in zip(got[:STEPS], want[:STEPS]):  # block 0 sees only its own (exact) rows
        assert torch.equal(a, b)
    later = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got[STEPS:], want[STEPS:])]
    assert max(later) < 0.05, later
    assert any(r > 0 for r in later)  # the history really is read back quantised
    assert all(k.dtype == E4M3 for k, _ in rings)


def test_streamed_fp8_rings_equal_resident_ones(model):
    inp = inputs(model.cfg, dtype=BF16)
    want, want_rings = rollout(model, _caches(model), inp)
    caches = _caches(model, make=make_streamed_step_caches)
    got, rings = rollout(model, caches, inp)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for (ka, va), (kb, vb) in zip(rings, want_rings):
        assert torch.equal(ka.view(torch.uint8), kb.view(torch.uint8))
        assert torch.equal(va.view(torch.uint8), vb.view(torch.uint8))
    assert caches[0].host_k.dtype == E4M3 and caches[0].host_k_scale.dtype == BF16


def test_sampler_with_fp8_rings_resumes_bit_identically_and_refuses_other_rings(model):
    inp = inputs(model.cfg, dtype=BF16)
    cfg = SamplerConfig(frames_per_clip=24, steps=STEPS, seed=3)
    audio = torch.randn(1, model.cfg.num_wav2vec_layers, model.cfg.audio_dim, 48,
                        generator=torch.Generator().manual_seed(1)).to(BF16)

    def sampler(storage=E4M3):
        def factory(*args, **kw):
            return make_step_caches(*args, storage_dtype=storage, **kw)
        return BlockSampler(model, inp["context"], inp["ref"], inp["motion"], cfg, cache_factory=factory)

    want = [b.latents.clone() for b in sampler().run(audio)]
    first = sampler()
    it = first.run(audio)
    got = [next(it).latents.clone() for _ in range(3)]
    state = first.state_dict()
    assert {"cache0.k_scale", "cache0.v_scale"} <= set(state["tensors"])
    resumed = sampler()
    resumed.load_state_dict(state)
    got += [b.latents.clone() for b in resumed.run(audio)]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(InputError, match="KV cache dtype"):
        sampler(BF16).load_state_dict(state)


def test_fp8_ring_needs_a_half_precision_model():
    with pytest.raises(InputError) as err:
        KVCache(1, 1, 6, 2, 8, E4M3, compute_dtype=torch.float32)
    assert err.value.input_name == "kv_cache_dtype"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (side streams, fused kernels)")
def test_gpu_fp8_rings_resident_and_streamed_agree(ckpt_dir):
    from liveavatar_core.ops.fp8 import dequantize_kv
    from liveavatar_core.weights.dit import load_dit_checkpoint

    g = torch.Generator(device="cuda").manual_seed(0)
    codes, scale = quantize_rows(torch.randn(1, 300, 4, 64, device="cuda", generator=g).to(BF16))
    assert torch.equal(dequantize_kv(codes, scale, BF16), dequantize_rows(codes, scale, BF16))
    gpu = build(load_dit_checkpoint(ckpt_dir), "cuda", BF16)
    inp = inputs(gpu.cfg, device="cuda", dtype=BF16)

    def caches(make):
        return make(gpu.cfg, LAT_H, LAT_W, num_steps=STEPS, cache_frames=CACHE_FRAMES, dtype=BF16, device="cuda",
                    storage_dtype=E4M3)
    want, _ = rollout(gpu, caches(make_step_caches), inp)
    streamed = caches(make_streamed_step_caches)
    got, _ = rollout(gpu, streamed, inp)
    torch.cuda.synchronize()
    assert streamed[0].host_k.is_pinned() and streamed[0].host_k_scale.is_pinned()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
