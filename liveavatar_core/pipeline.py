"""From encoded inputs to a stream of decoded frames, and from that stream to an MP4.

`generate()` returns a `VideoStream`: cheap to create (it validates settings and prepares the
reference picture), it does the heavy work only while it is iterated, one block at a time, and
holds nothing proportional to the video's length. Two modes share this code path:

* `streaming` (default): the conditioning of the official real-time pipeline (one reference frame,
  73 static motion frames, spec/pipeline.md 3.2 "Mode T"), the sink refreshed with the first
  generated latent before clip 1, every block decoded as soon as it is sampled by a causal
  streaming VAE decoder, and the audio shifted by the 3 frames dropped at the start so that picture
  and sound line up (the official code leaves the picture 120 ms ahead, spec 8.22).
* `official`: the single-GPU release pipeline (Mode S, or Mode S+ with `online_decode`): 5-frame
  reference, 365-frame motion window, each clip decoded from scratch after a 92-latent context that
  is re-encoded from the last 365 decoded frames, audio not shifted. Frames come per clip. It exists
  to reproduce the official video for parity.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .encoders.audio import AudioFeatures
from .encoders.image import preprocess_reference
from .errors import InputError
from .model.dit import LiveAvatarDiT
from .sampling.config import MODES, SamplerConfig
from .sampling.generator import BlockSampler, LatentBlock
from .vae.model import WanVAE
from .video.frames import to_uint8_frames
from .video.writer import StreamingMP4Writer, WriterSettings

log = logging.getLogger("liveavatar")

# Frames the official pipeline drops at the very start of the video (spec 3.11).
DROPPED_START_FRAMES = 3
# Official Mode S conditioning: the reference repeated 5 times, then that clip 73 times (spec 3.2).
OFFICIAL_REF_REPEAT = 5
# Latents of the static motion clip that warm the streaming decoder's causal state (spec 4.5).
DECODER_WARMUP_LATENTS = 7


@dataclass(frozen=True)
class GenerationSettings:
    """What the user chooses for one video. Defaults are the release settings."""

    size: str = "704*384"
    seed: int = 420
    num_clips: int = 0  # 0 = as long as the audio
    frames_per_clip: int = 48
    sample_steps: int = 4
    mode: str = "streaming"
    ref_offset_mode: str | None = None  # None = the mode's default ("seeded" / "official")
    ref_offset: int = 30  # used by ref_offset_mode "fixed"
    ref_offset_seed: int | None = None  # None = seed
    online_decode: bool = False  # official mode only: Mode S+
    fps: int = 25

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError("mode", f"unknown mode '{self.mode}'.", f"choose one of {', '.join(MODES)}.")
        if not isinstance(self.num_clips, int) or self.num_clips < 0:
            raise InputError("num_clips", f"must be 0 (as long as the audio) or a positive count, "
                             f"got {self.num_clips!r}.", "use 0 or a positive integer.")
        if self.online_decode and self.mode != "official":
            raise InputError("online_decode", "only the official mode has the online-decode variant; "
                             "streaming mode always decodes online.", "turn online_decode off.")
        self.sampler_config()  # validates steps, frames per clip and the offset options up front

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(mode=self.mode, frames_per_clip=self.frames_per_clip, steps=self.sample_steps,
                             seed=self.seed, num_clips=self.num_clips or None,
                             online_decode=self.online_decode,
                             sink_refresh="caller" if self.online_decode else None,
                             ref_offset=self.ref_offset_mode, ref_offset_seed=self.ref_offset_seed,
                             ref_offset_value=self.ref_offset)


@dataclass
class LiveAvatarModel:
    """The loaded generator: the DiT (LoRA merged, optionally FP8) and the VAE, each on its device."""

    dit: LiveAvatarDiT
    vae: WanVAE
    description: str = ""


@dataclass
class Stats:
    """Progress of a stream, for progress bars and logs."""

    blocks_done: int = 0
    blocks_total: int | None = None
    frames_done: int = 0
    elapsed_s: float = 0.0
    first_frame_s: float | None = None

    @property
    def fps(self) -> float:
        return self.frames_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if not self.blocks_total or not self.blocks_done:
            return None
        return self.elapsed_s / self.blocks_done * (self.blocks_total - self.blocks_done)


@dataclass
class FrameChunk:
    """Decoded frames of one block (streaming) or one clip (official), uint8 `[n, H, W, 3]`."""

    frames: np.ndarray
    clip: int
    block: int
    start_frame: int
    stats: Stats = field(default_factory=Stats)


class VideoStream:
    """Iterable of `FrameChunk`s; see `generate`."""

    def __init__(self, model: LiveAvatarModel, text: torch.Tensor, audio: AudioFeatures, image,
                 settings: GenerationSettings, should_stop: Callable[[], bool] | None = None):
        self.model, self.settings, self.should_stop = model, settings, should_stop
        self.config = settings.sampler_config()
        if audio.frames_per_clip != settings.frames_per_clip:
            raise InputError("frames_per_clip", f"the audio features were bucketed for {audio.frames_per_clip} "
                             f"frames per clip, the sampler is set to {settings.frames_per_clip}.",
                             "encode the audio with the same frames per clip.")
        self.audio = audio
        self.num_clips = audio.num_clips if not settings.num_clips else min(settings.num_clips,
                                                                             audio.available_clips)
        pixels, (self.height, self.width) = preprocess_reference(image, settings.size)
        self.reference = pixels
        self.text = text
        self.fps = settings.fps
        # Frame k of the output was driven by audio frame k + 3 in streaming mode (the audio is
        # shifted to match); the official mode keeps its offset.
        self.audio_offset_frames = DROPPED_START_FRAMES if settings.mode == "streaming" else 0
        self.blocks_per_clip = None
        self.stats = Stats()

    @property
    def total_frames(self) -> int:
        return self.num_clips * self.settings.frames_per_clip - DROPPED_START_FRAMES

    def __iter__(self) -> Iterator[FrameChunk]:
        start = time.perf_counter()
        self.stats = Stats()
        dit = self.model.dit
        with torch.no_grad():
            ref_lat, motion_lat, decoder = self._condition()
            sampler = BlockSampler(dit, self.text, ref_lat, motion_lat, self.config)
            self.blocks_per_clip = sampler.blocks_per_clip
            self.stats.blocks_total = self.num_clips * sampler.blocks_per_clip
            for block in sampler.run(self.audio, self.num_clips):
                frames = decoder(sampler, block)
                self.stats.blocks_done += 1
                self.stats.elapsed_s = time.perf_counter() - start
                if frames is not None and len(frames):
                    if self.stats.first_frame_s is None:
                        self.stats.first_frame_s = self.stats.elapsed_s
                    chunk = FrameChunk(frames, block.clip, block.block, self.stats.frames_done, self.stats)
                    self.stats.frames_done += len(frames)
                    yield chunk
                if self.should_stop is not None and self.should_stop():
                    log.info("stopped after block %d of clip %d", block.block, block.clip)
                    return

    # --- conditioning and decoding per mode -------------------------------------------------

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.model.vae
        return vae.encode(pixels.to(device=vae.device, dtype=vae.dtype))

    def _condition(self):
        """(reference latent, motion latents, block -> frames decoder) of the chosen mode."""
        ref = self.reference[None, :, None]  # [1, 3, 1, H, W]
        motion_frames = self.model.dit.cfg.motion_frames[0]
        if self.settings.mode == "streaming":
            ref_lat = self._encode(ref)
            motion_lat = self._encode(ref.expand(-1, -1, motion_frames, -1, -1))
            return ref_lat, motion_lat, _StreamingDecode(self.model.vae, motion_lat)
        ref5 = ref.expand(-1, -1, OFFICIAL_REF_REPEAT, -1, -1)
        ref_lat = self._encode(ref5)[:, :, 1:]
        window = ref5.repeat(1, 1, motion_frames, 1, 1)
        motion_lat = self._encode(window)
        return ref_lat, motion_lat, _OfficialDecode(self, window, motion_lat)


class _StreamingDecode:
    """Decodes every block as it arrives with a causal decoder warmed on the static motion clip."""

    def __init__(self, vae: WanVAE, motion_latents: torch.Tensor):
        self.decoder = vae.stream_decoder()
        self.decoder.decode(motion_latents[:, :, :DECODER_WARMUP_LATENTS])  # warm-up frames are discarded
        self.first = True

    def __call__(self, sampler: BlockSampler, block: LatentBlock) -> np.ndarray:
        frames = self.decoder.decode(block.latents)[0]
        if self.first:
            frames = frames[:, DROPPED_START_FRAMES:]
            self.first = False
        return to_uint8_frames(frames.cpu())


class _OfficialDecode:
    """Mode S / S+ decoding: per clip, a full decode after the re-encoded 92-latent context."""

    def __init__(self, stream: VideoStream, window: torch.Tensor, motion_latents: torch.Tensor):
        self.stream = stream
        self.window = window.float()  # the last 365 frames: reference, then generated
        self.context = motion_latents
        self.clip = 0

    def __call__(self, sampler: BlockSampler, block: LatentBlock) -> np.ndarray | None:
        if not block.last_in_clip:
            return None
        vae = self.stream.model.vae
        z = torch.cat([self.context.to(sampler.clip_latents.device), sampler.clip_latents.float()], dim=2)
        frames = vae.decode(z.to(vae.device))[:, :, -self.stream.settings.frames_per_clip:]
        if self.clip == 0:
            frames = frames[:, :, DROPPED_START_FRAMES:]
        n = min(self.stream.model.dit.cfg.motion_frames[0], frames.shape[2])
        self.window = torch.cat([self.window[:, :, n:], frames[:, :, -n:].to(self.window)], dim=2)
        self.context = self.stream._encode(self.window)
        if self.clip == 0 and self.stream.settings.online_decode:
            sampler.refresh_condition(sampler.clip_latents[:, :, :1].clone(), self.context)
        self.clip += 1
        return to_uint8_frames(frames[0].cpu())


def generate(model: LiveAvatarModel, text: torch.Tensor, audio: AudioFeatures, image,
             settings: GenerationSettings | None = None,
             should_stop: Callable[[], bool] | None = None) -> VideoStream:
    """A lazy stream of decoded frames for one avatar video (see the module docstring).

    text: umT5 output `[L, 4096]`; audio: `AudioEncoder.encode(...)` result; image: path, PIL
    image, uint8 array or ComfyUI IMAGE tensor; should_stop: polled after every block (cancel).
    """
    return VideoStream(model, text, audio, image, settings or GenerationSettings(), should_stop)


def write_mp4(stream: VideoStream, path: str | Path, audio: np.ndarray | None = None,
              sample_rate: int = 16000, on_chunk: Callable[[FrameChunk], None] | None = None,
              writer_settings: WriterSettings | None = None) -> Path:
    """Append every chunk of `stream` to a fragmented MP4 with the audio muxed in, as it arrives.

    The file is playable while it grows and after an interruption (an exception, a cancel, or a
    killed process): it then holds every chunk finished so far. Returns the path.
    """
    settings = replace(writer_settings or WriterSettings(), audio_offset_frames=stream.audio_offset_frames)
    audio = stream.audio.waveform_16k if audio is None else audio
    with StreamingMP4Writer(path, stream.width, stream.height, stream.fps, audio=audio,
                            sample_rate=sample_rate, settings=settings) as writer:
        for chunk in stream:
            writer.append(chunk.frames)
            if on_chunk is not None:
                on_chunk(chunk)
    return Path(path)
