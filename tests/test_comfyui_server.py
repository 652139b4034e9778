"""The pack inside a real ComfyUI server (skipped unless COMFYUI_DIR points at a ComfyUI checkout).

Starts `main.py --cpu` on 127.0.0.1 with a temporary base directory: the repository linked into
custom_nodes (under the folder name a clone gets, ComfyUI-LiveAvatar), the fixture checkpoints
under models/liveavatar and as single files in ComfyUI's standard model folders, the fixture inputs
in input/ (with a long copy of the speech for the cancel test; the pack itself adds the example
inputs the workflows name), and the database, so the ComfyUI checkout is left untouched.
COMFYUI_FRONTEND_ROOT serves another frontend than the pinned one (e.g. the static/ folder of the
newest comfyui-frontend-package). COMFYUI_PYTHON selects the interpreter (ComfyUI needs torch,
torchvision and torchaudio of matching versions); scripts/comfyui_integration.sh builds such an
environment.

The example workflows are taken as the frontend takes them: fetched from ComfyUI's template
route and turned into prompts with the server's /object_info (widget values by position).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import wave
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.test_nodes_support import API_DIR, REPO, UI_FILES, VIDEO_FILES, load_pack, models_tree, pack_module

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
# The folder name a `git clone` gives: not a Python identifier and not the pyproject name, so
# anything that registers the pack twice under two names shows here.
PACK = "ComfyUI-LiveAvatar"
# Another frontend than the pinned one (e.g. the newest comfyui-frontend-package's static/ folder).
FRONTEND_ROOT = os.environ.get("COMFYUI_FRONTEND_ROOT")
NODE_IDS = {"LiveAvatarModelLoader", "LiveAvatarTextEncode", "LiveAvatarAudioEncode", "LiveAvatarSampler",
            "LiveAvatarVideoWriter", "LiveAvatarReleaseGPUs", "LiveAvatarLiveSession"}
FRONTEND_ONLY = {"MarkdownNote", "Note", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# Widgets the frontend adds after an input, which hold a slot in `widgets_values` but are not
# sent to the server: the seed's "control after generate" and the upload button (and, for
# audio, the player) of LoadImage/LoadAudio.
EXTRA_SLOTS = {"control_after_generate": 1, "image_upload": 1, "audio_upload": 2}
SEED_NAMES = ("seed", "noise_seed")
LONG_AUDIO = "liveavatar_long_speech.wav"
# Long enough that the tiny model cannot finish before the cancel arrives.
LONG_AUDIO_S = 60.0


class Server(NamedTuple):
    url: str
    base: Path  # the --base-directory
    log: Path
    standard: dict[str, str]  # input name -> choice of a file in ComfyUI's standard model folders


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


def _tiled_wav(source: Path, target: Path, seconds: float) -> None:
    """`source` repeated until it lasts at least `seconds` (same rate, width and channels)."""
    with wave.open(str(source)) as src:
        params, data = src.getparams(), src.readframes(src.getnframes())
    repeats = math.ceil(seconds * params.framerate / params.nframes)
    with wave.open(str(target), "wb") as dst:
        dst.setparams(params)
        dst.writeframes(data * repeats)


def _example_inputs(base: Path, fixtures: Path) -> None:
    """The fixture inputs under their own names, and a long speech for the cancel test. The names
    the example workflows use are left to the pack, which copies its example inputs in when it loads."""
    shutil.copytree(fixtures / "inputs", base / "input")
    _tiled_wav(fixtures / "inputs" / "audio.wav", base / "input" / LONG_AUDIO, LONG_AUDIO_S)


def _standard_folders(base: Path, fixtures: Path) -> dict[str, str]:
    """The fixture's DiT, LoRA, VAE and T5 as single files in ComfyUI's own model folders, the way
    users keep them; returns the loader/encoder choices that name them. The DiT shards are merged
    into one file with its config.json beside it (a non-14B DiT needs one)."""
    from safetensors.torch import load_file, save_file

    pack = load_pack()
    official = fixtures / "ckpt" / "Wan2.2-S2V-14B"
    index = json.loads((official / pack_module(pack, "liveavatar_core.weights.dit").OFFICIAL_INDEX).read_text())
    merged = {}
    for shard in sorted(set(index["weight_map"].values())):
        merged.update(load_file(official / shard))
    models = base / "models"
    names = {"dit": "liveavatar_dit.safetensors", "lora": "liveavatar_lora.safetensors",
             "vae": pack_module(pack, "liveavatar_core.loading").VAE_FILE,
             "t5_encoder": pack_module(pack, "nodes.encoders").T5_MEMBER}
    for folder in ("diffusion_models", "loras", "vae", "text_encoders"):
        (models / folder).mkdir(parents=True)
    save_file(merged, models / "diffusion_models" / names["dit"])
    shutil.copy(official / "config.json", models / "diffusion_models" / "liveavatar_dit.json")
    (models / "loras" / names["lora"]).symlink_to(fixtures / "ckpt" / "LiveAvatar" / "liveavatar.safetensors")
    (models / "vae" / names["vae"]).symlink_to(official / names["vae"])
    (models / "text_encoders" / names["t5_encoder"]).symlink_to(official / names["t5_encoder"])
    return names


@pytest.fixture(scope="module")
def server(tmp_path_factory, fixtures):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    models_tree(base, fixtures)
    standard = _standard_folders(base, fixtures)
    _example_inputs(base, fixtures)
    port = _free_port()
    log_path = base / "comfyui.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", str(base), "--disable-auto-launch",
                                 "--database-url", f"sqlite:///{base / 'comfyui.db'}",
                                 *(["--front-end-root", FRONTEND_ROOT] if FRONTEND_ROOT else [])],
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
    yield Server(url, base, log_path, standard)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def object_info(server):
    return _get(f"{server.url}/object_info")


def _entries(definition: dict) -> list[tuple[str, str | list, dict]]:
    """(name, type, options) of a node's inputs in the order the frontend makes its widgets."""
    spec, order = definition["input"], definition["input_order"]
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            entry = spec[section][name]
            out.append((name, entry[0], entry[1] if len(entry) > 1 else {}))
    return out


def _is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES or kind == "COMBO"


def ui_to_api(graph: dict, info: dict) -> dict:
    """The prompt the frontend queues for `graph`, mapping widget values with the server's definitions."""
    links = {link[0]: link for link in graph["links"]}
    prompt = {}
    for node in graph["nodes"]:
        if node["type"] in FRONTEND_ONLY or node["mode"] in (2, 4):
            continue
        assert node["type"] in info, f"the server has no node {node['type']} (the UI would show it missing)"
        values, inputs = list(node["widgets_values"]), {}
        for name, kind, options in _entries(info[node["type"]]):
            if not _is_widget(kind):
                continue
            assert values, f"{node['type']}: no widget value left for {name}"
            inputs[name] = values.pop(0)
            extra = sum(n for key, n in EXTRA_SLOTS.items() if options.get(key))
            if kind == "INT" and name in SEED_NAMES and not options.get("control_after_generate"):
                extra += 1
            del values[:extra]
        assert not values, f"{node['type']}: {len(values)} widget values left over"
        for socket_ in node["inputs"]:
            if socket_.get("link") is not None:
                link = links[socket_["link"]]
                inputs[socket_["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _served_graph(url: str, path: Path) -> dict:
    return _get(f"{url}/api/workflow_templates/{PACK}/{urllib.parse.quote(path.name)}")


def _small(prompt: dict, audio: str | None = None, num_clips: int = 1) -> dict:
    """`prompt` at the smallest area, one DiT block per clip, a precision a CPU runs (this server runs --cpu)."""
    pack = load_pack()
    side = pack_module(pack, "liveavatar_core.encoders.image").DIVISOR
    block_frames = pack_module(pack, "liveavatar_core.encoders.audio").FRAMES_PER_BLOCK
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadAudio" and audio is not None:
            inputs["audio"] = audio
        elif node["class_type"] == "LiveAvatarModelLoader":
            # fp32 is fastest on a CPU; FP8 KV caches need a bf16 DiT, which a CPU also runs.
            inputs["precision"] = "bf16" if inputs["kv_cache_dtype"] == "fp8" else "fp32"
        elif node["class_type"] == "LiveAvatarAudioEncode":
            inputs["frames_per_clip"] = block_frames
        elif node["class_type"] == "LiveAvatarSampler":
            inputs.update(size="custom", custom_width=side, custom_height=side, num_clips=num_clips,
                          frames_per_clip=block_frames)
    return prompt


def _writer_id(prompt: dict) -> str:
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == "LiveAvatarVideoWriter"]
    return nid


def _wait(url: str, prompt_id: str, timeout_s: float = 600) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.2)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout_s} s")


def _check_video(url: str, base: Path, entry: dict, writer: str, frames: int | None = None) -> Path:
    """The writer's ui entry names an MP4 in output/ that /view serves and that plays with audio."""
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = entry["outputs"][writer]
    assert out["animated"] == [True]
    (file,) = out["images"]
    path = base / "output" / file["subfolder"] / file["filename"]
    response = urllib.request.urlopen(f"{url}/view?{urllib.parse.urlencode(file)}")
    assert response.headers["Content-Type"] == "video/mp4"  # what the node's <video> player needs
    assert response.read() == path.read_bytes()
    probe = pack_module(load_pack(), "liveavatar_core.video").probe_mp4(path)
    assert probe.has_audio and probe.frame_count > 0
    if frames is not None:
        assert probe.frame_count == frames
    return path


def test_pack_loads_and_registers_every_node(server, object_info):
    log_path = server.log
    assert NODE_IDS <= set(object_info)
    assert all(object_info[n]["python_module"] == f"custom_nodes.{PACK}" for n in NODE_IDS)
    log = log_path.read_text()
    assert "IMPORT FAILED" not in log and "Live Avatar: node" not in log, log
    assert "Traceback" not in log.split("Starting server")[0], log


def test_example_inputs_are_in_the_input_folder(server):
    """A fresh install: the pictures and speech the templates name are in input/ once the pack has
    loaded (the workflow runs below use them), and ComfyUI lists them for Load Image / Load Audio."""
    shipped = sorted((REPO / "example_inputs").iterdir())
    assert shipped
    for path in shipped:
        assert (server.base / "input" / path.name).read_bytes() == path.read_bytes()
    info = _get(f"{server.url}/object_info/LoadImage")["LoadImage"]["input"]["required"]["image"][0]
    assert "liveavatar_reference.png" in info


def test_web_extension_is_listed_and_served(server):
    url = server.url
    # Once, under the folder name: a second copy (e.g. under the pyproject name) would register
    # every extension twice in the browser.
    project = re.search(r'^name = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    extensions = _get(f"{url}/extensions")
    assert not [e for e in extensions if e.startswith(f"/extensions/{project}/")], extensions
    ours = [e for e in extensions if e.startswith(f"/extensions/{PACK}/")]
    assert sorted(ours) == sorted(f"/extensions/{PACK}/{p.relative_to(REPO / 'web').as_posix()}"
                                  for p in (REPO / "web").rglob("*.js"))
    for route in ours:
        response = urllib.request.urlopen(url + route)
        assert "javascript" in response.headers["Content-Type"]
        assert response.read() == (REPO / "web" / route.split("/", 3)[3]).read_bytes()


# Stands in for the browser: the frontend's shims read `window.comfyAPI`; this records what our
# extension registers through them.
_EXTENSION_HOST = """
const registered = [];
globalThis.window = { comfyAPI: {
  app: { app: { registerExtension: (ext) => registered.push(ext) } },
  api: { api: { addEventListener: () => {}, apiURL: (p) => p } } } };
for (const module of process.argv.slice(2)) await import(module);
console.log(JSON.stringify(registered.map((e) => e.name)));
"""
_IMPORT_RE = re.compile(r"""^\s*import\s[^;]*?from\s+["']([^"']+)["']""", re.M)


def test_web_extension_modules_resolve_on_the_server(server, tmp_path):
    """Each extension file, with the modules it imports as the server serves them (the frontend's
    shims included), links and runs as an ES module and registers an extension."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    url = server.url
    routes = [e for e in _get(f"{url}/extensions") if e.startswith(f"/extensions/{PACK}/")]
    pending, saved = list(routes), {}
    while pending:
        route = pending.pop()
        if route in saved:
            continue
        text = urllib.request.urlopen(url + route).read().decode()
        saved[route] = tmp_path / "root" / route.lstrip("/")
        saved[route].parent.mkdir(parents=True, exist_ok=True)
        saved[route].with_suffix(".mjs").write_text(re.sub(r"\.js([\"'])", r".mjs\1", text))
        pending += [urllib.parse.urlparse(urllib.parse.urljoin(url + route, spec)).path
                    for spec in _IMPORT_RE.findall(text) if spec.startswith(".")]
    host = tmp_path / "host.mjs"
    host.write_text(_EXTENSION_HOST)
    result = subprocess.run([node, str(host), *(saved[r].with_suffix(".mjs").as_uri() for r in routes)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(names) == len(routes) and all(n.startswith("liveavatar.") for n in names), names


def test_example_workflows_are_offered_as_templates(server):
    url = server.url
    assert sorted(_get(f"{url}/workflow_templates")[PACK]) == sorted(p.stem for p in UI_FILES)
    for path in UI_FILES:
        assert _served_graph(url, path) == json.loads(path.read_text())


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_widgets_are_accepted_by_the_server(server, object_info, path):
    """Widget values map onto the server's inputs, lie in its choices and ranges, links join
    matching types, and the result is the API twin we ship."""
    url = server.url
    graph = _served_graph(url, path)
    prompt = ui_to_api(graph, object_info)
    twin = json.loads((API_DIR / path.name).read_text())
    assert prompt == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in twin.items()}
    for nid, node in prompt.items():
        for name, kind, options in _entries(object_info[node["class_type"]]):
            value = node["inputs"].get(name)
            if isinstance(value, list) and not isinstance(kind, list):
                source = prompt[value[0]]["class_type"]
                assert object_info[source]["output"][value[1]] == kind, f"{nid}.{name}: link type"
            elif isinstance(kind, list):
                assert value in kind, f"{nid}.{name}: {value!r} is not offered by the server"
            elif kind in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value), f"{nid}.{name}"


@pytest.mark.parametrize("path", VIDEO_FILES, ids=lambda p: p.stem)
def test_ui_workflow_runs_through_prompt_and_history(server, object_info, path):
    url, base = server.url, server.base
    graph = _served_graph(url, path)
    prompt = _small(ui_to_api(graph, object_info))
    status, body = _post(f"{url}/prompt", {"prompt": prompt, "extra_data": {"extra_pnginfo": {"workflow": graph}}})
    assert status == 200, body
    pack = load_pack()
    frames = (pack_module(pack, "liveavatar_core.encoders.audio").FRAMES_PER_BLOCK
              - pack_module(pack, "liveavatar_core.pipeline").DROPPED_START_FRAMES)
    _check_video(url, base, _wait(url, body["prompt_id"]), _writer_id(prompt), frames)


def test_writer_outputs_feed_core_nodes(server, object_info):
    """VIDEO goes into core SaveVideo (a copy with audio and the same frames), IMAGE into PreviewImage."""
    url, base = server.url, server.base
    prompt = _small(ui_to_api(_served_graph(url, UI_FILES[0]), object_info))
    writer = _writer_id(prompt)
    prompt[writer]["inputs"].update(filename_prefix="video/LiveAvatar_core", return_frames=2)
    prompt["save"] = {"class_type": "SaveVideo", "inputs": {"video": [writer, 0], "filename_prefix": "video/core",
                                                              "format": "auto", "codec": "auto"}}
    prompt["preview"] = {"class_type": "PreviewImage", "inputs": {"images": [writer, 1]}}
    status, body = _post(f"{url}/prompt", {"prompt": prompt})
    assert status == 200, body
    entry = _wait(url, body["prompt_id"])
    ours = _check_video(url, base, entry, writer)
    (saved,) = entry["outputs"]["save"]["images"]
    probe_mp4 = pack_module(load_pack(), "liveavatar_core.video").probe_mp4
    copy = probe_mp4(base / "output" / saved["subfolder"] / saved["filename"], max_frames=0)
    assert copy.has_audio and copy.frame_count == probe_mp4(ours, max_frames=0).frame_count
    assert len(entry["outputs"]["preview"]["images"]) == 2


# How the UI names our error type: the core's module, not the install's folder path.
ERROR_TYPE = "liveavatar_core.errors.InputError"


def test_invalid_settings_are_refused_at_queue_time(server, object_info):
    """HTTP 400 with one error on the node at fault, whose message starts with the input's name,
    for rules of ours, for declared ranges that ComfyUI leaves to a node's VALIDATE_INPUTS, and
    for the frames_per_clip of Audio Encode and Sampler disagreeing."""
    url = server.url
    prompt = json.loads((API_DIR / UI_FILES[0].name).read_text())
    by_type = {v["class_type"]: k for k, v in prompt.items()}
    limits = {name: options for name, _, options in _entries(object_info["LiveAvatarSampler"])}
    step, default = limits["frames_per_clip"]["step"], limits["frames_per_clip"]["default"]
    # (node changed, input, value, node at fault, input named by the message)
    cases = [("LiveAvatarSampler", "frames_per_clip", step + 1, "LiveAvatarSampler", "frames_per_clip"),
             ("LiveAvatarAudioEncode", "frames_per_clip", step + 1, "LiveAvatarAudioEncode", "frames_per_clip"),
             ("LiveAvatarSampler", "ref_offset", limits["ref_offset"]["max"] + 1, "LiveAvatarSampler", "ref_offset"),
             ("LiveAvatarSampler", "custom_width", limits["custom_width"]["max"] + limits["custom_width"]["step"],
              "LiveAvatarSampler", "custom_width"),
             ("LiveAvatarModelLoader", "dit_device", "cuda:7", "LiveAvatarModelLoader", "dit_device"),
             ("LiveAvatarTextEncode", "device", "cuda:7", "LiveAvatarTextEncode", "device"),
             # Valid alone: only with the Sampler's 48 is it wrong, and the Sampler reports it.
             ("LiveAvatarAudioEncode", "frames_per_clip", 2 * default, "LiveAvatarSampler", "frames_per_clip")]
    for class_type, name, value, fault_node, fault in cases:
        bad = json.loads(json.dumps(prompt))
        bad[by_type[class_type]]["inputs"][name] = value
        status, body = _post(f"{url}/prompt", {"prompt": bad})
        assert status == 400, (class_type, name, body)
        assert list(body["node_errors"]) == [by_type[fault_node]], body["node_errors"]
        (error,) = body["node_errors"][by_type[fault_node]]["errors"]  # once, not once per input of the node
        assert error["details"].split(" - ", 1)[-1].startswith(f"{fault}: "), error
        assert error["extra_info"]["exception_type"] == ERROR_TYPE, error


def test_models_from_comfyui_standard_folders(server, object_info):
    """Single files in diffusion_models, loras, vae and text_encoders are offered and load."""
    url, base, standard = server.url, server.base, server.standard
    prompt = _small(ui_to_api(_served_graph(url, UI_FILES[0]), object_info))
    writer = _writer_id(prompt)
    prompt[writer]["inputs"]["filename_prefix"] = "video/LiveAvatar_standard"
    for node in prompt.values():
        for name, value in standard.items():
            if name in node["inputs"]:
                assert value in object_info[node["class_type"]]["input"]["required"][name][0]
                node["inputs"][name] = value
    status, body = _post(f"{url}/prompt", {"prompt": prompt})
    assert status == 200, body
    _check_video(url, base, _wait(url, body["prompt_id"]), writer)


def test_error_while_running_names_our_node_and_input(server, object_info):
    """A refusal that only running can find (an output name leaving output/) is an execution error
    of that node, with our clean type name and a message that names the input and the fix."""
    url = server.url
    prompt = _small(ui_to_api(_served_graph(url, UI_FILES[0]), object_info))
    prompt[_writer_id(prompt)]["inputs"]["filename_prefix"] = "../outside/LiveAvatar"
    status, body = _post(f"{url}/prompt", {"prompt": prompt})
    assert status == 200, body
    entry = _wait(url, body["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_type"] == "LiveAvatarVideoWriter" and error["exception_type"] == ERROR_TYPE
    assert error["exception_message"].startswith("filename_prefix: ") and "Fix: " in error["exception_message"]


def test_writer_reruns_on_a_cached_stream(server, object_info):
    """Only the file name changes: ComfyUI reuses every upstream output, the sampler's stream
    included, and the writer must still produce the whole video again."""
    url, base = server.url, server.base
    prompt = _small(ui_to_api(_served_graph(url, UI_FILES[0]), object_info))
    writer = _writer_id(prompt)
    paths = []
    for prefix in ("video/LiveAvatar_first", "video/LiveAvatar_again"):
        prompt[writer]["inputs"]["filename_prefix"] = prefix
        status, body = _post(f"{url}/prompt", {"prompt": prompt})
        assert status == 200, body
        entry = _wait(url, body["prompt_id"])
        paths.append(_check_video(url, base, entry, writer))
    cached = [m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"]
    assert cached and set(prompt) - {writer} <= set(cached[0])
    probe = pack_module(load_pack(), "liveavatar_core.video").probe_mp4
    assert probe(paths[0]).frame_count == probe(paths[1]).frame_count


def test_progress_previews_and_video_reach_the_websocket(server, object_info):
    aiohttp = pytest.importorskip("aiohttp")
    url = server.url
    prompt = _small(ui_to_api(_served_graph(url, UI_FILES[0]), object_info), num_clips=2)
    writer = _writer_id(prompt)
    prompt[writer]["inputs"]["filename_prefix"] = "video/LiveAvatar_ws"
    client_id = uuid.uuid4().hex

    async def run() -> tuple[list[dict], int]:
        messages, binary = [], 0
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client_id}") as ws:
                status, body = _post(f"{url}/prompt", {"prompt": prompt, "client_id": client_id})
                assert status == 200, body
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        binary += 1
                        continue
                    data = json.loads(msg.data)
                    messages.append(data)
                    if data["type"] in ("execution_success", "execution_error") and \
                            data["data"]["prompt_id"] == body["prompt_id"]:
                        return messages, binary
        raise AssertionError("the websocket closed before the prompt ended")

    messages, previews = asyncio.run(asyncio.wait_for(run(), 600))
    kinds = [m["type"] for m in messages]
    assert "execution_success" in kinds, messages[-3:]
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == writer]
    status = [m["data"] for m in messages if m["type"] == "liveavatar.status"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == len(status) >= 2
    assert previews >= len(status)
    assert [s["blocks_done"] for s in status] == list(range(1, len(status) + 1))
    (executed,) = [m["data"] for m in messages if m["type"] == "executed" and m["data"]["node"] == writer]
    assert executed["output"]["animated"] == [True]
    assert executed["output"]["images"][0]["filename"].startswith("LiveAvatar_ws")


def test_cancel_stops_within_a_block_and_leaves_a_playable_file(server, object_info):
    url, base = server.url, server.base
    pack = load_pack()
    probe_mp4 = pack_module(pack, "liveavatar_core.video").probe_mp4
    block_frames = pack_module(pack, "liveavatar_core.encoders.audio").FRAMES_PER_BLOCK
    graph = _served_graph(url, next(p for p in UI_FILES if "long" in p.stem))
    prompt = _small(ui_to_api(graph, object_info), audio=LONG_AUDIO, num_clips=0)
    writer = _writer_id(prompt)
    prompt[writer]["inputs"]["filename_prefix"] = "video/LiveAvatar_cancel"
    queued = time.time()
    status, body = _post(f"{url}/prompt", {"prompt": prompt})
    assert status == 200, body
    folder = base / "output" / "video"
    deadline = time.time() + 600
    frames_asked = 0
    while not frames_asked:  # the fragmented file is readable while it grows
        assert time.time() < deadline, "the writer never wrote a block"
        time.sleep(0.1)
        files = list(folder.glob("LiveAvatar_cancel_*.mp4"))
        if files and files[0].stat().st_size > 0:
            frames_asked = probe_mp4(files[0], max_frames=0).frame_count
    asked = time.time()
    _post(f"{url}/interrupt", {})
    entry = _wait(url, body["prompt_id"], 120)
    stop_s = time.time() - asked
    events = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in events and "execution_success" not in events
    (path,) = folder.glob("LiveAvatar_cancel_*.mp4")
    probe = probe_mp4(path, max_frames=0, decode_audio=True)
    print(f"cancel: first block on disk {asked - queued:.1f} s after queueing; stopped {stop_s:.2f} s after "
          f"/interrupt with {probe.frame_count - frames_asked} more frames ({probe.frame_count} in all)")
    # The block being sampled when Cancel came is finished and written, nothing after it; the file
    # lagged the stream by the chunks waiting for the encoder thread and the one it was encoding.
    in_flight = pack_module(pack, "liveavatar_core.pipeline").WRITE_QUEUE_CHUNKS + 1
    assert frames_asked <= probe.frame_count <= frames_asked + (in_flight + 1) * block_frames
    assert probe.has_audio and abs(probe.audio_duration_s - probe.duration_s) < 0.1


def _workers(base: Path) -> list[int]:
    """PIDs of parallel worker processes whose parent is this test's ComfyUI server."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if b"liveavatar_core.parallel.worker" not in args:
                continue
            ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if str(base).encode() in Path(f"/proc/{ppid}/cmdline").read_bytes():
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return found


def _gone(base: Path, timeout_s: float = 10) -> bool:
    deadline = time.time() + timeout_s
    while _workers(base):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("parallel, shard", [("steps", "none"), ("layers", "none"), ("steps", "fsdp")])
def test_parallel_workers_make_the_video_and_stop_when_released(server, object_info, parallel, shard):
    """The multi-GPU workflow with two CPU worker processes (gloo; GPUs would use NCCL), in either
    layout and with sharded weights: the video plays; the Release GPUs node stops the workers and
    the next run loads them again; ComfyUI's "Free model and node cache" (POST /free) stops them too."""
    url, base = server.url, server.base
    path = next(p for p in UI_FILES if p.stem == "liveavatar_multi_gpu")
    prompt = _small(ui_to_api(_served_graph(url, path), object_info))
    loader = next(k for k, v in prompt.items() if v["class_type"] == "LiveAvatarModelLoader")
    prompt[loader]["inputs"].update(parallel=parallel, gpus="cpu,cpu", shard=shard)
    pack = load_pack()
    frames = (pack_module(pack, "liveavatar_core.encoders.audio").FRAMES_PER_BLOCK
              - pack_module(pack, "liveavatar_core.pipeline").DROPPED_START_FRAMES)

    def run() -> None:
        status, body = _post(f"{url}/prompt", {"prompt": prompt})
        assert status == 200, body
        _check_video(url, base, _wait(url, body["prompt_id"]), _writer_id(prompt), frames)
        assert len(_workers(base)) == 2
        assert "parallel: 2 worker processes ready" in server.log.read_text()

    run()
    status, body = _post(f"{url}/prompt", {"prompt": {"9": {"class_type": "LiveAvatarReleaseGPUs", "inputs": {}}}})
    assert status == 200, body
    entry = _wait(url, body["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    (text,) = entry["outputs"]["9"]["text"]
    words = {"steps": "steps 0,1; rank 1 (cpu): steps 2,3 + VAE", "layers": "layers 0-1; rank 1 (cpu): layers 2-3 + VAE"}
    assert text.startswith(f"stopped: rank 0 (cpu): {words[parallel]}"), text
    assert _gone(base)
    run()  # the cached loader output was dropped with the workers: loaded again
    status, _ = _post(f"{url}/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    assert _gone(base, timeout_s=30)


def test_live_session_node_serves_a_websocket_client_on_comfyuis_port_until_cancel(server, object_info):
    """The live template, as the UI queues it: its Live Session node holds the model while it runs;
    a client connects to ComfyUI's own /liveavatar/ws with the node's token, pushes speech and
    receives playable fMP4 fragments; Cancel ends the node. Before the node runs, the route says no
    session is served."""
    import io

    import aiohttp
    import av
    import numpy as np

    url = server.url
    ws_url = url.replace("http://", "ws://") + "/liveavatar/ws"
    (path,) = [p for p in UI_FILES if p not in VIDEO_FILES]
    prompt = ui_to_api(_served_graph(url, path), object_info)
    loader = next(k for k, v in prompt.items() if v["class_type"] == "LiveAvatarModelLoader")
    live = next(k for k, v in prompt.items() if v["class_type"] == "LiveAvatarLiveSession")
    prompt[loader]["inputs"]["precision"] = "fp32"
    prompt[live]["inputs"].update(token="comfy-live-token", seed=5, minutes=10)
    rate = 16000
    speech = (np.sin(np.linspace(0, 400 * np.pi, rate)) * 0.3 * 32767).astype(np.int16).tobytes()

    async def first_message() -> dict:
        # A probe with a wrong token: "no_session" until the node serves, then "unauthorized"; it
        # starts no session that the real one would find still closing ("busy").
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url) as ws:
            await ws.send_json({"type": "session.start", "token": "not-the-token", "size": "64*64"})
            return json.loads((await ws.receive(timeout=60)).data)

    async def session() -> tuple[list, list]:
        messages, chunks = [], []
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
            await ws.send_json({"type": "session.start", "token": "comfy-live-token", "size": "64*64",
                                "audio_rate": rate})
            for i in range(0, len(speech), 6400):
                await ws.send_bytes(speech[i:i + 6400])
            await ws.send_json({"type": "audio.end"})
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    chunks.append(msg.data)
                    continue
                messages.append(json.loads(msg.data))
                if messages[-1]["type"] == "segment.ended":
                    await ws.send_json({"type": "session.stop"})
        return messages, chunks

    assert asyncio.run(first_message())["code"] == "no_session"
    status, body = _post(f"{url}/prompt", {"prompt": prompt})
    assert status == 200, body
    deadline = time.time() + 300
    while (reply := asyncio.run(first_message()))["code"] == "no_session":
        assert time.time() < deadline, "the Live Session node never served"
        time.sleep(0.5)
    assert reply["code"] == "unauthorized", reply
    messages, chunks = asyncio.run(session())
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "session.ready" and kinds[-1] == "session.closed" and "segment.ended" in kinds, messages
    with av.open(io.BytesIO(b"".join(chunks))) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == sum(m["frames"] for m in messages if m["type"] == "block") > 0
    _post(f"{url}/interrupt", {})
    entry = _wait(url, body["prompt_id"], 60)
    events = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in events
    assert asyncio.run(first_message())["code"] == "no_session"
