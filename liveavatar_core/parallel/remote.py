"""The controller side of a parallel run: a model that lives in worker processes, and its stream.

`load_parallel` starts a `WorkerGroup` and has every rank load its part; the returned
`RemoteModel` goes to `pipeline.generate` and `write_mp4` like a `LiveAvatarModel`. Its stream
(`RemoteStream`) is a `VideoStream` whose blocks are made by the ranks: this process keeps the
audio features (handing each clip to the ranks as they reach it), the MP4 writer, the cancel
check and the resume file, and serves the ranks' requests while it waits for frames.

Cancel (ComfyUI's interrupt, Ctrl-C on the CLI): the head rank is admitted no further block;
the blocks in flight are finished and their frames handed out (about one block period), so every
rank stops after the same block and their parts form one resume file, valid for any rank count
and layout (steps or layers).
A second Ctrl-C, or a drain longer than DRAIN_TIMEOUT_S, kills the workers (the MP4 keeps what was
written; no resume file). A dead or failed rank stops the group and raises after the frames
received so far are handed out.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import DiTConfig
from ..errors import InputError
from ..loading import compute_dtype, resolve_compile
from ..decoding import Decoded
from ..pipeline import Stats, VideoStream, _Pending, model_identity
from ..resume import ResumeState, build_resume_state, resume_part
from ..sampling.generator import LatentBlock, clip_source
from ..sampling.state import merge_stage_states, stage_part
from ..weights.check import check_run_files
from ..weights.dit import load_dit_checkpoint
from ..weights.lora import DEFAULT_SCALE
from ..weights.vae import SPATIAL_STRIDE
from .group import WorkerGroup
from .layout import LayerLayout, StepLayout, check_shard

if TYPE_CHECKING:
    from ..synthetic import RandomWeights

log = logging.getLogger("liveavatar")

# Every model whose workers may be running, for `release_all` (weak: a dropped model closes itself).
_LIVE: dict[int, weakref.ref] = {}
POLL_S = 0.05  # how often the controller checks for a cancel and for dead ranks while it waits
DRAIN_TIMEOUT_S = 10.0  # a cancelled pipeline still running after this long is killed


@dataclass
class RemoteModel:
    """A generator whose DiT and VAE live in the worker processes of `group`."""

    group: WorkerGroup
    layout: StepLayout | LayerLayout
    cfg: DiTConfig
    description: str
    identity: str
    plan: object = None  # the parallel plan it was loaded with (re-checked per video size), if any

    def close(self) -> None:
        """Stop the worker processes (the GPUs are free afterwards)."""
        self.group.close()

    def rank_stats(self, reset_peak: bool = False) -> list[dict]:
        """Each rank's memory between jobs (`Worker.stats`: peak GPU memory since the last reset,
        total memory, DiT weight bytes held)."""
        for rank in range(self.layout.world_size):
            self.group.send(rank, ("stats", reset_peak))
        return [self.group.receive(rank, "stats", timeout=60)[1] for rank in range(self.layout.world_size)]


def load_parallel(dit_path: str | Path | None, vae_path: str | Path | None, lora_path: str | Path | None = None, *,
                  layout: StepLayout | LayerLayout, precision: str = "bf16", attention: str = "sdpa",
                  compile: str = "auto", kv_cache_dtype: str = "auto", lora_scale: float = DEFAULT_SCALE, plan=None,
                  log_dir: str | os.PathLike | None = None, attach: tuple[str, int] | None = None,
                  authkey: bytes | None = None, random_weights: RandomWeights | None = None,
                  memory_cap: int | None = None, shard: str = "none") -> RemoteModel:
    """Start one worker per rank of `layout` and load each rank's part (see module docstring).

    plan: a `ParallelPlan` (its per-rank `RunPlan`s place each rank); None: each rank plans for
    its own device. attach / authkey: wait at that address for ranks launched elsewhere (torchrun)
    that present `authkey` (see `WorkerGroup`). Every file is checked before a worker starts.
    random_weights: build random weights of these architectures on every rank instead of reading
    files (benchmarks; the paths are then None); memory_cap: bytes each GPU rank may allocate once
    loaded (benchmarks emulating a smaller card, as `torch.cuda.set_per_process_memory_fraction`
    imposes); shard: "fsdp" shards the block units over the DiT ranks of a step layout (`layout.SHARDS`).
    """
    check_shard(shard, layout, layout.dit_ranks)
    if random_weights is None:
        check_run_files(dit_path, lora_path=lora_path, vae_path=vae_path)
        cfg = load_dit_checkpoint(dit_path).config
    elif dit_path is not None or vae_path is not None or lora_path is not None:
        raise InputError("random_weights", "random weights were asked for together with weight files.",
                         "pass either the files or random_weights, with the paths None.")
    else:
        cfg = random_weights.dit
    compute_dtype(precision)  # an unknown precision is refused before any worker starts
    compile_vae = resolve_compile(compile, torch.device(layout.devices[layout.vae_rank]))
    plans = list(getattr(plan, "rank_plans", None) or [None] * layout.world_size)
    spec = {"dit_path": str(dit_path), "vae_path": str(vae_path), "lora_path": str(lora_path) if lora_path else None,
            "precision": precision, "attention": attention, "compile": compile, "compile_vae": compile_vae,
            "kv_cache_dtype": kv_cache_dtype, "lora_scale": lora_scale, "plans": plans,
            "random_weights": random_weights, "memory_cap": memory_cap, "shard": shard}
    t0 = time.perf_counter()
    group = WorkerGroup(layout, log_dir, attach=attach, authkey=authkey).start()
    try:
        for rank in range(layout.world_size):
            group.send(rank, ("load", spec))
        info = [group.receive(rank, "loaded", timeout=None)[1] for rank in range(layout.world_size)]
    except BaseException:
        group.kill()
        raise
    head, vae = info[0], info[layout.vae_rank]
    identity = model_identity(head["weights"], head["digest"], vae["vae"])
    description = f"{head['description']}; {layout.world_size} processes: {layout.describe()}"
    log.info("parallel: loaded in %.1f s", time.perf_counter() - t0)
    model = RemoteModel(group, layout, cfg, description, identity, plan)
    weakref.finalize(model, group.close)
    _LIVE[id(model)] = weakref.ref(model, lambda _, key=id(model): _LIVE.pop(key, None))
    return model


def release_all() -> list[str]:
    """Stop the workers of every loaded parallel model; what each ran (its layout), in load order."""
    released = []
    for ref in list(_LIVE.values()):
        model = ref()
        if model is not None and model.group.alive:
            model.close()
            released.append(model.layout.describe())
    return released


class RemoteStream(VideoStream):
    """A `VideoStream` of a `RemoteModel` (see the module docstring); same contract and resume files."""

    def __init__(self, model: RemoteModel, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self._job: _Job | None = None
        self._held: list[np.ndarray] = []  # drained frames that could not be handed out

    def __iter__(self):
        cfg = self.model.cfg
        start = time.perf_counter()
        restored = self._restored
        self.stats = Stats() if restored is None else Stats(**restored["meta"]["stream"]["stats"])
        self._clock = (start, self.stats.elapsed_s)
        self.blocks_per_clip = self.config.latent_frames_per_clip(*cfg.motion_frames) // cfg.num_frames_per_block
        self._count_blocks()
        self._held = []
        job = self._job = _Job(self)
        try:
            job.start()
            while not job.finished:
                job.serve(POLL_S)
                while job.frames:
                    yield from self._hand_out(job.frames.popleft())
                if not job.stopping and self.should_stop is not None and self.should_stop():
                    log.info("stop requested: finishing the blocks in flight")
                    job.stop()
        except KeyboardInterrupt:
            # Ctrl-C: stop at a block boundary like a cancel; the frames of the blocks in flight
            # are handed out, then the interrupt goes on (a second one kills the workers).
            self._drain(job, hand_out=True)
            while job.frames:
                yield from self._hand_out(job.frames.popleft())
            raise
        except GeneratorExit:
            self._drain(job, hand_out=False)
            raise
        except BaseException:
            self.model.group.kill()
            while job.frames:
                yield from self._hand_out(job.frames.popleft())
            raise

    def _drain(self, job: "_Job", hand_out: bool) -> None:
        """Stop admitting blocks and serve the ranks until all are done (killed after DRAIN_TIMEOUT_S)."""
        job.stop()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        try:
            while not job.finished:
                if time.monotonic() > deadline:
                    log.error("the workers did not stop within %.0f s: killed", DRAIN_TIMEOUT_S)
                    self.model.group.kill()
                    job.failed = True
                    return
                job.serve(POLL_S)
                if not hand_out:
                    self._held.extend(f for *_, f in job.frames if f is not None)
                    self._count_held(job.frames)
                    job.frames.clear()
        except KeyboardInterrupt:
            log.error("second interrupt: the workers are killed; the MP4 keeps what was written")
            self.model.group.kill()
            job.failed = True
            raise

    def _count_held(self, items) -> None:
        for *_, frames in items:
            self.stats.blocks_done += 1
            if frames is not None:
                self.stats.frames_done += len(frames)

    def _hand_out(self, item):
        clip, block, last, frames = item
        self.stats.blocks_done += 1
        pending = _Pending(LatentBlock(clip, block, -1, None, last), Decoded(frames), None, self.stats.blocks_done)
        yield from self._emit(deque([pending]))

    def resume_state(self, writer_state: dict | None = None,
                     unwritten: list[np.ndarray] | None = None) -> ResumeState | None:
        """The state after the last block every rank finished (see VideoStream.resume_state);
        frames drained after the consumer stopped reading go into it as unwritten chunks."""
        job = self._job
        if job is None or job.failed or not self.model.group.alive:
            return None
        if not job.finished:
            self._drain(job, hand_out=False)
            if job.failed:
                return None
        unwritten = list(unwritten or ()) + self._held
        if writer_state is not None:
            on_disk = writer_state["frames_written"] + writer_state["frames_dropped"] + sum(map(len, unwritten))
            if on_disk != self.stats.frames_done:
                log.warning("the video file holds %d frames, the ranks stopped after %d: no resume state",
                            on_disk, self.stats.frames_done)
                return None
        lay = self.model.layout
        group = self.model.group
        for rank in range(lay.world_size):
            group.send(rank, ("state",))
        parts = [group.receive(rank, "state", timeout=None)[1] for rank in range(lay.world_size)]
        finishing = lay.dit_ranks - 1
        sampler = merge_stage_states([p["sampler"] for p in parts[:lay.dit_ranks]], finishing)
        return build_resume_state(settings=asdict(self.settings), fingerprint=self.fingerprint(),
                                  model_description=self.model.description, stream={"stats": asdict(self.stats)},
                                  sampler=sampler, decoder=parts[lay.vae_rank]["decoder"], writer=writer_state,
                                  unwritten=[torch.from_numpy(f) for f in unwritten])


class _Job:
    """One video on the worker group: the requests the ranks make while it runs."""

    def __init__(self, stream: RemoteStream):
        self.stream = stream
        self.model: RemoteModel = stream.model
        self.group = self.model.group
        self.layout = self.model.layout
        self.stopping = False
        self.failed = False
        self.done: set[int] = set()
        self.frames: deque = deque()  # (clip, block, last_in_clip, uint8 frames or None)
        self.board: dict[str, object] = {}
        self.waiting: dict[str, list[int]] = {}
        self._clip_cache: dict[int, torch.Tensor] = {}
        self._fetched: dict[int, int] = {}
        self._clips = None
        self._next_clip = 0
        self._end_clip: int | None = None

    @property
    def finished(self) -> bool:
        return self.failed or len(self.done) == self.layout.world_size

    def start(self) -> None:
        s, lay, cfg = self.stream, self.layout, self.model.cfg
        if not self.group.alive:
            raise InputError("model", "the worker processes of this model have stopped (released, or a rank died).",
                             "load the model again (re-run the loader node / the command).")
        restored = s._restored
        sampler = decoder = None
        start = 0
        if restored is not None:
            sampler = resume_part(restored, "sampler")
            decoder = resume_part(restored, "decoder")
            start = int(sampler["meta"]["clip"])
        streamed = hasattr(s.audio, "clips")
        num_clips = (s.settings.num_clips or None) if streamed else s.num_clips
        self._clips, _limit = clip_source(s.audio, cfg, s.config, start, num_clips)
        self._next_clip = start
        latents = cfg.out_dim, s.config.latent_frames_per_clip(*cfg.motion_frames)
        lat_hw = (s.height // SPATIAL_STRIDE, s.width // SPATIAL_STRIDE)
        common = {"settings": asdict(s.settings), "motion_frames": cfg.motion_frames[0]}
        for rank in range(lay.world_size):
            job = dict(common, text=None, reference=None, sampler=None, decoder=None)
            if rank < lay.dit_ranks:
                job["text"] = s.text.detach().cpu()
                if sampler is not None:
                    job["sampler"] = stage_part(sampler, *lay.part(rank))
            if rank == lay.vae_rank:
                job["reference"] = s.reference
                job["decoder"] = decoder
                if rank >= lay.dit_ranks:  # the dedicated VAE rank keeps its own clip buffer
                    job.update(sampler=None if sampler is None else {"tensors": {
                        "clip_latents": sampler["tensors"]["clip_latents"]}},
                        clip_latents_shape=(1, latents[0], latents[1], *lat_hw),
                        frames_per_block=cfg.num_frames_per_block, blocks_per_clip=s.blocks_per_clip)
            self.group.send(rank, ("job", job))

    def stop(self) -> None:
        self.stopping = True

    def serve(self, timeout: float) -> None:
        """Answer whatever the ranks have asked within `timeout`; raise if a rank died or failed."""
        conns = {conn: rank for rank, conn in enumerate(self.group.conns)}
        for conn in wait(list(conns), timeout):
            rank = conns[conn]
            while conn.poll():
                self._handle(rank, self.group.read(rank))
        self.group.check()

    def _handle(self, rank: int, message) -> None:
        kind, args = message[0], message[1:]
        if kind == "clip":
            self.group.send(rank, self._clip(rank, args[0]))
        elif kind == "admit":
            self.group.send(rank, not self.stopping)
        elif kind == "more_clips":
            self.group.send(rank, args[0] < self.stream.num_clips)
        elif kind == "put":
            key, value = args
            self.board[key] = value
            for waiter in self.waiting.pop(key, []):
                self.group.send(waiter, value)
        elif kind == "get":
            if args[0] in self.board:
                self.group.send(rank, self.board[args[0]])
            else:
                self.waiting.setdefault(args[0], []).append(rank)
        elif kind == "frames":
            self.frames.append(args)
        elif kind == "done":
            self.done.add(rank)
        else:
            self.group.kill()
            raise RuntimeError(f"rank {rank} sent an unknown request {kind!r}")

    def _clip(self, rank: int, clip: int) -> torch.Tensor | None:
        """Clip `clip`'s audio for a DiT rank (None past the end); dropped once every rank has it."""
        while self._end_clip is None and self._next_clip <= clip:
            audio = next(self._clips, None)
            if audio is None:
                self._end_clip = self._next_clip
                break
            self._clip_cache[self._next_clip] = audio.detach().cpu()
            self._next_clip += 1
            self.stream._count_blocks()  # streamed audio: the count is known once its end is read
        audio = self._clip_cache.get(clip)
        if audio is not None:
            self._fetched[clip] = self._fetched.get(clip, 0) + 1
            if self._fetched[clip] == self.layout.dit_ranks:
                del self._clip_cache[clip], self._fetched[clip]
        return audio
