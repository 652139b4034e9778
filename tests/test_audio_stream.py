"""Audio as a stream (issue 15): packet decoding, windowed wav2vec2, lazy features and muxing.

Real audio files (WAV, FLAC and Opus written with PyAV), the tiny fixture wav2vec2 and real MP4s
decoded again. Windowed features are compared with `AudioEncoder.encode` (the whole-file path).
"""

import shutil
import subprocess

import av
import numpy as np
import pytest
import torch

from liveavatar_core.encoders.audio import SAMPLE_RATE, AudioEncoder, AudioFeatures, bucket_frames, load_audio
from liveavatar_core.encoders.audio_stream import (AudioInput, AudioReader, StreamedAudioFeatures, StreamedWaveform,
                                                   WindowedFeatures, expected_samples, video_feature_index)
from liveavatar_core.errors import InputError
from liveavatar_core.synthetic_inputs import make_speech_audio
from liveavatar_core.video.writer import StreamingMP4Writer

WAV2VEC2_DIR = "wav2vec2-large-xlsr-53-english"


@pytest.fixture(scope="module")
def encoder(ckpt_dir):
    return AudioEncoder.from_pretrained(ckpt_dir / WAV2VEC2_DIR)


def speech(seconds: float, rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """Speech-like audio with pauses and loudness changes (phrases of 1-4 s, 0.2-1 s of quiet)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * rate), np.float32)
    at = 0
    while at < out.size:
        phrase = make_speech_audio(rng.uniform(1, 4), rate, seed=int(rng.integers(1 << 30)))
        phrase = phrase[: out.size - at] * rng.uniform(0.3, 1.0)
        out[at:at + phrase.size] = phrase
        at += phrase.size + int(rng.uniform(0.2, 1.0) * rate)
    out += 0.002 * rng.standard_normal(out.size).astype(np.float32)
    return out


def espeak(seconds: float, tmp_path) -> np.ndarray:
    """Real synthetic speech from espeak-ng, at 16 kHz (skips when it is not installed)."""
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed")
    text = ("Live avatars talk for hours. The audio encoder reads the speech window by window, "
            "and every window sees a few seconds of its neighbours. ") * int(seconds / 6 + 1)
    wav = tmp_path / "espeak.wav"
    subprocess.run(["espeak-ng", "-s", "170", "-w", str(wav), text], check=True, capture_output=True)
    x = load_audio(wav)
    assert x.size >= seconds * SAMPLE_RATE
    return x[: int(seconds * SAMPLE_RATE)]


def write_audio(path, samples: np.ndarray, rate: int, codec: str, channels: int = 1) -> None:
    fmt = {"pcm_s16le": "wav", "flac": "flac", "libopus": "ogg"}[codec]
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.layout = layout
        pcm = np.repeat(samples[None], channels, 0)
        step = 960 if codec == "libopus" else 4096
        for i in range(0, pcm.shape[1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, i:i + step]), format="fltp",
                                               layout=layout)
            frame.sample_rate = rate
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def run_windowed(encoder, x: np.ndarray, chunk: int, **kw) -> torch.Tensor:
    """Push `x` in chunks, taking features whenever some are ready (as the sampler would)."""
    enc = WindowedFeatures(encoder, **kw)
    parts = []
    for start in range(0, x.size, chunk):
        enc.push(x[start:start + chunk])
        if enc.available_frames > enc.frames_out:
            parts.append(enc.features_until(enc.available_frames))
    enc.finish()
    parts.append(enc.features_until(enc.total_frames))
    return torch.cat(parts, dim=-1)


def as_dict(x: np.ndarray, rate: int = SAMPLE_RATE) -> dict:
    return {"waveform": torch.from_numpy(x)[None, None], "sample_rate": rate}


# --- decoding as a stream ------------------------------------------------------------------


@pytest.mark.parametrize("codec,rate,channels", [("pcm_s16le", 44100, 2), ("flac", 22050, 1), ("libopus", 48000, 1)])
def test_reader_yields_exactly_load_audio(tmp_path, codec, rate, channels):
    path = tmp_path / f"a.{codec}"
    write_audio(path, speech(7.3, rate), rate, codec, channels)
    chunks = list(AudioReader(path))
    assert len(chunks) >= 3  # really in pieces (of at least 2 s, however small the packets)
    assert np.array_equal(np.concatenate(chunks), load_audio(path))
    declared = expected_samples(path)
    assert declared is not None and abs(declared - load_audio(path).size) <= 0.02 * SAMPLE_RATE


def test_reader_refuses_like_load_audio(tmp_path):
    silent = tmp_path / "silent.wav"
    write_audio(silent, np.zeros(16000, np.float32), 16000, "pcm_s16le")
    with pytest.raises(InputError, match="digital silence"):
        list(AudioReader(silent))
    with pytest.raises(InputError, match="not found"):
        AudioReader(tmp_path / "missing.wav")
    with pytest.raises(InputError, match="NaN"):
        list(AudioReader(as_dict(np.full(100, np.nan, np.float32))))


# --- windowed wav2vec2 ---------------------------------------------------------------------


def test_one_window_over_everything_is_the_whole_file(encoder, tmp_path):
    """Windowing itself adds nothing: one window holding the whole file, with the whole file's
    statistics and length, gives `encode`'s features to float rounding, for any chunking."""
    x = speech(5.0)
    whole = encoder.encode(as_dict(x)).embedding
    kw = dict(window_s=100, context_s=0, stats=(float(x.mean()), float(x.var())), expected_samples=x.size)
    for chunk in (x.size, 333):
        got = run_windowed(encoder, x, chunk, **kw)
        assert got.shape == whole.shape
        torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)


def test_result_does_not_depend_on_push_sizes(encoder):
    x = speech(10.0, seed=3)
    kw = dict(window_s=2, context_s=1.5, stats_lookahead_s=3, expected_samples=x.size)
    a = run_windowed(encoder, x, 16000, **kw)
    b = run_windowed(encoder, x, 777, **kw)
    assert torch.equal(a, b)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("seconds", [13.0, 37.0])
def test_default_windows_stay_within_bf16_noise(encoder, seconds):
    """Default geometry (8 s windows, 4 s context, running statistics with 30 s look-ahead) on
    speech-like audio of several lengths. Tolerance: the official GPU pipeline runs wav2vec2 in
    bf16, which moves the whole-file features by more than windowing does; both are measured."""
    x = speech(seconds, seed=int(seconds))
    whole = encoder.encode(as_dict(x)).embedding
    windowed = run_windowed(encoder, x, 4000, expected_samples=x.size)
    bf16 = AudioEncoder(encoder.model.to(torch.bfloat16), encoder.arch).encode(as_dict(x)).embedding
    encoder.model.to(torch.float32)
    assert windowed.shape == whole.shape
    assert torch.equal(windowed == 0, whole == 0)  # the same zero tail past the end of the audio
    assert _rel(windowed, whole) < _rel(bf16, whole), (_rel(windowed, whole), _rel(bf16, whole))
    assert _rel(windowed, whole) < 0.01


def test_espeak_speech_close_to_whole_file(encoder, tmp_path):
    x = espeak(20.0, tmp_path)
    whole = encoder.encode(as_dict(x)).embedding
    windowed = run_windowed(encoder, x, 8000, expected_samples=x.size)
    assert _rel(windowed, whole) < 0.01
    # The windowing part alone (the whole file's statistics) is smaller still.
    exact = run_windowed(encoder, x, 8000, expected_samples=x.size, stats=(float(x.mean()), float(x.var())))
    assert _rel(exact, whole) <= _rel(windowed, whole) + 1e-6


def test_short_context_hurts(encoder):
    """Why the context is 4 s: under the positional conv's reach (1.28 s) the seams show."""
    x = speech(9.0, seed=5)
    whole = encoder.encode(as_dict(x)).embedding
    stats = (float(x.mean()), float(x.var()))
    short = run_windowed(encoder, x, 8000, window_s=2, context_s=0.5, stats=stats, expected_samples=x.size)
    default = run_windowed(encoder, x, 8000, window_s=2, context_s=4, stats=stats, expected_samples=x.size)
    assert _rel(default, whole) < _rel(short, whole) / 3


def test_bucketing_index_is_the_official_one():
    """One hour of 25 fps frames: round(k * 30 / 25) equals `bucket_frames`' linspace arithmetic."""
    n = 3600 * 25
    feats = torch.arange(n * 2, dtype=torch.float32)[None, :, None]  # value = 30 Hz index
    embedding, _ = bucket_frames(feats, 48)
    assert np.array_equal(video_feature_index(np.arange(n), 25), embedding[0, 0, 0, :n].numpy().astype(np.int64))


def test_nominal_grid_without_length_is_within_two_frames(encoder):
    """Without a declared length the 30 Hz frames sit on i * 5/3: at most 2 frames of 50 Hz (40 ms)
    from the official align_corners grid, at the very end."""
    for t50 in (149, 886, 9001, 180000):
        t30 = int(t50 * 0.6)
        i = np.arange(t30)
        official = i * (t50 - 1) / (t30 - 1)
        enc = WindowedFeatures(encoder)
        j0, w = enc._grid(i)
        shift = official - (j0 + w)
        assert shift.min() >= -1e-3 and shift.max() <= 2.0 and np.argmax(shift) >= t30 - 2


def test_features_need_their_right_context(encoder):
    enc = WindowedFeatures(encoder, window_s=2, context_s=1, stats_lookahead_s=0)
    enc.push(speech(2.5))
    assert enc.available_frames == 0  # window 0 needs 3 s
    with pytest.raises(InputError, match="push more audio"):
        enc.features_until(1)
    enc.push(speech(1.0, seed=1))
    ready = enc.available_frames
    assert 45 <= ready <= 50  # about the 2 s window 0 owns, at 25 fps
    assert enc.features_until(ready).shape[-1] == ready


# --- lazy features, the pipeline's view ----------------------------------------------------


def test_clips_pulled_lazily_and_num_clips_reads_only_what_it_needs(encoder, tmp_path):
    x = speech(16.0, seed=2)
    path = tmp_path / "talk.flac"
    write_audio(path, x, 16000, "flac")
    geometry = dict(window_s=2, context_s=1, stats_lookahead_s=2)
    streamed = StreamedAudioFeatures(encoder, path, **geometry)
    assert streamed.available_clips == 9  # from the declared length: int(T30 / 57.6) + 1 = int(479 / 57.6) + 1
    clips = list(streamed.clips())
    assert len(clips) == streamed.available_clips and all(c.shape[-1] == 48 for c in clips)
    reference = run_windowed(encoder, load_audio(path), 4000, expected_samples=x.size, **geometry)
    assert torch.equal(torch.cat(clips, dim=-1), reference)
    assert torch.equal(torch.cat(list(streamed.clips(start=6)), -1), reference[..., 6 * 48:])

    one = StreamedAudioFeatures(encoder, path, num_clips=1, **geometry)
    assert len(list(one.clips())) == 1
    # Window 0 (2 s + 1 s of context), the 2 s statistics look-ahead and at most one more read
    # chunk (about 2 s), not the 16 s.
    assert one.samples_read < 7.5 * SAMPLE_RATE


def test_audio_input_resolves_per_mode(encoder, tmp_path):
    path = tmp_path / "a.wav"
    write_audio(path, speech(5.0), 16000, "pcm_s16le")
    prepared = encoder.prepare(as_dict(load_audio(path)))
    assert isinstance(prepared, AudioInput) and prepared.num_clips == encoder.encode(path).num_clips
    official = prepared.features("official")
    assert isinstance(official, AudioFeatures) and prepared.features("official") is official
    assert torch.equal(official.embedding, encoder.encode(path).embedding)
    streaming = prepared.features("streaming")
    assert isinstance(streaming, StreamedAudioFeatures) and streaming is not prepared.features("streaming")


# --- the MP4 track read a second time ------------------------------------------------------


def test_writer_with_streamed_track_writes_the_same_file(tmp_path):
    path = tmp_path / "voice.flac"
    write_audio(path, speech(6.0, 22050), 22050, "flac")
    frames = np.random.default_rng(0).integers(0, 255, (130, 64, 64, 3), dtype=np.uint8)
    out = []
    for name, audio in (("array", load_audio(path)), ("streamed", StreamedWaveform(path))):
        target = tmp_path / f"{name}.mp4"
        with StreamingMP4Writer(target, 64, 64, 25, audio=audio, sample_rate=16000) as w:
            for i in range(0, len(frames), 12):
                w.append(frames[i:i + 12])
        out.append(target.read_bytes())
    assert out[0] == out[1]
    # Frames past the end of a short track are dropped the same way (trim "shortest").
    short = tmp_path / "short.wav"
    write_audio(short, speech(2.0), 16000, "pcm_s16le")
    counts = []
    for audio in (load_audio(short), StreamedWaveform(short)):
        target = tmp_path / f"short{len(counts)}.mp4"
        with StreamingMP4Writer(target, 64, 64, 25, audio=audio, sample_rate=16000) as w:
            counts.append(sum(w.append(frames[i:i + 12]) for i in range(0, len(frames), 12)))
    assert counts[0] == counts[1] == 50


def test_streamed_track_reads_back_after_a_rollback(tmp_path):
    """A writer that rolls back a failed fragment re-reads earlier samples: near ones from the kept
    history, far ones by decoding again."""
    path = tmp_path / "voice.flac"
    write_audio(path, speech(12.0), 16000, "flac")
    samples = load_audio(path)
    source = StreamedWaveform(path).open_source(48)
    for start in range(0, 160000, 1024):
        source.read(start, start + 1024)
    for start in (150000, 1000):  # within the history, then far back
        assert np.array_equal(source.read(start, start + 1024)[0], samples[start + 48:start + 48 + 1024])
