"""The parallel runtime with real worker processes over gloo on CPU ranks (tiny checkpoint, fp32).

Every run starts `python -m liveavatar_core.parallel.worker` processes through `WorkerGroup`,
exactly as on GPUs (there with NCCL): the step layout must give the frames of one process bit for
bit, cancel/resume must complete the same video (also on another rank count), and a killed rank
must be reported at once with no process left behind.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest
import torch

from liveavatar_core.cli import main
from liveavatar_core.encoders.audio import AudioEncoder
from liveavatar_core.encoders.text import TextEncoder
from liveavatar_core.errors import InputError, WorkerError
from liveavatar_core.loading import load_generator, official_folder
from liveavatar_core.parallel.group import WorkerGroup
from liveavatar_core.parallel.layout import layer_layout, step_layout
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
    out = {}
    for settings in (STREAMING, OFFICIAL):
        stream = generate(model, text, audio, tiny.image, settings)
        stream.track_resume = True
        out[settings.mode] = [c.frames for c in stream]
        out[settings.mode + " state"] = _sampler_tensors(stream)
    return out


def _sampler_tensors(stream) -> dict:
    """The sampler's tensors after the last block: the last clip's denoised latents, every step's
    KV cache, the condition (sink) cache, the motion latents."""
    state = stream.resume_state()
    return {k: v.clone() for k, v in state["tensors"].items() if k.startswith("sampler.")}


def _load(tiny, inputs, n, vae=False, shard="none"):
    folder = inputs[0]
    return load_parallel(folder.dit, folder.vae, tiny.lora, precision="fp32", shard=shard,
                         layout=step_layout(["cpu"] * n, vae_device="cpu" if vae else None))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("n, vae", [(2, False), (4, True)])
def test_fsdp_shards_the_weights_and_gives_the_frames_of_one_process(tiny, inputs, single, n, vae):
    _, text, audio = inputs
    whole = load_generator(inputs[0].dit, None, tiny.lora, precision="fp32").dit
    whole_bytes = sum(p.numel() * p.element_size() for p in whole.parameters())
    unit_bytes = sum(p.numel() * p.element_size() for layer in range(whole.cfg.num_layers)
                     for m in whole.unit_modules(layer) for p in m.parameters())
    model = _load(tiny, inputs, n, vae, shard="fsdp")
    try:
        assert "sharded over %d ranks (FSDP)" % n in model.description
        held = [s["dit_weight_bytes"] for s in model.rank_stats()[:n]]
        # Each DiT rank holds the base and a 1/n share of the units (FSDP pads a share by a few rows).
        assert all(abs(h - (whole_bytes - unit_bytes + unit_bytes / n)) < 0.02 * unit_bytes for h in held), held
        for settings in (STREAMING,):  # the gathers do not depend on the mode (the step tests cover both)
            stream = generate(model, text, audio, tiny.image, settings)
            assert _same([c.frames for c in stream], single[settings.mode]), (n, settings.mode)
            want, have = single[settings.mode + " state"], _sampler_tensors(stream)
            assert sorted(have) == sorted(want)
            assert all(torch.equal(have[k], want[k]) for k in want), [k for k in want
                                                                        if not torch.equal(have[k], want[k])]
    finally:
        model.close()
    assert all(p.poll() is not None for p in model.group.procs)


def test_fsdp_refusals(tiny, inputs):
    folder = inputs[0]
    for layout, words in ((layer_layout(["cpu"] * 2, 4), "layer layout"), (step_layout(["cpu"]), "has one")):
        with pytest.raises(InputError, match=words) as err:
            load_parallel(folder.dit, folder.vae, tiny.lora, precision="fp32", shard="fsdp", layout=layout)
        assert err.value.input_name == "shard"
    with pytest.raises(InputError, match="unknown value 'zero3'"):
        load_parallel(folder.dit, folder.vae, tiny.lora, precision="fp32", shard="zero3",
                      layout=step_layout(["cpu"] * 2))


@pytest.mark.parametrize("n, vae", [(2, False), (3, False), (4, False), (4, True)])
def test_step_layout_gives_the_frames_of_one_process(tiny, inputs, single, n, vae):
    _, text, audio = inputs
    model = _load(tiny, inputs, n, vae)
    try:
        for settings in (STREAMING, OFFICIAL) if n != 4 or vae else (STREAMING,):
            stream = generate(model, text, audio, tiny.image, settings)
            got = [c.frames for c in stream]
            assert _same(got, single[settings.mode]), (n, settings.mode)
            # The latents and caches, not only the decoded frames: torch.equal, tensor by tensor.
            want, have = single[settings.mode + " state"], _sampler_tensors(stream)
            assert sorted(have) == sorted(want) and any("latents" in k for k in want)
            assert all(torch.equal(have[k], want[k]) for k in want), [k for k in want if not torch.equal(have[k], want[k])]
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


# --- command line ------------------------------------------------------------------------------------

def _cli(tiny, save_file, *extra) -> list[str]:
    return ["generate", "--ckpt_dir", str(tiny.ckpt_dir), "--lora_path_dmd", str(tiny.lora), "--image",
            str(tiny.image), "--audio", str(tiny.audio), "--prompt", tiny.prompt, "--save_file", str(save_file),
            "--size", STREAMING.size, "--num_clip", str(CLIPS), "--base_seed", str(STREAMING.seed),
            "--device", "cpu", "--precision", "fp32", *extra]


def test_cli_ctrl_c_stops_every_rank_then_resumes_on_another_rank_count(tiny, tmp_path):
    reference, out, log = tmp_path / "one.mp4", tmp_path / "out" / "clip.mp4", tmp_path / "log.txt"
    assert main(_cli(tiny, reference)) == 0
    total = probe_mp4(reference).frame_count

    # Ctrl-C (SIGINT to the CLI only: the workers run in sessions of their own, as from a
    # terminal) once the first block is logged: exit 130 within a block period or so, every rank
    # gone, a playable MP4 of the finished blocks and a resume file.
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "liveavatar_core", *_cli(tiny, out, "--devices", "cpu,cpu")],
                                stdout=f, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while "clip 0 block 0:" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
    assert time.monotonic() - t0 < 10
    assert not any(_exists(pid) for pid in workers)
    state = out.with_name(out.name + ".resume")
    assert state.is_file() and f"--resume {state}" in log.read_text()
    assert 0 < probe_mp4(out).frame_count < total

    # The same command on three ranks with --resume completes the video of one process.
    assert main(_cli(tiny, out, "--devices", "cpu,cpu,cpu", "--resume", str(state))) == 0
    assert not state.exists()
    a, b = probe_mp4(reference, max_frames=total), probe_mp4(out, max_frames=total)
    assert b.frame_count == a.frame_count == total
    np.testing.assert_array_equal(b.frames, a.frames)


def _children(pid: int) -> list[int]:
    """The worker processes a CLI started (they are in sessions of their own, still its children)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_plan_command_for_hardware_not_present(tiny, capsys):
    base = ["plan", "--ckpt_dir", str(tiny.ckpt_dir), "--lora_path_dmd", str(tiny.lora), "--image", str(tiny.image),
            "--audio", str(tiny.audio), "--prompt", "hi"]
    assert main([*base, "--gpu_count", "4", "--gpu_memory_gib", "24", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 4 and [r["steps"] for r in plan["ranks"]] == [[0], [1], [2], [3]]
    assert plan["fits"] and plan["fps"] > 0 and all(r["planned_bytes"] <= r["budget_bytes"] for r in plan["ranks"])
    assert main([*base, "--gpu_count", "5", "--gpu_memory_gib", "80"]) == 0
    text = capsys.readouterr().out
    assert "fits:" in text and "rank 4 (cuda:4): VAE" in text and "FPS" in text
    # The official five-GPU command line plans the official 4 + 1 layout.
    assert main([*base, "--num_gpus_dit", "4", "--enable_vae_parallel", "--gpu_count", "5", "--gpu_memory_gib", "80",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [r["steps"] for r in plan["ranks"]] == [[0], [1], [2], [3], []] and plan["ranks"][4]["vae"]
    assert main([*base, "--gpu_count", "3", "--gpu_memory_gib", "24", "--layout", "layers", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"] == "layers" and [r["steps"] for r in plan["ranks"]] == [[0, 1, 2, 3]] * 3
    assert [r["layers"] for r in plan["ranks"]] == [[0, 2], [2, 3], [3, 4]]  # the tiny DiT's 4 layers
    # The official --dit_fsdp is --shard fsdp: the tiny DiT's units sharded over the 4 ranks.
    assert main([*base, "--gpu_count", "4", "--gpu_memory_gib", "24", "--dit_fsdp", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["shard"] == "fsdp" and all(r["plan"]["shards"] == 4 for r in plan["ranks"])
    assert main([*base, "--gpu_count", "3", "--gpu_memory_gib", "24", "--layout", "layers", "--shard", "fsdp"]) == 2
    assert "error: shard:" in capsys.readouterr().err
    assert main([*base, "--gpu_count", "2", "--gpu_memory_gib", "24", "--devices", "cuda:0,cuda:2"]) == 2
    assert "cuda:2 does not exist" in capsys.readouterr().err
    assert main(["generate", *base[1:], "--gpu_count", "2", "--gpu_memory_gib", "24"]) == 2  # not these GPUs
    assert "error: gpu_count:" in capsys.readouterr().err


def test_workers_exit_when_their_controller_dies(tiny):
    """A controller killed outright (ComfyUI or the CLI, SIGKILL: no atexit runs) leaves no worker:
    each rank exits when its control socket closes."""
    script = (f"import time\nfrom liveavatar_core.loading import official_folder\n"
              f"from liveavatar_core.parallel.layout import layer_layout, step_layout\n"
              f"from liveavatar_core.parallel.remote import load_parallel\n"
              f"folder = official_folder({str(tiny.ckpt_dir)!r})\n"
              f"model = load_parallel(folder.dit, folder.vae, {str(tiny.lora)!r}, precision='fp32', "
              f"layout=step_layout(['cpu', 'cpu']))\nprint('ready', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == b"ready"
        workers = _children(proc.pid)
        assert len(workers) == 2 and all(map(_exists, workers))
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while any(map(_exists, workers)):
        assert time.monotonic() < deadline, "a worker outlived its controller"
        time.sleep(0.05)


def test_cli_attaches_to_ranks_launched_by_torchrun(tiny, tmp_path, monkeypatch):
    """generate --attach starts no worker: two ranks torchrun launched join with the authkey, make
    the one-process video, and exit when the run ends."""
    reference, out = tmp_path / "one.mp4", tmp_path / "attached.mp4"
    assert main(_cli(tiny, reference)) == 0
    key = secrets.token_hex(32)
    port = _free_port()
    repo = Path(__file__).resolve().parents[1]
    # torchrun gives each rank one CPU thread unless told otherwise; CPU ranks with another thread
    # count than the one-process run sum their matrix products in another order.
    env = dict(os.environ, LIVEAVATAR_CONTROL=f"127.0.0.1:{port}", LIVEAVATAR_AUTHKEY=key, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(repo), OMP_NUM_THREADS=str(torch.get_num_threads()))
    ranks = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "liveavatar_core.parallel.worker"], env=env, cwd=repo,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        monkeypatch.setenv("LIVEAVATAR_AUTHKEY", key)
        assert main(_cli(tiny, out, "--devices", "cpu,cpu", "--attach", f"127.0.0.1:{port}")) == 0
        assert ranks.wait(timeout=30) == 0
    finally:
        if ranks.poll() is None:
            ranks.kill()
        log = ranks.communicate()[0].decode(errors="replace")
    a, b = probe_mp4(reference, max_frames=10 ** 4), probe_mp4(out, max_frames=10 ** 4)
    assert b.frame_count == a.frame_count > 0, log[-3000:]
    np.testing.assert_array_equal(b.frames, a.frames)
    monkeypatch.delenv("LIVEAVATAR_AUTHKEY")
    assert main(_cli(tiny, out, "--devices", "cpu,cpu", "--attach", f"127.0.0.1:{port}")) == 2  # no key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gpu_worker_environment(monkeypatch):
    """A GPU rank sees only its GPU, without ComfyUI's cudaMallocAsync (NCCL runs out of memory
    under it) and, unless the user chose an allocator setting, with expandable segments."""
    group = WorkerGroup(step_layout(["cuda:1", "cuda:3"]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    env = group._env(1, "127.0.0.1:1")
    assert env["CUDA_VISIBLE_DEVICES"] == "7" and env["LIVEAVATAR_DEVICE"] == "cuda:0"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,backend:cudaMallocAsync")
    assert group._env(0, "127.0.0.1:1")["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
