"""Conditioning and decoding per mode: the VAE's side of a stream.

`start_decoder` encodes the reference (and, in official mode, the first motion window) and
returns the decoder that turns denoised blocks into frames; `restore_decoder` rebuilds it from a
resume state. One process (`pipeline.VideoStream`) and the VAE rank of a parallel run
(`parallel/worker.py`) use the same functions, so both make the same frames.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import InputError
from .resume import tensor_digest
from .sampling.generator import BlockSampler, LatentBlock
from .vae.model import WanVAE
from .video.frames import DeviceFrames, to_uint8_frames

if TYPE_CHECKING:
    from .pipeline import GenerationSettings

# Frames the official pipeline drops at the very start of the video (spec 3.11).
DROPPED_START_FRAMES = 3
# Official Mode S conditioning: the reference repeated 5 times, then that clip 73 times (spec 3.2).
OFFICIAL_REF_REPEAT = 5
# Latents of the static motion clip that warm the streaming decoder's causal state (spec 4.5).
DECODER_WARMUP_LATENTS = 7


def encode_pixels(vae: WanVAE, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents of `[1, 3, T, H, W]` pixels in [-1, 1]."""
    return vae.encode(pixels.to(device=vae.device, dtype=vae.dtype))


def official_window(reference: torch.Tensor, motion_frames: int) -> torch.Tensor:
    """The first motion window of Mode S: the 5-frame reference clip repeated (spec 3.2)."""
    ref5 = reference[None, :, None].expand(-1, -1, OFFICIAL_REF_REPEAT, -1, -1)
    return ref5.repeat(1, 1, motion_frames, 1, 1)


# The reference and first motion latents of the last few pictures, per VAE. They depend only on
# the picture, the mode and the VAE, so a later video of the same picture (another prompt, audio
# or seed) skips encoding them: the larger part of the work before the sink.
CONDITIONS_KEPT = 4
_conditions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def condition_latents(vae: WanVAE, reference: torch.Tensor, mode: str, motion_frames: int):
    """(reference latent, first motion latents) of the preprocessed picture `[3, H, W]` in `mode`
    (streaming or official), encoded once per picture and VAE placement; the caller gets copies."""
    return _kept_condition(vae, _picture_key(vae, reference, mode, motion_frames), reference, mode, motion_frames)


def _picture_key(vae: WanVAE, reference: torch.Tensor, mode: str, motion_frames: int) -> tuple:
    return mode, motion_frames, str(vae.device), vae.dtype, tensor_digest(reference)


def _kept_condition(vae: WanVAE, key: tuple, reference: torch.Tensor, mode: str, motion_frames: int):
    kept = _conditions.setdefault(vae, OrderedDict())
    if key in kept:
        kept.move_to_end(key)
    else:
        kept[key] = _encode_condition(vae, reference, mode, motion_frames)
        while len(kept) > CONDITIONS_KEPT:
            kept.popitem(last=False)
    return tuple(t.clone() for t in kept[key])


def _encode_condition(vae: WanVAE, reference: torch.Tensor, mode: str, motion_frames: int):
    ref = reference[None, :, None]  # [1, 3, 1, H, W]
    if mode == "streaming":
        return encode_pixels(vae, ref), encode_pixels(vae, ref.expand(-1, -1, motion_frames, -1, -1))
    ref5 = ref.expand(-1, -1, OFFICIAL_REF_REPEAT, -1, -1)
    return encode_pixels(vae, ref5)[:, :, 1:], encode_pixels(vae, official_window(reference, motion_frames))


# The warmed streaming decoder state of the last picture, per VAE: the causal history after the
# warm-up clip, which depends only on what the condition latents depend on. Decoding replaces a
# slot's tensor and never writes into it, so holding the slot list keeps that state with no copy.
# One picture: at 704x384 it is 1.2 GiB, planned as "VAE warmed state" where it fits
# (`plan.RunPlan.keep_warm_decoder`).
_warm_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def start_decoder(vae: WanVAE, reference: torch.Tensor, settings: GenerationSettings, motion_frames: int,
                  more_clips: Callable[[int], bool], keep_warm: bool = False):
    """(reference latent, motion latents, block -> frames decoder) of the settings' mode.

    reference: the preprocessed picture `[3, H, W]`; more_clips(n): whether the video has more
    than n clips (official mode re-encodes its context only for a clip that follows); keep_warm:
    keep the streaming decoder's warmed state for the next video of this picture, which then
    skips the warm-up (False also lets go of a kept state).
    """
    key = _picture_key(vae, reference, settings.mode, motion_frames)
    ref_lat, motion_lat = _kept_condition(vae, key, reference, settings.mode, motion_frames)
    if settings.mode == "streaming":
        return ref_lat, motion_lat, StreamingDecode(vae, motion_lat, warm_key=key if keep_warm else None)
    window = official_window(reference, motion_frames)
    return ref_lat, motion_lat, OfficialDecode(vae, settings, motion_frames, more_clips, window, motion_lat)


def restore_decoder(vae: WanVAE, reference: torch.Tensor, settings: GenerationSettings, motion_frames: int,
                    more_clips: Callable[[int], bool], part: dict):
    """The decoder of the settings' mode from the `decoder` part of a resume state."""
    if settings.mode == "streaming":
        return StreamingDecode.restore(vae, part)
    return OfficialDecode.restore(vae, settings, motion_frames, more_clips, official_window(reference, motion_frames),
                                  part)


class Decoded:
    """Frames of one block: ready, or being decoded and copied out behind the caller's back."""

    def __init__(self, frames: np.ndarray | DeviceFrames | None):
        self._frames = frames

    def result(self) -> np.ndarray | None:
        if isinstance(self._frames, DeviceFrames):
            self._frames = self._frames.result()
        return self._frames


class StreamingDecode:
    """Decodes every block as it arrives with a causal decoder warmed on the static motion clip.

    On a GPU the decoder runs on its own CUDA stream: `launch` queues the decode of a block and the
    copy of its frames to host memory, then returns at once, so the DiT work of the next block is
    queued while this one decodes and the caller encodes the previous block's frames meanwhile.
    Every tensor of the decoder's state is made on that stream (a kept warm state is recorded on
    it), so the allocator never hands its memory to the DiT while a queued decode still reads it.
    """

    def __init__(self, vae: WanVAE, motion_latents: torch.Tensor | None, warm_key: tuple | None = None):
        self.vae = vae
        self.stream = torch.cuda.Stream(vae.device) if vae.device.type == "cuda" else None
        self.decoder = vae.stream_decoder()
        if motion_latents is not None:  # None: state restored by `restore`
            self._warm_up(motion_latents, warm_key)
        self.first = True

    def _warm_up(self, motion_latents: torch.Tensor, key: tuple | None) -> None:
        """The causal state after the warm-up clip: the kept one of this picture (`key`), or decoded
        (and kept under `key` unless it is None)."""
        kept = _warm_states.pop(self.vae, None)  # a state not reused is let go before a new one is made
        cache = self.decoder.cache
        if key is not None and kept is not None and kept[0] == key:
            _, slots, done = kept
            if self.stream is not None:
                self.stream.wait_event(done)
                for t in slots:
                    if t is not None:
                        t.record_stream(self.stream)
            cache.slots, cache.first_chunk = list(slots), False
        else:
            with self._on_stream(motion_latents):
                self.decoder.decode(motion_latents[:, :, :DECODER_WARMUP_LATENTS])  # warm-up frames are discarded
            done = None
            if self.stream is not None:
                done = torch.cuda.Event()
                done.record(self.stream)
            slots = list(cache.slots)
        if key is not None:
            _warm_states[self.vae] = (key, slots, done)

    def _on_stream(self, *inputs: torch.Tensor):
        """Context running on the decoder's stream after the work that produced `inputs`."""
        if self.stream is None:
            return contextlib.nullcontext()
        for t in inputs:
            if t.is_cuda:
                self.stream.wait_stream(torch.cuda.current_stream(t.device))
                if t.device == self.vae.device:
                    t.record_stream(self.stream)
        return torch.cuda.stream(self.stream)

    def state(self) -> dict:
        cache = self.decoder.cache
        return {"meta": {"mode": "streaming", "first": self.first, "first_chunk": cache.first_chunk,
                         "slots": [t is not None for t in cache.slots]},
                "tensors": {f"slot{i}": t for i, t in enumerate(cache.slots) if t is not None}}

    @classmethod
    def restore(cls, vae: WanVAE, part: dict) -> "StreamingDecode":
        meta, tensors = part["meta"], part["tensors"]
        if meta.get("mode") != "streaming":
            raise InputError("resume", f"the file holds a {meta.get('mode')} decoder state.",
                             "resume in the mode of the interrupted run.")
        decode = cls(vae, None)
        with decode._on_stream():
            decode.decoder.cache.slots = [tensors[f"slot{i}"].to(vae.device) if present else None
                                          for i, present in enumerate(meta["slots"])]
        decode.decoder.cache.first_chunk = meta["first_chunk"]
        decode.first = meta["first"]
        return decode

    def launch(self, sampler: BlockSampler, block: LatentBlock) -> Decoded:
        with self._on_stream(block.latents):
            frames = self.decoder.decode(block.latents)[0]
            if self.first:
                frames = frames[:, DROPPED_START_FRAMES:]
            self.first = False
            if self.stream is None:
                return Decoded(to_uint8_frames(frames))
            return Decoded(DeviceFrames(frames))


class OfficialDecode:
    """Mode S / S+ decoding: per clip, a full decode after the re-encoded 92-latent context."""

    def __init__(self, vae: WanVAE, settings: GenerationSettings, motion_frames: int,
                 more_clips: Callable[[int], bool], window: torch.Tensor, motion_latents: torch.Tensor):
        self.vae, self.settings, self.motion_frames, self.more_clips = vae, settings, motion_frames, more_clips
        self.window = window.float()  # the last 365 frames: reference, then generated
        self.context = motion_latents
        self.clip = 0
        self.generated = 0  # frames of the window that were generated (the rest is the reference)

    def state(self) -> dict:
        tail = self.window[:, :, self.window.shape[2] - self.generated:]
        return {"meta": {"mode": "official", "clip": self.clip, "generated": self.generated},
                "tensors": {"window_tail": tail, "context": self.context}}

    @classmethod
    def restore(cls, vae: WanVAE, settings: GenerationSettings, motion_frames: int,
                more_clips: Callable[[int], bool], window: torch.Tensor, part: dict) -> "OfficialDecode":
        meta, tensors = part["meta"], part["tensors"]
        if meta.get("mode") != "official":
            raise InputError("resume", f"the file holds a {meta.get('mode')} decoder state.",
                             "resume in the mode of the interrupted run.")
        window = window.float()
        tail = tensors["window_tail"]
        if tail.shape[:2] != window.shape[:2] or tail.shape[3:] != window.shape[3:] \
                or not 0 <= tail.shape[2] <= window.shape[2]:
            raise InputError("resume", f"the saved frame window {tuple(tail.shape)} does not fit this stream's "
                             f"{tuple(window.shape)}.", "resume with the size of the interrupted run.")
        decode = cls(vae, settings, motion_frames, more_clips,
                     torch.cat([window[:, :, :window.shape[2] - tail.shape[2]], tail.float()], dim=2),
                     tensors["context"].to(vae.device))
        decode.clip, decode.generated = int(meta["clip"]), int(meta["generated"])
        return decode

    def launch(self, sampler: BlockSampler, block: LatentBlock) -> Decoded:
        return Decoded(self._decode(sampler, block))

    def _decode(self, sampler: BlockSampler, block: LatentBlock) -> np.ndarray | None:
        if not block.last_in_clip:
            return None
        vae = self.vae
        z = torch.cat([self.context.to(sampler.clip_latents.device), sampler.clip_latents.float()], dim=2)
        frames = vae.decode(z.to(vae.device))[:, :, -self.settings.frames_per_clip:]
        if self.clip == 0:
            frames = frames[:, :, DROPPED_START_FRAMES:]
        n = min(self.motion_frames, frames.shape[2])
        self.window = torch.cat([self.window[:, :, n:], frames[:, :, -n:].to(self.window)], dim=2)
        self.generated = min(self.window.shape[2], self.generated + n)
        self.clip += 1
        if self.more_clips(self.clip):  # after the last clip the context would go unused
            self.context = encode_pixels(vae, self.window)
            if self.clip == 1 and self.settings.online_decode:
                sampler.refresh_condition(sampler.clip_latents[:, :, :1].clone(), self.context)
        return to_uint8_frames(frames[0].cpu())
