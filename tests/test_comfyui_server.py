"""The pack inside a real ComfyUI server (skipped unless COMFYUI_DIR points at a ComfyUI checkout).

Starts `main.py --cpu` with a temporary base directory: the repository linked into custom_nodes,
the fixture checkpoints under models/liveavatar, the fixture inputs in input/. COMFYUI_PYTHON
selects the interpreter (ComfyUI needs torch, torchvision and torchaudio of matching versions).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.test_nodes_support import REPO, models_tree

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
PACK = "liveavatar"
NODE_IDS = {"LiveAvatarModelLoader", "LiveAvatarTextEncode", "LiveAvatarAudioEncode", "LiveAvatarSampler",
            "LiveAvatarVideoWriter"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    return json.load(urllib.request.urlopen(url, timeout=30))


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        response = urllib.request.urlopen(request, timeout=30)
        return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@pytest.fixture(scope="module")
def server(tmp_path_factory, fixtures):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    models_tree(base, fixtures)
    shutil.copytree(fixtures / "inputs", base / "input")
    port = _free_port()
    log_path = base / "comfyui.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", str(base), "--disable-auto-launch"],
                                cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            _get(f"{url}/system_stats")
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("ComfyUI did not start:\n" + log_path.read_text()[-4000:])
            time.sleep(1)
    yield url, base, log_path
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _small_prompt(name: str, num_clips: int = 1) -> dict:
    prompt = json.loads((REPO / "workflows" / "api" / name).read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadImage":
            inputs["image"] = "ref_image.png"
        elif node["class_type"] == "LoadAudio":
            inputs["audio"] = "audio.wav"
        elif node["class_type"] == "LiveAvatarModelLoader":
            inputs["precision"] = "fp32"
        elif node["class_type"] == "LiveAvatarSampler":
            inputs.update(size="custom", custom_width=64, custom_height=64, num_clips=num_clips)
    return prompt


def _wait(url: str, prompt_id: str, timeout_s: float = 600) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout_s} s")


def test_pack_loads_and_registers_every_node(server):
    url, _, log_path = server
    info = _get(f"{url}/object_info")
    assert NODE_IDS <= set(info)
    assert all(info[n]["python_module"] == f"custom_nodes.{PACK}" for n in NODE_IDS)
    assert "IMPORT FAILED" not in log_path.read_text()
    assert any(PACK in e for e in _get(f"{url}/extensions"))


def test_invalid_setting_is_refused_at_queue_time(server):
    url, _, _ = server
    prompt = _small_prompt("liveavatar_basic.json")
    prompt["6"]["inputs"]["frames_per_clip"] = 50
    status, body = _post(f"{url}/prompt", {"prompt": prompt})
    assert status == 400
    assert "frames_per_clip" in json.dumps(body["node_errors"]["6"])


def test_api_workflow_runs_through_prompt_and_history(server):
    from tests.test_nodes_support import load_pack, pack_module

    url, base, _ = server
    status, body = _post(f"{url}/prompt", {"prompt": _small_prompt("liveavatar_basic.json")})
    assert status == 200, body
    entry = _wait(url, body["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    (file,) = entry["outputs"]["7"]["images"]
    data = urllib.request.urlopen(f"{url}/view?{urllib.parse.urlencode(file)}").read()
    path = base / "output" / file["subfolder"] / file["filename"]
    assert path.read_bytes() == data
    probe = pack_module(load_pack(), "liveavatar_core.video").probe_mp4(path)
    assert probe.frame_count > 0 and probe.has_audio


def test_cancel_stops_and_leaves_a_playable_file(server):
    from tests.test_nodes_support import load_pack, pack_module

    url, base, _ = server
    status, body = _post(f"{url}/prompt", {"prompt": _small_prompt("liveavatar_long_streaming.json", 0)})
    assert status == 200, body
    folder = base / "output" / "video"
    deadline = time.time() + 600
    while not any(p.stat().st_size > 2048 for p in folder.glob("LiveAvatar_long_*.mp4")):
        assert time.time() < deadline, "the writer never started"
        time.sleep(0.2)
    _post(f"{url}/interrupt", {})
    entry = _wait(url, body["prompt_id"], 120)
    events = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in events
    (path,) = folder.glob("LiveAvatar_long_*.mp4")
    assert pack_module(load_pack(), "liveavatar_core.video").probe_mp4(path).frame_count > 0
