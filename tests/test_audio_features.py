"""Bucketing, clip counts and input checks of `AudioEncoder.encode` (spec/pipeline.md 2.5-2.7)."""

import numpy as np
import pytest
import torch

from liveavatar_core.encoders.audio import (SAMPLE_RATE, AudioEncoder, bucket_frames, check_frames_per_clip,
                                            clips_available, load_audio, resolve_num_clips)
from liveavatar_core.errors import InputError

WAV2VEC2_DIR = "wav2vec2-large-xlsr-53-english"


@pytest.fixture(scope="module")
def encoder(ckpt_dir):
    return AudioEncoder.from_pretrained(ckpt_dir / WAV2VEC2_DIR)


@pytest.fixture(scope="module")
def audio_path(fixtures, manifest):
    return fixtures / manifest["inputs"]["audio"]


@pytest.fixture(scope="module")
def features(encoder, audio_path):
    return encoder.encode(audio_path)


def test_spec_example_clip_count_and_zero_tail():
    """spec 2.5: T30 = 531 -> nr = 10, and video frames k >= 443 get zero audio."""
    assert clips_available(531, 48) == 10
    layers, channels = 2, 3
    feats = torch.arange(1, 532, dtype=torch.float32)[None, :, None].expand(layers, 531, channels)
    embedding, nr = bucket_frames(feats, 48)
    assert nr == 10 and embedding.shape == (1, layers, channels, 480)
    assert torch.all(embedding[..., 443:] == 0)
    picked = embedding[0, 0, 0, :443] - 1  # feature value - 1 = the 30 Hz index it came from
    assert torch.equal(picked, torch.tensor([round(1.2 * k) for k in range(443)], dtype=torch.float32))


def test_resolve_num_clips():
    assert resolve_num_clips(4, None) == 4
    assert resolve_num_clips(4, 9) == 4
    assert resolve_num_clips(4, 2) == 2


def test_frames_per_clip_must_be_multiple_of_12():
    for good in (12, 48, 96):
        check_frames_per_clip(good)
    for bad in (0, 50, -12, 4.8e1):
        with pytest.raises(InputError, match="multiple of 12") as info:
            check_frames_per_clip(bad)
        assert info.value.input_name == "frames_per_clip"


def test_settings_checked_before_audio_is_read(encoder, tmp_path):
    with pytest.raises(InputError) as info:
        encoder.encode(tmp_path / "missing.wav", frames_per_clip=50)
    assert info.value.input_name == "frames_per_clip"
    with pytest.raises(InputError) as info:
        encoder.encode(tmp_path / "missing.wav", num_clips=0)
    assert info.value.input_name == "num_clips"


def test_features_layout(features, encoder):
    layers = encoder.arch.num_layers + 1
    assert features.embedding.shape == (1, layers, encoder.arch.hidden_size,
                                        features.available_clips * features.frames_per_clip)
    assert features.embedding.dtype == torch.float32
    assert features.num_clips == features.available_clips
    assert features.fps == 25 and features.frames_per_clip == 48
    assert features.duration_s == pytest.approx(features.waveform_16k.shape[0] / SAMPLE_RATE)


def test_frames_do_not_depend_on_clip_length(encoder, audio_path, features):
    short = encoder.encode(audio_path, frames_per_clip=24, num_clips=1)
    assert short.num_clips == 1 and short.frames_per_clip == 24
    n = min(short.embedding.shape[-1], features.embedding.shape[-1])
    assert torch.equal(short.embedding[..., :n], features.embedding[..., :n])


def test_comfy_audio_dict_encodes_like_the_file(encoder, audio_path, features):
    waveform = load_audio(audio_path)
    result = encoder.encode({"waveform": torch.from_numpy(waveform)[None, None], "sample_rate": SAMPLE_RATE})
    assert torch.equal(result.embedding, features.embedding)
    assert np.array_equal(result.waveform_16k, features.waveform_16k)


def test_too_short_audio_refused_before_the_model(encoder):
    n = encoder.min_samples() - 1
    tone = np.sin(np.arange(n) * 0.3).astype(np.float32)
    with pytest.raises(InputError, match="shorter than") as info:
        encoder.encode({"waveform": torch.from_numpy(tone)[None, None], "sample_rate": SAMPLE_RATE})
    assert info.value.input_name == "audio"
    tone = np.sin(np.arange(n + 1) * 0.3).astype(np.float32)
    result = encoder.encode({"waveform": torch.from_numpy(tone)[None, None], "sample_rate": SAMPLE_RATE})
    assert result.available_clips == 1
