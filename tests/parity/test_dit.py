"""The DiT reproduces the official sink pass and denoising calls (golden/06, golden/07).

Everything about the run (sizes, steps, cache length, calls, offset draws) is read from the golden
tensors and the manifest, so other fixture sets run unchanged. Attention uses the "math" backend:
plain fp32 softmax attention, the form the fixtures were generated with (fixtures README 5).
"""

import re

import pytest
import torch
from safetensors.torch import load_file

from liveavatar_core.model.cache import make_step_caches, tokens_per_frame
from liveavatar_core.model.offset import RefOffsetPolicy

from tests.parity.tolerance import DIT_FORWARD, DIT_INPUT, ROLLOUT, assert_parity


def _golden(fixtures, name):
    return load_file(str(fixtures / "golden" / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def model(tiny_dit):
    """The fixture DiT as the official run used it (tests/parity/conftest.py)."""
    return tiny_dit


def _record_block_outputs(model):
    outs = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().clone())) for b in model.blocks]
    return outs, hooks


@pytest.fixture(scope="module")
def run(model, fixtures, manifest):
    """Sink once, then every clip-0 call stored in golden/07, in call order, with recorded draws."""
    text = _golden(fixtures, "01_text")
    vae = _golden(fixtures, "04_vae")
    g7 = _golden(fixtures, "07_dit_clip0_blocks01")
    settings = manifest["settings"]
    ref, motion = vae["ref_latents"], vae["motion_latents"]
    lat_h, lat_w = ref.shape[-2:]
    caches = make_step_caches(model.cfg, lat_h, lat_w, num_steps=settings["sample_steps"],
                              cache_frames=settings["lat_target_frames"], dtype=model.dtype)
    text_cache = model.encode_text(text["context"])

    sink_outs, hooks = _record_block_outputs(model)
    cond = model.sink(ref, motion, text_cache, caches)
    for h in hooks:
        h.remove()

    blocks = sorted({int(m.group(1)) for k in g7 if (m := re.match(r"clip0\.block(\d+)\.step0\.x$", k))})
    calls = [c for c in manifest["runs"]["offline"]["calls"]
             if c["kind"] == "infer" and c["clip"] == 0 and c["block"] in blocks]
    preds, layer_outs = {}, {}
    for call in calls:
        b, s = call["block"], call["step"]
        prefix = f"clip0.block{b}.step{s}"
        outs, hooks = _record_block_outputs(model)
        pred = model.denoise_block(g7[f"{prefix}.x"][None], g7[f"{prefix}.t"], text_cache,
                                   g7[f"clip0.block{b}.step0.audio_input"], None, caches[s],
                                   call["current_start"], call["randint_relative_dist"][0])
        for h in hooks:
            h.remove()
        preds[prefix] = pred[0]
        layer_outs[prefix] = outs
    return dict(text=text_cache, cond=cond, caches=caches, sink_outs=sink_outs, preds=preds,
                layer_outs=layer_outs, g7=g7, lat_hw=(lat_h, lat_w), calls=calls)


def test_text_embedding(run, fixtures):
    expected = _golden(fixtures, "01_text")["dit_text_embedding_out"]
    assert_parity(run["text"].embedded[0], expected, DIT_INPUT, "dit_text_embedding_out")


def test_sink_cond_cache(run, fixtures, manifest, model):
    g6 = _golden(fixtures, "06_dit_sink")
    cond = run["cond"]
    sink_calls = [c for c in manifest["runs"]["offline"]["calls"] if c["kind"] == "sink"]
    assert cond.num_tokens == sink_calls[0]["cond_end"]
    assert len(cond.k) == model.cfg.num_layers
    for i in range(model.cfg.num_layers):
        assert_parity(cond.k[i], g6[f"cond_k.layer{i}"], ROLLOUT, f"cond_k.layer{i}")
        assert_parity(cond.v[i], g6[f"cond_v.layer{i}"], ROLLOUT, f"cond_v.layer{i}")
    # Every step cache shares the one condition cache.
    assert all(c.cond is cond for c in run["caches"])


def test_sink_rope_bit_exact(run, fixtures, model):
    expected = _golden(fixtures, "06_dit_sink")["sink_rope_freqs"][0, :, 0]
    cos, sin = run["cond"].rope(model.rope, model.cfg.ref_rope_index)
    assert torch.equal(cos, expected[..., 0])
    assert torch.equal(sin, expected[..., 1])


def test_sink_layer_outputs(run, model):
    g7 = run["g7"]
    assert len(run["sink_outs"]) == model.cfg.num_layers
    for i, out in enumerate(run["sink_outs"]):
        assert_parity(out[0], g7[f"sink.layer{i}.out"], DIT_FORWARD, f"sink.layer{i}.out")


def test_block_rope_bit_exact(run, model):
    g7 = run["g7"]
    lat_h, lat_w = run["lat_hw"]
    fs = tokens_per_frame(model.cfg, lat_h, lat_w)
    for call in run["calls"]:
        key = f"clip0.block{call['block']}.step{call['step']}.rope_freqs"
        if key not in g7:
            continue
        expected = g7[key][0, :, 0]
        frames = expected.shape[0] // fs
        cos, sin = model.rope.grid(model.block_grid(call["current_start"] // fs, frames, lat_h, lat_w))
        assert torch.equal(cos, expected[..., 0]) and torch.equal(sin, expected[..., 1]), key


def test_audio_encoder(model, run):
    g7 = run["g7"]
    mf = model.cfg.motion_frames
    for key in (k for k in g7 if k.endswith(".audio_input")):
        prefix = key.removesuffix(".audio_input")
        audio = g7[key]
        audio = torch.cat([audio[..., :1].expand(*audio.shape[:-1], mf[0]), audio], dim=-1)
        with torch.no_grad():
            glob, local = model.casual_audio_encoder(audio.to(model.dtype))
        assert_parity(local[:, mf[1]:], g7[f"{prefix}.merged_audio_emb"], DIT_INPUT, f"{prefix}.merged_audio_emb")
        assert_parity(glob[:, mf[1]:], g7[f"{prefix}.audio_emb_global"], DIT_INPUT, f"{prefix}.audio_emb_global")


def test_block_layer_outputs(run, model):
    g7 = run["g7"]
    checked = 0
    for prefix, outs in run["layer_outs"].items():
        for i, out in enumerate(outs):
            key = f"{prefix}.layer{i}.out"
            if key in g7:
                assert_parity(out[0], g7[key], DIT_FORWARD, key)
                checked += 1
    assert checked >= model.cfg.num_layers


def test_predictions(run):
    g7 = run["g7"]
    assert run["preds"]
    for prefix, pred in run["preds"].items():
        assert_parity(pred, g7[f"{prefix}.pred"], DIT_FORWARD, prefix)


def test_step_caches_after_last_block(run, model):
    g7 = run["g7"]
    names = [k for k in g7 if re.match(r"kvcache\d+\.after_block\d+\.[kv]\.layer\d+$", k)]
    assert names
    for name in names:
        cache_no, block, kind, layer = re.match(r"kvcache(\d+)\.after_block(\d+)\.([kv])\.layer(\d+)$", name).groups()
        assert int(block) == max(c["block"] for c in run["calls"]), "cache state compared after the last block run"
        expected = g7[name]
        cache = run["caches"][int(cache_no) - 1]
        got = (cache.k if kind == "k" else cache.v)[int(layer)][:, :expected.shape[1]]
        assert_parity(got, expected, ROLLOUT, name)


def test_official_offset_policy_reproduces_recorded_draws(manifest):
    """One randint(4, 30) per denoising call from random.seed(python_random_seed), in call order."""
    for run in manifest["runs"].values():
        recorded = [d for c in run["calls"] if c["kind"] == "infer" for d in c["randint_relative_dist"]]
        policy = RefOffsetPolicy("official", seed=manifest["settings"]["python_random_seed"])
        assert [policy.draw() for _ in recorded] == recorded
