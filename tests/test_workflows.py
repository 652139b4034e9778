"""Shipped workflows: UI graphs match the node definitions, API twins match the UI graphs, and each
API workflow runs end to end on the fixture checkpoint through the pack imported as ComfyUI does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_nodes_support import (API_DIR, REPO, UI_FILES, VIDEO_FILES, Executor, cpu_prompt, load_pack,
                                      models_tree, pack_module)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
FRONTEND_ONLY = {"MarkdownNote", "Note", "Reroute"}
# Core nodes: their widget names in ComfyUI's order (LoadImage's upload and LoadAudio's player and
# upload button are frontend widgets that the API format drops).
CORE_WIDGETS = {"LoadImage": (["image"], 2), "LoadAudio": (["audio"], 3)}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, fixtures):
    pack = load_pack()
    root = tmp_path_factory.mktemp("comfy")
    pack_module(pack, "nodes.host").use_standalone(models_tree(root, fixtures), root / "output")
    return pack, root


def widget_names(cls) -> list[str]:
    spec = cls.INPUT_TYPES()
    entries = {**spec["required"], **spec.get("optional", {})}
    return [n for n, (kind, _) in entries.items() if isinstance(kind, list) or kind in WIDGET_TYPES]


def ui_to_api(graph: dict, mappings: dict) -> dict:
    """What the frontend's 'Export (API)' produces, from INPUT_TYPES order (seed has a control slot)."""
    links = {link[0]: link for link in graph["links"]}
    prompt = {}
    for node in graph["nodes"]:
        if node["type"] in FRONTEND_ONLY or node["mode"] in (2, 4):
            continue
        inputs = {}
        values = list(node["widgets_values"])
        if node["type"] in CORE_WIDGETS:
            names, count = CORE_WIDGETS[node["type"]]
            assert len(values) == count, node["type"]
        else:
            cls = mappings[node["type"]]
            names = widget_names(cls)
            spec = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
            expanded = []
            for name in names:
                expanded.append(name)
                if spec[name][1].get("control_after_generate"):
                    expanded.append(None)
            assert len(values) == len(expanded), f"{node['type']}: {len(values)} widget values, {len(expanded)} slots"
            names = expanded
        for name, value in zip(names, values):
            if name is not None:
                inputs[name] = value
        for socket in node["inputs"]:
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_every_ui_workflow_has_an_api_twin_and_nothing_else_is_offered():
    assert [p.name for p in UI_FILES] == sorted(p.name for p in API_DIR.glob("*.json"))
    assert len(UI_FILES) >= 3
    # ComfyUI offers every top-level json of workflows/ as a template: only UI graphs may live there.
    assert not list((REPO / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_widgets_match_node_definitions(comfy, path):
    pack, _ = comfy
    graph = json.loads(path.read_text())
    assert graph["version"] == 0.4 and graph["links"] and graph["nodes"]
    node_ids = {n["id"] for n in graph["nodes"]}
    for link in graph["links"]:
        assert link[1] in node_ids and link[3] in node_ids
    for node in graph["nodes"]:
        if node["type"] not in pack.NODE_CLASS_MAPPINGS:
            assert node["type"] in FRONTEND_ONLY | set(CORE_WIDGETS), node["type"]
            continue
        cls = pack.NODE_CLASS_MAPPINGS[node["type"]]
        spec = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
        # A muted node (left for the user to switch on) is checked as if it were on.
        api = ui_to_api({"nodes": [dict(node, mode=0)], "links": graph["links"]},
                        pack.NODE_CLASS_MAPPINGS)[str(node["id"])]
        for name in widget_names(cls):
            kind, options = spec[name]
            value = api["inputs"][name]
            if isinstance(kind, list):
                assert value in kind, f"{node['type']}.{name}: {value!r} not offered"
            elif kind in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value)
        sockets = [n for n, (kind, _) in spec.items() if not isinstance(kind, list) and kind not in WIDGET_TYPES]
        assert [s["name"] for s in node["inputs"] if s.get("link") is not None] == sockets
        assert [o["type"] for o in node["outputs"]] == list(cls.RETURN_TYPES)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_equals_ui_export(comfy, path):
    pack, _ = comfy
    exported = ui_to_api(json.loads(path.read_text()), pack.NODE_CLASS_MAPPINGS)
    twin = json.loads((API_DIR / path.name).read_text())
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in twin.items()} == exported


@pytest.fixture(scope="module")
def executor(comfy, fixtures):
    pack, root = comfy
    return Executor(pack.NODE_CLASS_MAPPINGS, fixtures / "inputs")


@pytest.mark.parametrize("name", [p.name for p in VIDEO_FILES], ids=lambda n: n[:-5])
def test_api_workflow_runs_end_to_end(comfy, executor, fixtures, name):
    """Each twin with the fixture's inputs, a precision this machine can run, and the smallest video:
    one clip of one block (12 frames) at the smallest area, so three runs stay fast on a CPU."""
    pack, root = comfy
    pipeline = pack_module(pack, "liveavatar_core.pipeline")
    image_mod = pack_module(pack, "liveavatar_core.encoders.image")
    probe_mp4 = pack_module(pack, "liveavatar_core.video").probe_mp4
    prompt = json.loads((API_DIR / name).read_text())
    side = image_mod.DIVISOR
    block_frames = pack_module(pack, "liveavatar_core.encoders.audio").FRAMES_PER_BLOCK
    cpu_prompt(prompt, block_frames, sampler=dict(size="custom", custom_width=side, custom_height=side, num_clips=1),
               writer=dict(return_frames=2))
    ui = executor.run(prompt)
    (writer_id, out), = ui.items()
    assert out["animated"] == [True]
    (entry,) = out["images"]
    path = root / "output" / entry["subfolder"] / entry["filename"]
    probe = probe_mp4(path, max_frames=2, decode_audio=True)
    assert probe.frame_count == block_frames - pipeline.DROPPED_START_FRAMES
    assert probe.fps == 25 and (probe.height, probe.width) == (side, side)
    assert probe.has_audio and abs(probe.audio_duration_s - probe.duration_s) < 0.1
    assert float(abs(torch.from_numpy(probe.audio)).max()) > 0.01  # the speech, not silence
    video, first_frames, path_out = executor.cache[executor._key(prompt, writer_id)]
    assert Path(path_out) == path and first_frames.shape == (2, side, side, 3)
    # The IMAGE output holds the frames that went into the file, in order (up to H.264 loss).
    encoded = torch.from_numpy(probe.frames[:2]).float()
    same = float((first_frames[0] * 255 - encoded[0]).abs().mean())
    other = float((first_frames[0] * 255 - encoded[1]).abs().mean())
    assert same < other / 2, (same, other)


# LiteGraph draws a node's title bar above its `pos` (LiteGraph.NODE_TITLE_HEIGHT in both
# frontends ComfyUI 0.3.64 is tested with).
TITLE_HEIGHT = 30


def node_boxes(graph: dict) -> dict[int, tuple[float, float, float, float]]:
    """Node id -> (left, top, right, bottom) on the canvas, title bar included."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in graph["nodes"]}


def overlaps(boxes: dict) -> list[tuple[int, int]]:
    ids = sorted(boxes)
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
            if boxes[a][0] < boxes[b][2] and boxes[b][0] < boxes[a][2]
            and boxes[a][1] < boxes[b][3] and boxes[b][1] < boxes[a][3]]


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_nodes_do_not_overlap_at_their_recorded_sizes(path):
    """At the sizes stored in the file (the browser test checks the frontend needs no more), no node
    covers another, title bars included."""
    assert overlaps(node_boxes(json.loads(path.read_text()))) == []


def test_overlap_check_sees_a_covered_node():
    graph = json.loads(UI_FILES[0].read_text())
    loader = next(n for n in graph["nodes"] if n["type"] == "LiveAvatarModelLoader")
    below = next(n for n in graph["nodes"] if n["type"] == "LiveAvatarTextEncode")
    loader["size"] = [loader["size"][0], below["pos"][1] - loader["pos"][1]]  # reaches its title bar
    assert overlaps(node_boxes(graph))


def test_shipped_workflows_name_example_inputs_that_are_shipped(tmp_path):
    """Every file a Load Image / Load Audio node names is in example_inputs/, decodes, and is copied
    into an input folder that lacks it, never over a file that is there."""
    from PIL import Image

    pack = load_pack()
    examples = pack_module(pack, "nodes.examples")
    named = {n["widgets_values"][0] for p in UI_FILES for n in json.loads(p.read_text())["nodes"]
             if n["type"] in CORE_WIDGETS}
    shipped = {p.name for p in examples.EXAMPLE_DIR.iterdir()}
    assert named and named == shipped
    image = next(examples.EXAMPLE_DIR.glob("*.png"))
    with Image.open(image) as img:
        assert img.mode == "RGB" and min(img.size) >= 256
    audio = pack_module(pack, "liveavatar_core.encoders.audio")
    speech = audio.load_audio(next(examples.EXAMPLE_DIR.glob("*.wav")))
    assert 3 * audio.SAMPLE_RATE <= len(speech) <= 15 * audio.SAMPLE_RATE
    mine = tmp_path / image.name
    mine.write_bytes(b"the user's own picture")
    written = examples.install_example_inputs(tmp_path)
    assert [p.name for p in written] == sorted(shipped - {image.name})
    assert mine.read_bytes() == b"the user's own picture"
    assert examples.install_example_inputs(tmp_path) == []
    for name in shipped - {image.name}:
        assert (tmp_path / name).read_bytes() == (examples.EXAMPLE_DIR / name).read_bytes()
