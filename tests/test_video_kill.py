"""A writer process killed with SIGKILL mid-run leaves a playable file that can be resumed."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from liveavatar_core.video import StreamingMP4Writer, probe_mp4

REPO = Path(__file__).resolve().parents[1]

# Shared by the child process and the reference run, so both append identical blocks.
BLOCK_SOURCE = """
import numpy as np
H, W, FPS, SR, BLOCK = 64, 128, 25, 16000, 12

def block(i):
    t = np.arange(i * BLOCK, (i + 1) * BLOCK)[:, None, None, None]
    y = np.linspace(0, 1, H)[None, :, None, None]
    x = np.linspace(0, 1, W)[None, None, :, None]
    phase = np.array([0.0, 0.8, 1.6])
    return (127.5 + 100 * np.sin(2 * x + 1.5 * y + 0.05 * t + phase)).astype(np.uint8)

def audio(seconds):
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2.5 * t))).astype(np.float32)
"""

CHILD = BLOCK_SOURCE + """
import json, sys
from liveavatar_core.video import StreamingMP4Writer
writer = StreamingMP4Writer(sys.argv[1], W, H, FPS, audio=audio(60), sample_rate=SR)
i = 0
while True:  # runs until it is killed
    writer.append(block(i))
    i += 1
    print(json.dumps(writer.state()), flush=True)
"""


def test_kill_9_mid_run_leaves_a_playable_file_that_resumes_exactly(tmp_path):
    blocks = {}
    exec(BLOCK_SOURCE, blocks)
    path = tmp_path / "killed.mp4"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    states = []
    try:
        while len(states) < 4:
            line = child.stdout.readline()
            assert line, "the writer process ended before it was killed"
            states.append(json.loads(line))
    finally:
        os.kill(child.pid, signal.SIGKILL)  # typically while it encodes or writes the next block
        child.wait()
    assert child.returncode == -signal.SIGKILL

    flushed = states[-1]["frames_written"]
    probe = probe_mp4(path, max_frames=flushed)
    assert probe.frame_count >= flushed
    np.testing.assert_array_equal(probe.frames.shape, (flushed, blocks["H"], blocks["W"], 3))
    assert probe.audio_duration_s >= states[-1]["audio_samples_written"] / blocks["SR"]

    # Resume from the last state the dead process reported and finish the video.
    total_blocks = len(states) + 2
    sound = blocks["audio"](60)
    writer = StreamingMP4Writer.resume(states[-1], audio=sound, sample_rate=blocks["SR"])
    for i in range(len(states), total_blocks):
        writer.append(blocks["block"](i))
    writer.close()

    reference = tmp_path / "reference.mp4"
    with StreamingMP4Writer(reference, blocks["W"], blocks["H"], audio=sound, sample_rate=blocks["SR"]) as ref:
        for i in range(total_blocks):
            ref.append(blocks["block"](i))

    total = total_blocks * blocks["BLOCK"]
    resumed, expected = probe_mp4(path, max_frames=total), probe_mp4(reference, max_frames=total)
    assert resumed.frame_count == expected.frame_count == total
    np.testing.assert_array_equal(resumed.frames, expected.frames)
    assert resumed.audio_duration_s == expected.audio_duration_s == total / blocks["FPS"]
