"""The parallel runtime with real worker processes over gloo on CPU ranks (tiny checkpoint, fp32).

Every run starts `python -m liveavatar_core.parallel.worker` processes through `WorkerGroup`,
exactly as on GPUs (there with NCCL): the step layout must give the frames of one process bit for
bit, cancel/resume must complete the same video (also on another rank count), and a killed rank
must be reported at once with no process left behind.
"""

import os
import signal
import threading
import time
from dataclasses import replace
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import numpy as np
import pytest
import torch

from liveavatar_core.encoders.audio import AudioEncoder
from liveavatar_core.encoders.text import TextEncoder
from liveavatar_core.errors import InputError, WorkerError
from liveavatar_core.loading import load_generator, official_folder
from liveavatar_core.parallel.group import WorkerGroup
from liveavatar_core.parallel.layout import step_layout
from liveavatar_core.parallel.remote import load_parallel
from liveavatar_core.pipeline import GenerationSettings, generate, write_mp4
from liveavatar_core.resume import load_resume_state
from liveavatar_core.synthetic import write_tiny_checkpoint
from liveavatar_core.video.probe import probe_mp4

CLIPS = 3
STREAMING = GenerationSettings(size="64*64", seed=5, num_clips=CLIPS)
OFFICIAL = replace(STREAMING, mode="official", online_decode=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), audio_seconds=CLIPS * 48 / 25 + 0.2)


@pytest.fixture(scope="module")
def inputs(tiny):
    folder = official_folder(tiny.ckpt_dir)
    text = TextEncoder.from_pretrained(folder.t5, dtype=torch.float32).encode(tiny.prompt)
    audio = AudioEncoder.from_pretrained(folder.wav2vec2).encode(str(tiny.audio))
    return folder, text, audio


@pytest.fixture(scope="module")
def single(tiny, inputs):
    folder, text, audio = inputs
    model = load_generator(folder.dit, folder.vae, tiny.lora, precision="fp32")
    return {s.mode: [c.frames for c in generate(model, text, audio, tiny.image, s)] for s in (STREAMING, OFFICIAL)}


def _load(tiny, inputs, n, vae=False):
    folder = inputs[0]
    return load_parallel(folder.dit, folder.vae, tiny.lora, precision="fp32",
                         layout=step_layout(["cpu"] * n, vae_device="cpu" if vae else None))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("n, vae", [(2, False), (3, False), (4, False), (4, True)])
def test_step_layout_gives_the_frames_of_one_process(tiny, inputs, single, n, vae):
    _, text, audio = inputs
    model = _load(tiny, inputs, n, vae)
    try:
        for settings in (STREAMING, OFFICIAL) if n != 4 or vae else (STREAMING,):
            got = [c.frames for c in generate(model, text, audio, tiny.image, settings)]
            assert _same(got, single[settings.mode]), (n, settings.mode)
    finally:
        model.close()
    assert all(p.poll() is not None for p in model.group.procs)


def test_cancel_then_resume_on_another_rank_count_completes_the_same_video(tiny, inputs, single, tmp_path):
    _, text, audio = inputs
    path, state = tmp_path / "video.mp4", tmp_path / "video.mp4.resume"
    model = _load(tiny, inputs, 2)
    try:
        stream = generate(model, text, audio, tiny.image, STREAMING, should_stop=lambda: stream.stats.blocks_done >= 3)
        head = []
        write_mp4(stream, path, on_chunk=lambda c: head.append(c.frames.copy()), resume_path=state)
    finally:
        model.close()
    assert not stream.finished and state.is_file()
    # The blocks in flight when the cancel came were finished (N - 1 in the pipeline, one being
    # decoded, one admitted while the cancel was seen), all on disk.
    assert 3 <= len(head) <= 3 + 3 and probe_mp4(path).frame_count == sum(map(len, head))
    assert _same(head, single["streaming"][:len(head)])
    # The resume file is the single-process format: its step caches come from both ranks.
    saved = load_resume_state(state)
    assert {k.split(".")[1] for k in saved["tensors"] if k.startswith("sampler.cache")} == {f"cache{i}" for i in range(4)}

    model = _load(tiny, inputs, 3)
    try:
        tail = []
        resumed = generate(model, text, audio, tiny.image, STREAMING, resume_from=state)
        write_mp4(resumed, path, on_chunk=lambda c: tail.append(c.frames.copy()), resume_path=state)
    finally:
        model.close()
    assert resumed.finished and not state.exists()
    assert _same(head + tail, single["streaming"])
    assert probe_mp4(path).frame_count == resumed.total_frames


def test_killed_rank_is_reported_at_once_and_leaves_a_playable_mp4(tiny, inputs, tmp_path):
    _, text, audio = inputs
    model = _load(tiny, inputs, 2)
    victim = model.group.procs[1]
    stream = generate(model, text, audio, tiny.image, STREAMING)
    killed = []

    def kill(chunk):
        if not killed:
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(time.monotonic())

    with pytest.raises(WorkerError) as err:
        write_mp4(stream, tmp_path / "killed.mp4", on_chunk=kill)
    assert time.monotonic() - killed[0] < 2.0
    e = err.value
    assert (e.rank, e.device) == (1, "cpu") and "SIGKILL" in e.cause and "rank 1 (cpu)" in str(e)
    assert all(p.poll() is not None for p in model.group.procs)  # no process left behind
    assert probe_mp4(tmp_path / "killed.mp4").frame_count > 0  # the chunks received before the death
    with pytest.raises(InputError, match="load the model again"):
        list(generate(model, text, audio, tiny.image, STREAMING))


def test_control_socket_refuses_a_client_without_the_key_then_stops_listening():
    group = WorkerGroup(step_layout(["cpu"] * 2))
    starting = threading.Thread(target=group.start)
    starting.start()
    while group._listener is None:
        time.sleep(0.001)
    address = group._listener.address
    # The workers take seconds to import torch: this client comes first, and is refused.
    with pytest.raises(AuthenticationError):
        Client(address, authkey=b"guess")
    starting.join(timeout=120)
    try:
        assert group.alive and all(c is not None for c in group.conns)
        with pytest.raises(ConnectionRefusedError):  # every rank is in: nothing else may connect
            Client(address, authkey=b"guess")
    finally:
        group.close()
    assert all(p.poll() is not None for p in group.procs)
