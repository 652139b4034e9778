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

Interrupt and resume (resume.py): `write_mp4(..., resume_path=...)` saves the state after the last
completed block when the stream stops early; `generate(..., resume_from=...)` continues from there
and `write_mp4` appends to the same MP4. Only then does the stream keep per-block records, and
those are references to state that later blocks replace rather than modify (no tensor copies,
except one clip of latents at each clip end).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .config import DEFAULT_FRAMES_PER_CLIP
from .decoding import DROPPED_START_FRAMES, Decoded, restore_decoder, start_decoder
from .encoders.audio import SAMPLE_RATE, AudioFeatures, check_audio_length
from .encoders.audio_stream import AudioInput, StreamedAudioFeatures, audio_identity, features_for_mode
from .encoders.image import DEFAULT_SIZE, preprocess_reference, reference_uint8, target_area
from .errors import InputError
from .health.monitor import HealthRecord
from .health.run import RunHealth
from .model.cache import KV_STORAGE_DTYPES, make_step_caches
from .model.dit import LiveAvatarDiT
from .plan import RunPlan
from .resume import (ResumeState, build_resume_state, check_resume_state, input_fingerprint, load_resume_state,
                     partial_video, resume_part, save_resume_state, unwritten_chunks)
from .sampling.config import MODES, SamplerConfig
from .sampling.generator import BlockSampler, LatentBlock
from .vae.model import WanVAE
from .video.writer import StreamingMP4Writer, WriterSettings, frames_within_audio

log = logging.getLogger("liveavatar")



@dataclass(frozen=True)
class GenerationSettings:
    """What the user chooses for one video. Defaults are the release settings."""

    size: str = DEFAULT_SIZE  # a pixel area: the output's shape follows the image (encoders/image.py)
    seed: int = 420
    num_clips: int = 0  # 0 = as long as the audio
    frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP
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
        target_area(self.size)
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
    kv_cache_location: str = "gpu"  # "cpu": pinned host rings streamed per layer (placement/)
    kv_cache_dtype: str | None = None  # None: the DiT's compute dtype; "fp8": e4m3 rings (model/cache.py)
    plan: RunPlan | None = None  # the placement it was loaded with; re-checked at each video's size
    weights: str = ""  # what sets the numbers (files, LoRA, precision, KV dtype); "" = the description
    placement: object = None  # `loading.prepare_dit`'s state: block swap counters, FSDP gathers, or None

    @property
    def identity(self) -> str:
        """The weights' identity for resume files: the same whatever the placement or GPU count."""
        from .resume import tensor_digest

        return model_identity(self.weights or self.description, tensor_digest(self.dit.patch_embedding.weight),
                              self.vae.description if self.vae is not None else "")

    def cache_factory(self):
        """The step-cache constructor matching `kv_cache_location` and `kv_cache_dtype`."""
        if self.kv_cache_location == "cpu":
            from .placement import make_streamed_step_caches as make
        else:
            make = make_step_caches
        if self.kv_cache_dtype is None:
            return make
        # Fused dequantisation only where the DiT is compiled too (compile='off': nothing compiles).
        return functools.partial(make, storage_dtype=KV_STORAGE_DTYPES[self.kv_cache_dtype], fused=self.dit.compiled)


def check_size(model: LiveAvatarModel, height: int, width: int, settings: GenerationSettings) -> bool:
    """Raise InputError if the model's placement does not fit a video of this size (the loader
    cannot know the sampler's size); return whether its plan keeps the warmed decoder state."""
    if model.plan is None:
        return False
    plan = model.plan.replanned(height, width, settings.frames_per_clip, settings.sample_steps).validate()
    # Parallel workers start their decoder afresh each run: only one device's plan keeps the state.
    return isinstance(plan, RunPlan) and plan.keep_warm_decoder


def model_identity(weights: str, dit_digest: str, vae: str) -> str:
    """What identifies a generator's numbers: the DiT's files, LoRA, precision and KV dtype
    (`weights`), the digest of its patch embedding after the LoRA merge, and the VAE."""
    return f"{weights}|{dit_digest}|{vae}"


@dataclass
class Stats:
    """Progress of a stream, for progress bars and logs.

    A chunk's `stats` is a snapshot taken as its frames are handed out: `blocks_done` counts the
    blocks handed out with it (every block of the clip in official mode), `frames_done` the frames
    of the video so far, this chunk's included, not counting frames past the end of the audio,
    which the MP4 leaves out. The stream's own `stats` counts blocks as they are sampled (one
    block runs ahead of the frames handed out) and every decoded frame.
    """

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
    """Decoded frames of one block (streaming) or one clip (official), uint8 `[n, H, W, 3]`.

    `frames` holds every decoded frame, also those past the end of the audio that the writer
    drops (`VideoStream.frame_limit`); `stats` is the snapshot described in `Stats`; `health`, when
    `write_mp4` runs the checks, the newest health record (`health.HealthRecord`) measured as the
    chunk is handed out: the previous block's (the checks run one block behind, on their thread).
    """

    frames: np.ndarray
    clip: int
    block: int
    start_frame: int
    stats: Stats = field(default_factory=Stats)
    health: HealthRecord | None = None


@dataclass
class _Boundary:
    """The stream right after one completed block: sampler and decoder states, counters."""

    blocks_done: int
    sampler: dict
    decoder: dict
    frames_done: int | None = None
    stats: dict | None = None


@dataclass
class _Pending:
    """A sampled block whose frames have not been handed out yet."""

    block: LatentBlock
    decoded: Decoded
    boundary: _Boundary | None
    blocks_done: int


class VideoStream:
    """Iterable of `FrameChunk`s; see `generate`."""

    def __init__(self, model: LiveAvatarModel, text: torch.Tensor,
                 audio: AudioFeatures | StreamedAudioFeatures | AudioInput, image,
                 settings: GenerationSettings, should_stop: Callable[[], bool] | None = None,
                 resume_from: str | os.PathLike | ResumeState | None = None):
        self.model, self.settings, self.should_stop = model, settings, should_stop
        self.config = settings.sampler_config()
        audio = features_for_mode(audio, settings.mode)
        if audio.frames_per_clip != settings.frames_per_clip:
            raise InputError("frames_per_clip", f"the audio features were bucketed for {audio.frames_per_clip} "
                             f"frames per clip, the sampler is set to {settings.frames_per_clip}.",
                             "encode the audio with the same frames per clip.")
        # A streamed track knows its length from its header (None: not declared, nothing to check).
        seconds = audio.duration_s if isinstance(audio, AudioFeatures) else (
            audio.expected_samples / SAMPLE_RATE if audio.expected_samples else None)
        if seconds is not None:
            check_audio_length(seconds, settings.fps)
        self.audio = audio
        pixels, (self.height, self.width) = preprocess_reference(image, settings.size)
        self._keep_warm_decoder = check_size(model, self.height, self.width, settings)
        self.reference = pixels
        self.text = text
        self.fps = settings.fps
        # Frame k of the output was driven by audio frame k + 3 in streaming mode (the audio is
        # shifted to match); the official mode keeps its offset.
        self.audio_offset_frames = DROPPED_START_FRAMES if settings.mode == "streaming" else 0
        self._frame_limit: int | None = None  # set by write_mp4 from its writer
        self.blocks_per_clip = None
        self.stats = Stats()
        # Set by write_mp4(resume_path=...): keep the last two block boundaries (see _boundary).
        self.track_resume = False
        self._boundaries: deque[_Boundary] = deque(maxlen=2)
        self._blocks_begun = 0
        self._restored: ResumeState | None = None
        self._fingerprint: dict[str, str] | None = None
        if resume_from is not None:
            state = load_resume_state(resume_from)
            check_resume_state(state, asdict(settings), self.fingerprint())
            if state["meta"]["writer"] is not None:
                partial_video(state)
            self._restored = state

    @property
    def num_clips(self) -> int | None:
        """Clips of this video; None while streamed audio has not been read to its end (and no
        count was asked for). Streamed audio of a file: from its declared length until then."""
        available, wanted = self.audio.available_clips, self.settings.num_clips or self.audio.num_clips
        if wanted is None or available is None:
            return wanted if wanted is not None else available
        return min(wanted, available)

    @property
    def generated_frames(self) -> int | None:
        """Frames the stream decodes and hands out (whole clips, less the 3 dropped at the start)."""
        n = self.num_clips
        return None if n is None else n * self.settings.frames_per_clip - DROPPED_START_FRAMES

    @property
    def total_frames(self) -> int | None:
        """Frames of the finished video: those generated, up to the end of the audio (`frame_limit`)."""
        if self.frame_limit is None or self.generated_frames is None:
            return self.generated_frames
        return min(self.generated_frames, self.frame_limit)

    @property
    def frame_limit(self) -> int | None:
        """Frames the MP4 keeps (the writer's "shortest" trim); write_mp4 sets its writer's own
        limit. Streamed audio: None until its end has been read."""
        if self._frame_limit is not None:
            return self._frame_limit
        samples = getattr(self.audio, "total_samples", None)
        if samples is None:
            return None
        return frames_within_audio(samples, SAMPLE_RATE, self.fps, self.audio_offset_frames)

    @frame_limit.setter
    def frame_limit(self, value: int | None) -> None:
        self._frame_limit = value

    @property
    def finished(self) -> bool:
        """True once every block of the video has been produced."""
        return self.stats.blocks_total is not None and self.stats.blocks_done >= self.stats.blocks_total

    @property
    def resume_frame(self) -> int:
        """Frames handed out by the interrupted run this stream resumes (0 for a new stream)."""
        return 0 if self._restored is None else self._restored["meta"]["stream"]["stats"]["frames_done"]

    @property
    def writer_state(self) -> dict | None:
        """The MP4 writer state of the interrupted run this stream resumes, if any."""
        return self._restored["meta"]["writer"] if self._restored is not None else None

    def fingerprint(self) -> dict[str, str]:
        """Digests of this stream's inputs, stored in resume files and checked on resume."""
        if self._fingerprint is None:  # hashing a long audio embedding takes a moment: once per stream
            self._fingerprint = input_fingerprint(text=self.text, audio=audio_identity(self.audio),
                                                  reference=self.reference, model=self.model)
        return self._fingerprint

    def __iter__(self) -> Iterator[FrameChunk]:
        start = time.perf_counter()
        self.stats = Stats()
        self._boundaries.clear()
        with torch.no_grad():
            sampler, decoder = self._start() if self._restored is None else self._restore(self._restored)
            self.blocks_per_clip = sampler.blocks_per_clip
            self._count_blocks()
            self._blocks_begun = self.stats.blocks_done
            self._clock = (start, self.stats.elapsed_s)  # (this run's start, time spent before an interruption)
            if self._restored is not None and self.track_resume:
                restored = self._boundary(sampler, decoder)
                restored.frames_done, restored.stats = self.stats.frames_done, asdict(self.stats)
                self._boundaries.append(restored)
            # One block in flight: block k's frames are handed out once block k+1 is sampled (on a
            # GPU that is only queued), so decode, copy-out and the caller's encoding of block k
            # overlap the DiT work of block k+1. The first frames go out at once (time to first frame).
            pending: deque[_Pending] = deque()
            # Streamed features are pulled clip by clip (the first clip waits only for its own window)
            # and end with the audio; their clip count may be an estimate until then.
            streamed = isinstance(self.audio, StreamedAudioFeatures)
            blocks = iter(sampler.run(self.audio, (self.settings.num_clips or None) if streamed else self.num_clips))
            try:
                while True:
                    self._blocks_begun += 1
                    block = next(blocks, None)
                    self._count_blocks()  # streamed audio: the count is known once its end has been read
                    if block is None:
                        break
                    self.stats.blocks_done += 1
                    pending.append(_Pending(block, decoder.launch(sampler, block),
                                            self._boundary(sampler, decoder) if self.track_resume else None,
                                            self.stats.blocks_done))
                    while len(pending) > 1 or (pending and self.stats.first_frame_s is None):
                        yield from self._emit(pending)
                    if self.should_stop is not None and self.should_stop():
                        log.info("stopped after block %d of clip %d", block.block, block.clip)
                        break
            except GeneratorExit:
                raise
            except BaseException:
                # Hand out what is finished before the error surfaces, so the writer keeps it and a
                # resume state matches the file.
                while pending:
                    yield from self._emit(pending)
                raise
            while pending:
                yield from self._emit(pending)

    def _count_blocks(self) -> None:
        n = self.num_clips
        self.stats.blocks_total = None if n is None else n * self.blocks_per_clip

    def _emit(self, pending: deque[_Pending]) -> Iterator[FrameChunk]:
        """Collect the oldest block in flight; it leaves `pending` only once its frames are in hand."""
        item = pending[0]
        frames = item.decoded.result()
        pending.popleft()
        start, earlier_s = self._clock
        self.stats.elapsed_s = earlier_s + time.perf_counter() - start
        chunk = None
        if frames is not None and len(frames):
            if self.stats.first_frame_s is None:
                self.stats.first_frame_s = self.stats.elapsed_s
            start_frame = self.stats.frames_done
            self.stats.frames_done += len(frames)
            in_video = self.stats.frames_done if self.frame_limit is None else min(self.stats.frames_done,
                                                                                   self.frame_limit)
            chunk = FrameChunk(frames, item.block.clip, item.block.block, start_frame,
                               replace(self.stats, blocks_done=item.blocks_done, frames_done=in_video))
        if item.boundary is not None:
            item.boundary.frames_done = self.stats.frames_done
            item.boundary.stats = {**asdict(self.stats), "blocks_done": item.boundary.blocks_done}
            self._boundaries.append(item.boundary)
        if chunk is not None:
            yield chunk

    # --- resume -------------------------------------------------------------------------------

    def _boundary(self, sampler: BlockSampler, decoder) -> _Boundary:
        """References to the state right after a completed block (one copy per clip, see below);
        the frame count and stats are filled in when its frames are handed out.

        The decoders' states and the sampler's condition and latents are replaced by new tensors,
        never modified, so references stay valid. The step KV rings are modified in place, but a
        block writes only its own rows and writes each before reading it, so a ring that a later
        block has (partly) written resumes that block exactly. The one buffer a later block changes
        that a resume still needs is the clip-latents buffer after a clip end (the streaming sink
        refresh reads its first latent), hence the copy at clip ends. Valid while at most one more
        block has begun, which `resume_state` checks.
        """
        state = sampler.state_dict()
        if sampler.block == 0:
            state["tensors"]["clip_latents"] = sampler.clip_latents.clone()
        return _Boundary(self.stats.blocks_done, state, decoder.state())

    def resume_state(self, writer_state: dict | None = None,
                     unwritten: list[np.ndarray] | None = None) -> ResumeState | None:
        """The state after the last completed block, or None before the first one.

        Needs `track_resume` set before iterating. With `writer_state` (from
        `StreamingMP4Writer.state()`), the last block whose frames the writer holds is chosen: a
        chunk being written when the stream stopped is generated again on resume. `unwritten`:
        the chunks handed out after those but not in the file (a failed write); they go into the
        state and are written first on resume, chunk by chunk (each is one H.264 GOP). Tensors are live references: save the state
        (`resume.save_resume_state`) before iterating on.
        """
        on_disk = None if writer_state is None else writer_state["frames_written"] + writer_state["frames_dropped"]
        if on_disk is not None and unwritten:
            on_disk += sum(len(frames) for frames in unwritten)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the decoder's state is written on its own stream
        for b in reversed(self._boundaries):
            if self._blocks_begun - b.blocks_done > 1:
                log.warning("the video file is more than one block behind the sampler; no resume state")
                return None
            if on_disk is None or b.frames_done == on_disk:
                return build_resume_state(settings=asdict(self.settings), fingerprint=self.fingerprint(),
                                          model_description=self.model.description, stream={"stats": b.stats},
                                          sampler=b.sampler, decoder=b.decoder, writer=writer_state,
                                          unwritten=[torch.from_numpy(f) for f in unwritten or ()])
        return None

    @property
    def unwritten_chunks(self) -> list[np.ndarray]:
        """Chunks of the interrupted run that its MP4 lacks (a failed write), written first on resume."""
        return [] if self._restored is None else [t.numpy() for t in unwritten_chunks(self._restored)]

    def _start(self):
        ref_lat, motion_lat, decoder = start_decoder(self.model.vae, self.reference, self.settings,
                                                     self.model.dit.cfg.motion_frames[0], self._more_clips,
                                                     keep_warm=self._keep_warm_decoder)
        return BlockSampler(self.model.dit, self.text, ref_lat, motion_lat, self.config,
                            cache_factory=self.model.cache_factory()), decoder

    def _more_clips(self, clips_done: int) -> bool:
        """Whether the video has more than `clips_done` clips (the official decoder skips the last
        context encode)."""
        return clips_done < self.num_clips

    def _restore(self, state: ResumeState):
        """Sampler and decoder continuing after the saved block (no VAE encode, no warm-up)."""
        part = resume_part(state, "sampler")
        try:
            t = part["tensors"]
            sampler = BlockSampler(self.model.dit, self.text, t["ref_latents"], t["motion_latents"], self.config,
                                   cache_factory=self.model.cache_factory())
            sampler.load_state_dict(part)
            decoder = restore_decoder(self.model.vae, self.reference, self.settings,
                                      self.model.dit.cfg.motion_frames[0], self._more_clips,
                                      resume_part(state, "decoder"))
        except KeyError as exc:
            raise InputError("resume", f"the resume file lacks the tensor {exc.args[0]}.",
                             "the file is damaged; start the video again without resuming.") from None
        except InputError as exc:
            raise InputError("resume", f"{exc.input_name}: {exc.problem}", exc.fix) from None
        self.stats = Stats(**state["meta"]["stream"]["stats"])
        return sampler, decoder


def generate(model: LiveAvatarModel, text: torch.Tensor, audio: AudioFeatures, image,
             settings: GenerationSettings | None = None, should_stop: Callable[[], bool] | None = None,
             resume_from: str | os.PathLike | ResumeState | None = None) -> VideoStream:
    """A lazy stream of decoded frames for one avatar video (see the module docstring).

    text: umT5 output `[L, 4096]`; audio: `AudioEncoder.encode(...)` result; image: path, PIL
    image, uint8 array or ComfyUI IMAGE tensor; should_stop: polled after every block (cancel);
    resume_from: a resume file (or its loaded state) of an interrupted run with the same inputs
    and settings, checked now: the stream continues after its last completed block.
    """
    from .parallel.remote import RemoteModel, RemoteStream

    kind = RemoteStream if isinstance(model, RemoteModel) else VideoStream
    return kind(model, text, audio, image, settings or GenerationSettings(), should_stop, resume_from)


def write_mp4(stream: VideoStream, path: str | Path, audio: np.ndarray | None = None,
              sample_rate: int = 16000, on_chunk: Callable[[FrameChunk], None] | None = None,
              writer_settings: WriterSettings | None = None,
              resume_path: str | os.PathLike | None = None, health: str = "off") -> Path:
    """Append every chunk of `stream` to a fragmented MP4 with the audio muxed in, as it arrives.

    The file is playable while it grows and after an interruption (an exception, a cancel, or a
    killed process): it then holds every chunk finished so far. A full disk ends it with an
    InputError naming the file, which then holds every chunk written before. With `resume_path`, a
    stream that stops early (cancel, exception, Ctrl-C, a full disk; not a killed process) also
    leaves there the state after its last completed block (with the chunks the file lacks, if a
    write failed), or logs in one line why it could not, and the file is removed once the video is
    complete. A stream made with `generate(..., resume_from=...)` appends to the interrupted MP4,
    which `path` must name. `health` (`health.HEALTH_MODES`): "auto", "warn" or "stop" run the per-block
    health checks on what the file gets, into NAME.health.jsonl and NAME.health.png beside it (the
    plot written at the end, also after a failure), on a thread of their own, so a chunk's `health`
    is the record of the chunk before it; an alarm in "stop" ends the run after the block in flight
    with `HealthStopped`, as a failure ends it. Returns the path.
    """
    settings = replace(writer_settings or WriterSettings(), audio_offset_frames=stream.audio_offset_frames)
    audio = stream.audio.waveform_16k if audio is None else audio
    if resume_path is not None:
        stream.track_resume = True
    writer = _open_writer(stream, Path(path), audio, sample_rate, settings)
    stream.frame_limit = writer.frame_limit
    unwritten = stream.unwritten_chunks
    frame = stream.resume_frame - sum(len(frames) for frames in unwritten)  # where the file ends
    # The monitor resolves "auto" (off where OpenCV cannot run the checks, then nothing is measured).
    checks = RunHealth(health, path, reference_uint8(stream.reference), stream.fps, audio, sample_rate,
                       stream.audio_offset_frames, frame) if health != "off" else None
    background = _BackgroundWriter(writer)
    try:
        for frames in unwritten:
            background.append(frames)
            if checks is not None:
                checks.stop_if_asked(checks.submit(frames, frame, stream.frame_limit))
            frame += len(frames)
        for chunk in stream:
            background.append(chunk.frames)
            if checks is not None:
                chunk.health = checks.submit(chunk.frames, chunk.start_frame, stream.frame_limit)
            if on_chunk is not None:
                on_chunk(chunk)
            if checks is not None:
                checks.stop_if_asked(chunk.health)
        if checks is not None:
            checks.stop_if_asked(checks.finish())
        background.close()
    except BaseException:
        background.close(failed=True)
        _finish(stream, writer, resume_path, failed=True, unwritten=background.unwritten)
        raise
    finally:
        if checks is not None:
            checks.close()
    _finish(stream, writer, resume_path, failed=False)
    return Path(path)


# Chunks handed out but not yet in the file: the file lags the stream by up to this many blocks
# (plus the one being encoded), which is also what a cancel can still add to what the file shows.
WRITE_QUEUE_CHUNKS = 2


class _BackgroundWriter:
    """Encodes and writes chunks on a thread, so H.264 encoding (PyAV releases the GIL) overlaps
    the queuing of the next block's GPU work instead of adding to it.

    At most `depth` chunks wait. An encoding or write error (a full disk) is raised in the caller
    at its next `append` or at `close`; `close` writes everything still waiting, so the file holds
    every chunk the stream handed out, or, after an error, every one before the failed chunk, and
    `unwritten` holds the frames of that chunk and of every one handed over after it.
    """

    def __init__(self, writer: StreamingMP4Writer, depth: int = WRITE_QUEUE_CHUNKS):
        self.writer = writer
        self.error: BaseException | None = None
        self.failed = False
        self._unwritten: list[np.ndarray] = []
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="liveavatar-mp4", daemon=True)
        self._thread.start()

    @property
    def unwritten(self) -> list[np.ndarray]:
        """Chunks handed over but not in the file, once a write failed (read after `close`)."""
        return list(self._unwritten)

    def _run(self) -> None:
        while (frames := self._queue.get()) is not None:
            if self.failed:
                self._unwritten.append(frames)
                continue
            try:
                self.writer.append(frames)  # all or nothing: a failed append leaves the file as before
            except BaseException as exc:  # handed to the caller, which decides
                self.error, self.failed = exc, True
                self._unwritten.append(frames)

    def append(self, frames: np.ndarray) -> None:
        if self.failed:
            self._unwritten.append(frames)
        self._raise()
        self._queue.put(frames)

    def close(self, failed: bool = False) -> None:
        """Write what is waiting and stop the thread; re-raise its error unless already `failed`."""
        self._queue.put(None)
        self._thread.join()
        if not failed:
            self._raise()
        elif self.error is not None:
            log.error("writing the MP4 failed as well: %s", self.error)

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _open_writer(stream: VideoStream, path: Path, audio, sample_rate: int,
                 settings: WriterSettings) -> StreamingMP4Writer:
    if stream._restored is None:
        return StreamingMP4Writer(path, stream.width, stream.height, stream.fps, audio=audio,
                                  sample_rate=sample_rate, settings=settings)
    saved = stream.writer_state
    partial = partial_video(stream._restored)
    if path.resolve() != partial:
        raise InputError("resume", f"the interrupted run was writing {partial}, not {path}.",
                         "pass the path of the interrupted video: it is the file that gets completed.")
    if asdict(settings) != saved["settings"]:
        raise InputError("resume", f"the interrupted video was written with {saved['settings']}, now "
                         f"{asdict(settings)}.", "resume with the writer settings of the interrupted run.")
    try:
        return StreamingMP4Writer.resume(saved, audio, sample_rate)
    except InputError as exc:
        raise InputError("resume", f"{exc.input_name}: {exc.problem}", exc.fix) from None


def _finish(stream: VideoStream, writer: StreamingMP4Writer, resume_path, failed: bool,
            unwritten: list[np.ndarray] | None = None) -> None:
    """Close the MP4; when asked, save the resume state of an unfinished stream or drop a stale one."""
    # A finished stream whose last frames could not be written is unfinished for the file.
    complete = stream.finished and not unwritten
    try:
        if resume_path is not None and not complete:
            _save_resume(stream, writer, Path(resume_path), failed, unwritten)
    finally:
        try:
            writer.close()
        except InputError as exc:
            if not failed:
                raise
            # The closing audio could not be written either (the disk is still full); the video
            # plays without its last fraction of a second of sound. The first error is the one to see.
            log.warning("closing %s: %s", writer.path.name, exc.problem)
    if resume_path is not None and complete:
        _drop_stale_resume(Path(resume_path), writer.path)


def _drop_stale_resume(resume_path: Path, video: Path) -> None:
    """Delete the resume file of a video that is now complete (and no other file)."""
    if not resume_path.is_file():
        return
    try:
        writer = load_resume_state(resume_path)["meta"]["writer"]
    except InputError:
        return
    if writer is not None and Path(writer["path"]) == video:
        resume_path.unlink()


def _save_resume(stream: VideoStream, writer: StreamingMP4Writer, resume_path: Path, failed: bool,
                 unwritten: list[np.ndarray] | None) -> None:
    """Save the state after the last block the file (plus `unwritten`) holds; every outcome is one log line."""
    earlier = " (the earlier resume file there still resumes from where it was saved)" if resume_path.is_file() else ""
    try:
        # The writer's state before close: resuming truncates the closing audio tail again.
        state = stream.resume_state(writer.state(), unwritten)
        if state is None:
            if writer.frames_written == 0 and not unwritten:
                log.warning("stopped before the first block was written: nothing to resume, %s not written%s",
                            resume_path, earlier)
            else:
                log.warning("stopped with %d frames in %s, not at a block the stream can resume from: %s not "
                            "written%s", writer.frames_written, writer.path, resume_path, earlier)
            return
        save_resume_state(state, resume_path)
    except OSError as exc:  # no room for the state either, most often
        log.error("could not save the resume state to %s (%s): this run cannot be resumed%s; %s keeps its %d "
                  "frames", resume_path, exc.strerror or exc, earlier, writer.path, writer.frames_written)
        return
    except Exception as exc:
        if not failed:
            raise
        # One line: the error that stopped the stream is the one to see, not a traceback about its state.
        log.error("could not save the resume state to %s (%s: %s)%s", resume_path, type(exc).__name__, exc, earlier)
        return
    s, w = state["meta"]["stream"]["stats"], state["meta"]["writer"]
    lacking = sum(len(frames) for frames in unwritten or ())
    kept = f" (and the resume file the {lacking} frames it lacks)" if lacking else ""
    log.warning("stopped after %d of %d blocks; %s holds %d frames%s; resume state saved to %s",
                s["blocks_done"], s["blocks_total"], writer.path, w["frames_written"], kept, resume_path)
