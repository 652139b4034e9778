"""Streaming MP4 writer: real files written with PyAV encoders and decoded again with PyAV."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.video import StreamingMP4Writer, WriterSettings, probe_mp4, to_uint8_frames
from liveavatar_core.video.fmp4 import top_level_boxes

H, W, FPS, SR = 64, 128, 25, 16000
SAMPLES_PER_FRAME = SR // FPS
# Pipeline-like block sizes: 9 frames for the first block (3 dropped), then 12.
BLOCKS = [9, 12, 12, 12, 12, 12]


def smooth_clip(n: int, start: int = 0, height: int = H, width: int = W) -> torch.Tensor:
    """Float frames [3, n, H, W] in [-1, 1]: slowly moving gradients, like a talking head."""
    t = torch.arange(start, start + n, dtype=torch.float32)[:, None, None]
    y = torch.linspace(0, 1, height)[None, :, None]
    x = torch.linspace(0, 1, width)[None, None, :]
    return torch.stack([
        0.7 * torch.sin(2.0 * x + 1.5 * y + 0.05 * t + phase) for phase in (0.0, 0.8, 1.6)
    ])


def voice(seconds: float, sr: int = SR, channels: int = 1) -> np.ndarray:
    """A speech-like test signal: a gliding harmonic tone with a syllable-rate envelope."""
    t = np.arange(round(seconds * sr)) / sr
    pitch = 2 * np.pi * np.cumsum(140 + 40 * np.sin(2 * np.pi * 0.7 * t)) / sr
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    out = [0.25 * envelope * (np.sin(pitch * (c + 1)) + 0.5 * np.sin(3 * pitch * (c + 1))) for c in range(channels)]
    return np.stack(out).astype(np.float32) if channels > 1 else out[0].astype(np.float32)


def write_blocks(path, blocks, audio=None, settings=None, **kwargs) -> StreamingMP4Writer:
    with StreamingMP4Writer(path, W, H, FPS, audio=audio, sample_rate=SR if audio is not None else None,
                            settings=settings, **kwargs) as writer:
        start = 0
        for n in blocks:
            writer.append(smooth_clip(n, start))
            start += n
    return writer


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def snr_db(decoded: np.ndarray, reference: np.ndarray) -> float:
    n = min(decoded.shape[-1], reference.shape[-1])
    error = decoded[..., :n] - reference[..., :n]
    return 10 * np.log10(np.sum(reference[..., :n] ** 2) / np.sum(error ** 2))


def best_lag(decoded: np.ndarray, reference: np.ndarray, max_lag: int = 2048) -> int:
    """Shift (in samples) at which the decoded audio best matches the reference (FFT xcorr)."""
    n = min(len(decoded), len(reference))
    size = 1 << (2 * n - 1).bit_length()
    xcorr = np.fft.irfft(np.fft.rfft(decoded[:n], size) * np.conj(np.fft.rfft(reference[:n], size)), size)
    lags = np.concatenate([np.arange(0, max_lag + 1), np.arange(-max_lag, 0)])
    return int(lags[np.argmax(xcorr[lags])])


def test_frames_decode_close_to_input_with_audio_in_sync(tmp_path):
    total = sum(BLOCKS)
    audio = voice(total / FPS)
    path = tmp_path / "clip.mp4"
    writer = write_blocks(path, BLOCKS, audio)
    assert writer.frames_written == total and writer.duration_s == pytest.approx(total / FPS)

    probe = probe_mp4(path, max_frames=total, decode_audio=True)
    assert (probe.width, probe.height, probe.frame_count, probe.fps) == (W, H, total, FPS)
    expected = to_uint8_frames(smooth_clip(total))
    quality = psnr(probe.frames, expected)
    assert quality > 35, f"PSNR {quality:.1f} dB at the default CRF"

    assert probe.has_audio and probe.sample_rate == SR and probe.channels == 1
    assert abs(probe.audio_duration_s - probe.duration_s) <= 1 / FPS
    decoded = probe.audio[0]
    assert abs(len(decoded) - len(audio)) <= SAMPLES_PER_FRAME
    # The AAC priming is hidden by the edit list: sound starts at t = 0, not 64 ms late.
    assert best_lag(decoded, audio) == 0
    assert snr_db(decoded, audio) > 12


def test_uint8_input_and_stereo_audio(tmp_path):
    audio = voice(2.0, channels=2)
    frames = to_uint8_frames(smooth_clip(50))
    path = tmp_path / "stereo.mp4"
    with StreamingMP4Writer(path, W, H, audio=audio.T.copy(), sample_rate=SR) as writer:  # [n, 2] layout
        writer.append(frames[:20])
        writer.append(torch.from_numpy(frames[20:]))
    probe = probe_mp4(path, max_frames=50, decode_audio=True)
    assert probe.frame_count == 50 and probe.channels == 2
    assert psnr(probe.frames, frames) > 35
    for c in range(2):
        assert best_lag(probe.audio[c], audio[c]) == 0
        assert snr_db(probe.audio[c], audio[c]) > 12


def test_official_quantisation_is_truncation_after_clamp():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6).expand(3, 1, 1, 6)
    # (x + 1) / (2 + 1e-5) * 255, truncated: +1 maps to 254 in the official writer.
    expected = [0, 0, 127, 191, 254, 254]
    assert to_uint8_frames(x)[0, 0, :, 0].tolist() == expected


def test_default_trim_drops_frames_past_the_end_of_the_audio(tmp_path):
    audio = voice(1.01)  # 25.25 frames long: frame 25 still starts inside the audio
    path = tmp_path / "trim.mp4"
    writer = write_blocks(path, [20, 20], audio)
    assert writer.frames_written == 26 and writer.frames_dropped == 14
    probe = probe_mp4(path)
    assert probe.frame_count == 26
    assert probe.audio_duration_s == pytest.approx(len(audio) / SR, abs=1e-6)
    assert abs(probe.audio_duration_s - probe.duration_s) <= 1 / FPS


def test_audio_longer_than_video_is_cut_at_the_last_frame(tmp_path):
    path = tmp_path / "short_video.mp4"
    write_blocks(path, [12, 12], voice(3.0))
    probe = probe_mp4(path)
    assert probe.frame_count == 24
    assert probe.audio_duration_s == pytest.approx(24 / FPS, abs=1e-6)


def test_trim_video_keeps_every_frame(tmp_path):
    audio = voice(1.0)
    path = tmp_path / "keep.mp4"
    writer = write_blocks(path, [20, 20], audio, settings=WriterSettings(trim="video"))
    assert writer.frames_written == 40 and writer.frames_dropped == 0
    probe = probe_mp4(path)
    assert probe.frame_count == 40
    assert probe.audio_duration_s == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("offset", [3, -2])
def test_audio_offset_shifts_sound_against_picture(tmp_path, offset):
    audio = voice(2.0)
    path = tmp_path / "offset.mp4"
    write_blocks(path, [25, 25], audio, settings=WriterSettings(audio_offset_frames=offset, trim="video"))
    probe = probe_mp4(path, decode_audio=True)
    shift = offset * SAMPLES_PER_FRAME
    # Output sample t plays source sample t + shift (silence where that is outside the source).
    if shift > 0:
        reference = audio[shift:]
    else:
        reference = np.concatenate([np.zeros(-shift, np.float32), audio])[:len(audio)]
    assert best_lag(probe.audio[0], reference) == 0
    assert probe.audio_duration_s == pytest.approx(min(len(audio) - shift, len(audio)) / SR, abs=1e-6)


def test_growing_file_is_playable_after_every_append(tmp_path):
    audio = voice(sum(BLOCKS) / FPS)
    path = tmp_path / "growing.mp4"
    writer = StreamingMP4Writer(path, W, H, audio=audio, sample_rate=SR)
    start = 0
    for i, n in enumerate(BLOCKS):
        writer.append(smooth_clip(n, start))
        start += n
        snapshot = tmp_path / f"snapshot{i}.mp4"
        shutil.copyfile(path, snapshot)  # what a player reading the growing file sees now
        probe = probe_mp4(snapshot)
        assert probe.frame_count == writer.frames_written == start
        assert probe.audio_duration_s == pytest.approx(writer.audio_samples_written / SR, abs=1e-6)
        assert 0 <= probe.duration_s - probe.audio_duration_s < 1024 / SR + 1 / FPS
    writer.close()
    assert probe_mp4(path).audio_duration_s == pytest.approx(start / FPS, abs=1e-6)


def test_file_cut_at_any_byte_still_opens_with_every_complete_fragment(tmp_path):
    """What a kill -9 can leave: complete fragments, then part of one still typed `free`."""
    path = tmp_path / "full.mp4"
    write_blocks(path, BLOCKS[:4], voice(sum(BLOCKS[:4]) / FPS))
    data = path.read_bytes()
    boxes = list(top_level_boxes(data))
    # (moof offset, moof size, end of its mdat) for each fragment, in file order.
    fragments = [
        (offset, size, boxes[j + 1][1] + boxes[j + 1][2])
        for j, (kind, offset, size) in enumerate(boxes) if kind == b"moof"
    ]
    frames_before = np.cumsum([0] + BLOCKS[:4])
    cut_file = tmp_path / "cut.mp4"
    for index, (offset, size, end) in enumerate(fragments[:4]):
        in_flight = bytearray(data[offset:end])
        in_flight[4:8] = b"free"  # how the writer emits a fragment before it is complete
        length = len(in_flight)
        for cut in sorted({0, 3, 8, 20, size // 2, size, size + 8, (size + length) // 2, length - 1}):
            cut_file.write_bytes(data[:offset] + bytes(in_flight[:cut]))
            assert probe_mp4(cut_file).frame_count == frames_before[index], (index, cut)


def test_exception_inside_the_with_block_still_finalises(tmp_path):
    audio = voice(4.0)
    path = tmp_path / "failed.mp4"
    with pytest.raises(RuntimeError, match="sampler blew up"):
        with StreamingMP4Writer(path, W, H, audio=audio, sample_rate=SR) as writer:
            writer.append(smooth_clip(9))
            writer.append(smooth_clip(12, 9))
            raise RuntimeError("sampler blew up")
    assert writer.closed
    probe = probe_mp4(path)
    assert probe.frame_count == 21
    assert probe.audio_duration_s == pytest.approx(21 / FPS, abs=1e-6)  # the audio tail was written
    with pytest.raises(InputError, match="closed"):
        writer.append(smooth_clip(1))


def test_resume_gives_the_same_video_as_an_uninterrupted_run(tmp_path):
    total = sum(BLOCKS)
    audio = voice(total / FPS + 0.5)
    reference = tmp_path / "reference.mp4"
    write_blocks(reference, BLOCKS, audio)

    resumed = tmp_path / "resumed.mp4"
    writer = StreamingMP4Writer(resumed, W, H, audio=audio, sample_rate=SR)
    starts = np.cumsum([0] + BLOCKS)
    for i in range(3):
        writer.append(smooth_clip(BLOCKS[i], starts[i]))
    state = json.loads(json.dumps(writer.state()))  # it must survive a trip through JSON
    writer.append(smooth_clip(BLOCKS[3], starts[3]))  # work after the state: must be discarded
    writer._file.close()  # the process "dies" here, without close()

    writer = StreamingMP4Writer.resume(state, audio=audio, sample_rate=SR)
    assert writer.frames_written == starts[3]
    for i in range(3, len(BLOCKS)):
        writer.append(smooth_clip(BLOCKS[i], starts[i]))
    writer.close()

    a = probe_mp4(reference, max_frames=total, decode_audio=True)
    b = probe_mp4(resumed, max_frames=total, decode_audio=True)
    assert a.frame_count == b.frame_count == total
    np.testing.assert_array_equal(a.frames, b.frames)
    assert video_samples(reference) == video_samples(resumed)  # even the H.264 bytes match
    # Audio: identical up to the resume point, then re-encoded after a warmed-up splice.
    split = state["audio_samples_written"]
    assert a.audio.shape == b.audio.shape
    np.testing.assert_array_equal(a.audio[:, :split], b.audio[:, :split])
    assert snr_db(b.audio[:, split:], a.audio[:, split:]) > 30


def video_samples(path) -> list[bytes]:
    import av

    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(video=0) if p.size]


def test_resume_rejects_other_audio_and_damaged_files(tmp_path):
    audio = voice(2.0)
    path = tmp_path / "partial.mp4"
    writer = StreamingMP4Writer(path, W, H, audio=audio, sample_rate=SR)
    writer.append(smooth_clip(12))
    state = writer.state()
    writer.close()

    with pytest.raises(InputError, match="differs from the audio"):
        StreamingMP4Writer.resume(state, audio=audio * 0.5, sample_rate=SR)
    with pytest.raises(InputError, match="audio"):
        StreamingMP4Writer.resume(state)
    with pytest.raises(InputError, match="state"):
        StreamingMP4Writer.resume({"frames_written": 3})

    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # a header that these settings would not produce
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="header"):
        StreamingMP4Writer.resume(state, audio=audio, sample_rate=SR)
    path.write_bytes(bytes(data[:state["bytes"] - 10]))
    with pytest.raises(InputError, match="shorter"):
        StreamingMP4Writer.resume(state, audio=audio, sample_rate=SR)


def test_memory_stays_flat_however_many_blocks(tmp_path):
    """RSS (from /proc/self/statm) may not grow with the number of frames appended."""
    height = width = 256
    blocks, per_block = 20, 48
    frames = to_uint8_frames(smooth_clip(per_block, 0, height, width))
    audio = voice(blocks * per_block / FPS)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    settings = WriterSettings(preset="ultrafast")
    with StreamingMP4Writer(tmp_path / "long.mp4", width, height, audio=audio, sample_rate=SR,
                            settings=settings) as writer:
        for i in range(blocks):
            writer.append(np.roll(frames, i, axis=2))
            if i == 2:
                baseline = rss()
        growth = rss() - baseline
    passed_through = (blocks - 3) * frames.nbytes  # ~160 MB that a frame-keeping writer would hold
    mib = 2 ** 20
    assert growth < 24 * mib, f"RSS grew {growth / mib:.1f} MiB over {passed_through / mib:.0f} MiB of frames"


@pytest.mark.parametrize("size", [(127, 64), (128, 63), (0, 64)])
def test_odd_or_empty_sizes_are_rejected(tmp_path, size):
    with pytest.raises(InputError, match="even"):
        StreamingMP4Writer(tmp_path / "odd.mp4", *size)
    assert not (tmp_path / "odd.mp4").exists()


@pytest.mark.parametrize("frames, message", [
    (np.zeros((4, H, W, 3), np.float32), "uint8"),
    (np.zeros((4, H, W, 4), np.uint8), r"\[n, H, W, 3\]"),
    (torch.zeros(4, 3, H, W), r"\[3, n, H, W\]"),
    (torch.zeros(1, 3, 4, H, W), r"\[3, n, H, W\]"),
    (torch.zeros(3, 4, H, W, dtype=torch.int32), "float"),
    (torch.full((3, 2, H, W), float("nan")), "NaN"),
    (torch.zeros(3, 2, H + 2, W), "does not match"),
    ([[0.0]], "torch tensor or numpy"),
])
def test_bad_frames_are_rejected_before_encoding(tmp_path, frames, message):
    with StreamingMP4Writer(tmp_path / "bad.mp4", W, H) as writer:
        with pytest.raises(InputError, match=message):
            writer.append(frames)
        assert writer.frames_written == 0


@pytest.mark.parametrize("audio, rate, message", [
    (np.zeros(1000, np.int16), SR, "float"),
    (np.zeros((3, 1000), np.float32), SR, "mono"),
    (np.zeros(1000, np.float32), 12345, "AAC"),
    (np.zeros(1000, np.float32), None, "sample rate"),
    (np.array([0.0, np.inf] * 600, np.float32), SR, "NaN or infinite"),
])
def test_bad_audio_is_rejected(tmp_path, audio, rate, message):
    with pytest.raises(InputError, match=message):
        StreamingMP4Writer(tmp_path / "bad.mp4", W, H, audio=audio, sample_rate=rate)


def test_bad_settings_and_paths_are_rejected(tmp_path):
    with pytest.raises(InputError, match="crf"):
        WriterSettings(crf=60)
    with pytest.raises(InputError, match="trim"):
        WriterSettings(trim="longest")
    with pytest.raises(InputError, match="fps"):
        StreamingMP4Writer(tmp_path / "a.mp4", W, H, fps=0)
    with pytest.raises(InputError, match="does not exist"):
        StreamingMP4Writer(tmp_path / "missing" / "a.mp4", W, H)
    existing = tmp_path / "taken.mp4"
    existing.write_bytes(b"keep me")
    with pytest.raises(InputError, match="already exists"):
        StreamingMP4Writer(existing, W, H)
    assert existing.read_bytes() == b"keep me"
