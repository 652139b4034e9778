"""Everything is checked before a weight is read: sizes, settings, official flags, the memory plan.

The CLI runs on the tiny fixture checkpoint. The "no weight read" cases use a copy of it whose
umT5, VAE, wav2vec2 and LoRA weights are garbage: a loader reaching any of them would fail with a
weights error about that file, so the expected error proves that none was opened for loading, and
no loader's log line may appear.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from liveavatar_core.cli import build_parser, main
from liveavatar_core.encoders.image import SIZE_PRESETS, choose_output_size
from liveavatar_core.plan import host_device
from liveavatar_core.sizes import GiB

REPO = Path(__file__).resolve().parents[1]
# Lines the loaders log when they start reading weights.
LOADER_LINES = ("Text encoder:", "audio encoder:", "DiT:", "VAE:", "LoRA:")
# Every flag of the official minimal_inference/s2v_streaming_interact.py (spec/pipeline.md 7).
OFFICIAL_FLAGS = (
    "task", "size", "frame_num", "ckpt_dir", "offload_model", "ulysses_size", "t5_fsdp", "t5_cpu", "dit_fsdp",
    "save_file", "save_dir", "prompt", "use_prompt_extend", "prompt_extend_method", "prompt_extend_model",
    "prompt_extend_target_lang", "base_seed", "image", "sample_solver", "sample_steps", "sample_shift",
    "sample_guide_scale", "convert_model_dtype", "num_clip", "audio", "enable_tts", "tts_prompt_audio",
    "tts_prompt_text", "tts_text", "pose_video", "start_from_ref", "infer_frames", "load_lora", "lora_path",
    "lora_path_dmd", "training_config", "use_dataset", "dataset_sample_idx", "drop_motion_noisy", "single_gpu",
    "using_merged_ckpt", "num_gpus_dit", "enable_vae_parallel", "offload_kv_cache", "enable_online_decode", "fp8",
)


def _wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture
def base(ckpt_dir, fixtures, tmp_path):
    return ["--ckpt_dir", str(ckpt_dir), "--image", str(fixtures / "inputs" / "ref_image.png"),
            "--audio", str(fixtures / "inputs" / "audio.wav"), "--prompt", "hi",
            "--lora_path_dmd", str(fixtures / "ckpt" / "LiveAvatar" / "liveavatar.safetensors"),
            "--save_file", str(tmp_path / "out" / "o.mp4"), "--device", "cpu"]


@pytest.fixture(scope="module")
def garbage_ckpt(ckpt_dir, fixtures, tmp_path_factory):
    """The fixture folder with real config and DiT shards, every other weight file garbage."""
    root = tmp_path_factory.mktemp("garbage") / "Wan2.2-S2V-14B"
    shutil.copytree(ckpt_dir, root)
    for rel in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "wav2vec2-large-xlsr-53-english/model.safetensors"):
        os.chmod(root / rel, 0o644)
        (root / rel).write_bytes(b"not a weight file" * 64)
    lora = root.parent / "liveavatar.safetensors"
    lora.write_bytes(b"not a weight file" * 64)
    return root, lora


def _plan_json(capsys, args) -> dict:
    capsys.readouterr()
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- sizes ---------------------------------------------------------------------------------------

def test_every_preset_plans_at_the_image_search_size(base, tmp_path, capsys):
    """The official presets the CLI used to refuse (480*832, 832*480, 720*400, 1280*720) and every
    other preset plan at the output size the image search picks for the actual image."""
    wide = tmp_path / "wide.png"
    Image.new("RGB", (1280, 720), (90, 120, 200)).save(wide)
    tall = tmp_path / "tall.png"
    Image.new("RGB", (720, 1280), (90, 120, 200)).save(tall)
    seen = set()
    for image in (wide, tall):
        args = list(base)
        args[args.index("--image") + 1] = str(image)
        for preset in SIZE_PRESETS:
            plan = _plan_json(capsys, args + ["--size", preset])
            h, w = choose_output_size(Image.open(image).size, preset)
            assert plan["output_size"] == [w, h], preset
            assert (w > h) == (image == wide)  # orientation follows the image, whatever the preset says
            seen.add((preset, w, h))
    assert ("720*400", 704, 384) in seen and ("1280*720", 1280, 704) in seen
    assert ("480*832", 832, 448) in seen and ("832*480", 448, 832) in seen


def test_small_image_is_never_upscaled_and_warned(base, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        plan = _plan_json(capsys, base + ["--size", "704*384"])
    assert plan["image_size"] == [128, 72] and plan["output_size"] == [128, 128]
    text = caplog.text
    assert "the size is a pixel area" in text and "never upscaled" in text
    assert any(r.levelno == logging.WARNING and "much smaller than the requested area" in r.getMessage()
               for r in caplog.records)
    assert any("much smaller" in w for w in plan["warnings"])


def test_one_real_generate_at_a_formerly_refused_preset(base, tmp_path):
    """480*832 ("width 480 is not a positive multiple of 64" after loading, before) makes a video."""
    from liveavatar_core.video.probe import probe_mp4

    out = subprocess.run([sys.executable, "-m", "liveavatar_core", "generate", *base, "--size", "480*832",
                          "--num_clip", "1", "--infer_frames", "12", "--precision", "fp32"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    path = Path(out.stdout.strip().split("wrote ", 1)[1])
    info = probe_mp4(path)
    assert (info.width, info.height) == (128, 128) and info.frame_count == 9


# --- errors before anything loads ----------------------------------------------------------------

def _short_audio(tmp_path, seconds):
    return str(_wav(tmp_path / f"a{seconds}.wav", seconds))


@pytest.mark.parametrize("extra, name, words", [
    (["--size", "32*32"], "size", "smallest output area"),
    (["--size", "banana"], "size", "cannot read"),
    (["--fp8"], "fp8", "CUDA GPU"),
    (["--lora_path_dmd", "Quark-Vision/Live-Avatar"], "lora", "Hugging Face repository id"),
    (["--sample_guide_scale", "4.5"], "sample_guide_scale", "never applies guidance"),
    (["--num_gpus_dit", "4"], "devices", "no CUDA GPU is visible"),
    (["--enable_vae_parallel"], "devices", "no CUDA GPU is visible"),
    (["--num_gpus_dit", "2", "--devices", "cpu,cpu"], "num_gpus_dit", "keep one pair"),
    (["--devices", "cpu,cpu,cpu,cpu,cpu"], "devices", "a rank would have none"),
    (["--devices", "cuda:0,cuda:1"], "devices", "no CUDA GPU is visible"),
    (["--ulysses_size", "2"], "ulysses_size", "sequence parallelism"),
    (["--dit_fsdp"], "shard", "FSDP shards the weights over several DiT ranks"),
    (["--sample_solver", "unipc"], "sample_solver", "Euler"),
    (["--lora_path", "x.safetensors"], "lora_path", "--lora_path_dmd"),
    (["--device", "cuda:7"], "device", "CUDA GPU"),
    ("0.1", "audio", "shorter than one block"),
    ("0.2", "audio", "at most 5 frames"),
])
def test_errors_arrive_before_any_weight_is_read(garbage_ckpt, base, tmp_path, capsys, caplog, extra, name, words):
    if name in ("fp8", "device") and torch.cuda.is_available():
        pytest.skip("needs a machine without that GPU")
    root, lora = garbage_ckpt
    args = list(base)
    args[args.index("--ckpt_dir") + 1] = str(root)
    args[args.index("--lora_path_dmd") + 1] = str(lora)
    if isinstance(extra, str):
        args[args.index("--audio") + 1] = _short_audio(tmp_path, float(extra))
        extra = []
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        assert main(["generate", *args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {name}:") and words in err, err
    assert not [r for r in caplog.records if r.getMessage().startswith(LOADER_LINES)]
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "out").exists()


def test_memory_plan_at_the_real_size_refuses_before_loading(base, tmp_path, capsys, caplog):
    """A plan that does not fit at the output size of the actual image is refused by the planner
    before any loader runs (a CPU run: the budget is host memory)."""
    host = host_device().total_bytes
    if host > 400 * GiB:
        pytest.skip("this host has more memory than the 8192x8192 fp32 plan needs")
    big = tmp_path / "big.png"
    Image.new("RGB", (8192, 8192), (90, 120, 200)).save(big, compress_level=1)
    args = list(base)
    args[args.index("--image") + 1] = str(big)
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        assert main(["generate", *args, "--size", "8192*8192", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: memory: needs") and "8192x8192" in err and "run on a GPU" in err
    assert not [r for r in caplog.records if r.getMessage().startswith(LOADER_LINES)]
    # The plan command prints the same plan and says it does not fit.
    assert main(["plan", *args, "--size", "8192*8192", "--precision", "fp32", "--json"]) == 2
    out = capsys.readouterr()
    plan = json.loads(out.out)
    assert plan["fits"] is False and plan["output_size"] == [8192, 8192]
    assert plan["devices"][0]["planned_bytes"] > plan["devices"][0]["budget_bytes"]


# --- warnings ------------------------------------------------------------------------------------

def test_settings_the_model_was_not_made_for_are_warned(base, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="liveavatar"):
        plan = _plan_json(capsys, base + ["--sample_steps", "8", "--offload_model", "True"])
    warnings = " ".join(plan["warnings"])
    assert "made for 4 steps" in warnings
    assert "--offload_model True on the CPU" in warnings and "nothing is offloaded" in warnings
    assert plan["steps"] == 8


# --- official flags ------------------------------------------------------------------------------

def test_every_official_flag_is_known():
    options = {o for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
               for o in a.option_strings}
    assert {f"--{f}" for f in OFFICIAL_FLAGS} <= options


def test_official_single_gpu_command_line_runs_the_preflight(base, fixtures, capsys, caplog):
    """The flags of infinite_inference_single_gpu.sh (with local paths, minus --fp8 on CPU) pass."""
    official = ["--ulysses_size", "1", "--task", "s2v-14B", "--size", "704*384", "--base_seed", "420",
                "--training_config", "liveavatar/configs/s2v_causal_sft.yaml", "--offload_model", "True",
                "--convert_model_dtype", "--infer_frames", "48", "--load_lora", "--sample_steps", "4",
                "--sample_guide_scale", "0", "--num_clip", "10000", "--num_gpus_dit", "1", "--sample_solver",
                "euler", "--single_gpu", "--t5_cpu"]
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        plan = _plan_json(capsys, base + official)
    assert plan["output_size"] == [128, 128] and plan["fits"]
    assert "--convert_model_dtype" in caplog.text and "--training_config" in caplog.text


def test_plan_table_and_json(base, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        assert main(["plan", *base]) == 0
    out = capsys.readouterr().out
    assert "fits: everything on the CPU" in out
    table = caplog.text
    assert "Run plan: 128x128" in table and "peak (+4% fragmentation)" in table and "on the GPU" not in table
    plan = _plan_json(capsys, base)
    assert plan["output_size"] == [128, 128] and plan["placement"].startswith("everything on the CPU")
    (dev,) = plan["devices"]
    assert dev["device"] == "cpu" and isinstance(dev["planned_bytes"], int) and dev["fits"]
    items = [i["bytes"] for i in dev["items"]]
    assert max(items) < dev["planned_bytes"] <= 1.05 * sum(items)
    assert {i["name"] for i in dev["items"]} >= {"DiT weights (resident)", "KV caches", "VAE weights"}
