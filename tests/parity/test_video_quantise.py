"""Output frames against the official quantisation (golden/08 `video_uint8`, golden/10 frames)."""

import math

import av
import numpy as np
from safetensors.torch import load_file

from liveavatar_core.video import StreamingMP4Writer, probe_mp4, to_uint8_frames


def test_quantisation_matches_the_official_save_video(fixtures):
    frames = load_file(fixtures / "golden" / "10_video_clip0.safetensors")["clip0_frames"]
    for run in ("08_rollout_offline", "09_rollout_online"):
        expected = load_file(fixtures / "golden" / f"{run}.safetensors")["video_uint8"]
        # The decoded clip-0 frames are the first frames of both runs' videos.
        official = expected[:, :frames.shape[1]].permute(1, 2, 3, 0).numpy()
        np.testing.assert_array_equal(to_uint8_frames(frames), official)


def test_official_video_and_audio_through_the_writer(fixtures, manifest, tmp_path):
    video = load_file(fixtures / "golden" / "08_rollout_offline.safetensors")["video_uint8"]
    frames = np.ascontiguousarray(video.permute(1, 2, 3, 0).numpy())
    fps = manifest["settings"]["sample_fps"]
    audio, sr = read_wav(fixtures / manifest["inputs"]["audio"])
    path = tmp_path / "official.mp4"
    with StreamingMP4Writer(path, frames.shape[2], frames.shape[1], fps, audio=audio, sample_rate=sr) as writer:
        writer.append(frames)
    # Like the official `-shortest` mux: the file ends with the shorter of picture and sound.
    expected_frames = min(len(frames), math.ceil(len(audio) * fps / sr))
    probe = probe_mp4(path, max_frames=expected_frames)
    assert probe.frame_count == expected_frames and probe.fps == fps
    kept = frames[:expected_frames]
    # 4:2:0 chroma subsampling alone limits the RGB PSNR of noisy content (the official writer is
    # yuv420p too), so the bar is what the pixel-format round trip keeps, less 1 dB for H.264.
    subsampled = np.stack([
        av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray(format="rgb24")
        for f in kept
    ])
    assert psnr(probe.frames, kept) > psnr(subsampled, kept) - 1.0
    assert abs(probe.audio_duration_s - min(probe.duration_s, len(audio) / sr)) < 1 / fps


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def read_wav(path) -> tuple[np.ndarray, int]:
    """Mono float samples at the pipeline's 16 kHz, decoded with PyAV (the official mux reads the file
    with FFmpeg too)."""
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=16000)
    with av.open(str(path)) as container:
        chunks = [f.to_ndarray()[0] for frame in container.decode(audio=0) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray()[0] for f in resampler.resample(None)]
    return np.concatenate(chunks), 16000
