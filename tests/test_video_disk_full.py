"""A disk that fills up while the MP4 is written: a clear error, a playable file, a resume.

Two real, OS-level ways to run out of room, never a mock:

* a small tmpfs, mounted in a private mount namespace of a child process (`unshare -rm`, which
  needs no root where user namespaces are allowed): the kernel answers ENOSPC, exactly what a full
  disk gives. Skipped where namespaces or tmpfs mounts are not allowed.
* `RLIMIT_FSIZE` set in a child process: the kernel refuses every write past the limit with EFBIG
  (SIGXFSZ ignored), which runs through the same code path. Always available, so CI always checks
  the recovery even where it cannot mount anything.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from liveavatar_core.video import StreamingMP4Writer, probe_mp4
from tests.test_video_kill import BLOCK_SOURCE

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096

# Appends blocks until the disk refuses one, then reports the error and the writer's state and
# copies the file out of the small disk (argv[2]), which vanishes with the child's namespace.
WRITER_CHILD = BLOCK_SOURCE + """
import json, shutil, sys
from liveavatar_core.errors import InputError
from liveavatar_core.video import StreamingMP4Writer
writer = StreamingMP4Writer(sys.argv[1], W, H, FPS, audio=audio(60), sample_rate=SR)
blocks = 0
try:
    while True:
        writer.append(block(blocks))
        blocks += 1
except InputError as exc:
    state = writer.state()
    try:
        writer.close()  # the closing audio does not fit either: rolled back, the video still plays
    except InputError:
        pass
    shutil.copyfile(sys.argv[1], sys.argv[2])
    print(json.dumps({"error": str(exc), "blocks": blocks, "state": state}))
"""


def small_disk_prefix(mountpoint: Path, size: int) -> list[str] | None:
    """argv prefix running a command with a `size`-byte tmpfs on `mountpoint`, or None if impossible."""
    if shutil.which("unshare") is None:
        return None
    mountpoint.mkdir(parents=True, exist_ok=True)
    prefix = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "{mountpoint}" && exec "$@"', "sh"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.fixture(scope="module")
def blocks():
    source = {}
    exec(BLOCK_SOURCE, source)
    return source


@pytest.fixture(scope="module")
def reference(blocks, tmp_path_factory):
    """(path, byte length after each block) of an uninterrupted 8-block file."""
    path = tmp_path_factory.mktemp("reference") / "reference.mp4"
    sizes = []
    with StreamingMP4Writer(path, blocks["W"], blocks["H"], audio=blocks["audio"](60), sample_rate=blocks["SR"]) as w:
        for i in range(8):
            w.append(blocks["block"](i))
            sizes.append(w.state()["bytes"])
    return path, sizes


def _check_and_resume(report: dict, copy: Path, blocks: dict, reference: tuple, reason: str) -> None:
    state, n = report["state"], report["blocks"]
    assert reason in report["error"] and state["path"] in report["error"], report["error"]
    # The file holds every block appended before the failed one, and plays; the state says so.
    assert 2 <= n < 8 and state["frames_written"] == n * blocks["BLOCK"]
    assert f"the {state['frames_written']} frames" in report["error"]
    probe = probe_mp4(copy, max_frames=0)
    assert probe.frame_count == state["frames_written"]

    # Room again: the resumed file, completed, equals the uninterrupted one.
    state = {**state, "path": str(copy)}
    writer = StreamingMP4Writer.resume(state, audio=blocks["audio"](60), sample_rate=blocks["SR"])
    for i in range(n, 8):
        writer.append(blocks["block"](i))
    writer.close()
    total = 8 * blocks["BLOCK"]
    resumed, expected = probe_mp4(copy, max_frames=total), probe_mp4(reference[0], max_frames=total)
    assert resumed.frame_count == expected.frame_count == total
    np.testing.assert_array_equal(resumed.frames, expected.frames)
    assert resumed.audio_duration_s == expected.audio_duration_s


def test_full_tmpfs_leaves_a_playable_file_that_resumes(blocks, reference, tmp_path):
    # Room for the init segment and about three and a half blocks (tmpfs counts whole pages).
    sizes = reference[1]
    size = -(-(sizes[2] + (sizes[3] - sizes[2]) // 2) // PAGE) * PAGE
    mountpoint, copy = tmp_path / "small", tmp_path / "copy.mp4"
    prefix = small_disk_prefix(mountpoint, size)
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (no user namespaces); the RLIMIT_FSIZE test covers the path")
    out = subprocess.run([*prefix, sys.executable, "-c", WRITER_CHILD, str(mountpoint / "video.mp4"), str(copy)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _check_and_resume(json.loads(out.stdout), copy, blocks, reference, "the disk is full")


def test_file_size_limit_leaves_a_playable_file_that_resumes(blocks, reference, tmp_path):
    sizes = reference[1]
    path = tmp_path / "video.mp4"
    copy = tmp_path / "copy.mp4"
    out = subprocess.run([sys.executable, "-c", WRITER_CHILD, str(path), str(copy)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
                         preexec_fn=_limit_file_size(sizes[2] + (sizes[3] - sizes[2]) // 2))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["blocks"] == 3
    assert path.stat().st_size <= sizes[2] + (sizes[3] - sizes[2]) // 2
    _check_and_resume(report, copy, blocks, reference, "largest size allowed")
