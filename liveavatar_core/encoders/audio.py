"""Audio -> the `[1, 25, C, frames]` wav2vec2 embedding the DiT consumes (spec/pipeline.md 2.3-2.7).

Steps, each matching the official pipeline:
1. decode any common file with PyAV (no ffmpeg binary needed) or take a ComfyUI AUDIO dict, average
   the channels, resample to 16 kHz exactly as `librosa.load(sr=16000)` does (soxr HQ);
2. normalise per utterance, run wav2vec2 and keep all 25 hidden states;
3. resample the 50 Hz features to 30 Hz linearly, then pick one 30 Hz frame per 25 fps video frame.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soxr
import torch
import torch.nn.functional as F

from ..config import DEFAULT_FRAMES_PER_CLIP, FRAMES_PER_BLOCK, check_frames_per_clip  # noqa: F401 (re-exported)
from ..errors import InputError, WeightsError
from ..weights.wav2vec2 import LoadedWav2Vec2, Wav2Vec2Arch, load_wav2vec2

logger = logging.getLogger("liveavatar")

SAMPLE_RATE = 16000
# The official encoder hard-codes both rates: wav2vec2 runs at 50 Hz (320x stride at 16 kHz) and
# its features are resampled to a 30 Hz "video rate" before bucketing (spec 2.4 step 4).
FEATURE_RATE = 50
VIDEO_RATE = 30
DEFAULT_FPS = 25
_NORM_EPS = 1e-7


@dataclass
class AudioFeatures:
    """Encoded audio of one run.

    `embedding` is `[1, 25, C, available_clips * frames_per_clip]` float32 on CPU: the whole bucketed
    tensor, zeros past the end of the audio. `num_clips` is how many clips to generate (the request
    capped at `available_clips`); `waveform_16k` is the mono 16 kHz signal for muxing.
    """

    embedding: torch.Tensor
    num_clips: int
    available_clips: int
    frames_per_clip: int
    fps: int
    waveform_16k: np.ndarray
    duration_s: float

    @property
    def total_samples(self) -> int:
        """16 kHz length of the audio."""
        return len(self.waveform_16k)


# ---------------------------------------------------------------------------------------------
# Loading and resampling


def load_audio(source, input_name: str = "audio") -> np.ndarray:
    """Mono float32 waveform at 16 kHz from a file path or a ComfyUI AUDIO dict.

    Matches `librosa.load(path, sr=16000)`: channels averaged, soxr HQ resampling, length
    `ceil(n * 16000 / sr)`. Refuses missing, unreadable, empty and digitally silent audio.
    """
    if isinstance(source, Mapping):
        channels, rate = _from_comfy_audio(source, input_name)
    elif isinstance(source, (str, os.PathLike)):
        channels, rate = _decode_file(Path(source), input_name)
    else:
        raise InputError(input_name, f"expected a file path or a ComfyUI AUDIO dict, got {type(source).__name__}.",
                         "connect a Load Audio node or pass the path of a wav/flac/mp3/ogg/m4a file.")
    if channels.shape[-1] == 0:
        raise InputError(input_name, "the audio has no samples (zero length).",
                         "use an audio file that contains speech.")
    mono = np.mean(channels, axis=0) if channels.shape[0] > 1 else channels[0]
    if not np.all(np.isfinite(mono)):
        raise InputError(input_name, "the audio contains NaN or infinite samples.", "re-export the audio file.")
    if np.all(mono == mono[0]):
        raise InputError(input_name, "the audio is digital silence (every sample has the same value). wav2vec2 "
                         "normalises each clip to zero mean and unit variance, so silence yields all-zero "
                         "features and the avatar would not move.", "use the speech audio you want lip-synced.")
    return resample(mono, rate, SAMPLE_RATE)


def resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """`librosa.resample` with its default `soxr_hq`: soxr, then trim/zero-pad to ceil(n*ratio)."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    if orig_sr == target_sr:
        return y
    n_out = int(np.ceil(y.shape[-1] * float(target_sr) / orig_sr))
    out = soxr.resample(y, orig_sr, target_sr, quality="soxr_hq")
    if out.shape[-1] >= n_out:
        out = out[:n_out]
    else:
        out = np.pad(out, (0, n_out - out.shape[-1]))
    return np.asarray(out, dtype=np.float32)


def _decode_file(path: Path, input_name: str) -> tuple[np.ndarray, int]:
    if not path.exists():
        raise InputError(input_name, f"file not found: {path}.", "check the path of the audio file.")
    if path.is_dir():
        raise InputError(input_name, f"{path} is a folder.", "pass the audio file itself.")
    chunks = []
    rate = None
    try:
        with av.open(str(path)) as container:
            streams = [s for s in container.streams if s.type == "audio"]
            if not streams:
                raise InputError(input_name, f"{path.name} has no audio stream.",
                                 "use a wav, flac, mp3, ogg or m4a file with sound in it.")
            for frame in container.decode(streams[0]):
                if rate is None:
                    rate = frame.sample_rate
                elif frame.sample_rate != rate:
                    raise InputError(input_name, f"{path.name} changes sample rate mid-stream.",
                                     "re-export it as a plain wav file.")
                chunks.append(_frame_to_float(frame, input_name))
    except av.error.FFmpegError as exc:
        raise InputError(input_name, f"cannot decode {path.name} ({exc.strerror or type(exc).__name__}); the file "
                         "is corrupt or not an audio format.", "use a wav, flac, mp3, ogg or m4a file.") from None
    if not chunks:
        return np.zeros((1, 0), np.float32), rate or SAMPLE_RATE
    return np.concatenate(chunks, axis=1), rate


# Integer sample formats scale to [-1, 1) the way libsndfile (librosa's reader) does.
_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _frame_to_float(frame, input_name: str) -> np.ndarray:
    """One decoded PyAV frame as float32 `[channels, samples]`."""
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    name = frame.format.name.rstrip("p")
    if name in ("flt", "dbl"):
        return data.astype(np.float32)
    if name not in _INT_SCALE:
        raise InputError(input_name, f"unsupported sample format '{frame.format.name}'.", "re-export as a wav file.")
    if name == "u8":
        return (data.astype(np.float32) - 128.0) / 128.0
    # Dividing by a power of two is exact, so this equals libsndfile's float conversion.
    return data.astype(np.float32) / np.float32(_INT_SCALE[name])


def _from_comfy_audio(audio: Mapping, input_name: str) -> tuple[np.ndarray, int]:
    waveform = audio.get("waveform")
    rate = audio.get("sample_rate")
    if not isinstance(waveform, torch.Tensor) or waveform.ndim != 3 or not isinstance(rate, int) or rate <= 0:
        raise InputError(input_name, "an AUDIO input must be {'waveform': tensor [batch, channels, samples], "
                         "'sample_rate': int}.", "connect the output of a Load Audio node.")
    if waveform.shape[0] == 0 or waveform.shape[1] == 0:
        raise InputError(input_name, f"the AUDIO waveform is empty (shape {tuple(waveform.shape)}).",
                         "connect an audio with at least one channel.")
    return waveform[0].detach().to("cpu", torch.float32).numpy(), rate


# ---------------------------------------------------------------------------------------------
# Features


def normalize_waveform(waveform: np.ndarray) -> np.ndarray:
    """Wav2Vec2FeatureExtractor's per-utterance zero-mean/unit-variance step, same float32 arithmetic."""
    x = np.asarray(waveform, dtype=np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + _NORM_EPS)


def to_video_rate(hidden_states: torch.Tensor) -> torch.Tensor:
    """`[L, T50, C]` at 50 Hz -> `[L, int(T50/50*30), C]` at 30 Hz, linear with align_corners=True."""
    t30 = int(hidden_states.shape[1] / float(FEATURE_RATE) * VIDEO_RATE)
    out = F.interpolate(hidden_states.transpose(1, 2), size=t30, mode="linear", align_corners=True)
    return out.transpose(1, 2)


def clips_available(t30: int, frames_per_clip: int, fps: int = DEFAULT_FPS) -> int:
    """`nr = int(T30 / (F_clip * 30/fps)) + 1`: always one extra, partly empty clip (spec 2.5)."""
    return int(t30 / (frames_per_clip * (VIDEO_RATE / fps))) + 1


def resolve_num_clips(available: int, requested: int | None) -> int:
    """Clips to generate: the request, or all available when None or too large (spec 2.6)."""
    if requested is None or requested > available:
        return available
    return requested


def bucket_frames(features: torch.Tensor, frames_per_clip: int, fps: int = DEFAULT_FPS) -> tuple[torch.Tensor, int]:
    """`[L, T30, C]` -> (`[1, L, C, nr*F_clip]`, nr): video frame k takes 30 Hz frame round(k*30/fps).

    Frames past the end of the audio get zero vectors (not the encoding of silence), as in the
    official `get_audio_embed_bucket_fps` with m = 0.
    """
    num_layers, t30, channels = features.shape
    nr = clips_available(t30, frames_per_clip, fps)
    n = nr * frames_per_clip
    padded_len = math.ceil(n / fps * VIDEO_RATE)
    # The official index arithmetic (linspace in float64, then round-half-even) is kept verbatim in
    # meaning so that no index can differ by one at a rounding boundary.
    times = np.linspace(0.0, n / fps, n, endpoint=False)
    idx = np.clip(np.round(times * VIDEO_RATE).astype(np.int64), 0, padded_len - 1)
    valid = torch.from_numpy(idx < t30)
    out = torch.zeros(num_layers, channels, n, dtype=features.dtype, device=features.device)
    picked = features[:, torch.from_numpy(np.minimum(idx, t30 - 1))]  # [L, n, C]
    out[:, :, valid] = picked[:, valid].transpose(1, 2)
    return out.unsqueeze(0), nr


def min_audio_seconds(fps: int = DEFAULT_FPS) -> float:
    """The shortest audio that fills one block of video (12 frames: 0.48 s at 25 fps)."""
    return FRAMES_PER_BLOCK / fps


def check_audio_length(seconds: float, fps: int = DEFAULT_FPS, input_name: str = "audio") -> None:
    """Refuse audio shorter than one block: the video is cut where the audio ends, so it would
    hold only a few frames (0.2 s gives 2), or none at all."""
    shortest = min_audio_seconds(fps)
    if seconds < shortest:
        frames = max(0, round(seconds * fps))
        raise InputError(input_name, f"the audio lasts {seconds:.2f} s, shorter than one block of video "
                         f"({FRAMES_PER_BLOCK} frames = {shortest:.2f} s at {fps} fps); the video ends with the "
                         f"audio, so it would hold at most {frames} frames.",
                         f"use at least {shortest:.2f} s of audio (a few seconds of speech is typical).")


class AudioEncoder:
    """wav2vec2 (transformers `Wav2Vec2Model`) plus the official pre- and post-processing."""

    def __init__(self, model: torch.nn.Module, arch: Wav2Vec2Arch, do_normalize: bool = True,
                 description: str = ""):
        self.model = model
        self.arch = arch
        self.do_normalize = do_normalize
        self.description = description

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, config: str | os.PathLike | Mapping | None = None,
                        attn_implementation: str = "sdpa", input_name: str = "audio_encoder") -> "AudioEncoder":
        """Load the official folder or a single wav2vec2 file (see `weights.wav2vec2`).

        Use bf16 on GPU for real runs (what the official pipeline does) and fp32 for parity.
        """
        loaded = load_wav2vec2(path, config=config, input_name=input_name)
        model = build_model(loaded, attn_implementation, input_name).to(device=device, dtype=dtype)
        logger.info("audio encoder: %s", loaded.description)
        return cls(model, loaded.arch, loaded.do_normalize, loaded.description)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def min_samples(self) -> int:
        """Shortest 16 kHz input that still yields one 30 Hz feature frame."""
        t50 = 1
        while int(t50 / float(FEATURE_RATE) * VIDEO_RATE) < 1:
            t50 += 1
        return self.arch.samples_for_frames(t50)

    @torch.no_grad()
    def hidden_states(self, waveform_16k: np.ndarray) -> torch.Tensor:
        """All 25 hidden states `[25, T50, C]` in the model dtype (spec 2.4 step 3).

        Index 0 = feature projection + positional conv, 1..23 = layer outputs, 24 = the encoder's final
        LayerNorm output. transformers 5 reports the un-normed last layer as state 24, so state 24 is
        taken from `last_hidden_state`, which is the normed one in every version.
        """
        x = normalize_waveform(waveform_16k) if self.do_normalize else np.asarray(waveform_16k, np.float32)
        return self._states(x)

    @torch.no_grad()
    def window_states(self, inputs: np.ndarray, start: int, stop: int) -> torch.Tensor:
        """Hidden states `[25, stop - start, C]` of frames [start, stop) of already normalised input
        (one window of `audio_stream.WindowedFeatures`, its context cut off)."""
        return self._states(np.asarray(inputs, np.float32))[:, start:stop].clone()

    def _states(self, x: np.ndarray) -> torch.Tensor:
        inputs = torch.from_numpy(x)[None].to(device=self.device, dtype=self.dtype)
        out = self.model(inputs, output_hidden_states=True)
        states = list(out.hidden_states[: self.arch.num_layers]) + [out.last_hidden_state]
        return torch.cat(states)

    def encode(self, source, frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP, num_clips: int | None = None,
               fps: int = DEFAULT_FPS, input_name: str = "audio") -> AudioFeatures:
        """File path or ComfyUI AUDIO dict -> `AudioFeatures` (spec 2.3-2.6)."""
        _check_clip_args(frames_per_clip, num_clips, fps)
        waveform = load_audio(source, input_name)
        if waveform.shape[0] < self.min_samples():
            raise InputError(input_name, f"the audio is {waveform.shape[0] / SAMPLE_RATE * 1000:.0f} ms long, shorter "
                             f"than the {self.min_samples() / SAMPLE_RATE * 1000:.0f} ms wav2vec2 needs for one "
                             "feature frame.", "use a longer audio clip.")

        # The official code interpolates in the model dtype (bf16 on GPU) and only then widens.
        feats = to_video_rate(self.hidden_states(waveform)).to(torch.float32).cpu()
        embedding, available = bucket_frames(feats, frames_per_clip, fps)
        clips = resolve_num_clips(available, num_clips)
        duration = waveform.shape[0] / SAMPLE_RATE
        logger.info("audio: %.2f s -> %d clips of %d frames available, generating %d", duration, available,
                    frames_per_clip, clips)
        return AudioFeatures(embedding, clips, available, frames_per_clip, fps, waveform, duration)


    def prepare(self, source, frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP, num_clips: int | None = None,
                fps: int = DEFAULT_FPS, input_name: str = "audio"):
        """`audio_stream.AudioInput`: the source checked, nothing decoded or encoded yet. The stream
        it is given to encodes it for its mode: the whole file at once (official) or window by
        window as the blocks need it (streaming)."""
        from .audio_stream import AudioInput

        _check_clip_args(frames_per_clip, num_clips, fps)
        return AudioInput(self, source, frames_per_clip, num_clips, fps, input_name)


def _check_clip_args(frames_per_clip: int, num_clips: int | None, fps: int) -> None:
    """Refuse a frames-per-clip, clip count or frame rate the encoders cannot use."""
    check_frames_per_clip(frames_per_clip)
    if num_clips is not None and (not isinstance(num_clips, int) or num_clips < 1):
        raise InputError("num_clips", f"{num_clips!r} is not a positive number of clips.",
                         "use a positive integer, or leave it empty to cover the whole audio.")
    if not isinstance(fps, int) or fps <= 0:
        raise InputError("fps", f"{fps!r} is not a positive integer frame rate.", "use 25.")


def build_model(loaded: LoadedWav2Vec2, attn_implementation: str = "sdpa",
                input_name: str = "audio_encoder") -> torch.nn.Module:
    """transformers `Wav2Vec2Model` holding the canonical tensors (no random init, strict load)."""
    from transformers import Wav2Vec2Model

    config = loaded.arch.to_hf_config(attn_implementation)
    # Built on the meta device and filled with assign=True: no 300M-parameter random init.
    with torch.device("meta"):
        model = Wav2Vec2Model(config)
    result = model.load_state_dict(loaded.state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise _key_error(result, input_name)
    return model.eval().requires_grad_(False)


def _key_error(result, input_name: str) -> WeightsError:
    parts = []
    if result.missing_keys:
        parts.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
    return WeightsError(input_name, "the wav2vec2 weights do not fit the model: " + ", ".join(parts) + ".",
                        "use an unmodified wav2vec2-large-xlsr-53-english checkpoint.")
