"""The health checks inside a real run (issue 20): `write_mp4(health=...)` on the tiny checkpoint
(CPU), whose random weights make noise frames, a fault the checks see from the first block.

warn: one sidecar record per block of what the MP4 holds, a plot that decodes, each chunk its
record; stop: the run ends after the block in flight when the alarm is seen, the MP4 plays up to
it and resumes, and the resumed run continues the sidecar; and a health mode whose checks cannot
run is refused before any weight is read.
"""

import json
import logging
import sys

import pytest
from PIL import Image

from liveavatar_core.cli import main
from liveavatar_core.health import health_paths
from liveavatar_core.health.run import HealthStopped
from liveavatar_core.pipeline import write_mp4
from liveavatar_core.video.probe import probe_mp4
from tests.test_preflight import LOADER_LINES, base, garbage_ckpt  # noqa: F401
from tests.test_resume import MAX_FRAMES, STREAMING, _stream, encoders, inputs, tiny  # noqa: F401


def records(jsonl) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def test_warn_records_every_block_the_file_holds(tiny, inputs, tmp_path, caplog):  # noqa: F811
    path = tmp_path / "run.mp4"
    chunks = []
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        write_mp4(_stream(inputs, tiny.image, STREAMING), path, on_chunk=chunks.append, health="warn")
    jsonl, png = health_paths(path)
    recs = records(jsonl)
    assert [r["block"] for r in recs] == list(range(len(chunks)))
    # The checks run one block behind, on their thread: each chunk carries the record before it.
    assert [c.health.block if c.health else None for c in chunks] == [None, *range(len(chunks) - 1)]
    assert [r["start_frame"] for r in recs] == [c.start_frame for c in chunks]
    assert sum(r["frames"] for r in recs) == probe_mp4(path, max_frames=MAX_FRAMES).frame_count
    # Noise against a picture: the colour alarm from the first block, in the log too.
    assert "colour_frame" in recs[0]["active"]
    assert any("health alarm colour_frame at block 0" in r.getMessage() for r in caplog.records)
    with Image.open(png) as image:
        image.load()
        assert image.size[0] >= 800

    quiet = tmp_path / "quiet.mp4"
    write_mp4(_stream(inputs, tiny.image, STREAMING), quiet)
    assert not any(p.exists() for p in health_paths(quiet))


def test_stop_ends_after_the_alarm_block_and_the_resumed_run_continues_the_sidecar(  # noqa: F811
        tiny, inputs, tmp_path):
    path, state = tmp_path / "run.mp4", tmp_path / "run.mp4.resume"
    chunks = []
    stopped = "block 0 .*raised colour_frame.*stopped after block 1, the block in flight"
    with pytest.raises(HealthStopped, match=stopped):
        write_mp4(_stream(inputs, tiny.image, STREAMING), path, on_chunk=chunks.append, resume_path=state,
                  health="stop")
    jsonl, png = health_paths(path)
    head = records(jsonl)
    assert len(head) == 2 == len(chunks) and head[0]["should_stop"] and png.is_file()
    assert probe_mp4(path).frame_count == sum(r["frames"] for r in head) and state.is_file()

    resumed = _stream(inputs, tiny.image, STREAMING, resume_from=state)
    write_mp4(resumed, path, resume_path=state, health="warn")
    assert resumed.finished and not state.exists()
    full = records(jsonl)
    assert full[0] == head[0] and [r["block"] for r in full] == list(range(len(full))) and len(full) > 1
    starts = [r["start_frame"] for r in full]
    assert starts == [0] + [sum(r["frames"] for r in full[:i]) for i in range(1, len(full))]
    assert sum(r["frames"] for r in full) == probe_mp4(path, max_frames=MAX_FRAMES).frame_count
    # The alarm raised before the stop is still active after it: not raised a second time.
    assert not any(a["name"] == "colour_frame" for r in full[1:] for a in r["alarms"] if a["state"] == "raised")


@pytest.mark.parametrize("opencv", ["missing", "without cascades"])
def test_health_needing_opencv_is_refused_before_any_weight_is_read(garbage_ckpt, base, tmp_path, capsys,  # noqa: F811
                                                                    caplog, monkeypatch, opencv):
    root, lora = garbage_ckpt
    args = list(base)
    args[args.index("--ckpt_dir") + 1] = str(root)
    args[args.index("--lora_path_dmd") + 1] = str(lora)
    if opencv == "missing":
        monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    else:
        import cv2

        # As OpenCV 5's wheels are: their data folder holds no Haar cascade.
        monkeypatch.setattr(cv2.data, "haarcascades", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        assert main(["generate", *args, "--health", "warn"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: health:") and "opencv-python-headless" in err and "off" in err, err
    assert not [r for r in caplog.records if r.getMessage().startswith(LOADER_LINES)]
    # The default, auto, lets the run go on without the checks, saying so once: this one then
    # stops at the damaged weights, not at the health checks.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        assert main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and not err.startswith("error: health"), err
    assert [r.getMessage() for r in caplog.records].count(next(
        r.getMessage() for r in caplog.records if r.getMessage().startswith("health checks off: health:"))) == 1


def test_a_resumed_run_without_the_earlier_sidecar_measures_from_where_it_starts(tiny, inputs, tmp_path):  # noqa: F811
    path, state = tmp_path / "run.mp4", tmp_path / "run.mp4.resume"
    stream = _stream(inputs, tiny.image, STREAMING, should_stop=lambda: stream.stats.blocks_done >= 2)
    write_mp4(stream, path, resume_path=state)  # health off: no sidecar
    jsonl, _ = health_paths(path)
    assert state.is_file() and not jsonl.exists()
    resumed = _stream(inputs, tiny.image, STREAMING, resume_from=state)
    held = probe_mp4(path).frame_count
    write_mp4(resumed, path, resume_path=state, health="warn")
    recs = records(jsonl)
    assert recs[0]["start_frame"] == held > 0 and recs[0]["time_s"] == held / 25
    assert held + sum(r["frames"] for r in recs) == probe_mp4(path, max_frames=MAX_FRAMES).frame_count
