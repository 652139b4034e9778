"""Per-block health checks on real synthetic video: the example picture with a mouth that opens with
the example speech, and planted faults (colour cast, audio delay, freeze, seam, black block,
identity change). Each stream is rendered once per module and fed to the monitors block by block."""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from liveavatar_core.errors import InputError
from liveavatar_core.health import (HEALTH_MODES, HealthMonitor, HealthThresholds, check_health, check_health_mode,
                                    health_paths)
from liveavatar_core.health.checks import fit_reference
from liveavatar_core.health.synthetic import TalkingScene, mouth_openings, read_speech, red_lips

EXAMPLES = Path(__file__).resolve().parents[1] / "example_inputs"
FPS = 25
HEIGHT, WIDTH = 704, 384  # portrait, as the pack picks for this picture
BLOCKS = 40


def _speech(seconds: float) -> np.ndarray:
    samples, rate = read_speech(EXAMPLES / "liveavatar_speech.wav", seconds)
    assert rate == 16000
    return samples


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.asarray(Image.open(EXAMPLES / "liveavatar_reference.png").convert("RGB"))


@pytest.fixture(scope="module")
def picture(reference) -> np.ndarray:
    return fit_reference(reference, HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def mouth(picture) -> tuple[int, int, int, int]:
    return red_lips(picture)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return _speech(BLOCKS * 12 / FPS + 1)


def _block_starts(blocks: int) -> list[tuple[int, int]]:
    """(start frame, frames) of each block: the first block of a stream has 9 frames."""
    out, start = [], 0
    for b in range(blocks):
        n = 9 if b == 0 else 12
        out.append((start, n))
        start += n
    return out


def run_stream(monitors, picture, mouth, audio, rate=16000, delay=0, blocks=BLOCKS, fault=None, seed=0):
    """Render the stream block by block, apply `fault(block, frames)`, feed every monitor."""
    openings = mouth_openings(audio, rate, FPS, delay)
    scene = TalkingScene(picture, mouth, seed=seed)
    records = [[] for _ in monitors]
    per_frame = rate // FPS
    for b, (start, n) in enumerate(_block_starts(blocks)):
        frames = scene.render(openings[start:start + n])
        if fault is not None:
            frames = fault(b, frames)
        samples = audio[start * per_frame:(start + n) * per_frame]
        for monitor, out in zip(monitors, records):
            out.append(monitor.observe(frames, samples, rate))
    for monitor in monitors:
        monitor.close()
    return records


def raised(records) -> list[tuple[str, int]]:
    return [(a.name, a.block) for r in records for a in r.alarms if a.state == "raised"]


def speaking_block(audio, after: int) -> int:
    """The first block after `after` whose every frame has speech (for the freeze fault)."""
    for b, (start, n) in enumerate(_block_starts(BLOCKS)):
        rms = np.sqrt(np.mean(audio[start * 640:(start + n) * 640].reshape(n, 640) ** 2, axis=1))
        if b > after and (20 * np.log10(rms + 1e-9) > -40).all():
            return b
    raise AssertionError("no speaking block")


@pytest.fixture(scope="module")
def clean(tmp_path_factory, reference, picture, mouth, speech):
    """A clean stream, monitored from the unfitted 448x768 reference (the monitor fits it itself)."""
    jsonl, png = health_paths(tmp_path_factory.mktemp("clean") / "run_00001.mp4")
    monitor = HealthMonitor(reference, FPS, "warn", sidecar=jsonl, plot_path=png)
    (records,) = run_stream([monitor], picture, mouth, speech)
    return records, jsonl, png


def test_clean_run_raises_no_alarm(clean):
    records, _, _ = clean
    assert raised(records) == []
    assert all(not r.should_stop for r in records)
    measured = records[-1]
    assert measured.face_found and abs(measured.face_size - 1) < 0.15
    assert measured.identity_ssim > 0.5
    assert measured.colour_de_frame < 2 and measured.seam_ratio < 2.5 and measured.black_frames == 0
    assert records[0].seam_ratio is None and records[0].frames == 9 and records[1].start_frame == 9
    offsets = [r.av_offset for r in records if r.av_offset is not None]
    assert len(offsets) > 10 and all(abs(o) <= 1 for o in offsets)
    assert all(r.cost_ms > 0 for r in records)


def test_sidecar_has_one_line_per_block_and_the_plot_decodes(clean):
    records, jsonl, png = clean
    assert jsonl.name == "run_00001.health.jsonl" and png.name == "run_00001.health.png"
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["block"] for line in lines] == list(range(BLOCKS))
    assert [line["start_frame"] for line in lines] == [r.start_frame for r in records]
    assert lines[5]["colour_de_frame"] == pytest.approx(records[5].colour_de_frame, abs=1e-3)
    assert lines[-1]["av_offset"] == records[-1].av_offset
    with Image.open(png) as image:
        image.load()
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 600
        assert len(image.getcolors(1 << 16) or range(1000)) > 20  # drawn on, not blank


@pytest.mark.parametrize("delay, rate", [(3, 16000), (-3, 48000)])
def test_known_audio_delay_is_estimated(picture, mouth, delay, rate):
    audio = _speech(BLOCKS * 12 / FPS + 1)
    if rate != 16000:  # a live session's rate: the same speech, resampled
        audio = np.interp(np.arange(audio.size * rate // 16000) * 16000 / rate, np.arange(audio.size), audio)
    monitor = HealthMonitor(picture, FPS, "warn")
    (records,) = run_stream([monitor], picture, mouth, audio.astype(np.float32), rate=rate, delay=delay)
    estimates = [r.av_offset for r in records if r.av_offset is not None]
    assert len(estimates) > 10
    assert all(abs(e - delay) <= 1 for e in estimates[-10:]), estimates
    assert records[-1].av_confidence > 0.3
    assert ("av_offset", records[0].block) not in raised(records)
    assert any(name == "av_offset" for name, _ in raised(records))
    assert {name for name, _ in raised(records)} == {"av_offset"}


@pytest.mark.parametrize("start", [8, 27])  # while the 20-block baseline forms, and after it
def test_colour_shift_raises_at_the_block_it_starts(picture, mouth, speech, start):

    def cast(block, frames):
        if block < start:
            return frames
        return np.clip(frames * np.array([1.1, 1.0, 0.85]), 0, 255).astype(np.uint8)

    monitor = HealthMonitor(picture, FPS, "warn")
    (records,) = run_stream([monitor], picture, mouth, speech, fault=cast)
    assert ("colour_frame", start) in raised(records)
    assert [alarm for alarm in raised(records) if alarm[1] < start] == []
    assert records[start - 1].colour_de_frame < HealthThresholds().colour_frame.off
    assert "colour_frame" in records[-1].active


def test_freeze_and_seam_are_flagged_at_their_blocks(picture, mouth, speech):
    frozen, seam = speaking_block(speech, 12), 30

    def faults(block, frames):
        if block == frozen:
            frames = np.repeat(frames[:1], len(frames), axis=0)
        if block >= seam:
            frames = np.roll(frames, 20, axis=2)
        return frames

    monitor = HealthMonitor(picture, FPS, "warn")
    (records,) = run_stream([monitor], picture, mouth, speech, fault=faults)
    assert raised(records) == [("freeze", frozen), ("seam", seam)]
    assert records[frozen].motion == 0 and records[frozen].speech_fraction == 1
    assert records[seam].seam_ratio > 4 > records[seam + 1].seam_ratio


@pytest.fixture(scope="module")
def black_run(picture, mouth, speech):
    """One stream with a black block, watched by a warn and a stop monitor; warn's log lines kept."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logger = logging.getLogger("liveavatar")
    logger.addHandler(handler)
    try:
        warn, stop = HealthMonitor(picture, FPS, "warn"), HealthMonitor(picture, FPS, "stop")
        records = run_stream([warn, stop], picture, mouth, speech, blocks=24,
                             fault=lambda b, f: np.zeros_like(f) if b == 18 else f)
    finally:
        logger.removeHandler(handler)
    return records, lines, stop


def test_black_block_is_flagged(black_run):
    (warn, _), _, _ = black_run
    assert warn[18].black_frames == 12 and warn[17].black_frames == 0
    assert ("black", 18) in raised(warn)
    assert all(alarm[1] == 18 for alarm in raised(warn))
    assert not any(r.should_stop for r in warn)


def test_warn_logs_one_line_per_alarm_and_stop_stops_at_the_fault(black_run, tmp_path):
    (warn, stop), lines, monitor = black_run
    black = [line for line in lines if "health alarm black" in line]
    assert len(black) == 2  # one from each monitor
    assert "at block 18" in black[0] and "threshold 1" in black[0] and "likely cause" in black[0]
    assert [r.should_stop for r in stop].index(True) == 18 and stop[18].should_stop
    assert monitor.should_stop
    png = monitor.plot(tmp_path / "stopped.health.png")
    with Image.open(png) as image:
        assert image.size[0] >= 800


def test_identity_change_is_flagged(picture, mouth, speech):
    start = 22
    hair = np.abs(picture.astype(int) - picture[150, WIDTH // 2]).sum(-1) < 40  # the brown hair
    blond = picture.copy()
    blond[hair] = (225, 195, 95)

    def swap(block, frames):
        if block < start:
            return frames
        frames = frames.copy()
        frames[:, hair] = blond[hair]
        return frames

    monitor = HealthMonitor(picture, FPS, "warn")
    (records,) = run_stream([monitor], picture, mouth, speech, blocks=30, fault=swap)
    identity = [block for name, block in raised(records) if name == "identity"]
    assert identity and start <= identity[0] <= start + 2
    assert min(r.identity_ssim for r in records[:start] if r.identity_ssim is not None) > 0.45


def test_modes_are_checked_and_off_measures_nothing(picture, tmp_path):
    assert HEALTH_MODES == ("auto", "off", "warn", "stop")
    assert check_health_mode("stop") == "stop"
    with pytest.raises(InputError) as err:
        check_health_mode("loud")
    assert err.value.input_name == "health" and "auto, off, warn, stop" in str(err.value)
    with pytest.raises(InputError, match="health: 'Warn'"):
        HealthMonitor(picture, FPS, "Warn")
    off = HealthMonitor(None, FPS, "off", sidecar=tmp_path / "x.health.jsonl", plot_path=tmp_path / "x.png")
    assert off.observe(np.zeros((12, 8, 8, 3), np.uint8), np.zeros(7680, np.float32), 16000) is None
    assert off.close() is None and not any(tmp_path.iterdir())
    monitor = HealthMonitor(picture, FPS, "warn")
    with pytest.raises(InputError, match="health audio"):
        monitor.observe(np.zeros((12, HEIGHT, WIDTH, 3), np.uint8), np.zeros(100, np.float32), 16000)


@pytest.mark.parametrize("opencv", ["missing", "without cascades"])
def test_unusable_opencv_is_refused_by_warn_and_turns_auto_off(picture, monkeypatch, tmp_path, caplog, opencv):
    if opencv == "missing":
        monkeypatch.setitem(sys.modules, "cv2", None)  # what `import cv2` meets when the wheel is absent
    else:
        import cv2

        monkeypatch.setattr(cv2.data, "haarcascades", str(tmp_path))  # as OpenCV 5's wheels are
    with pytest.raises(InputError) as err:
        HealthMonitor(picture, FPS, "warn")
    assert err.value.input_name == "health" and "opencv-python-headless" in err.value.fix
    assert "set health to off" in err.value.fix
    assert HealthMonitor(picture, FPS, "off").observe(picture[None], np.zeros(640, np.float32), 16000) is None
    with caplog.at_level(logging.WARNING, logger="liveavatar"):
        assert check_health("auto") == "off"
    assert any(r.getMessage().startswith("health checks off: health:") for r in caplog.records)


def test_auto_is_warn_where_opencv_can_run_the_checks():
    assert check_health("auto") == "warn" and check_health("stop") == "stop" and check_health("off") == "off"
