"""check_run_files on real checkpoint copies: each broken file is named, with the fix, before any load."""

import json
import logging
import shutil

import pytest

from liveavatar_core.cli import main
from liveavatar_core.errors import WeightsError
from liveavatar_core.loading import load_generator
from liveavatar_core.weights.check import check_run_files
from liveavatar_core.weights.io import open_checkpoint
from liveavatar_core.weights.layout import (DIT_CONFIG, DIT_INDEX, LORA_FILE, T5_FILE, TOKENIZER_DIR, VAE_FILE,
                                            WAV2VEC2_DIR)


def _parts(root):
    official = root / "Wan2.2-S2V-14B"
    return dict(dit_path=official, lora_path=root / "LiveAvatar" / LORA_FILE, vae_path=official / VAE_FILE,
                t5_path=official / T5_FILE, wav2vec2_path=official / WAV2VEC2_DIR)


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def test_a_complete_checkpoint_passes_and_every_file_is_counted(writable_ckpt):
    parts = _parts(writable_ckpt)
    checked = check_run_files(**parts)
    official = parts["dit_path"]
    assert [c.path for c in checked] == [official / DIT_INDEX, parts["lora_path"], parts["vae_path"],
                                         parts["t5_path"], official / WAV2VEC2_DIR / "model.safetensors"]
    assert [c.tensors for c in checked] == [len(open_checkpoint(c.path)) for c in checked]
    assert checked[0].size == sum(p.stat().st_size for p in official.glob("diffusion_pytorch_model*"))


def _shard(official, i):
    return sorted(official.glob("diffusion_pytorch_model-*-of-*.safetensors"))[i]


# (what breaks, how, the input it is reported under, the file the message names)
BREAKAGES = {
    "missing LoRA": (lambda c: (c / "LiveAvatar" / LORA_FILE).unlink(), "lora", "LiveAvatar/" + LORA_FILE),
    "truncated LoRA": (lambda c: _truncate(c / "LiveAvatar" / LORA_FILE), "lora", LORA_FILE),
    "config.json not JSON": (lambda c: (c / "Wan2.2-S2V-14B" / DIT_CONFIG).write_text('{"dim": 128,'),
                             "ckpt_dir", DIT_CONFIG),
    "config.json a list": (lambda c: (c / "Wan2.2-S2V-14B" / DIT_CONFIG).write_text("[1, 2]"), "ckpt_dir",
                           DIT_CONFIG),
    "config.json wrong type": (lambda c: (c / "Wan2.2-S2V-14B" / DIT_CONFIG).write_text(
        json.dumps({**json.loads((c / "Wan2.2-S2V-14B" / DIT_CONFIG).read_text()), "num_layers": "x"})),
        "ckpt_dir", DIT_CONFIG),
    "missing shard": (lambda c: _shard(c / "Wan2.2-S2V-14B", 1).unlink(), "dit_checkpoint", "-00002-of-00002"),
    "truncated shard": (lambda c: _truncate(_shard(c / "Wan2.2-S2V-14B", 0)), "dit_checkpoint",
                        "-00001-of-00002"),
    "index not JSON": (lambda c: (c / "Wan2.2-S2V-14B" / DIT_INDEX).write_text("{"), "dit_checkpoint", DIT_INDEX),
    "truncated VAE": (lambda c: _truncate(c / "Wan2.2-S2V-14B" / VAE_FILE, 0.9), "vae", VAE_FILE),
    "truncated T5": (lambda c: _truncate(c / "Wan2.2-S2V-14B" / T5_FILE), "t5_checkpoint", T5_FILE),
    "missing tokenizer": (lambda c: shutil.rmtree(c / "Wan2.2-S2V-14B" / TOKENIZER_DIR), "tokenizer_path",
                          str(TOKENIZER_DIR)),
    "tokenizer.json not JSON": (lambda c: (c / "Wan2.2-S2V-14B" / TOKENIZER_DIR / "tokenizer.json").write_text("{"),
                                "tokenizer_path", "tokenizer.json"),
    "wav2vec2 config not JSON": (lambda c: (c / "Wan2.2-S2V-14B" / WAV2VEC2_DIR / "config.json").write_text("["),
                                 "audio_encoder", WAV2VEC2_DIR + "/config.json"),
    "truncated wav2vec2": (lambda c: _truncate(c / "Wan2.2-S2V-14B" / WAV2VEC2_DIR / "model.safetensors"),
                           "audio_encoder", "model.safetensors"),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_each_broken_file_is_named_with_the_fix(writable_ckpt, case):
    damage, input_name, named = BREAKAGES[case]
    damage(writable_ckpt)
    with pytest.raises(WeightsError) as err:
        check_run_files(**_parts(writable_ckpt))
    assert err.value.input_name == input_name
    assert named in str(err.value) and err.value.fix


def test_a_hub_id_is_named_as_one_with_the_download(writable_ckpt):
    with pytest.raises(WeightsError, match="Hugging Face repository id") as err:
        check_run_files(lora_path="Quark-Vision/Live-Avatar")
    assert "hf download Quark-Vision/Live-Avatar liveavatar.safetensors" in err.value.fix


def test_load_generator_names_a_truncated_vae_before_reading_the_dit(writable_ckpt, caplog):
    parts = _parts(writable_ckpt)
    _truncate(parts["vae_path"], 0.9)
    with caplog.at_level(logging.INFO), pytest.raises(WeightsError, match=f"{VAE_FILE} is truncated"):
        load_generator(parts["dit_path"], parts["vae_path"], parts["lora_path"], dit_device="cpu",
                       precision="fp32")
    assert not [r for r in caplog.records if r.getMessage().startswith("DiT:")]


@pytest.mark.parametrize("case", ["truncated VAE", "missing shard", "missing LoRA", "config.json wrong type"])
def test_generate_stops_before_the_encoders_load(writable_ckpt, fixtures, tmp_path, capsys, caplog, case):
    damage, _, named = BREAKAGES[case]
    damage(writable_ckpt)
    args = ["generate", "--ckpt_dir", str(writable_ckpt / "Wan2.2-S2V-14B"), "--lora_path_dmd",
            str(writable_ckpt / "LiveAvatar" / LORA_FILE), "--image", str(fixtures / "inputs" / "ref_image.png"),
            "--audio", str(fixtures / "inputs" / "audio.wav"), "--prompt", "hi", "--size", "128*128",
            "--precision", "fp32", "--device", "cpu", "--save_file", str(tmp_path / "out" / "o.mp4")]
    with caplog.at_level(logging.INFO):
        assert main(args) == 2
    assert named in capsys.readouterr().err
    assert not [r for r in caplog.records if r.getMessage().startswith(("Text encoder:", "audio encoder:", "DiT:"))]
    assert not (tmp_path / "out" / "o.mp4").exists()
