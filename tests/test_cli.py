"""The command line on real files: inspect, and input validation before any weight is read."""

import subprocess
import sys

from liveavatar_core.cli import main
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_inspect_names_every_part(ckpt_dir, fixtures, capsys):
    assert main(["inspect", str(ckpt_dir), str(fixtures / "ckpt" / "LiveAvatar" / "liveavatar.safetensors")]) == 0
    out = capsys.readouterr().out
    for part in ("DiT: Wan2.2-S2V DiT", "text encoder: umT5 encoder", "VAE: Wan 2.1 VAE",
                 "audio encoder: wav2vec2, 24 layers", "a LoRA file"):
        assert part in out


def test_generate_refuses_bad_inputs_before_loading(ckpt_dir, fixtures, tmp_path, capsys):
    base = ["generate", "--ckpt_dir", str(ckpt_dir), "--image", str(fixtures / "inputs" / "ref_image.png"),
            "--audio", str(fixtures / "inputs" / "audio.wav"), "--prompt", "hi",
            "--save_file", str(tmp_path / "o.mp4")]
    cases = [(["--size", "banana"], "size"), (["--infer_frames", "50"], "frames_per_clip"),
             (["--mode", "official", "--enable_online_decode", "--size", "64*128", "--sample_steps", "0"],
              "steps"), (["--precision", "fp32", "--kv_cache_dtype", "fp8"], "kv_cache_dtype")]
    for extra, name in cases:
        assert main(base + extra) == 2
        assert f"{name}" in capsys.readouterr().err
    assert main(base[:2] + [str(tmp_path)] + base[3:]) == 2
    assert "lacks" in capsys.readouterr().err
    missing = list(base)
    missing[missing.index("--audio") + 1] = str(tmp_path / "nope.wav")
    assert main(missing) == 2
    assert "audio" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "liveavatar_core", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout
