"""The whole official-mode pipeline reproduces the official video (golden/08 offline, golden/09 online).

Inputs are the fixture's real inputs (reference image, the run's text context and audio features);
conditioning latents, sampling, decoding, the motion-window re-encode and the uint8 quantisation
all run through `liveavatar_core.pipeline`. Nothing about the set (size, clips, seeds) is hard-coded.
"""

import numpy as np
import pytest
import torch

from liveavatar_core.encoders.audio import AudioFeatures
from liveavatar_core.pipeline import GenerationSettings, LiveAvatarModel, generate
from liveavatar_core.vae.loader import load_vae
from tests.parity.tolerance import VIDEO_UINT8, assert_parity


@pytest.fixture(scope="module")
def model(tiny_dit, ckpt_dir):
    return LiveAvatarModel(tiny_dit, load_vae(ckpt_dir / "Wan2.1_VAE.pth", dtype=torch.float32))


def _audio(golden, manifest):
    s = manifest["settings"]
    emb = golden("02_audio")["audio_emb"].float()
    clips = emb.shape[-1] // s["infer_frames"]
    return AudioFeatures(emb, min(clips, s["num_clip_requested"]), clips, s["infer_frames"], s["sample_fps"],
                         golden("02_audio")["waveform"].numpy(), manifest["inputs"]["audio_seconds"])


@pytest.mark.parametrize("run,golden_file", [("offline", "08_rollout_offline"), ("online", "09_rollout_online")])
def test_official_video_matches(model, golden, manifest, fixtures, run, golden_file):
    s = manifest["settings"]
    settings = GenerationSettings(size=int(s["max_area"]), seed=s["seed"], num_clips=s["num_clip_requested"],
                                  frames_per_clip=s["infer_frames"], sample_steps=s["sample_steps"],
                                  mode="official", ref_offset_seed=s["python_random_seed"],
                                  online_decode=run == "online")
    stream = generate(model, golden("01_text")["context"], _audio(golden, manifest),
                      fixtures / manifest["inputs"]["image"], settings)
    video = np.concatenate([chunk.frames for chunk in stream])  # [n, H, W, 3]
    expected = golden(golden_file)["video_uint8"].permute(1, 2, 3, 0).numpy()
    assert_parity(video, expected, VIDEO_UINT8, f"{run} video_uint8")
