"""The DiT module: key contract, strict loading, caches, text K/V reuse, long streams, bf16."""

import pytest
import torch

from liveavatar_core.config import DiTConfig
from liveavatar_core.errors import InputError, WeightsError
from liveavatar_core.model.audio import conv1d_as_gemm
from liveavatar_core.model.cache import KVCache, make_step_caches, tokens_per_frame
from liveavatar_core.model.dit import LiveAvatarDiT
from liveavatar_core.model.layers import Attention, round_to_bf16
from liveavatar_core.model.offset import reference_time
from liveavatar_core.model.rope import RopeFreqs, TokenGrid
from liveavatar_core.ops.attention import attention_backends, get_attention
from liveavatar_core.weights.dit import expected_dit_keys, load_dit_checkpoint
from liveavatar_core.weights.io import open_checkpoint
from tests.dit_support import build_dit

INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def tiny(ckpt_dir):
    """The fixture DiT in fp32 with its base weights (no LoRA needed for self-consistency tests)."""
    return build_dit(load_dit_checkpoint(ckpt_dir))


def _inputs(cfg: DiTConfig, lat_h: int, lat_w: int, frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        ref=torch.randn(1, cfg.in_dim, 1, lat_h, lat_w, generator=g),
        motion=torch.randn(1, cfg.in_dim, cfg.motion_frames[1], lat_h, lat_w, generator=g),
        context=torch.randn(7, cfg.text_dim, generator=g),
        x=torch.randn(1, cfg.in_dim, frames, lat_h, lat_w, generator=g),
        audio=torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 4 * frames, generator=g),
    )


# --- key contract -------------------------------------------------------------------------------

def test_full_size_key_contract_on_meta():
    cfg = DiTConfig.wan_s2v_14b()
    with torch.device("meta"):
        model = LiveAvatarDiT(cfg)
    state = model.state_dict()
    expected = expected_dit_keys(cfg)
    assert len(state) == 1260
    assert set(state) == set(expected)
    assert all(tuple(state[k].shape) == tuple(expected[k]) for k in state)
    assert list(model.buffers()) == []  # RoPE values are computed, never stored


def test_fixture_checkpoint_loads_with_no_missing_or_unexpected_keys(ckpt_dir, tiny):
    sd = open_checkpoint(ckpt_dir / INDEX, "dit_checkpoint")
    assert set(tiny.state_dict()) == set(sd)
    assert all(torch.equal(tiny.state_dict()[k], sd[k].float()) for k in sd)


def test_round_to_bf16_equals_the_cast_round_trip_bit_for_bit():
    """Ties to even, subnormals, the overflow to infinity and the signs come out as `.to(bf16).float()`."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    finite = bits.view(torch.float32)[torch.isfinite(bits.view(torch.float32))]
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x00008000, 0x7F7FFFFF], dtype=torch.int64)
    edge = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -3e-39])
    x = torch.cat([finite, ties.to(torch.int32).view(torch.float32), edge])
    assert torch.equal(round_to_bf16(x).view(torch.int32), x.to(torch.bfloat16).float().view(torch.int32))
    nan = torch.tensor([float("nan"), -float("nan")])
    assert torch.isnan(round_to_bf16(nan)).all()


# --- caches -------------------------------------------------------------------------------------

def test_ring_window_grows_then_rolls():
    cache = KVCache(1, 1, 12, 1, 2, torch.float32)
    assert [cache.window(s, 3) for s in (0, 3, 6, 9)] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert [cache.window(s, 3) for s in (12, 15, 27)] == [(0, 12), (3, 12), (3, 12)]
    with pytest.raises(InputError, match="multiple"):
        cache.window(0, 5)


def test_step_cache_factory_refuses_partial_blocks():
    cfg = DiTConfig.wan_s2v_14b()
    with pytest.raises(InputError, match="cache_frames"):
        make_step_caches(cfg, 88, 48, num_steps=4, cache_frames=20, device="meta")
    caches = make_step_caches(cfg, 88, 48, num_steps=4, cache_frames=12, device="meta")
    assert len(caches) == 4 and caches[0].length == 12 * 1056  # spec/dit.md 1: 12672 tokens


@pytest.mark.parametrize("lat_hw", [(8, 16), (16, 8), (24, 16)])
def test_cond_cache_sized_by_actual_tokens(tiny, lat_hw):
    cfg = tiny.cfg
    inp = _inputs(cfg, *lat_hw, cfg.num_frames_per_block)
    cond = tiny.sink(inp["ref"], inp["motion"], inp["context"])
    fs = tokens_per_frame(cfg, *lat_hw)
    assert cond.num_tokens * 2 == 5 * fs  # ref fs + post fs + 2x fs/4 + 4x fs/4
    assert all(k.shape == (1, cond.num_tokens, cfg.num_heads, cfg.head_dim) for k in cond.k)


def test_reference_time_rule():
    assert reference_time(30, 0, 4) == 30  # first block: never moves
    assert reference_time(30, 12, 19) == 31  # moves once frame0 + d > 30
    assert reference_time(30, 12, 18) == 30
    assert reference_time(30, 27, 4) == 31 and reference_time(30, 100, 7) == 107


# --- calls --------------------------------------------------------------------------------------

def _stream(model, inp, lat_hw, frames, cache_frames=None):
    cache_frames = cache_frames or 2 * frames
    caches = make_step_caches(model.cfg, *lat_hw, num_steps=1, cache_frames=cache_frames, dtype=model.dtype)
    return caches[0]


def test_text_kv_reuse_is_bit_identical(tiny):
    cfg = tiny.cfg
    f = cfg.num_frames_per_block
    inp = _inputs(cfg, 8, 16, f, seed=1)
    fs = tokens_per_frame(cfg, 8, 16)
    text = tiny.encode_text(inp["context"])
    outs = []
    for ctx in (inp["context"], text):
        cache = _stream(tiny, inp, (8, 16), f)
        tiny.sink(inp["ref"], inp["motion"], ctx, cache)
        preds = [tiny.denoise_block(inp["x"], 700.0, ctx, inp["audio"], None, cache, b * f * fs, 11)
                 for b in range(3)]
        outs.append((cache.cond, preds))
    (cond_a, preds_a), (cond_b, preds_b) = outs
    assert all(torch.equal(a, b) for a, b in zip(cond_a.k + cond_a.v, cond_b.k + cond_b.v))
    assert all(torch.equal(a, b) for a, b in zip(preds_a, preds_b))


@pytest.mark.parametrize("stride", [1, 2])
def test_audio_conv_as_gemm_equals_conv1d(stride):
    """The CUDA form of the audio encoder's causal convs (cuDNN would re-lay their weights out on
    every call) computes the same conv."""
    g = torch.Generator().manual_seed(stride)
    x = torch.randn(3, 24, 13, generator=g)
    w, b = torch.randn(40, 24, 3, generator=g), torch.randn(40, generator=g)
    expected = torch.nn.functional.conv1d(x, w, b, stride)
    got = conv1d_as_gemm(x, w, b, stride)
    assert got.shape == expected.shape == (3, 40, (13 - 3) // stride + 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_far_stream_position_rotates_keys_like_the_official_table(tiny):
    """Past the official 45,000-position table: finite output, keys rotated at their true position."""
    cfg = tiny.cfg
    f = cfg.num_frames_per_block
    lat_hw = (8, 16)
    fs = tokens_per_frame(cfg, *lat_hw)
    inp = _inputs(cfg, *lat_hw, f, seed=2)
    cache = _stream(tiny, inp, lat_hw, f)
    tiny.sink(inp["ref"], inp["motion"], inp["context"], cache)
    frame0 = 60_000 * f  # ~ 8 h of 25 fps video
    raw = []
    hook = tiny.blocks[0].self_attn.norm_k.register_forward_hook(lambda _m, _i, o: raw.append(o.detach()))
    pred = tiny.denoise_block(inp["x"], 500.0, inp["context"], inp["audio"], None, cache, frame0 * fs, 30)
    hook.remove()
    assert torch.isfinite(pred).all()

    # Official recipe: float64 angles, complex-half table entries, complex product in float64.
    hp, wp = lat_hw[0] // 2, lat_hw[1] // 2
    parts = tiny.rope.part_pairs
    pos = [torch.arange(frame0, frame0 + f), torch.arange(hp), torch.arange(wp)]
    tables = []
    for p, n in zip(pos, parts):
        inv = 1.0 / torch.pow(cfg.rope_theta, torch.arange(0, 2 * n, 2).to(torch.float64).div(2 * n))
        ang = torch.outer(p.to(torch.float64), inv)
        tables.append(torch.polar(torch.ones_like(ang), ang).to(torch.complex64).to(torch.complex32))
    freqs = torch.cat([tables[0].view(f, 1, 1, -1).expand(f, hp, wp, -1),
                       tables[1].view(1, hp, 1, -1).expand(f, hp, wp, -1),
                       tables[2].view(1, 1, wp, -1).expand(f, hp, wp, -1)], dim=-1).reshape(f * fs, 1, -1)
    k = raw[0][0].unflatten(-1, (cfg.num_heads, -1))
    expected = torch.view_as_real(torch.view_as_complex(k.double().unflatten(-1, (-1, 2)).contiguous())
                                  * freqs.to(torch.complex128)).flatten(-2).float()
    row = (frame0 * fs) % cache.length
    assert torch.equal(cache.k[0, 0, row:row + f * fs], expected)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_rope_matches_the_official_45000_table_bit_for_bit(tiny):
    positions = torch.arange(45000)
    for axis, n in enumerate(tiny.rope.part_pairs):
        inv = 1.0 / torch.pow(10000, torch.arange(0, 2 * n, 2).to(torch.float64).div(2 * n))
        table = torch.polar(torch.ones(45000, n, dtype=torch.float64), torch.outer(positions, inv))
        half = table.to(torch.complex64).to(torch.complex32).to(torch.complex64)
        cos, sin = tiny.rope.part(axis, positions)
        assert torch.equal(cos, half.real) and torch.equal(sin, half.imag)
        # Negative positions are the conjugate (FramePack motion tokens).
        ncos, nsin = tiny.rope.part(axis, -positions[:100])
        assert torch.equal(ncos, cos[:100]) and torch.equal(nsin, -sin[:100])


def test_rope_tables_are_cached_per_group_and_bounded():
    """A block's table serves its sampler steps and the fixed motion groups are built once: cached
    tables equal fresh ones, repeat requests share them, and the caches stay small."""
    cfg = DiTConfig.wan_s2v_14b()
    freqs, fresh = RopeFreqs(cfg.head_dim), RopeFreqs(cfg.head_dim)
    fresh.GRID_CACHE = fresh.SEQUENCE_CACHE = 0
    grid = TokenGrid((40, 41, 42), tuple(range(24)), tuple(range(44)))
    first = freqs.sequence([grid])
    assert freqs.sequence([grid]) is first
    assert all(torch.equal(a, b) for a, b in zip(first, fresh.sequence([grid])))
    for t in range(3 * RopeFreqs.GRID_CACHE):
        moved = TokenGrid((t,), grid.h, grid.w)
        mixed = freqs.sequence([moved, grid])
        assert all(torch.equal(a, b) for a, b in zip(mixed, fresh.sequence([moved, grid])))
    assert len(freqs._grids) == RopeFreqs.GRID_CACHE and len(freqs._sequences) == RopeFreqs.SEQUENCE_CACHE
    assert not fresh._grids and not fresh._sequences


def _compare_bf16(tiny, ckpt_dir, device, attention):
    cfg = tiny.cfg
    f = cfg.num_frames_per_block
    lat_hw = (8, 16)
    fs = tokens_per_frame(cfg, *lat_hw)
    inp = _inputs(cfg, *lat_hw, f, seed=3)
    ckpt = load_dit_checkpoint(ckpt_dir)
    bf16 = build_dit(ckpt, torch.bfloat16, device, attention=attention)
    preds = []
    for model in (tiny, bf16):
        cache = make_step_caches(cfg, *lat_hw, num_steps=1, cache_frames=2 * f, dtype=model.dtype,
                                 device=model.device)[0]
        model.sink(inp["ref"], inp["motion"], inp["context"], cache)
        preds.append([model.denoise_block(inp["x"], 900.0, inp["context"], inp["audio"].to(model.dtype), None,
                                          cache, b * f * fs, 9) for b in range(2)])
        assert cache.k.dtype == model.dtype and cache.cond.k[0].dtype == model.dtype
    for ref, low in zip(*preds):
        assert low.dtype == torch.bfloat16 and low.device == bf16.device
        rel = (low.float().cpu() - ref).norm() / ref.norm()
        assert rel < 0.05, rel


def test_bf16_path_runs_close_to_fp32(ckpt_dir, tiny):
    _compare_bf16(tiny, ckpt_dir, "cpu", "sdpa")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", attention_backends())
def test_bf16_on_gpu_close_to_fp32_reference(ckpt_dir, tiny, backend):
    try:
        get_attention(backend)
    except InputError as exc:
        pytest.skip(str(exc))
    _compare_bf16(tiny, ckpt_dir, "cuda", backend)


def test_denoise_refuses_bad_inputs_before_work(tiny):
    cfg = tiny.cfg
    f = cfg.num_frames_per_block
    inp = _inputs(cfg, 8, 16, f)
    cache = _stream(tiny, inp, (8, 16), f)
    with pytest.raises(InputError, match="sink"):
        tiny.denoise_block(inp["x"], 1.0, inp["context"], inp["audio"], None, cache, 0, 4)
    tiny.sink(inp["ref"], inp["motion"], inp["context"], cache)
    with pytest.raises(InputError, match="current_start"):
        tiny.denoise_block(inp["x"], 1.0, inp["context"], inp["audio"], None, cache, 5, 4)
    with pytest.raises(InputError, match="audio"):
        tiny.denoise_block(inp["x"], 1.0, inp["context"], inp["audio"][:, :3], None, cache, 0, 4)
    with pytest.raises(InputError, match="sink"):  # condition cache of another size
        tiny.denoise_block(torch.zeros(1, cfg.in_dim, f, 16, 16), 1.0, inp["context"], inp["audio"],
                           None, cache, 0, 4)
    with pytest.raises(InputError, match="text_len"):
        tiny.encode_text(torch.zeros(cfg.text_len + 1, cfg.text_dim))


def test_offset_only_matters_once_the_reference_moves(tiny):
    """d changes nothing for the first block (reference stays at its index) and moves it later."""
    cfg = tiny.cfg
    f = cfg.num_frames_per_block
    fs = tokens_per_frame(cfg, 8, 16)
    inp = _inputs(cfg, 8, 16, f, seed=4)
    text = tiny.encode_text(inp["context"])
    cond = tiny.sink(inp["ref"], inp["motion"], text)

    def pred(frame0, d):
        cache = _stream(tiny, inp, (8, 16), f)
        cache.cond = cond
        return tiny.denoise_block(inp["x"], 600.0, text, inp["audio"], None, cache, frame0 * fs, d)

    assert torch.equal(pred(0, 4), pred(0, 30))
    assert torch.equal(pred(cfg.ref_rope_index, 7), pred(cfg.ref_rope_index, 7))
    assert not torch.equal(pred(cfg.ref_rope_index, 4), pred(cfg.ref_rope_index, 30))


def test_attention_kernel_is_swapped_everywhere(tiny):
    tiny.set_attention("math")
    kernels = {m.attn for m in tiny.modules() if isinstance(m, Attention)}
    assert kernels == {get_attention("math")}
    tiny.set_attention("sdpa")
    with pytest.raises(InputError, match="unknown attention backend"):
        tiny.set_attention("nope")
