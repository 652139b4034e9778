"""Audio path against golden/02_audio (official librosa + Wav2Vec2ForCTC + bucketing, fp32, CPU)."""

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from liveavatar_core.encoders.audio import (AudioEncoder, bucket_frames, load_audio,
                                            normalize_waveform, resolve_num_clips, to_video_rate)
from tests.parity.tolerance import ENCODER, assert_parity

WAV2VEC2_DIR = "wav2vec2-large-xlsr-53-english"


@pytest.fixture(scope="module")
def golden(fixtures):
    return load_file(fixtures / "golden" / "02_audio.safetensors")


@pytest.fixture(scope="module")
def audio_path(fixtures, manifest):
    return fixtures / manifest["inputs"]["audio"]


@pytest.fixture(scope="module")
def settings(manifest):
    return manifest["settings"]


@pytest.fixture(scope="module")
def encoder(ckpt_dir, manifest):
    return AudioEncoder.from_pretrained(ckpt_dir / WAV2VEC2_DIR, device="cpu", dtype=torch.float32,
                                        attn_implementation=manifest["wav2vec2_attn_implementation"])


@pytest.fixture(scope="module")
def features(encoder, audio_path, settings):
    return encoder.encode(audio_path, frames_per_clip=settings["infer_frames"],
                          num_clips=settings["num_clip_requested"], fps=settings["sample_fps"])


def test_waveform_matches_librosa_load(golden, audio_path):
    waveform = load_audio(audio_path)
    expected = golden["waveform"].numpy()
    assert waveform.dtype == np.float32 and waveform.shape == expected.shape
    assert_parity(waveform, expected, ENCODER, "waveform")


def test_input_values_match_processor(golden):
    assert_parity(normalize_waveform(golden["waveform"].numpy()), golden["input_values"].numpy(), ENCODER,
                  "input_values")


def test_all_25_hidden_states(encoder, golden):
    states = encoder.hidden_states(golden["waveform"].numpy())
    expected = golden["hidden_states_50hz"]
    assert states.shape == expected.shape
    assert_parity(states, expected, ENCODER, "hidden_states_50hz")


def test_30fps_interpolation(golden):
    assert_parity(to_video_rate(golden["hidden_states_50hz"]), golden["feat_30fps"], ENCODER, "feat_30fps")


def test_bucketing_from_golden_features(golden, settings):
    embedding, available = bucket_frames(golden["feat_30fps"], settings["infer_frames"], settings["sample_fps"])
    expected = golden["audio_emb"]
    assert available * settings["infer_frames"] == expected.shape[-1]
    assert torch.equal(embedding, expected)


def test_encode_end_to_end(features, golden, settings):
    expected = golden["audio_emb"]
    assert features.embedding.shape == expected.shape
    assert_parity(features.embedding, expected, ENCODER, "audio_emb")
    assert features.available_clips == settings["nr_from_audio"] == expected.shape[-1] // settings["infer_frames"]
    assert features.num_clips == resolve_num_clips(settings["nr_from_audio"], settings["num_clip_requested"])
    assert features.duration_s == pytest.approx(golden["waveform"].shape[0] / 16000)
    assert_parity(features.waveform_16k, golden["waveform"].numpy(), ENCODER, "waveform_16k")


def test_clip_block_slices_are_what_the_dit_received(features, fixtures, settings):
    """golden/07 stores the audio each DiT call of clip 0 received: block b of clip r is frames
    `[F*r + 12*b, +12)` of the embedding (spec 2.7), the slice the sampler hands the DiT."""
    calls = load_file(fixtures / "golden" / "07_dit_clip0_blocks01.safetensors")
    keys = [k for k in calls if re.fullmatch(r"clip\d+\.block\d+\.step0\.audio_input", k)]
    assert keys
    for key in keys:
        clip, block = (int(n) for n in re.findall(r"\d+", key)[:2])
        expected = calls[key]
        start = clip * features.frames_per_clip + block * expected.shape[-1]
        got = features.embedding[..., start:start + expected.shape[-1]]
        assert_parity(got, expected, ENCODER, key)
    blocks = settings["infer_frames"] // expected.shape[-1]
    assert blocks == settings["num_blocks_per_clip"]
