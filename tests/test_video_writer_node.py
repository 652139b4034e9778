"""The Video Writer node's progress bar and caption count what the MP4 holds, block by block.

Runs the shipped basic workflow through the node executor of tests/test_nodes_support.py (the pack
imported as ComfyUI imports it) and records every progress and status call through
`host.Progress.listener`, the same calls that reach ComfyUI's progress bar and the web extension.
"""

from __future__ import annotations

import json

import pytest

from tests.test_nodes_support import REPO, Executor, cpu_prompt, load_pack, models_tree, pack_module

# 4 clips of 24 frames: 8 blocks and 93 generated frames, of which the 3 s fixture audio keeps 72
# (the numbers of the issue: "93 frames" logged, 72 in the file, 8/8 reported twice).
CLIPS, FRAMES_PER_CLIP, BLOCKS, KEPT = 4, 24, 8, 72


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, fixtures):
    pack = load_pack()
    root = tmp_path_factory.mktemp("comfy")
    pack_module(pack, "nodes.host").use_standalone(models_tree(root, fixtures), root / "output")
    return pack, root


def _prompt() -> dict:
    prompt = json.loads((REPO / "workflows" / "api" / "liveavatar_basic.json").read_text())
    return cpu_prompt(prompt, FRAMES_PER_CLIP,
                      sampler=dict(size="custom", custom_width=64, custom_height=64, num_clips=CLIPS, sample_steps=2),
                      writer=dict(filename_prefix="video/progress"))


def test_progress_steps_once_per_block_and_the_caption_counts_the_file(comfy, fixtures):
    pack, root = comfy
    host = pack_module(pack, "nodes.host")
    probe_mp4 = pack_module(pack, "liveavatar_core.video").probe_mp4
    events = []
    host.Progress.listener = lambda kind, data: events.append((kind, data))
    try:
        ui = Executor(pack.NODE_CLASS_MAPPINGS, fixtures / "inputs").run(_prompt())
    finally:
        host.Progress.listener = None
    (out,) = ui.values()
    (entry,) = out["images"]
    frames_in_file = probe_mp4(root / "output" / entry["subfolder"] / entry["filename"], max_frames=0).frame_count
    assert frames_in_file == KEPT

    bar = [(d["value"], d["max"]) for kind, d in events if kind == "progress"]
    assert bar == [(i, BLOCKS) for i in range(1, BLOCKS + 1)]  # 1, 2, ..., 8, each once
    (loader,) = [d for kind, d in events if kind == "status" and "plan" in d]
    # The loader node shows the plan table its log holds, the placement in words.
    assert loader["text"].startswith("Run plan:") and "DiT, VAE, umT5 and wav2vec2 on cpu" in loader["text"]
    assert loader["plan"]["devices"][0]["device"] == "cpu"
    status = [d for kind, d in events if kind == "status" and "plan" not in d]
    assert [s["blocks_done"] for s in status] == list(range(1, BLOCKS + 1))
    # Frames so far: 9 after the first block (3 dropped at the start), 12 more per block, never
    # more than the file holds (the frames past the end of the audio are left out).
    assert [s["frames"] for s in status] == [min(9 + 12 * i, KEPT) for i in range(BLOCKS)]
    assert status[-1]["frames"] == frames_in_file
    assert status[-1]["text"].startswith(f"block {BLOCKS}/{BLOCKS}")


@pytest.mark.parametrize("prefix", ["video/Live\0Avatar", "video\0/LiveAvatar", "Live\x1bAvatar"])
def test_control_characters_in_the_prefix_are_refused(comfy, prefix):
    pack, root = comfy
    host = pack_module(pack, "nodes.host")
    input_error = pack_module(pack, "liveavatar_core.errors").InputError  # the pack's own class
    with pytest.raises(input_error, match=r"control character") as info:
        host.new_output_path(prefix, 64, 64)
    assert info.value.input_name == "filename_prefix"
