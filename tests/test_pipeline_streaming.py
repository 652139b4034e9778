"""Streaming mode end to end on the tiny synthetic checkpoint: many clips with flat memory, a real MP4.

The checkpoint is written by `liveavatar_core.synthetic` in the official layout and loaded by the
same loaders as real weights; the MP4 is decoded again with PyAV.
"""

import gc
import os

import numpy as np
import pytest
import torch

from liveavatar_core.encoders.audio import AudioEncoder, AudioFeatures
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
    expected = min(stream.generated_frames, int(np.ceil((audio.duration_s - 3 / fps) * fps)))
    assert info.frame_count == expected == stream.total_frames  # the count the command line logs
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

    # A stop request seen after the 3rd chunk arrives: the 4th block, already sampled while the
    # caller handled the 3rd, is still written; nothing after it is sampled.
    blocks = []
    stream = generate(model, text, audio, tiny.image, settings, should_stop=lambda: len(blocks) >= 3)
    path = write_mp4(stream, tmp_path / "cancelled.mp4", on_chunk=blocks.append)
    info = probe_mp4(path)
    assert len(blocks) == 4 and stream.stats.blocks_done == 4
    assert info.frame_count == sum(len(c.frames) for c in blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (decode on a side stream)")
def test_gpu_stream_with_side_stream_decode_matches_cpu_and_resumes_exactly(tiny, tmp_path):
    """On a GPU the VAE decodes on its own stream while the next block samples: the frames match
    the CPU run (float rounding only), repeat exactly, and a stopped run resumes exactly.

    Random text and audio features stand in for the encoders (their parity is tested elsewhere).
    """
    folder = official_folder(tiny.ckpt_dir)
    cpu = load_generator(folder.dit, folder.vae, tiny.lora, precision="fp32")
    gpu = load_generator(folder.dit, folder.vae, tiny.lora, precision="fp32", dit_device="cuda", compile="off")
    cfg, clips, fpc = cpu.dit.cfg, 2, 48
    g = torch.Generator().manual_seed(5)
    text = torch.randn(30, cfg.text_dim, generator=g)
    seconds = clips * fpc / 25
    audio = AudioFeatures(torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, clips * fpc, generator=g), clips,
                          clips, fpc, 25, np.zeros(int(seconds * 16000), np.float32), seconds)
    settings = GenerationSettings(size=SIZE, seed=11, num_clips=clips)
    on_cpu = [c.frames for c in generate(cpu, text, audio, tiny.image, settings)]
    on_gpu = [c.frames for c in generate(gpu, text, audio, tiny.image, settings)]
    again = [c.frames for c in generate(gpu, text, audio, tiny.image, settings)]
    assert len(on_gpu) == len(on_cpu) == len(again)
    for c, g_, a in zip(on_cpu, on_gpu, again):
        assert np.array_equal(g_, a)
        assert np.abs(c.astype(int) - g_.astype(int)).max() <= 2

    path, state = tmp_path / "video.mp4", tmp_path / "video.mp4.resume"
    first = []
    stream = generate(gpu, text, audio, tiny.image, settings, should_stop=lambda: stream.stats.blocks_done >= 3)
    write_mp4(stream, path, on_chunk=lambda c: first.append(c.frames), resume_path=state)
    assert state.exists() and len(first) == 3
    rest = []
    write_mp4(generate(gpu, text, audio, tiny.image, settings, resume_from=state), path,
              on_chunk=lambda c: rest.append(c.frames), resume_path=state)
    assert all(np.array_equal(x, y) for x, y in zip(first + rest, on_gpu)) and len(first + rest) == len(on_gpu)
    assert probe_mp4(path).frame_count == sum(len(f) for f in on_gpu)
