"""Streaming mode end to end on the tiny synthetic checkpoint: many clips with flat memory, a real MP4.

The checkpoint is written by `liveavatar_core.synthetic` in the official layout and loaded by the
same loaders as real weights; the MP4 is decoded again with PyAV.
"""

import gc
import os

import numpy as np
import pytest
import torch

from liveavatar_core.encoders.audio import AudioEncoder
from liveavatar_core.encoders.text import TextEncoder
from liveavatar_core.loading import load_generator, official_folder
from liveavatar_core.pipeline import GenerationSettings, generate, write_mp4
from liveavatar_core.synthetic import write_tiny_checkpoint
from liveavatar_core.video.probe import probe_mp4

CLIPS = 6
SIZE = "128*64"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    # Long enough for CLIPS clips of 48 frames at 25 fps (the last clip is partly past the audio).
    return write_tiny_checkpoint(root, audio_seconds=(CLIPS - 1) * 48 / 25 + 0.5)


@pytest.fixture(scope="module")
def inputs(tiny):
    folder = official_folder(tiny.ckpt_dir)
    text = TextEncoder.from_pretrained(folder.t5, dtype=torch.float32).encode(tiny.prompt)
    audio = AudioEncoder.from_pretrained(folder.wav2vec2).encode(str(tiny.audio))
    model = load_generator(folder.dit, folder.vae, tiny.lora, precision="fp32")
    return model, text, audio


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_many_clips_flat_memory_and_playable_mp4(tiny, inputs, tmp_path):
    model, text, audio = inputs
    assert audio.num_clips == CLIPS
    stream = generate(model, text, audio, tiny.image, GenerationSettings(size=SIZE, seed=3))
    rss = []

    def on_chunk(chunk):
        if chunk.block == stream.blocks_per_clip - 1:
            gc.collect()
            rss.append(_rss_mib())

    path = write_mp4(stream, tmp_path / "long.mp4", on_chunk=on_chunk)
    assert len(rss) == CLIPS
    # After the first clip (allocator warm-up), RSS stays flat: the caches are fixed rings and every
    # block is decoded, written and dropped. Bound: 16 MiB over 5 clips (allocator noise).
    assert max(rss[1:]) - rss[1] < 16, rss
    info = probe_mp4(path, decode_audio=True)
    fps = 25
    # Frames are trimmed to the audio, which is shifted by the 3 dropped frames (streaming fix).
    expected = min(stream.total_frames, int(np.ceil((audio.duration_s - 3 / fps) * fps)))
    assert info.frame_count == expected
    assert (info.width, info.height) == (stream.width, stream.height)
    assert abs(info.audio_duration_s - info.duration_s) <= 1 / fps
    assert stream.stats.blocks_done == CLIPS * stream.blocks_per_clip
    assert stream.stats.first_frame_s is not None and stream.stats.fps > 0


def test_same_seed_same_video_and_cancel_leaves_playable_file(tiny, inputs, tmp_path):
    model, text, audio = inputs
    settings = GenerationSettings(size=SIZE, seed=11, num_clips=2)
    a = [c.frames for c in generate(model, text, audio, tiny.image, settings)]
    b = [c.frames for c in generate(model, text, audio, tiny.image, settings)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    other = [c.frames for c in generate(model, text, audio, tiny.image, GenerationSettings(size=SIZE, seed=12,
                                                                                             num_clips=2))]
    assert not np.array_equal(a[-1], other[-1])

    blocks = []
    stream = generate(model, text, audio, tiny.image, settings, should_stop=lambda: len(blocks) >= 3)
    path = write_mp4(stream, tmp_path / "cancelled.mp4", on_chunk=blocks.append)
    info = probe_mp4(path)
    assert len(blocks) == 3 and info.frame_count == sum(len(c.frames) for c in blocks)
