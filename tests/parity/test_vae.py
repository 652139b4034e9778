"""Wan 2.1 VAE against the official encodes (golden/04) and the clip-0 decode (golden/10).

Frame and latent counts come from the golden shapes and the manifest settings. The long encode
(reference repeated `5 * motion_frames` times) and the long decode run several latents / groups per
network pass: the causal history makes that the same computation as the upstream one-at-a-time
order (tests/test_vae.py checks the two agree to 1e-6), with far fewer kernel calls on CPU.
"""

import pytest
import torch

from liveavatar_core.vae import load_vae
from tests.parity.tolerance import ENCODER, FRAMES, assert_parity

PASS = 8


@pytest.fixture(scope="module")
def vae(ckpt_dir, manifest):
    return load_vae(ckpt_dir / "Wan2.1_VAE.pth", dtype=getattr(torch, manifest["settings"]["param_dtype"]))


@pytest.fixture(scope="module")
def ref(golden):
    return golden("03_image")["ref_pixel_values"][None, :, None]  # [1, 3, 1, H, W]


def _frames_for(latent_frames: int) -> int:
    return 1 + 4 * (latent_frames - 1)


def test_reference_latents(vae, ref, golden):
    g = golden("04_vae")
    both = g["ref_latents_both_frames"]
    z = vae.encode(ref.repeat(1, 1, _frames_for(both.shape[1]), 1, 1))
    assert_parity(z[0], both, ENCODER, "ref_latents_both_frames")
    assert_parity(z[:, :, 1:], g["ref_latents"], ENCODER, "ref_latents")


def test_motion_latents(vae, ref, golden, manifest):
    expected = golden("04_vae")["motion_latents"]
    ref_frames = _frames_for(golden("04_vae")["ref_latents_both_frames"].shape[1])
    # Upstream repeats the already repeated reference clip (spec/pipeline.md 3.2 step 2).
    pixels = ref.repeat(1, 1, ref_frames * manifest["settings"]["motion_frames"], 1, 1)
    z = vae.encode(pixels, groups_per_pass=PASS)
    assert z.shape == expected.shape
    assert_parity(z, expected, ENCODER, "motion_latents")


def test_pose_condition_latents(vae, ref, golden, manifest):
    expected = golden("04_vae")["pose_cond_latents_raw"]
    frames = manifest["settings"]["infer_frames"] + 1  # -1 video plus its duplicated first frame (spec 2.10)
    _, _, _, h, w = ref.shape
    z = vae.encode(-torch.ones(1, 3, frames, h, w), groups_per_pass=PASS)
    assert z.shape[1:] == expected.shape
    assert_parity(z[0], expected, ENCODER, "pose_cond_latents_raw")


def test_clip0_frames(vae, golden, manifest):
    expected = golden("10_video_clip0")["clip0_frames"]  # [3, F_clip - dropped, H, W]
    motion = golden("04_vae")["motion_latents"]
    clip = golden("08_rollout_offline")["decode0.clip_latents"][None]
    z = torch.cat([motion, clip], dim=2)
    frames = vae.decode(z, latents_per_pass=PASS)
    assert frames.shape[2] == _frames_for(z.shape[2])
    f_clip = manifest["settings"]["infer_frames"]
    kept = frames[0, :, -f_clip:][:, f_clip - expected.shape[1]:]  # the first clip drops its first frames
    assert_parity(kept, expected, FRAMES, "clip0_frames")
