"""Audio loading: every common container through PyAV, librosa-identical resampling, refusals."""

import wave

import av
import librosa
import numpy as np
import pytest
import soxr
import torch

from liveavatar_core.encoders.audio import SAMPLE_RATE, load_audio
from liveavatar_core.errors import InputError

STEREO_RATE = 44100


def read_wav(path) -> tuple[np.ndarray, int]:
    """int16 PCM [channels, samples] with the standard library, independent of the code under test."""
    with wave.open(str(path)) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return data.reshape(-1, w.getnchannels()).T.copy(), w.getframerate()


def write_wav(path, pcm: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(pcm.T).astype("<i2").tobytes())


def write_with_pyav(path, container: str, codec: str, rate: int, mono: np.ndarray) -> None:
    """Encode a float mono signal into a real compressed file (what a user would upload)."""
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(mono[None].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        converter = av.AudioResampler(format=stream.codec_context.format, layout="mono", rate=rate)
        pts = 0
        # Explicit pts let the encoder write its priming delay (AAC edit list, Opus pre-skip).
        for chunk in [*converter.resample(frame), *converter.resample(None)]:
            chunk.pts = pts
            pts += chunk.samples
            out.mux(stream.encode(chunk))
        out.mux(stream.encode(None))


@pytest.fixture(scope="module")
def wav_path(fixtures, manifest):
    return fixtures / manifest["inputs"]["audio"]


@pytest.fixture(scope="module")
def reference(wav_path):
    return load_audio(wav_path)


@pytest.fixture(scope="module")
def stereo_44k(tmp_path_factory, wav_path):
    """A 44.1 kHz stereo PCM16 wav whose channels differ, so the channel average matters."""
    pcm, rate = read_wav(wav_path)
    left = soxr.resample(pcm[0].astype(np.float32) / 32768, rate, STEREO_RATE)
    right = 0.5 * left[::-1]
    stereo = np.clip(np.round(np.stack([left, right]) * 32767), -32768, 32767).astype(np.int16)
    path = tmp_path_factory.mktemp("audio") / "stereo_44k.wav"
    write_wav(path, stereo, STEREO_RATE)
    return path


def test_wav_equals_librosa_load(wav_path, reference):
    expected, _ = librosa.load(wav_path, sr=SAMPLE_RATE)
    assert reference.dtype == np.float32
    assert np.array_equal(reference, expected)


def test_stereo_44k_wav_equals_librosa_load(stereo_44k):
    expected, _ = librosa.load(stereo_44k, sr=SAMPLE_RATE)
    got = load_audio(stereo_44k)
    assert got.shape == expected.shape == (int(np.ceil(read_wav(stereo_44k)[0].shape[1] * SAMPLE_RATE / STEREO_RATE)),)
    assert np.array_equal(got, expected)


def test_flac_is_lossless(tmp_path, wav_path, reference):
    pcm, rate = read_wav(wav_path)
    path = tmp_path / "audio.flac"
    write_with_pyav(path, "flac", "flac", rate, pcm[0].astype(np.float32) / 32768)
    assert np.array_equal(load_audio(path), reference)


@pytest.mark.parametrize("name,container,codec,rate", [
    ("audio.mp3", "mp3", "libmp3lame", 16000),
    ("audio.ogg", "ogg", "libopus", 48000),
    ("audio.m4a", "ipod", "aac", 22050),
])
def test_lossy_formats_decode_to_the_same_signal(tmp_path, wav_path, reference, name, container, codec, rate):
    pcm, src_rate = read_wav(wav_path)
    mono = soxr.resample(pcm[0].astype(np.float32) / 32768, src_rate, rate)
    path = tmp_path / name
    write_with_pyav(path, container, codec, rate, mono)
    got = load_audio(path)
    # Codecs round the end up to whole frames; the priming delay must be removed (no lag).
    assert 0 <= got.shape[0] - reference.shape[0] <= 2048
    n = reference.shape[0]
    assert np.corrcoef(got[:n], reference)[0, 1] > 0.95


def test_comfy_audio_dict_equals_file(wav_path, stereo_44k):
    for path in (wav_path, stereo_44k):
        pcm, rate = read_wav(path)
        audio = {"waveform": torch.from_numpy(pcm.astype(np.float32) / 32768)[None], "sample_rate": rate}
        assert np.array_equal(load_audio(audio), load_audio(path))


def test_comfy_audio_uses_batch_zero(wav_path, reference):
    pcm, rate = read_wav(wav_path)
    first = torch.from_numpy(pcm.astype(np.float32) / 32768)
    audio = {"waveform": torch.stack([first, torch.zeros_like(first)]), "sample_rate": rate}
    assert np.array_equal(load_audio(audio), reference)


def _refused(source, *words):
    with pytest.raises(InputError) as info:
        load_audio(source)
    assert info.value.input_name == "audio" and info.value.fix
    for word in words:
        assert word in str(info.value)


def test_missing_file_refused(tmp_path):
    _refused(tmp_path / "nope.wav", "not found")


def test_folder_refused(tmp_path):
    _refused(tmp_path, "folder")


def test_corrupt_and_non_audio_files_refused(tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _refused(garbage, "cannot decode")
    text = tmp_path / "notes.mp3"
    text.write_text("this is not audio\n" * 100)
    _refused(text, "cannot decode")


def test_video_without_audio_refused(tmp_path):
    path = tmp_path / "silent_video.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    _refused(path, "no audio stream")


def test_zero_length_refused(tmp_path):
    path = tmp_path / "empty.wav"
    write_wav(path, np.zeros((1, 0), np.int16), SAMPLE_RATE)
    _refused(path, "zero length")
    _refused({"waveform": torch.zeros(1, 1, 0), "sample_rate": SAMPLE_RATE}, "zero length")


def test_digital_silence_refused_with_reason(tmp_path):
    path = tmp_path / "silence.wav"
    write_wav(path, np.zeros((2, SAMPLE_RATE), np.int16), SAMPLE_RATE)
    _refused(path, "silence", "would not move")
    _refused({"waveform": torch.full((1, 1, SAMPLE_RATE), 0.25), "sample_rate": SAMPLE_RATE}, "silence")


def test_bad_comfy_dicts_refused():
    _refused({"waveform": torch.zeros(SAMPLE_RATE), "sample_rate": SAMPLE_RATE}, "AUDIO")
    _refused({"waveform": torch.zeros(1, 1, SAMPLE_RATE)}, "AUDIO")
    _refused({"waveform": torch.zeros(1, 0, SAMPLE_RATE), "sample_rate": SAMPLE_RATE}, "empty")
    _refused({"waveform": torch.full((1, 1, 100), float("nan")), "sample_rate": SAMPLE_RATE}, "NaN")
    _refused(12345, "expected a file path")
