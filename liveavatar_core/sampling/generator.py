"""Block sampler: the causal DiT rolled out over clips and blocks as a generator (spec/pipeline.md 3).

Per clip r: one noise draw; per block b of 3 latent frames: `steps` Euler steps, step i through its
own ring KV cache (timestep forcing: a block sees its history at its own noise level, spec 3.6).
Each finished block is yielded at once, so the decoder can start while later blocks are denoised.
Memory is flat however long the stream: the caches are fixed rings, the clip buffer and the noise
are one clip long, and nothing is appended per block.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..model.cache import KVCache, TextCache, make_step_caches, tokens_per_frame
from ..model.dit import LiveAvatarDiT
from ..model.offset import RefOffsetPolicy
from ..ops.transfer import upload
from .config import SamplerConfig
from .scheduler import FlowMatchSchedule, flow_match_schedule
from .state import SamplerState, load_state, restore_cond, save_state, snapshot

logger = logging.getLogger("liveavatar")

# Video frames per latent frame (Wan VAE temporal stride).
VIDEO_PER_LATENT = 4


@dataclass(frozen=True)
class LatentBlock:
    """One denoised block: `latents [1, 16, F_b, h, w]` (F_b = 3), starting at absolute latent
    frame `frame` (counted from the stream start, never reset), block `block` of clip `clip`."""

    clip: int
    block: int
    frame: int
    latents: torch.Tensor
    last_in_clip: bool


# Called after the last block of a clip, before that block is yielded: (sampler, clip, clip
# latents [1, 16, L_clip, h, w]). The latents are the sampler's buffer; clone them to keep them.
ClipEndHook = Callable[["BlockSampler", int, torch.Tensor], None]


def clip_noise(seed: int, clip: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise of clip `clip`: fp32 `randn(shape)` from a CPU generator seeded `seed + clip`.

    The official pipeline draws bf16 noise on the GPU (spec 3.9), whose values depend on the GPU's
    SM count; a CPU fp32 draw is the same on every machine (and is how the fixtures were made).
    """
    g = torch.Generator(device="cpu").manual_seed(seed + clip)
    return torch.randn(shape, generator=g, dtype=torch.float32)


# (cfg, lat_h, lat_w, *, num_steps, cache_frames, dtype, device) -> one KVCache per step
CacheFactory = Callable[..., list[KVCache]]


class BlockSampler:
    """Streaming generator of denoised latent blocks for one avatar stream.

    model: the DiT (LoRA merged, in its compute dtype); context: umT5 output `[L, 4096]` or a
    `TextCache` from `model.encode_text`; ref_latents `[1, 16, 1, h, w]`; motion_latents
    `[1, 16, T, h, w]` (the last 19 frames feed FramePack). Nothing heavy runs before the first
    block except the text embedding; the sink runs lazily at stream start.
    """

    def __init__(self, model: LiveAvatarDiT, context, ref_latents: torch.Tensor, motion_latents: torch.Tensor,
                 config: SamplerConfig | None = None, schedule: FlowMatchSchedule | None = None,
                 on_clip_end: ClipEndHook | None = None, cache_factory: CacheFactory = make_step_caches,
                 steps: Sequence[int] | None = None):
        self.config = config = config or SamplerConfig()
        self.model = model
        cfg = model.cfg
        self.dtype = model.dtype
        if config.torch_dtype is not None and config.torch_dtype != self.dtype:
            raise InputError("dtype", f"the sampler was asked for {config.dtype} latents but the DiT computes in "
                             f"{self.dtype}.", "load the DiT in the same dtype, or leave dtype unset.")
        self.schedule = schedule or flow_match_schedule(config.steps, config.shift)
        if self.schedule.num_steps != config.steps:
            raise InputError("steps", f"the schedule has {self.schedule.num_steps} steps, the config asks for "
                             f"{config.steps}.", "build the schedule with the same number of steps.")
        self.frames_per_block = cfg.num_frames_per_block
        self.latent_frames = config.latent_frames_per_clip(*cfg.motion_frames)
        if self.latent_frames % self.frames_per_block:
            raise InputError("frames_per_clip", f"{config.frames_per_clip} frames give {self.latent_frames} "
                             f"latent frames per clip, not a multiple of the {self.frames_per_block} denoised "
                             "per block.", "use 48 frames per clip.")
        self.blocks_per_clip = self.latent_frames // self.frames_per_block
        self.lat_hw = self._check_latents(ref_latents, motion_latents)
        self.fs = tokens_per_frame(cfg, *self.lat_hw)
        self.on_clip_end = on_clip_end

        self.text = context if isinstance(context, TextCache) else model.encode_text(context)
        # The factory decides where the step caches live (GPU rings, or host memory streamed per
        # layer by placement.make_streamed_step_caches); the sampler only needs the KVCache interface.
        # The denoising steps run here: all of them, or a pipeline stage's (parallel/stage.py).
        self.steps = tuple(range(config.steps)) if steps is None else tuple(steps)
        self.caches: list[KVCache] = cache_factory(cfg, *self.lat_hw, num_steps=len(self.steps),
                                                   cache_frames=self.latent_frames, dtype=self.dtype,
                                                   device=model.device)
        self.policy = self._new_policy()
        self.ref_latents, self.motion_latents = self._keep(ref_latents, motion_latents)
        self.clip_latents = torch.zeros(1, cfg.out_dim, self.latent_frames, *self.lat_hw,
                                        dtype=self.dtype, device=model.device)
        self.clip = 0
        self.block = 0
        self.refreshed_at: int | None = None  # clip boundary of the last refresh_condition call
        self._noise: tuple[int, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------
    # generation

    def run(self, audio, num_clips: int | None = None) -> Iterator[LatentBlock]:
        """Blocks of every remaining clip covered by `audio` (from the current position on).

        audio: `AudioFeatures` or its `[1, 25, C, N]` embedding (N a multiple of frames_per_clip),
        or `StreamedAudioFeatures`, whose clips are computed as they are needed.
        Clip count: `num_clips` if given (refused when the audio covers fewer clips), else the
        official rule `min(config.num_clips, clips the audio covers)`; streamed features stop at
        `num_clips` or at the end of the audio, whichever comes first.
        """
        clips, limit = clip_source(audio, self.model.cfg, self.config, self.clip, num_clips)
        return self._stream(clips, limit)

    def stream(self, clip_audio: Iterable[torch.Tensor]) -> Iterator[LatentBlock]:
        """Blocks of as many clips as `clip_audio` yields (unbounded streams, audio arriving live).

        Each item is one clip's audio `[1, 25, C, frames_per_clip]`, the first one for clip
        `self.clip` (after a resume, the clip in progress), or a live source of that clip's audio:
        an object whose `block(b)` returns block b's `[1, 25, C, 12]` once it has arrived (None: the
        source has closed, the stream ends). Stops early at `config.num_clips`.
        """
        return self._stream(clip_audio, self.config.num_clips)

    def _stream(self, clip_audio: Iterable[torch.Tensor], limit: int | None) -> Iterator[LatentBlock]:
        clips = iter(clip_audio)
        # The limit is checked before the next clip's audio is asked for: streamed features
        # compute nothing past the last clip.
        while limit is None or self.clip < limit:
            audio = next(clips, None)
            if audio is None:
                return
            if (yield from self._clip_blocks(self._check_clip_audio(audio) if torch.is_tensor(audio) else audio)):
                return

    def _clip_blocks(self, audio: torch.Tensor) -> Generator[LatentBlock, None, bool]:
        """The clip's remaining blocks; returns True if a pipeline stage was told to stop in it."""
        r, nfb, model = self.clip, self.frames_per_block, self.model
        if self.block == 0:
            self._begin_clip(r)
        for b in range(self.block, self.blocks_per_clip):
            frame = r * self.latent_frames + b * nfb
            block_audio = audio[..., b * nfb * VIDEO_PER_LATENT:(b + 1) * nfb * VIDEO_PER_LATENT] \
                if torch.is_tensor(audio) else audio.block(b)
            x = None if block_audio is None else self._block_input(r, b)
            if x is None:  # a live source closed, or a pipeline stage was told that the stream stops here
                return True
            # Every step's offset is drawn, also those of steps run elsewhere: the draws are
            # counted per call, so each stage replays the single-process sequence.
            offsets = [self.policy.draw() for _ in range(self.config.steps)]
            for i, cache in zip(self.steps, self.caches):
                t = self.schedule.timesteps[i].expand(1, nfb)
                v = model.denoise_block(x, t, self.text, block_audio, None, cache, frame * self.fs, offsets[i])
                x = self.schedule.step(x, v, i)
            if self.finishes_blocks:
                self.clip_latents[:, :, b * nfb:(b + 1) * nfb] = x
            last = b == self.blocks_per_clip - 1
            # Counters move before the yield so that a state saved while the consumer holds this
            # block resumes at the next one.
            self.block = b + 1
            if last:
                self.clip, self.block = r + 1, 0
                if self.on_clip_end is not None:
                    self.on_clip_end(self, r, self.clip_latents)
            yield LatentBlock(r, b, frame, x, last)
        return False

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block's latents (as they cross ranks of a pipeline)."""
        return (1, self.model.cfg.in_dim, self.frames_per_block, *self.lat_hw)

    @property
    def finishes_blocks(self) -> bool:
        """Whether this sampler runs the last step (its blocks are denoised; it keeps clip_latents)."""
        return self.steps[-1] == self.config.steps - 1

    def _block_input(self, clip: int, block: int) -> torch.Tensor | None:
        """The noisy latents entering this sampler's first step: the clip's noise slice."""
        nfb = self.frames_per_block
        return self._clip_noise(clip)[:, :, block * nfb:(block + 1) * nfb]

    def _begin_clip(self, r: int) -> None:
        """Sink at stream start; the configured refresh before clip 1 (spec 3.5)."""
        if self.caches[0].cond is None:
            self._sink()
            return
        if r != 1 or self.refreshed_at == r:
            return
        policy = self.config.sink_refresh
        if policy == "caller":
            raise InputError("refresh_condition", "this run refreshes the sink before clip 1 (online decode / "
                             "sink_refresh='caller') but no new conditioning was supplied after clip 0.",
                             "call sampler.refresh_condition(first latent of clip 0, re-encoded motion latents) "
                             "in on_clip_end or after the last block of clip 0.")
        if policy == "first_clip_output":
            self.refresh_condition(self._first_clip_latent(), self.motion_latents)

    def _first_clip_latent(self) -> torch.Tensor:
        """The first denoised latent of clip 0 (the streaming sink refresh's new reference)."""
        return self.clip_latents[:, :, :1]

    def prime(self) -> None:
        """Run the sink now instead of with the first block (a live session, before its audio)."""
        if self.caches[0].cond is None:
            self._sink()

    def _sink(self) -> None:
        self.model.sink(self.ref_latents, self.motion_latents, self.text, self.caches)

    def refresh_condition(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> None:
        """Re-run the sink with new reference and motion latents; allowed only between clips.

        Official online decode (Mode S+) calls this before clip 1 with `clip0_latents[:, :, :1]`
        and the motion latents re-encoded from the decoded frames.
        """
        if self.block != 0:
            raise InputError("refresh_condition", f"called in the middle of clip {self.clip} (after block "
                             f"{self.block - 1}).", "refresh the condition only between clips.")
        lat_hw = self._check_latents(ref_latents, motion_latents)
        if lat_hw != self.lat_hw:
            raise InputError("ref_latents", f"latent size {lat_hw} differs from the stream's {self.lat_hw}.",
                             "encode the new conditioning at the stream's resolution.")
        self.ref_latents, self.motion_latents = self._keep(ref_latents, motion_latents)
        self.refreshed_at = self.clip
        self._sink()

    def _clip_noise(self, r: int) -> torch.Tensor:
        if self._noise is None or self._noise[0] != r:
            shape = (self.model.cfg.in_dim, self.latent_frames, *self.lat_hw)
            noise = upload(clip_noise(self.config.seed, r, shape), self.model.device).to(self.dtype)
            self._noise = (r, noise[None])
        return self._noise[1]

    # ----------------------------------------------------------------------------------------
    # resume

    def state_dict(self) -> SamplerState:
        """Everything needed to continue bit-identically (the live tensors, not copies)."""
        return snapshot(self)

    def load_state_dict(self, state: SamplerState) -> None:
        """Continue from `state_dict()` of a sampler built with the same config, model and prompt."""
        meta, tensors = state["meta"], state["tensors"]
        needed = [f"cache{i}.{n}" for i, cache in zip(self.steps, self.caches) for n in cache.tensors()]
        missing = [k for k in needed + ["ref_latents", "motion_latents", "clip_latents"] if k not in tensors]
        if missing:
            raise InputError("resume_state", f"the state lacks {', '.join(missing)} (saved with a different "
                             "number of steps?).", "resume with the configuration of the saved run.")
        saved = SamplerConfig.from_dict(meta["config"])
        mine = self.config.to_dict()
        diff = sorted(k for k, v in saved.to_dict().items() if k != "num_clips" and mine[k] != v)
        if diff:
            raise InputError("resume_state", "the saved run used other settings: "
                             + ", ".join(f"{k}={saved.to_dict()[k]!r} (now {mine[k]!r})" for k in diff) + ".",
                             "resume with the configuration of the saved run.")
        if tuple(meta["lat_hw"]) != self.lat_hw:
            raise InputError("resume_state", f"the saved run has latents of {tuple(meta['lat_hw'])}, this one "
                             f"{self.lat_hw}.", "resume with the same reference size.")
        for i, cache in zip(self.steps, self.caches):
            for name, dst in cache.tensors().items():
                src = tensors[f"cache{i}.{name}"]
                if src.shape != dst.shape or src.dtype != dst.dtype:
                    raise InputError("resume_state", f"step cache {i} {name} is {tuple(src.shape)} {src.dtype}, "
                                     f"expected {tuple(dst.shape)} {dst.dtype}.",
                                     "resume with the same model and settings (KV cache dtype included).")
                dst.copy_(src)
        cond = restore_cond(meta, tensors, self.model.device, self.dtype)
        for cache in self.caches:
            cache.cond = cond
        self.ref_latents, self.motion_latents = self._keep(tensors["ref_latents"], tensors["motion_latents"])
        self.clip_latents.copy_(tensors["clip_latents"])
        self.clip, self.block = int(meta["clip"]), int(meta["block"])
        self.refreshed_at = meta["refreshed_at"]
        self.policy = self._new_policy()
        for _ in range(int(meta["offset_calls"])):
            self.policy.draw()
        self._noise = None

    def save(self, path: str | os.PathLike) -> None:
        """Write the resume state to a file (see state.py for what it holds)."""
        save_state(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Continue from a file written by `save`."""
        self.load_state_dict(load_state(path))

    def _new_policy(self) -> RefOffsetPolicy:
        c = self.config
        return RefOffsetPolicy(c.ref_offset, seed=c.ref_offset_seed, value=c.ref_offset_value,
                               draws=c.ref_offset_draws)

    # ----------------------------------------------------------------------------------------
    # input checks

    def _keep(self, ref: torch.Tensor, motion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # FramePack reads only the newest sum(buckets) motion latents; keep just those.
        keep = sum(self.model.cfg.zip_frame_buckets)
        dev = self.model.device
        return ref.detach().to(dev).clone(), motion[:, :, -keep:].detach().to(dev).clone()

    def _check_latents(self, ref: torch.Tensor, motion: torch.Tensor) -> tuple[int, int]:
        c = self.model.cfg.in_dim
        if not torch.is_tensor(ref) or ref.dim() != 5 or ref.shape[:3] != (1, c, 1):
            raise InputError("ref_latents", f"expected [1, {c}, 1, h, w], got "
                             f"{tuple(ref.shape) if torch.is_tensor(ref) else type(ref).__name__}.",
                             "pass the VAE latent of the reference image (one stream per sampler).")
        if not torch.is_tensor(motion) or motion.dim() != 5 or motion.shape[:2] != (1, c) \
                or motion.shape[3:] != ref.shape[3:] or motion.shape[2] < 1:
            raise InputError("motion_latents", f"expected [1, {c}, T, {ref.shape[3]}, {ref.shape[4]}], got "
                             f"{tuple(motion.shape) if torch.is_tensor(motion) else type(motion).__name__}.",
                             "encode the motion frames at the reference's size.")
        h, w = ref.shape[3:]
        if h % 8 or w % 8:
            raise InputError("ref_latents", f"latent size {h}x{w} is not a multiple of 8 (FramePack's 4x patches).",
                             "use pixel sizes that are multiples of 64.")
        return int(h), int(w)

    def _check_clip_audio(self, audio) -> torch.Tensor:
        check_audio_shape(self.model.cfg, audio)
        f = self.config.frames_per_clip
        if audio.shape[-1] != f:
            raise InputError("audio", f"clip {self.clip} got {audio.shape[-1]} frames of audio features, a clip "
                             f"needs exactly {f}.", "pad the last chunk with zero features, as the official "
                             "bucketing does.")
        return audio


def clip_source(audio, cfg, config: SamplerConfig, start: int, num_clips: int | None = None
                ) -> tuple[Iterator[torch.Tensor], int | None]:
    """(each clip's audio `[1, 25, C, frames_per_clip]` from clip `start` on, clip limit or None).

    audio: `AudioFeatures`, its embedding, or `StreamedAudioFeatures` (clips computed as they are
    needed; the limit is then `num_clips`, else the smaller of `config.num_clips` and the clips
    requested from the encoder). Whole features: see `BlockSampler.run` for the clip count.
    """
    if hasattr(audio, "clips"):
        check_frames_per_clip(config, audio)
        limit = num_clips
        if limit is None:
            limit = min((n for n in (config.num_clips, audio.requested) if n is not None), default=None)
        return audio.clips(start=start, stop=limit), limit
    embedding = _check_audio(cfg, config, audio)
    n = _num_clips(config, embedding, audio, num_clips)
    f = config.frames_per_clip
    return (embedding[..., r * f:(r + 1) * f] for r in range(start, n)), None


def check_frames_per_clip(config: SamplerConfig, audio) -> None:
    """Refuse features bucketed for another clip length than the sampler's."""
    per_clip = getattr(audio, "frames_per_clip", config.frames_per_clip)
    if per_clip != config.frames_per_clip:
        raise InputError("audio", f"the audio features were bucketed for {per_clip} frames per clip, the "
                         f"sampler uses {config.frames_per_clip}.", "encode the audio with the same "
                         "frames_per_clip.")


def _check_audio(cfg, config: SamplerConfig, audio) -> torch.Tensor:
    embedding = getattr(audio, "embedding", audio)
    check_frames_per_clip(config, audio)
    check_audio_shape(cfg, embedding)
    n, f = embedding.shape[-1], config.frames_per_clip
    if n < f:
        raise InputError("audio", f"{n} frames of audio features are shorter than one clip of {f} frames.",
                         "use a longer audio (the encoder pads the last clip with zeros).")
    if n % f:
        raise InputError("audio", f"{n} frames of audio features are not whole clips of {f} frames.",
                         "pass the bucketed embedding of the audio encoder (a multiple of frames_per_clip).")
    return embedding


def check_audio_shape(cfg, audio) -> None:
    """Refuse anything but wav2vec2 features `[1, layers, C, frames]` of this model."""
    if not torch.is_tensor(audio) or audio.dim() != 4 or audio.shape[:3] != (1, cfg.num_wav2vec_layers,
                                                                                cfg.audio_dim):
        raise InputError("audio", f"expected wav2vec2 features [1, {cfg.num_wav2vec_layers}, {cfg.audio_dim}, "
                         f"frames], got {tuple(audio.shape) if torch.is_tensor(audio) else type(audio).__name__}.",
                         "pass the audio encoder's embedding for this model.")


def _num_clips(config: SamplerConfig, embedding: torch.Tensor, audio, requested: int | None) -> int:
    available = embedding.shape[-1] // config.frames_per_clip
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise InputError("num_clips", f"must be a positive integer, got {requested!r}.",
                             "ask for at least one clip.")
        if requested > available:
            raise InputError("num_clips", f"{requested} clips requested but the audio covers {available}.",
                             "use a longer audio or ask for fewer clips.")
        return requested
    n = min(available, getattr(audio, "num_clips", available))
    if config.num_clips is not None:
        n = min(n, config.num_clips)
    logger.info("sampler: %d clips (%d covered by the audio)", n, available)
    return n
