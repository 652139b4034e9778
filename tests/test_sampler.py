"""Block sampler behaviour on the fixture DiT at a small latent size: records, determinism, clip
counts, sink refresh policies, refusals, resume and flat memory."""

import itertools

import numpy as np
import pytest
import torch

from liveavatar_core.encoders.audio import AudioFeatures
from liveavatar_core.errors import InputError
from liveavatar_core.sampling.config import SamplerConfig
from liveavatar_core.sampling.generator import BlockSampler
from liveavatar_core.sampling.scheduler import flow_match_schedule
from liveavatar_core.weights.dit import load_dit_checkpoint
from tests.dit_support import build_dit

LAT_H, LAT_W = 8, 8  # smallest size FramePack accepts: 16 tokens per latent frame
# Streaming mode accepts any step count; one step keeps these behaviour tests fast, the resume
# tests use several steps (one ring cache each) and the parity tests the official four.
FAST = dict(steps=1, frames_per_clip=24)


@pytest.fixture(scope="module")
def model(ckpt_dir):
    ckpt = load_dit_checkpoint(ckpt_dir)
    return build_dit(ckpt, torch.float32)


@pytest.fixture(scope="module")
def inputs(model):
    cfg = model.cfg
    g = torch.Generator().manual_seed(7)
    return dict(
        context=model.encode_text(torch.randn(5, cfg.text_dim, generator=g)),
        ref=torch.randn(1, cfg.in_dim, 1, LAT_H, LAT_W, generator=g),
        motion=torch.randn(1, cfg.in_dim, 23, LAT_H, LAT_W, generator=g),
        audio=torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 8 * 24, generator=g),
    )


def _sampler(model, inputs, on_clip_end=None, **config):
    config = {**FAST, **config}
    return BlockSampler(model, inputs["context"], inputs["ref"], inputs["motion"], SamplerConfig(**config),
                        on_clip_end=on_clip_end)


def _audio(inputs, clips, frames_per_clip=24):
    return inputs["audio"][..., :clips * frames_per_clip]


def _latents(blocks):
    return [b.latents for b in blocks]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --- records ------------------------------------------------------------------------------------

def test_blocks_in_order_with_shapes_and_absolute_frames(model, inputs):
    sampler = _sampler(model, inputs, seed=3)
    blocks = list(sampler.run(_audio(inputs, 2)))
    nfb, per_clip = model.cfg.num_frames_per_block, 24 // 4
    assert [(b.clip, b.block) for b in blocks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [b.frame for b in blocks] == [0, nfb, per_clip, per_clip + nfb]
    assert [b.last_in_clip for b in blocks] == [False, True, False, True]
    for b in blocks:
        assert b.latents.shape == (1, model.cfg.out_dim, nfb, LAT_H, LAT_W)
        assert b.latents.dtype == model.dtype and torch.isfinite(b.latents).all()
    assert (sampler.clip, sampler.block) == (2, 0)


def test_blocks_are_yielded_lazily(model, inputs):
    calls = []
    real = model.denoise_block
    model.denoise_block = lambda *a: calls.append(1) or real(*a)
    try:
        gen = _sampler(model, inputs).run(_audio(inputs, 2))
        assert calls == []
        next(gen)
        assert len(calls) == 1  # one block's single step only
    finally:
        del model.denoise_block


def test_clip_end_hook_sees_the_whole_clip(model, inputs):
    seen = []
    blocks = list(_sampler(model, inputs, on_clip_end=lambda s, r, lat: seen.append((r, lat.clone())))
                  .run(_audio(inputs, 2)))
    assert [r for r, _ in seen] == [0, 1]
    for r, lat in seen:
        assert torch.equal(lat, torch.cat([b.latents for b in blocks if b.clip == r], dim=2))


# --- determinism ----------------------------------------------------------------------------------

def test_same_seed_same_blocks_other_seed_other_blocks(model, inputs):
    a = _latents(_sampler(model, inputs, seed=11).run(_audio(inputs, 2)))
    b = _latents(_sampler(model, inputs, seed=11).run(_audio(inputs, 2)))
    c = _latents(_sampler(model, inputs, seed=12).run(_audio(inputs, 2)))
    assert _same(a, b)
    assert not any(torch.equal(x, y) for x, y in zip(a, c))


def test_bf16_model_gives_bf16_blocks_and_caches(ckpt_dir, inputs):
    ckpt = load_dit_checkpoint(ckpt_dir)
    m = build_dit(ckpt, torch.bfloat16)
    text = m.encode_text(torch.randn(5, m.cfg.text_dim))
    sampler = BlockSampler(m, text, inputs["ref"], inputs["motion"], SamplerConfig(dtype="bfloat16", **FAST))
    blocks = list(sampler.run(_audio(inputs, 1)))
    assert {b.latents.dtype for b in blocks} == {torch.bfloat16}
    assert all(torch.isfinite(b.latents.float()).all() for b in blocks)
    assert {c.k.dtype for c in sampler.caches} == {c.cond.k[0].dtype for c in sampler.caches} == {torch.bfloat16}


# --- clip counts ----------------------------------------------------------------------------------

def _clips(blocks):
    return sorted({b.clip for b in blocks})


def test_clip_count_from_audio_and_request(model, inputs):
    assert _clips(_sampler(model, inputs, frames_per_clip=12).run(_audio(inputs, 3, 12))) == [0, 1, 2]
    # Official rule: the requested count, capped by what the audio covers.
    assert _clips(_sampler(model, inputs, frames_per_clip=12, num_clips=2).run(_audio(inputs, 3, 12))) == [0, 1]
    assert _clips(_sampler(model, inputs, frames_per_clip=12, num_clips=9).run(_audio(inputs, 2, 12))) == [0, 1]
    assert _clips(_sampler(model, inputs, frames_per_clip=12).run(_audio(inputs, 3, 12), num_clips=1)) == [0]


def test_clip_count_from_audio_features(model, inputs):
    emb = _audio(inputs, 3, 12)
    features = AudioFeatures(emb, num_clips=2, available_clips=3, frames_per_clip=12, fps=25,
                             waveform_16k=np.zeros(16000, np.float32), duration_s=1.0)
    assert _clips(_sampler(model, inputs, frames_per_clip=12).run(features)) == [0, 1]
    with pytest.raises(InputError, match="frames per clip"):
        _sampler(model, inputs, frames_per_clip=24).run(features)


def test_unbounded_stream_of_clip_audio(model, inputs):
    chunks = (inputs["audio"][..., :12] * (1 + k) for k in itertools.count())  # never ends
    blocks = list(itertools.islice(_sampler(model, inputs, frames_per_clip=12).stream(chunks), 5))
    assert [b.clip for b in blocks] == [0, 1, 2, 3, 4]
    capped = _sampler(model, inputs, frames_per_clip=12, num_clips=2).stream(
        inputs["audio"][..., :12] for _ in itertools.count())
    assert _clips(list(capped)) == [0, 1]


def test_short_or_misshaped_audio_refused(model, inputs):
    sampler = _sampler(model, inputs)
    with pytest.raises(InputError, match="covers 2"):
        sampler.run(_audio(inputs, 2), num_clips=3)
    with pytest.raises(InputError, match="shorter than one clip"):
        sampler.run(inputs["audio"][..., :20])
    with pytest.raises(InputError, match="not whole clips"):
        sampler.run(inputs["audio"][..., :30])
    with pytest.raises(InputError, match="wav2vec2 features"):
        sampler.run(inputs["audio"][:, :3])
    with pytest.raises(InputError, match="exactly 24"):
        next(sampler.stream([inputs["audio"][..., :20]]))
    assert (sampler.clip, sampler.block) == (0, 0)


# --- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(frames_per_clip=50), "frames_per_clip"),
    (dict(frames_per_clip=0), "frames_per_clip"),
    (dict(mode="fast"), "mode"),
    (dict(mode="official", steps=3), "steps"),
    (dict(steps=0), "steps"),
    (dict(seed=-1), "seed"),
    (dict(num_clips=0), "num_clips"),
    (dict(online_decode=True), "online_decode"),
    (dict(mode="official", sink_refresh="first_clip_output"), "sink_refresh"),
    (dict(sink_refresh="sometimes"), "sink_refresh"),
    (dict(ref_offset="random"), "ref_offset"),
    (dict(dtype="float33"), "dtype"),
])
def test_bad_configuration_refused(kwargs, name):
    with pytest.raises(InputError) as err:
        SamplerConfig(**kwargs)
    assert err.value.input_name == name and err.value.fix


def test_mode_defaults_are_resolved():
    official = SamplerConfig(mode="official", seed=5)
    assert (official.sink_refresh, official.ref_offset, official.ref_offset_seed) == ("never", "official", 5)
    assert SamplerConfig(mode="official", online_decode=True).sink_refresh == "caller"
    streaming = SamplerConfig()
    assert (streaming.sink_refresh, streaming.ref_offset) == ("first_clip_output", "seeded")
    assert SamplerConfig.from_dict(streaming.to_dict()) == streaming


def test_sampler_refuses_mismatched_schedule_dtype_and_latents(model, inputs):
    with pytest.raises(InputError, match="schedule has 3 steps"):
        BlockSampler(model, inputs["context"], inputs["ref"], inputs["motion"], SamplerConfig(),
                     schedule=flow_match_schedule(3))
    with pytest.raises(InputError) as err:
        BlockSampler(model, inputs["context"], inputs["ref"], inputs["motion"], SamplerConfig(dtype="bfloat16"))
    assert err.value.input_name == "dtype"
    with pytest.raises(InputError) as err:
        BlockSampler(model, inputs["context"], inputs["ref"][:, :, :, :4], inputs["motion"], SamplerConfig())
    assert err.value.input_name == "motion_latents"
    with pytest.raises(InputError) as err:
        BlockSampler(model, inputs["context"], inputs["ref"].expand(2, -1, -1, -1, -1), inputs["motion"],
                     SamplerConfig())
    assert err.value.input_name == "ref_latents"


# --- sink refresh -----------------------------------------------------------------------------------

def test_first_clip_output_refresh_equals_caller_refresh(model, inputs):
    auto = _sampler(model, inputs, sink_refresh="first_clip_output")
    auto_blocks = _latents(auto.run(_audio(inputs, 2)))
    assert torch.equal(auto.ref_latents, auto_blocks[0][:, :, :1])

    def refresh(sampler, clip, latents):
        if clip == 0:
            sampler.refresh_condition(latents[:, :, :1], inputs["motion"])
    manual = _latents(_sampler(model, inputs, refresh, sink_refresh="caller").run(_audio(inputs, 2)))
    assert _same(auto_blocks, manual)
    never = _latents(_sampler(model, inputs, sink_refresh="never").run(_audio(inputs, 2)))
    assert _same(never[:2], manual[:2]) and not torch.equal(never[2], manual[2])


def test_sink_runs_once_without_refresh(model, inputs):
    sampler = _sampler(model, inputs, frames_per_clip=12, sink_refresh="never")
    gen = sampler.run(_audio(inputs, 3, 12))
    next(gen)
    cond = sampler.caches[0].cond
    list(gen)
    assert all(c.cond is cond for c in sampler.caches)


def test_caller_refresh_missing_refused(model, inputs):
    sampler = _sampler(model, inputs, sink_refresh="caller")
    gen = sampler.run(_audio(inputs, 2))
    next(gen), next(gen)
    with pytest.raises(InputError) as err:
        next(gen)
    assert err.value.input_name == "refresh_condition"


def test_refresh_mid_clip_refused(model, inputs):
    sampler = _sampler(model, inputs)
    gen = sampler.run(_audio(inputs, 2))
    next(gen)
    with pytest.raises(InputError, match="middle of clip 0"):
        sampler.refresh_condition(inputs["ref"], inputs["motion"])
    list(gen)
    with pytest.raises(InputError, match="resolution"):
        sampler.refresh_condition(torch.zeros(1, 16, 1, 16, 8), torch.zeros(1, 16, 19, 16, 8))


# --- resume ---------------------------------------------------------------------------------------------

RESUME = {
    # 2 clips x 2 blocks, 2 steps: stops mid clip 0, at the clip boundary (before the automatic sink
    # refresh) and mid clip 1 (ring caches wrapped).
    "streaming": dict(steps=2, frames_per_clip=24, seed=9),
    # Official Mode S+: 2 clips x 1 block, 4 steps; the caller refreshes the sink after clip 0.
    "official": dict(mode="official", online_decode=True, steps=4, frames_per_clip=12, seed=9),
}


def _resume_hook(sampler, clip, latents):
    if sampler.config.sink_refresh == "caller" and clip == 0:
        sampler.refresh_condition(latents[:, :, :1], sampler.motion_latents * 0.5)


@pytest.fixture(scope="module")
def uninterrupted(model, inputs):
    return {mode: _latents(_sampler(model, inputs, _resume_hook, **kw).run(_audio(inputs, 2, kw["frames_per_clip"])))
            for mode, kw in RESUME.items()}


@pytest.mark.parametrize("mode, stop", [("streaming", 1), ("streaming", 2), ("streaming", 3), ("official", 1)])
def test_resume_from_file_is_bit_identical(model, inputs, uninterrupted, tmp_path, mode, stop):
    kw = RESUME[mode]
    audio = _audio(inputs, 2, kw["frames_per_clip"])
    first = _sampler(model, inputs, _resume_hook, **kw)
    head = _latents(itertools.islice(first.run(audio), stop))
    first.save(tmp_path / "state.pt")
    resumed = _sampler(model, inputs, _resume_hook, **kw)
    resumed.load(tmp_path / "state.pt")
    assert (resumed.clip, resumed.block) == (first.clip, first.block)
    tail = list(resumed.run(audio))
    assert _same(head + _latents(tail), uninterrupted[mode])


def test_resume_refuses_other_settings_and_bad_files(model, inputs, tmp_path):
    sampler = _sampler(model, inputs, seed=1)
    next(sampler.run(_audio(inputs, 2)))
    sampler.save(tmp_path / "s.pt")
    with pytest.raises(InputError, match="seed=1"):
        _sampler(model, inputs, seed=2).load(tmp_path / "s.pt")
    with pytest.raises(InputError, match="does not exist"):
        sampler.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="not a readable sampler state"):
        sampler.load(tmp_path / "junk.pt")
    data = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="resume_state"):
        sampler.load(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a block sampler state"):
        sampler.load(tmp_path / "other.pt")


# --- memory -------------------------------------------------------------------------------------------

def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor storage reachable from `obj`, not counting the model's weights."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (torch.nn.Module, type)):
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        key = ("storage", obj.untyped_storage().data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


# Coarse guard against leaks outside tensors (allocator slack only; measured growth here is 0). The
# exact check is the constant tensor byte count.
RSS_GROWTH_BOUND = 4 * 2 ** 20


def test_memory_flat_over_many_clips(model, inputs):
    sampler = _sampler(model, inputs, frames_per_clip=12)
    held, rss = [], []
    chunks = (inputs["audio"][..., :12] for _ in itertools.count())
    for block in itertools.islice(sampler.stream(chunks), 8):
        held.append(_tensor_bytes(sampler))
        rss.append(_rss())
        del block
    assert len(set(held[1:])) == 1, held  # constant from clip 1 on (after the clip-1 sink refresh)
    assert held[1] > 0
    assert max(rss[2:]) - rss[2] < RSS_GROWTH_BOUND, [r - rss[2] for r in rss]
