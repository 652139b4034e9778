"""`inspect` on real folders and files: each is recognised in words, and the exit status says if it is usable."""

import shutil

import pytest

from liveavatar_core.cli import main
from liveavatar_core.weights.layout import LORA_FILE, T5_FILE, TOKENIZER_DIR, VAE_FILE, WAV2VEC2_DIR


def _inspect(capsys, *paths):
    code = main(["inspect", *map(str, paths)])
    return code, capsys.readouterr().out


def test_official_folder_lists_every_part(capsys, ckpt_dir):
    code, out = _inspect(capsys, ckpt_dir)
    assert code == 0
    for line in ("Wan2.2-S2V-14B folder", "DiT: Wan2.2-S2V DiT (dim 128, 4 layers), bf16, 180 tensors in 2 shards; "
                 "config.json: dim 128, 4 layers, 2 heads", "text encoder: umT5 encoder (2 layers",
                 "tokenizer: umT5 tokenizer (Unigram", "VAE: Wan 2.1 VAE", "audio encoder: wav2vec2, 24 layers"):
        assert line in out
    assert "MISSING" not in out


@pytest.mark.parametrize("relative, expect", [
    (WAV2VEC2_DIR, "wav2vec2 audio encoder folder: wav2vec2, 24 layers, hidden 32, 2 heads, ffn 64 (from "
                   "config.json), fp32, 424 tensors"),
    (str(TOKENIZER_DIR), "umT5 tokenizer (Unigram, 200 tokens)"),
    ("diffusion_pytorch_model-00002-of-00002.safetensors",
     "shard 2 of 2 of Wan2.2-S2V DiT (dim 128, 4 layers) (diffusion_pytorch_model.safetensors.index.json): "
     "90 tensors, bf16"),
    ("diffusion_pytorch_model.safetensors.index.json", "Wan2.2-S2V DiT (dim 128, 4 layers), bf16, 180 tensors in "
                                                       "2 shards"),
    (T5_FILE, "umT5 encoder (2 layers, d_model 4096, 4 heads, vocab 256), bf16, 22 tensors (official Wan layout)"),
])
def test_each_part_on_its_own(capsys, ckpt_dir, relative, expect):
    code, out = _inspect(capsys, ckpt_dir / relative)
    assert code == 0 and expect in out, out


def test_a_shard_without_its_index_says_what_its_keys_are(capsys, ckpt_dir, tmp_path):
    for i in (1, 2):
        name = f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
        shutil.copyfile(ckpt_dir / name, tmp_path / name)
    code, out = _inspect(capsys, *sorted(tmp_path.glob("*.safetensors")))
    assert code == 0
    assert "shard 1 of 2 of a Wan DiT: 90 tensors, bf16 (no *.index.json" in out
    assert "shard 2 of 2 of a Wan2.2-S2V DiT: 90 tensors" in out
    assert "dim 0" not in out and "unrecognised" not in out


def test_lora_folders_plain_and_hub_cache(capsys, fixtures, tmp_path):
    cached = tmp_path / "LiveAvatar" / "models--Quark-Vision--Live-Avatar" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    shutil.copyfile(fixtures / "ckpt" / "LiveAvatar" / LORA_FILE, cached / LORA_FILE)
    code, out = _inspect(capsys, fixtures / "ckpt" / "LiveAvatar", tmp_path / "LiveAvatar")
    assert code == 0
    assert out.count("LiveAvatar LoRA folder:") == 2 and out.count("a LoRA file (adapter factors only), bf16") == 2
    assert f"snapshots/abc123/{LORA_FILE}" in out


def test_a_folder_of_downloads_is_read_one_level_down(capsys, fixtures):
    code, out = _inspect(capsys, fixtures / "ckpt")
    assert code == 0 and "Wan2.2-S2V-14B folder" in out and "LiveAvatar LoRA folder" in out


def test_nothing_recognised_exits_non_zero(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, out = _inspect(capsys, tmp_path)
    assert code == 1 and "no Live Avatar weights recognised" in out
    code, out = _inspect(capsys, tmp_path / "nope.safetensors")
    assert code == 1 and "not found" in out


def test_missing_and_damaged_parts_exit_non_zero(capsys, writable_ckpt):
    official = writable_ckpt / "Wan2.2-S2V-14B"
    (official / VAE_FILE).unlink()
    shutil.rmtree(official / TOKENIZER_DIR)
    with open(official / T5_FILE, "r+b") as f:
        f.truncate(1000)
    code, out = _inspect(capsys, official)
    assert code == 1
    assert f"VAE: MISSING ({VAE_FILE})" in out and f"tokenizer: MISSING ({TOKENIZER_DIR}/tokenizer.json)" in out
    assert "text encoder: DAMAGED" in out and "truncated" in out
    assert "DiT: Wan2.2-S2V DiT" in out  # the intact parts are still described


def test_one_bad_path_among_good_ones_exits_non_zero(capsys, fixtures, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3, 4, 5, 6]")
    code, out = _inspect(capsys, fixtures / "ckpt" / "LiveAvatar" / LORA_FILE, junk)
    assert code == 1 and "a LoRA file" in out and f"{junk}: damaged or unusable" in out
