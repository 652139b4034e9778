"""Interrupt and resume of a whole generation on the tiny synthetic checkpoint (CPU).

A run stopped after k blocks (a cancel, or Ctrl-C in the middle of a block) leaves a playable MP4
and a resume file; a new stream resumed from that file yields exactly the chunks the
uninterrupted run yields after block k, and completes the same MP4 (video frames identical,
audio as long). Resumes with other settings, other inputs or damaged files are refused.
"""

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from liveavatar_core.cli import main
from liveavatar_core.encoders.audio import AudioEncoder
from liveavatar_core.encoders.text import TextEncoder
from liveavatar_core.errors import InputError
from liveavatar_core.health import health_paths
from liveavatar_core.loading import load_generator, official_folder
from liveavatar_core.pipeline import GenerationSettings, generate, write_mp4
from liveavatar_core.synthetic import write_tiny_checkpoint, write_wav
from liveavatar_core.synthetic_inputs import make_speech_audio
from liveavatar_core.video.probe import probe_mp4

# Two clips of two blocks (24 frames per clip) and two steps: stops inside clip 0, at the clip
# boundary (before the streaming sink refresh) and inside clip 1 (after it).
CLIPS = 2
STREAMING = GenerationSettings(size="64*64", seed=5, num_clips=CLIPS, frames_per_clip=24, sample_steps=2)
# Official Mode S+ (4 steps, one block per clip): per-clip decoding with the re-encoded frame window,
# sink refreshed by the decoder after clip 0.
OFFICIAL = replace(STREAMING, mode="official", online_decode=True, sample_steps=4, frames_per_clip=12)
# The command line runs longer (24 blocks), so that a signal sent once its first block is done lands
# mid-run even on a busy machine.
CLI = replace(STREAMING, num_clips=12)
CLI_ARGS = ["--size", CLI.size, "--num_clip", str(CLI.num_clips), "--infer_frames", str(CLI.frames_per_clip),
            "--sample_steps", str(CLI.sample_steps), "--base_seed", str(CLI.seed), "--device", "cpu",
            "--precision", "fp32"]
MAX_FRAMES = CLI.num_clips * CLI.frames_per_clip
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), audio_seconds=CLI.num_clips * 24 / 25 + 0.2)


@pytest.fixture(scope="module")
def encoders(tiny):
    folder = official_folder(tiny.ckpt_dir)
    return (TextEncoder.from_pretrained(folder.t5, device="cpu", dtype=torch.float32),
            AudioEncoder.from_pretrained(folder.wav2vec2, device="cpu", dtype=torch.float32))


@pytest.fixture(scope="module")
def inputs(tiny, encoders):
    """(model, text, {frames per clip: audio features}), made by the same calls as the command line."""
    folder = official_folder(tiny.ckpt_dir)
    text = encoders[0].encode(tiny.prompt)
    # Prepared, as the command line does: each mode encodes it its own way (windowed when streaming).
    audio = {s.frames_per_clip: encoders[1].prepare(tiny.audio, frames_per_clip=s.frames_per_clip, num_clips=CLIPS)
             for s in (STREAMING, OFFICIAL)}
    model = load_generator(folder.dit, folder.vae, tiny.lora, precision="fp32", attention="sdpa", dit_device="cpu")
    return model, text, audio


def _chunk(c):
    return c.frames.copy(), c.clip, c.block, c.start_frame


def _stream(inputs, image, settings, **kw):
    model, text, audio = inputs
    return generate(model, text, audio[settings.frames_per_clip], image, settings, **kw)


def _run(inputs, image, path, settings, stop_after=None, resume_from=None, resume_path=None):
    """Chunks written to `path`; `stop_after` blocks (also those without frames), then a cancel."""
    stream = _stream(inputs, image, settings, resume_from=resume_from,
                     should_stop=None if stop_after is None else lambda: stream.stats.blocks_done >= stop_after)
    chunks = []
    write_mp4(stream, path, on_chunk=lambda c: chunks.append(_chunk(c)), resume_path=resume_path)
    return chunks, stream


@pytest.fixture(scope="module")
def reference(tiny, inputs, tmp_path_factory):
    """Uninterrupted runs: mode -> (chunks, mp4 path)."""
    out = {}
    for settings in (STREAMING, OFFICIAL):
        path = tmp_path_factory.mktemp("reference") / f"{settings.mode}.mp4"
        chunks, _ = _run(inputs, tiny.image, path, settings)
        out[settings.mode] = chunks, path
    return out


def _same_chunks(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[0], y[0]) and x[1:] == y[1:] for x, y in zip(a, b))


def _assert_same_video(path, reference_path):
    a = probe_mp4(reference_path, max_frames=MAX_FRAMES)
    b = probe_mp4(path, max_frames=MAX_FRAMES)
    assert b.frame_count == a.frame_count > 0
    np.testing.assert_array_equal(b.frames, a.frames)
    assert b.audio_duration_s == pytest.approx(a.audio_duration_s, abs=1e-6)


@pytest.mark.parametrize("mode, stop", [("streaming", 1), ("streaming", 2), ("streaming", 3), ("official", 1)])
def test_stop_save_and_resume_equals_uninterrupted(tiny, inputs, reference, tmp_path, mode, stop):
    settings = STREAMING if mode == "streaming" else OFFICIAL
    expected, reference_path = reference[mode]
    path, state = tmp_path / "video.mp4", tmp_path / "video.mp4.resume"

    head, stream = _run(inputs, tiny.image, path, settings, stop_after=stop, resume_path=state)
    assert not stream.finished and state.is_file()
    assert probe_mp4(path).frame_count == sum(len(c[0]) for c in head)  # playable, every finished chunk
    assert _same_chunks(head, expected[:len(head)])

    tail, resumed = _run(inputs, tiny.image, path, settings, resume_from=state, resume_path=state)
    assert resumed.finished and not state.exists()  # a finished video leaves no stale resume file
    assert _same_chunks(head + tail, expected)
    assert resumed.stats.blocks_done == resumed.stats.blocks_total
    _assert_same_video(path, reference_path)


def test_interrupt_in_the_middle_of_a_block_resumes_exactly(tiny, inputs, reference, tmp_path):
    # Ctrl-C while clip 1's first block is being denoised: after its sink refresh, with its rows of
    # the step-0 ring written and the step-1 ring partly written.
    expected, reference_path = reference["streaming"]
    model = inputs[0]
    path, state = tmp_path / "video.mp4", tmp_path / "state.resume"
    chunks, calls = [], []

    def interrupt(*_):
        if stream.stats.blocks_done == 2:  # two blocks sampled (the second one's frames still in flight)
            calls.append(1)
            if len(calls) == 3:  # the refresh sink, step 0, then step 1 of the block
                raise KeyboardInterrupt

    stream = _stream(inputs, tiny.image, STREAMING)
    hook = model.dit.blocks[1].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_mp4(stream, path, on_chunk=lambda c: chunks.append(_chunk(c)), resume_path=state)
    finally:
        hook.remove()
    # Both finished blocks reached the file before the interrupt surfaced.
    assert len(calls) == 3 and len(chunks) == 2
    assert probe_mp4(path).frame_count == sum(len(c[0]) for c in chunks)

    tail, _ = _run(inputs, tiny.image, path, STREAMING, resume_from=state, resume_path=state)
    assert _same_chunks(chunks + tail, expected)
    _assert_same_video(path, reference_path)


def test_error_in_the_consumer_keeps_the_chunk_it_was_given(tiny, inputs, reference, tmp_path):
    # The consumer fails once block 0 is in the file: the state saved is the one after block 0.
    expected, reference_path = reference["streaming"]
    path, state = tmp_path / "video.mp4", tmp_path / "state.resume"

    def fail(chunk):
        raise RuntimeError("display went away")

    with pytest.raises(RuntimeError, match="display"):
        write_mp4(_stream(inputs, tiny.image, STREAMING), path, on_chunk=fail, resume_path=state)
    tail, _ = _run(inputs, tiny.image, path, STREAMING, resume_from=state, resume_path=state)
    assert _same_chunks(expected[:1] + tail, expected)
    _assert_same_video(path, reference_path)


# --- refusals ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped(tiny, inputs, tmp_path_factory):
    """(video, resume file) of a streaming run cancelled after its first block."""
    folder = tmp_path_factory.mktemp("stopped")
    video, state = folder / "video.mp4", folder / "video.mp4.resume"
    _run(inputs, tiny.image, video, STREAMING, stop_after=1, resume_path=state)
    return video, state


def _refused(match: str, make, *args, **kw) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        make(*args, **kw)
    assert info.value.input_name == "resume"
    return info.value


def test_resume_refuses_other_settings_and_inputs(tiny, inputs, encoders, stopped, tmp_path):
    model, text, audio = inputs
    _, state = stopped
    features = audio[STREAMING.frames_per_clip]
    _refused(r"seed=5 \(now 6\)", _stream, inputs, tiny.image, replace(STREAMING, seed=6), resume_from=state)
    _refused("mode='streaming'", _stream, inputs, tiny.image, replace(OFFICIAL, frames_per_clip=24),
             resume_from=state)
    _refused("prompt", generate, model, encoders[0].encode("Someone else entirely."), features, tiny.image,
             STREAMING, resume_from=state)

    other_wav = tmp_path / "other.wav"
    write_wav(other_wav, make_speech_audio(3.0, 16000, seed=1), 16000)
    other_audio = encoders[1].encode(other_wav, frames_per_clip=STREAMING.frames_per_clip, num_clips=CLIPS)
    _refused("audio", generate, model, text, other_audio, tiny.image, STREAMING, resume_from=state)

    flipped = tmp_path / "flipped.png"
    Image.open(tiny.image).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(flipped)
    _refused("reference image", generate, model, text, features, flipped, STREAMING, resume_from=state)

    folder = official_folder(tiny.ckpt_dir)
    bf16 = load_generator(folder.dit, folder.vae, tiny.lora, precision="bf16")
    _refused("another model: it was .*fp32", generate, bf16, text, features, tiny.image, STREAMING,
             resume_from=state)


def test_resume_refuses_missing_or_damaged_files(tiny, inputs, stopped, tmp_path, capsys):
    video, state = stopped

    def resume(path):
        return _stream(inputs, tiny.image, STREAMING, resume_from=path)

    _refused("does not exist", resume, tmp_path / "nothing.resume")
    cut = tmp_path / "cut.resume"
    cut.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    _refused("not a readable resume file", resume, cut)
    junk = tmp_path / "junk.resume"
    junk.write_bytes(b"not a resume file at all" * 10)
    _refused("not a readable resume file", resume, junk)
    foreign = tmp_path / "foreign.resume"
    torch.save({"meta": {"format": "liveavatar.block_sampler.v1"}, "tensors": {}}, foreign)
    _refused("not a Live Avatar stream resume file", resume, foreign)

    # The partial video moved away, or another output path asked of the resumed stream.
    moved = tmp_path / "moved"
    moved.mkdir()
    copy = moved / "video.mp4.resume"
    copy.write_bytes(state.read_bytes())
    video.rename(moved / "video.mp4")
    try:
        _refused("partial video .* is missing", resume, copy)
    finally:
        (moved / "video.mp4").rename(video)
    _refused("was writing", write_mp4, resume(state), tmp_path / "elsewhere.mp4")

    # The command line checks the file and its settings before loading anything.
    assert main(_cli(tiny, tmp_path / "o.mp4", "--resume", str(tmp_path / "nothing.resume"))) == 2
    assert "resume: " in capsys.readouterr().err
    assert main(_cli(tiny, tmp_path / "o.mp4", "--resume", str(state))) == 2
    assert f"num_clips={CLIPS} (now {CLI.num_clips})" in capsys.readouterr().err
    assert state.is_file() and probe_mp4(video).frame_count > 0  # refusals touch neither file


# --- command line -----------------------------------------------------------------------------------------

def _cli(tiny, save_file, *extra) -> list[str]:
    return ["generate", "--ckpt_dir", str(tiny.ckpt_dir), "--lora_path_dmd", str(tiny.lora), "--image",
            str(tiny.image), "--audio", str(tiny.audio), "--prompt", tiny.prompt, "--save_file", str(save_file),
            *CLI_ARGS, *extra]


def _frames(path) -> int:
    """Frames a player finds in `path` now (0 before the file exists)."""
    if path is None:
        return 0
    try:
        return probe_mp4(path, max_frames=0).frame_count
    except InputError:
        return 0


def _start(tiny, log, *args) -> subprocess.Popen:
    with open(log, "w") as f:
        # SIGINT back to its default: a test runner started in the background (`cmd &`) ignores it,
        # and the child would inherit that and never see the Ctrl-C.
        return subprocess.Popen([sys.executable, "-m", "liveavatar_core", *_cli(tiny, *args)], cwd=REPO,
                                stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_until(proc: subprocess.Popen, ready, log) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run ended (rc {proc.wait()}) before the awaited point:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def test_cli_ctrl_c_then_sigterm_then_kill_then_resume(tiny, inputs, tmp_path):
    out, log = tmp_path / "out" / "clip.mp4", tmp_path / "log.txt"
    expected, _ = _run(inputs, tiny.image, tmp_path / "uninterrupted.mp4", CLI)
    total = sum(len(c[0]) for c in expected)

    # Ctrl-C once the first block is done (the command line logs it; probing the growing MP4 from
    # here would take longer): exit code 130, a playable MP4 holding the finished blocks, a resume
    # file next to it. An explicit --save_file is written as given, not numbered.
    proc = _start(tiny, log, out)
    _wait_until(proc, lambda: "clip 0 block 0:" in log.read_text(), log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    video, state = out, out.with_name(out.name + ".resume")
    assert f"--resume {state}" in log.read_text() and state.is_file()
    head = _frames(video)
    assert 0 < head < total

    # The resumed run stopped with SIGTERM (kill, systemd, docker stop): handled as Ctrl-C, exit
    # code 143, more frames in the MP4 and a newer resume state.
    proc = _start(tiny, log, out, "--resume", str(state))
    _wait_until(proc, lambda: _frames(video) > head, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    text = log.read_text()
    assert "terminated (SIGTERM)" in text and f"--resume {state}" in text and "resume state saved" in text
    middle = _frames(video)
    assert head < middle < total and state.is_file()

    # The resumed run killed outright: the MP4 still plays, with more frames; no state was written.
    proc = _start(tiny, log, out, "--resume", str(state))
    _wait_until(proc, lambda: _frames(video) > middle, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert _frames(video) > middle

    # Resuming again from the same file discards what the killed run added and completes that video
    # (no new output), and its health sidecar: one record per block of it, in order.
    assert main(_cli(tiny, out, "--resume", str(state))) == 0
    sidecar, plot = health_paths(video)
    assert not state.exists() and sorted(out.parent.iterdir()) == sorted([video, sidecar, plot])
    _assert_same_video(video, tmp_path / "uninterrupted.mp4")
    records = [json.loads(line) for line in sidecar.read_text().splitlines()]
    assert [r["block"] for r in records] == list(range(len(expected)))
    assert [r["start_frame"] for r in records] == [c[3] for c in expected]
    assert sum(r["frames"] for r in records) == total
