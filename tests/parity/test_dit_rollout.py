"""Whole official runs replayed call by call: every DiT prediction and the final clip latents.

Covers the growing cache of the first clip, the rolling ring of later clips, the moving reference
position (recorded offset draws) and, in the online-decode run, the sink refill before clip 1.
The Euler update between calls is the flow-matching step with the golden scheduler sigmas.
All sizes and call orders come from the manifest and the golden tensors (golden/08, golden/09).
"""

import pytest
import torch
from safetensors.torch import load_file

from liveavatar_core.model.cache import make_step_caches
from tests.parity.tolerance import ROLLOUT, assert_parity

GOLDEN = {"offline": "08_rollout_offline", "online": "09_rollout_online"}


def _golden(fixtures, name):
    return load_file(str(fixtures / "golden" / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def model(tiny_dit):
    """The fixture DiT as the official run used it (tests/parity/conftest.py)."""
    return tiny_dit


def _replay(model, fixtures, manifest, mode):
    """Run the recorded calls of one official run; returns per-call predictions and clip latents."""
    s = manifest["settings"]
    offline = _golden(fixtures, GOLDEN["offline"])
    golden = _golden(fixtures, GOLDEN[mode])
    vae = _golden(fixtures, "04_vae")
    audio = _golden(fixtures, "02_audio")["audio_emb"]
    context = _golden(fixtures, "01_text")["context"]
    sigmas = offline["scheduler_sigmas"]
    nfb = s["num_frames_per_block"]
    video_per_latent = s["infer_frames"] // s["lat_target_frames"]
    ref, motion = vae["ref_latents"], vae["motion_latents"]
    lat_h, lat_w = ref.shape[-2:]
    caches = make_step_caches(model.cfg, lat_h, lat_w, num_steps=s["sample_steps"],
                              cache_frames=s["lat_target_frames"], dtype=model.dtype)
    text = model.encode_text(context)

    preds, clips = {}, {}
    sinks_done, previous_kind, x = 0, None, None
    for call in manifest["runs"][mode]["calls"]:
        if call["kind"] == "sink":
            # Consecutive sink calls fill the one shared cond cache identically: run it once.
            if previous_kind != "sink":
                if sinks_done:  # online decode: refill from clip 0's first latent and new motion
                    ref, motion = golden["sink2.ref_latents"], offline["decode1.motion_latents"][None]
                model.sink(ref, motion, text, caches)
                sinks_done += 1
            previous_kind = "sink"
            continue
        previous_kind = "infer"
        r, b, i = call["clip"], call["block"], call["step"]
        if i == 0:
            x = offline[f"clip{r}.noise"][None, :, b * nfb:(b + 1) * nfb]
        first_video = r * s["infer_frames"] + b * nfb * video_per_latent
        block_audio = audio[..., first_video:first_video + nfb * video_per_latent]
        pred = model.denoise_block(x, torch.tensor(call["t"])[None], text, block_audio, None, caches[i],
                                   call["current_start"], call["randint_relative_dist"][0])
        preds[f"calls.clip{r}.block{b}.step{i}.pred"] = pred[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * pred
        if i == s["sample_steps"] - 1:
            clips.setdefault(r, []).append(x[0])
    latents = {f"decode{r}.clip_latents": torch.cat(blocks, dim=1) for r, blocks in clips.items()}
    return preds, latents, golden, sinks_done


@pytest.mark.parametrize("mode", sorted(GOLDEN))
def test_rollout_matches_official(model, fixtures, manifest, mode):
    preds, latents, golden, sinks = _replay(model, fixtures, manifest, mode)
    run = manifest["runs"][mode]
    assert len(preds) == run["num_dit_calls"] - run["num_sink_calls"]
    assert sinks == run["num_sink_calls"] // manifest["settings"]["sample_steps"]
    for key, pred in preds.items():
        assert_parity(pred, golden[key], ROLLOUT, key)
    assert set(latents) == {k for k in golden if k.endswith(".clip_latents")}
    for key, lat in latents.items():
        assert_parity(lat, golden[key], ROLLOUT, key)


def test_online_sink_refill_matches_official(model, fixtures, manifest):
    """The second sink (new reference latent + re-encoded motion) refills the cond cache."""
    online = _golden(fixtures, GOLDEN["online"])
    offline = _golden(fixtures, GOLDEN["offline"])
    context = _golden(fixtures, "01_text")["context"]
    cond = model.sink(online["sink2.ref_latents"], offline["decode1.motion_latents"][None], context)
    for i in range(model.cfg.num_layers):
        assert_parity(cond.k[i], online[f"sink2.cond_k.layer{i}"], ROLLOUT, f"sink2.cond_k.layer{i}")
        assert_parity(cond.v[i], online[f"sink2.cond_v.layer{i}"], ROLLOUT, f"sink2.cond_v.layer{i}")
