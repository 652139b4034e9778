"""wav2vec2 weights: key-map round trips, architecture from shapes, single files, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from liveavatar_core.encoders.audio import AudioEncoder, load_audio
from liveavatar_core.errors import WeightsError
from liveavatar_core.weights.wav2vec2 import (Wav2Vec2Arch, Wav2Vec2KeyLayout, arch_from_config, arch_from_shapes,
                                              canonical_key, check_arch, detect_layout, from_canonical,
                                              load_wav2vec2, source_key, to_canonical)

WAV2VEC2_DIR = "wav2vec2-large-xlsr-53-english"
FP16_ATOL = 1e-2  # fp16 weight rounding through 24 layers; measured 4e-3 on the fixture
LAYOUTS = [Wav2Vec2KeyLayout(prefix, norm)
           for prefix in ("", "wav2vec2.", "audio_encoder.")
           for norm in ("legacy", "parametrizations")]


@pytest.fixture(scope="module")
def folder(ckpt_dir):
    return ckpt_dir / WAV2VEC2_DIR


@pytest.fixture(scope="module")
def official(folder):
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def loaded(folder):
    return load_wav2vec2(folder)


@pytest.fixture(scope="module")
def folder_encoder(folder):
    return AudioEncoder.from_pretrained(folder)


@pytest.fixture(scope="module")
def waveform(fixtures, manifest):
    return load_audio(fixtures / manifest["inputs"]["audio"])


@pytest.fixture(scope="module")
def folder_states(folder_encoder, waveform):
    return folder_encoder.hidden_states(waveform)


def hf_model_keys(arch: Wav2Vec2Arch) -> dict[str, tuple[int, ...]]:
    """Keys and shapes transformers' Wav2Vec2Model expects for `arch` (built on meta, no memory)."""
    from transformers import Wav2Vec2Model

    with torch.device("meta"):
        model = Wav2Vec2Model(arch.to_hf_config())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_official_file_layout_detected(official):
    assert detect_layout(official) == Wav2Vec2KeyLayout("wav2vec2.", "legacy")


def test_canonical_keys_are_exactly_what_transformers_loads(loaded):
    expected = hf_model_keys(loaded.arch)
    assert {k: tuple(v.shape) for k, v in loaded.state_dict.items()} == expected


def test_heads_and_training_tensors_dropped(official):
    layout = detect_layout(official)
    dropped = {k for k in official if canonical_key(k, layout) is None}
    assert dropped == {k for k in official if k.startswith("lm_head.") or k.endswith("masked_spec_embed")}
    assert dropped


def test_official_keys_round_trip(official):
    layout = detect_layout(official)
    for key in official:
        name = canonical_key(key, layout)
        if name is not None:
            assert source_key(name, layout) == key


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.prefix or 'bare'}-{l.weight_norm}")
def test_every_spelling_round_trips(loaded, layout):
    spelled = from_canonical(loaded.state_dict, layout)
    assert all(k.startswith(layout.prefix) for k in spelled)
    assert detect_layout(spelled) == layout
    back = to_canonical(spelled, layout)
    assert back.keys() == loaded.state_dict.keys()
    assert all(back[k] is loaded.state_dict[k] for k in back)


def test_weight_norm_spellings_name_the_same_tensors(loaded):
    legacy = from_canonical(loaded.state_dict, Wav2Vec2KeyLayout("", "legacy"))
    g = legacy["encoder.pos_conv_embed.conv.weight_g"]
    v = legacy["encoder.pos_conv_embed.conv.weight_v"]
    assert g is loaded.state_dict["encoder.pos_conv_embed.conv.parametrizations.weight.original0"]
    assert v is loaded.state_dict["encoder.pos_conv_embed.conv.parametrizations.weight.original1"]
    assert g.shape[:2] == (1, 1) and v.ndim == 3


def test_arch_from_shapes_matches_config(folder, loaded):
    config = json.loads((folder / "config.json").read_text())
    shapes = {k: tuple(v.shape) for k, v in loaded.state_dict.items()}
    from_config = arch_from_config(config)
    assert arch_from_shapes(shapes, num_heads=config["num_attention_heads"]) == from_config == loaded.arch


@pytest.mark.parametrize("arch", [
    Wav2Vec2Arch(),  # wav2vec2-large-xlsr-53-english: layer-norm conv stack, stable layer norm
    Wav2Vec2Arch(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, conv_bias=False,
                 feat_extract_norm="group", stable_layer_norm=False),  # wav2vec2-base
], ids=["large-xlsr", "base"])
def test_real_sized_arch_from_shapes(arch):
    assert arch_from_shapes(hf_model_keys(arch)) == arch


def test_base_model_refused_by_name():
    base = Wav2Vec2Arch(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, conv_bias=False,
                        feat_extract_norm="group", stable_layer_norm=False)
    with pytest.raises(WeightsError, match="12 transformer layers.*wav2vec2-base.*25 hidden states") as info:
        check_arch(base, hf_model_keys(base))
    assert "xlsr-53" in info.value.fix


def test_12_layer_file_refused_before_loading(tmp_path, loaded):
    sd = {k: v for k, v in loaded.state_dict.items()
          if not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= 12)}
    path = tmp_path / "wav2vec2_base_like.safetensors"
    save_file(from_canonical(sd, Wav2Vec2KeyLayout("", "parametrizations")), path)
    with pytest.raises(WeightsError, match="12 transformer layers"):
        AudioEncoder.from_pretrained(path)


def test_config_contradicting_weights_refused(folder):
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    with pytest.raises(WeightsError, match="intermediate_size"):
        load_wav2vec2(folder, config=config)


def test_not_a_wav2vec2_file_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(WeightsError, match="not a single wav2vec2"):
        load_wav2vec2(path)


def test_folder_without_weights_refused(tmp_path, folder):
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError, match="no weights"):
        load_wav2vec2(tmp_path)


def test_single_file_without_config_needs_heads(tmp_path, loaded):
    """The tiny fixture's hidden size (not a multiple of 64) is exactly the case a config must settle."""
    if loaded.arch.hidden_size % 64 == 0:
        pytest.skip("this fixture's head count is inferable from shapes")
    path = tmp_path / "w.safetensors"
    save_file(from_canonical(loaded.state_dict, Wav2Vec2KeyLayout("", "parametrizations")), path)
    with pytest.raises(WeightsError, match="head count") as info:
        load_wav2vec2(path)
    assert "config" in info.value.fix


def test_pytorch_model_bin_folder(tmp_path, folder, official, folder_states, waveform):
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(official, tmp_path / "pytorch_model.bin")
    states = AudioEncoder.from_pretrained(tmp_path).hidden_states(waveform)
    assert torch.equal(states, folder_states)


@pytest.mark.parametrize("layout,ctc_head", [
    (Wav2Vec2KeyLayout("", "parametrizations"), False),
    (Wav2Vec2KeyLayout("", "legacy"), False),
    (Wav2Vec2KeyLayout("wav2vec2.", "parametrizations"), True),
    (Wav2Vec2KeyLayout("audio_encoder.", "legacy"), True),
], ids=["bare-param", "bare-legacy", "wav2vec2-param-ctc", "audio_encoder-legacy-ctc"])
def test_comfy_single_file_fp16_matches_folder(tmp_path, folder, official, loaded, folder_states, waveform,
                                               layout, ctc_head):
    """ComfyUI's wav2vec2_large_english_fp16.safetensors form, written from the fixture weights."""
    sd = {k: v.to(torch.float16) for k, v in from_canonical(loaded.state_dict, layout).items()}
    if ctc_head:
        sd.update({layout.prefix + k: v.to(torch.float16) for k, v in official.items() if k.startswith("lm_head.")})
    path = tmp_path / "wav2vec2_large_english_fp16.safetensors"
    save_file(sd, path)
    encoder = AudioEncoder.from_pretrained(path, config=folder / "config.json")
    assert "fp16" in encoder.description and encoder.dtype == torch.float32
    states = encoder.hidden_states(waveform)
    assert states.shape == folder_states.shape
    torch.testing.assert_close(states, folder_states, rtol=0, atol=FP16_ATOL)
