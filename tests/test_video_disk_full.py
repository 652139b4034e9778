"""A disk that fills up while the MP4 is written: a clear error, a playable file, a resume.

Two real, OS-level ways to run out of room, never a mock:

* a small tmpfs, mounted in a private mount namespace of a child process (`unshare -rm`, which
  needs no root where user namespaces are allowed): the kernel answers ENOSPC, exactly what a full
  disk gives. Skipped where namespaces or tmpfs mounts are not allowed.
* `RLIMIT_FSIZE` set in a child process: the kernel refuses every write past the limit with EFBIG
  (SIGXFSZ ignored), which runs through the same code path. Always available, so CI always checks
  the recovery even where it cannot mount anything.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from liveavatar_core.encoders.audio import AudioEncoder
from liveavatar_core.encoders.text import TextEncoder
from liveavatar_core.loading import load_generator, official_folder
from liveavatar_core.pipeline import GenerationSettings, generate, write_mp4
from liveavatar_core.synthetic import write_tiny_checkpoint
from liveavatar_core.video import StreamingMP4Writer, probe_mp4
from tests.test_video_kill import BLOCK_SOURCE

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096

# Appends blocks until the disk refuses one, then reports the error and the writer's state and
# copies the file out of the small disk (argv[2]), which vanishes with the child's namespace.
WRITER_CHILD = BLOCK_SOURCE + """
import json, shutil, sys
from liveavatar_core.errors import InputError
from liveavatar_core.video import StreamingMP4Writer
writer = StreamingMP4Writer(sys.argv[1], W, H, FPS, audio=audio(60), sample_rate=SR)
blocks = 0
try:
    while True:
        writer.append(block(blocks))
        blocks += 1
except InputError as exc:
    state = writer.state()
    try:
        writer.close()  # the closing audio does not fit either: rolled back, the video still plays
    except InputError:
        pass
    shutil.copyfile(sys.argv[1], sys.argv[2])
    print(json.dumps({"error": str(exc), "blocks": blocks, "state": state}))
"""


def small_disk_prefix(mountpoint: Path, size: int) -> list[str] | None:
    """argv prefix running a command with a `size`-byte tmpfs on `mountpoint`, or None if impossible."""
    if shutil.which("unshare") is None:
        return None
    mountpoint.mkdir(parents=True, exist_ok=True)
    prefix = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "{mountpoint}" && exec "$@"', "sh"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.fixture(scope="module")
def blocks():
    source = {}
    exec(BLOCK_SOURCE, source)
    return source


@pytest.fixture(scope="module")
def reference(blocks, tmp_path_factory):
    """(path, byte length after each block) of an uninterrupted 8-block file."""
    path = tmp_path_factory.mktemp("reference") / "reference.mp4"
    sizes = []
    with StreamingMP4Writer(path, blocks["W"], blocks["H"], audio=blocks["audio"](60), sample_rate=blocks["SR"]) as w:
        for i in range(8):
            w.append(blocks["block"](i))
            sizes.append(w.state()["bytes"])
    return path, sizes


def _check_and_resume(report: dict, copy: Path, blocks: dict, reference: tuple, reason: str) -> None:
    state, n = report["state"], report["blocks"]
    assert reason in report["error"] and state["path"] in report["error"], report["error"]
    # The file holds every block appended before the failed one, and plays; the state says so.
    assert 2 <= n < 8 and state["frames_written"] == n * blocks["BLOCK"]
    assert f"the {state['frames_written']} frames" in report["error"]
    probe = probe_mp4(copy, max_frames=0)
    assert probe.frame_count == state["frames_written"]

    # Room again: the resumed file, completed, equals the uninterrupted one.
    state = {**state, "path": str(copy)}
    writer = StreamingMP4Writer.resume(state, audio=blocks["audio"](60), sample_rate=blocks["SR"])
    for i in range(n, 8):
        writer.append(blocks["block"](i))
    writer.close()
    total = 8 * blocks["BLOCK"]
    resumed, expected = probe_mp4(copy, max_frames=total), probe_mp4(reference[0], max_frames=total)
    assert resumed.frame_count == expected.frame_count == total
    np.testing.assert_array_equal(resumed.frames, expected.frames)
    assert resumed.audio_duration_s == expected.audio_duration_s


def test_full_tmpfs_leaves_a_playable_file_that_resumes(blocks, reference, tmp_path):
    # Room for the init segment and about three and a half blocks (tmpfs counts whole pages).
    sizes = reference[1]
    size = -(-(sizes[2] + (sizes[3] - sizes[2]) // 2) // PAGE) * PAGE
    mountpoint, copy = tmp_path / "small", tmp_path / "copy.mp4"
    prefix = small_disk_prefix(mountpoint, size)
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (no user namespaces); the RLIMIT_FSIZE test covers the path")
    out = subprocess.run([*prefix, sys.executable, "-c", WRITER_CHILD, str(mountpoint / "video.mp4"), str(copy)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _check_and_resume(json.loads(out.stdout), copy, blocks, reference, "the disk is full")


def test_file_size_limit_leaves_a_playable_file_that_resumes(blocks, reference, tmp_path):
    sizes = reference[1]
    path = tmp_path / "video.mp4"
    copy = tmp_path / "copy.mp4"
    out = subprocess.run([sys.executable, "-c", WRITER_CHILD, str(path), str(copy)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
                         preexec_fn=_limit_file_size(sizes[2] + (sizes[3] - sizes[2]) // 2))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["blocks"] == 3
    assert path.stat().st_size <= sizes[2] + (sizes[3] - sizes[2]) // 2
    _check_and_resume(report, copy, blocks, reference, "largest size allowed")


# --- a whole generation on a disk that fills up ----------------------------------------------------------

SETTINGS = dict(size="64*64", seed=5, num_clips=2, frames_per_clip=24, sample_steps=2)
# 1.7 s of audio: the 2 clips give 45 frames, of which the MP4 keeps the 40 that start within the
# audio (shifted by the 3 dropped frames), so every count below must say 40, not 45.
AUDIO_SECONDS = 1.7
KEPT_FRAMES = 40

# Inside a private mount namespace (root there): a generation on a full tmpfs with its resume
# file elsewhere, the same video resumed once there is room, then the command line on another
# full tmpfs. Files are copied out, log lines and errors reported as JSON.
PIPELINE_CHILD = r"""
import contextlib, io, json, logging, shutil, subprocess, sys
from pathlib import Path
import torch
from liveavatar_core.cli import main
from liveavatar_core.encoders.audio import AudioEncoder
from liveavatar_core.encoders.text import TextEncoder
from liveavatar_core.errors import InputError
from liveavatar_core.loading import load_generator, official_folder
from liveavatar_core.pipeline import GenerationSettings, generate, write_mp4

cfg = json.loads(sys.argv[1])
out = Path(cfg["outside"])

def mount(folder, size, remount=False):
    options = ("remount," if remount else "") + f"size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", folder], check=True)

records = []
handler = logging.Handler()
handler.emit = lambda record: records.append(record.getMessage())
logging.getLogger("liveavatar").addHandler(handler)
logging.getLogger("liveavatar").setLevel(logging.INFO)

folder = official_folder(cfg["ckpt_dir"])
text = TextEncoder.from_pretrained(folder.t5, device="cpu", dtype=torch.float32).encode(cfg["prompt"])
settings = GenerationSettings(**cfg["settings"])
audio = AudioEncoder.from_pretrained(folder.wav2vec2, device="cpu", dtype=torch.float32).encode(
    cfg["audio"], frames_per_clip=settings.frames_per_clip, num_clips=settings.num_clips)
model = load_generator(folder.dit, folder.vae, cfg["lora"], precision="fp32", attention="sdpa", dit_device="cpu")

small = Path(cfg["small"])
mount(small, cfg["size"])
video, state = small / "video.mp4", out / "video.mp4.resume"
report = {}
records.clear()
try:
    write_mp4(generate(model, text, audio, cfg["image"], settings), video, resume_path=state)
except InputError as exc:
    report["error"] = str(exc)
report["logs"] = list(records)
shutil.copyfile(video, out / "at_failure.mp4")
mount(small, 64 << 20, remount=True)
write_mp4(generate(model, text, audio, cfg["image"], settings, resume_from=state), video, resume_path=state,
          health="warn")
report["state_left"] = state.exists()
report["health"] = [[r["start_frame"], r["frames"]] for r in
                    map(json.loads, (small / "video.health.jsonl").read_text().splitlines())]
shutil.copyfile(video, out / "resumed.mp4")

cli_small = Path(cfg["cli_small"])
mount(cli_small, cfg["size"])
records.clear()
stderr = io.StringIO()
with contextlib.redirect_stderr(stderr):
    report["rc"] = main([*cfg["cli"], "--save_file", str(cli_small / "clip.mp4")])
report.update(stderr=stderr.getvalue(), cli_logs=list(records), cli_files=sorted(p.name for p in cli_small.iterdir()))
shutil.copyfile(cli_small / "clip.mp4", out / "cli.mp4")

# No room for even the first block, in folders the run has to create: it writes nothing and
# leaves nothing behind.
cli_tiny = Path(cfg["cli_tiny"])
mount(cli_tiny, 4096)
records.clear()
with contextlib.redirect_stderr(io.StringIO()):
    report["tiny_rc"] = main([*cfg["cli"], "--save_file", str(cli_tiny / "new" / "sub" / "clip.mp4")])
report.update(tiny_logs=list(records), tiny_files=sorted(str(p) for p in cli_tiny.rglob("*")))
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), audio_seconds=AUDIO_SECONDS)


def _generation(tiny):
    folder = official_folder(tiny.ckpt_dir)
    settings = GenerationSettings(**SETTINGS)
    text = TextEncoder.from_pretrained(folder.t5, device="cpu", dtype=torch.float32).encode(tiny.prompt)
    audio = AudioEncoder.from_pretrained(folder.wav2vec2, device="cpu", dtype=torch.float32).encode(
        tiny.audio, frames_per_clip=settings.frames_per_clip, num_clips=settings.num_clips)
    model = load_generator(folder.dit, folder.vae, tiny.lora, precision="fp32", attention="sdpa", dit_device="cpu")
    return generate(model, text, audio, tiny.image, settings)


def test_generation_on_a_full_disk_ends_clearly_and_resumes(tiny, tmp_path):
    if small_disk_prefix(tmp_path / "probe", PAGE) is None:
        pytest.skip("cannot mount a tmpfs here (no user namespaces); the RLIMIT_FSIZE test covers the writer")
    # The uninterrupted video, and the counts every log and caption must agree with.
    stream, chunks = _generation(tiny), []
    reference = write_mp4(stream, tmp_path / "reference.mp4", on_chunk=chunks.append)
    expected = probe_mp4(reference, max_frames=KEPT_FRAMES)
    assert expected.frame_count == stream.total_frames == chunks[-1].stats.frames_done == KEPT_FRAMES
    assert stream.generated_frames == sum(len(c.frames) for c in chunks) > KEPT_FRAMES
    assert [c.stats.blocks_done for c in chunks] == [1, 2, 3, 4]

    # Room for about half the video: the disk fills up inside the run.
    size = -(-reference.stat().st_size // 2 // PAGE) * PAGE
    small, cli_small, cli_tiny, outside = (tmp_path / name for name in ("small", "cli_small", "cli_tiny", "outside"))
    for folder in (small, cli_small, cli_tiny, outside):
        folder.mkdir()
    cli = ["generate", "--ckpt_dir", str(tiny.ckpt_dir), "--lora_path_dmd", str(tiny.lora), "--image",
           str(tiny.image), "--audio", str(tiny.audio), "--prompt", tiny.prompt, "--size", SETTINGS["size"],
           "--num_clip", "2", "--infer_frames", "24", "--sample_steps", "2", "--base_seed", "5", "--device", "cpu",
           "--precision", "fp32"]
    cfg = dict(outside=str(outside), small=str(small), cli_small=str(cli_small), cli_tiny=str(cli_tiny), size=size,
               settings=SETTINGS,
               ckpt_dir=str(tiny.ckpt_dir), lora=str(tiny.lora), image=str(tiny.image), audio=str(tiny.audio),
               prompt=tiny.prompt, cli=cli)
    run = subprocess.run(["unshare", "-rm", sys.executable, "-c", PIPELINE_CHILD, json.dumps(cfg)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])

    # A clear error naming the file and what it holds, which is what a player finds in it.
    held = re.search(r"the disk is full while writing (\S+); it holds and plays the (\d+) frames", report["error"])
    assert held and held.group(1) == str(small / "video.mp4"), report["error"]
    frames = int(held.group(2))
    assert 0 < frames < KEPT_FRAMES
    assert probe_mp4(outside / "at_failure.mp4", max_frames=0).frame_count == frames
    # One consistent stop line: the resume file (on another disk) keeps what the MP4 lacks.
    (stopped,) = [line for line in report["logs"] if line.startswith("stopped")]
    assert f"holds {frames} frames" in stopped and "resume state saved" in stopped, stopped
    # Room again: the resumed video equals the uninterrupted one, and the resume file is gone.
    resumed = probe_mp4(outside / "resumed.mp4", max_frames=KEPT_FRAMES)
    assert resumed.frame_count == KEPT_FRAMES and not report["state_left"]
    np.testing.assert_array_equal(resumed.frames, expected.frames)
    # The resumed run's health checks start where the file ended, with the chunks the resume file
    # kept for it: a record per block, no gap, up to the end.
    spans = report["health"]
    assert spans and spans[0][0] == frames and spans[-1][0] + spans[-1][1] == KEPT_FRAMES, spans
    assert all(start + n == after for (start, n), (after, _) in zip(spans, spans[1:])), spans

    # The command line: exit code 2, the error in one line, no traceback, and one line saying
    # that the resume state did not fit either (it would go next to the video).
    assert report["rc"] == 2 and "Traceback" not in report["stderr"]
    (error,) = [line for line in report["stderr"].splitlines() if line.startswith("error: ")]
    held = re.search(r"the disk is full while writing (\S+); it holds and plays the (\d+) frames", error)
    assert held and held.group(1) == str(cli_small / "clip.mp4"), error
    assert probe_mp4(outside / "cli.mp4", max_frames=0).frame_count == int(held.group(2)) > 0
    assert any(line.startswith(f"output 64x64, 2 clips, {KEPT_FRAMES} frames") for line in report["cli_logs"])
    (unsaved,) = [line for line in report["cli_logs"] if "could not save the resume state" in line]
    assert "No space left on device" in unsaved and "cannot be resumed" in unsaved
    # No partial resume file left behind; the health sidecar of the blocks written stays, the plot,
    # which found no room, does not.
    assert report["cli_files"] == ["clip.health.jsonl", "clip.mp4"]

    # Nothing written: the empty video and the two folders made for it are removed again.
    assert report["tiny_rc"] == 2 and report["tiny_files"] == []
    assert any(line.startswith("nothing was written: removed") for line in report["tiny_logs"]), report["tiny_logs"]
