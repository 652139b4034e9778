"""A rank of a parallel run: `python -m liveavatar_core.parallel.worker`.

Started by `WorkerGroup` (one process per rank; the authkey arrives on stdin) or under torchrun
(`LIVEAVATAR_CONTROL=host:port LIVEAVATAR_AUTHKEY=<hex> torchrun ... -m liveavatar_core.parallel.worker`,
rendezvous through torchrun's environment). The rank connects to the controller's control socket,
joins the process group, then serves commands: `load` (its part of the model, from the
memory-mapped files or random weights), `job` (one video), `state` (its part of the resume state),
`stats` (its peak GPU memory), `shutdown`.

During a job the rank never waits on a peer for input from outside: clip audio, admission of each
block (how a cancel stops the head), the conditioning latents and the sink refreshes come from the
controller over the control socket; only block latents cross ranks (transport.py). Any error is
reported to the controller with its traceback, then the process exits: the controller stops the
other ranks, which may be blocked in a receive. The process also exits when the control socket
closes (its controller is gone), so no rank outlives the ComfyUI or CLI process that started it.
With sharded weights (`shard` "fsdp") the DiT ranks form a group of their own for the gathers,
and a waiting rank serves them (placement/fsdp.py).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import select
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection

import torch
import torch.distributed as dist

from ..errors import InputError
from ..decoding import restore_decoder, start_decoder
from ..pipeline import GenerationSettings
from ..sampling.generator import LatentBlock
from .layers import LayerSampler
from .layout import LayerLayout, StepLayout
from .stage import StageSampler
from .transport import Peers, recv_message, send_message

log = logging.getLogger("liveavatar")

# How long a rank waits in a collective before torch.distributed gives up; the controller notices
# a dead rank within a second and stops the others long before this.
PROCESS_GROUP_TIMEOUT_S = 600
CONNECT_TIMEOUT_S = 120


class ControlClient:
    """The rank's end of the control socket: requests answered in order, and posts."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.idle = None  # called while an answer is awaited (a sharded model's `serve`), or None: block

    def request(self, kind: str, *args):
        send_message(self.conn, (kind, *args))
        while self.idle is not None and not self.conn.poll():
            self.idle()
        return recv_message(self.conn)

    def post(self, kind: str, *args) -> None:
        send_message(self.conn, (kind, *args))


class _Publishing:
    """What a decoder needs of the sampler, on the VAE rank: the clip's denoised latents, and the
    online-decode sink refresh, which is published for the other DiT ranks (and applied to the
    local sampler when this rank has one)."""

    def __init__(self, control: ControlClient, clip_latents: torch.Tensor, sampler: StageSampler | None = None):
        self.control, self.clip_latents, self.sampler = control, clip_latents, sampler
        self.refreshed = False

    def refresh_condition(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> None:
        self.refreshed = True
        self.control.post("put", "refreshed_condition", (ref_latents.cpu(), motion_latents.cpu()))
        if self.sampler is not None:
            self.sampler.refresh_condition(ref_latents, motion_latents)


class Worker:
    """The state of one rank: its model part and, between jobs, the last job's sampler/decoder."""

    def __init__(self, rank: int, layout: StepLayout | LayerLayout, device: torch.device, control: ControlClient):
        self.rank, self.layout, self.device, self.control = rank, layout, device, control
        self.peers = Peers(device, layout.backend)
        self.dit = self.vae = self.cache_factory = self.dtype = None
        self.shard_group = self.shards = None  # FSDP: the DiT ranks' group, this rank's gathers
        self.sampler: StageSampler | None = None
        self.decoder = None

    @property
    def is_dit(self) -> bool:
        return self.rank < self.layout.dit_ranks

    @property
    def has_vae(self) -> bool:
        return self.rank == self.layout.vae_rank

    # --- commands -----------------------------------------------------------------------------

    def load(self, spec: dict) -> dict:
        """Load this rank's part: the DiT (tensor by tensor from the mapped files, or random weights)
        and/or the VAE; then cap its GPU memory if the spec asks (a benchmark emulating a smaller card)."""
        from ..loading import compute_dtype

        self.dtype = compute_dtype(spec["precision"])  # the DiT's, and so the latents'; the VAE's: vae_compute_dtype
        if spec["shard"] == "fsdp":
            # Every process takes part in making the DiT ranks' group, a dedicated VAE rank too.
            group = dist.new_group(list(range(self.layout.dit_ranks)))
            self.shard_group = group if self.is_dit else None
        info = self._load_random(spec) if spec.get("random_weights") is not None else self._load_files(spec)
        cap = spec.get("memory_cap")
        if cap is not None and self.device.type == "cuda":
            # After building (random weights are made whole on the GPU), before the first job, as
            # bench/run_bench.py does: compilation, caches and decoding run inside the budget.
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), self.device)
        return info

    def _load_random(self, spec: dict) -> dict:
        """This rank's part with random weights (`synthetic.RandomWeights`): the same numbers on
        every rank, as from a file, placed by the same steps as `load_generator`."""
        from ..loading import (assemble, drop_other_layers, model_words, plan_for_device, prepare_dit, prepare_vae,
                               resolve_compile, vae_compute_dtype)
        from ..ops.fp8 import check_fp8_support
        from ..resume import tensor_digest
        from ..synthetic import random_dit, random_vae

        weights, precision = spec["random_weights"], spec["precision"]
        if precision == "fp8" and self.is_dit:
            check_fp8_support(self.device)
        vae = None
        if self.has_vae:
            vae = prepare_vae(random_vae(weights, self.device, vae_compute_dtype(precision, self.device)), self.device,
                              spec["compile_vae"])
        if not self.is_dit:
            self.vae = vae
            return {"description": vae.description, "vae": vae.description}
        shards = 1 if self.shard_group is None else self.shard_group.size()
        plan = spec["plans"][self.rank] or plan_for_device(weights.dit, self.device, precision=precision,
                                                           kv_cache_dtype=spec["kv_cache_dtype"], shards=shards)
        dit = random_dit(weights, precision, spec["attention"], self.device)
        layers = self.layout.part(self.rank)[1]
        if layers is not None:
            drop_other_layers(dit, layers, plan)
        use_compile = resolve_compile(spec["compile"], self.device)
        placement = prepare_dit(dit, plan, self.device, use_compile=use_compile, shard_group=self.shard_group)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the swapped or sharded blocks' whole GPU copies
        description, words = model_words(weights.describe(), precision, plan, use_compile)
        model = assemble(dit, vae, plan, description, weights=words, placement=placement)
        self._keep(model)
        return {"description": model.description, "weights": words, "cfg": dit.cfg,
                "digest": tensor_digest(dit.patch_embedding.weight), "vae": vae.description if vae else None}

    def _load_files(self, spec: dict) -> dict:
        """This rank's part from the checkpoint files of the spec."""
        from ..loading import load_generator, prepare_vae, vae_compute_dtype
        from ..vae.loader import load_vae

        if self.is_dit:
            model = load_generator(spec["dit_path"], spec["vae_path"] if self.has_vae else None, spec["lora_path"],
                                   precision=spec["precision"], attention=spec["attention"], dit_device=self.device,
                                   lora_scale=spec["lora_scale"], kv_cache_dtype=spec["kv_cache_dtype"],
                                   compile=spec["compile"], plan=spec["plans"][self.rank],
                                   layers=self.layout.part(self.rank)[1], shard_group=self.shard_group)
            self._keep(model)
            from ..resume import tensor_digest

            return {"description": model.description, "weights": model.weights, "cfg": model.dit.cfg,
                    "digest": tensor_digest(model.dit.patch_embedding.weight),
                    "vae": model.vae.description if model.vae is not None else None}
        dtype = vae_compute_dtype(spec["precision"], self.device)
        self.vae = prepare_vae(load_vae(spec["vae_path"], device=self.device, dtype=dtype), self.device,
                               spec["compile_vae"])
        return {"description": self.vae.description, "vae": self.vae.description}

    def _keep(self, model) -> None:
        self.dit, self.vae, self.cache_factory = model.dit, model.vae, model.cache_factory()
        self.shards = model.placement if self.shard_group is not None else None

    def run_job(self, job: dict) -> None:
        """One video: this rank's stage of every block until the stream ends."""
        self.sampler = self.decoder = None
        settings = GenerationSettings(**job["settings"])
        motion_frames = job["motion_frames"]
        cond = None
        if self.has_vae:
            more = lambda n: self.control.request("more_clips", n)  # noqa: E731
            reference = job["reference"]
            if job["decoder"] is None:
                ref_lat, motion_lat, self.decoder = start_decoder(self.vae, reference, settings, motion_frames, more)
                cond = (ref_lat, motion_lat)
                if self.layout.dit_ranks > 1 or not self.is_dit:
                    self.control.post("put", "condition", (ref_lat.cpu(), motion_lat.cpu()))
            else:
                self.decoder = restore_decoder(self.vae, reference, settings, motion_frames, more, job["decoder"])
        with torch.no_grad():
            if self.is_dit:
                with self._serving_gathers():
                    self._run_stage(job, settings, cond)
            else:
                self._run_vae_rank(job)
        self.control.post("done", self.rank)

    @contextlib.contextmanager
    def _serving_gathers(self):
        """With sharded weights: serve the group's gathers whenever this rank waits for a peer or
        the controller, and at the end until every DiT rank has finished (placement/fsdp.py)."""
        if self.shards is None:
            yield
            return
        self.peers.idle = self.control.idle = self.shards.serve
        try:
            yield
            self.peers.flush()
            self.shards.finish()
        finally:
            self.peers.idle = self.control.idle = None

    def _condition(self, job: dict, cond):
        """(reference, motion) latents the sampler starts from: the saved ones, the VAE's here, or
        those the VAE rank published."""
        part = job["sampler"]
        if part is not None:
            return part["tensors"]["ref_latents"], part["tensors"]["motion_latents"]
        return cond if cond is not None else self.control.request("get", "condition")

    def _run_stage(self, job: dict, settings: GenerationSettings, cond) -> None:
        if isinstance(self.layout, LayerLayout):
            self._run_layers(job, settings, cond)
            return
        part = job["sampler"]
        cond = self._condition(job, cond)
        r, lay = self.rank, self.layout
        sampler = StageSampler(self.dit, job["text"].to(self.device), *cond, settings.sampler_config(),
                               cache_factory=self.cache_factory, steps=lay.steps[r], control=self.control,
                               peers=self.peers, prev=r - 1 if r > 0 else None, has_vae=self.has_vae)
        if part is not None:
            sampler.load_state_dict(part)
        self.sampler = sampler
        publish_first = sampler.finishes_blocks and lay.dit_ranks > 1 \
            and sampler.config.sink_refresh == "first_clip_output"
        if publish_first and sampler.clip == 0 and sampler.block > 0:  # resumed after block (0, 0)
            self.control.post("put", "first_clip_latent", sampler.clip_latents[:, :, :1].cpu())
        target = _Publishing(self.control, sampler.clip_latents, sampler)
        frames = _FrameSender(self.control)
        for block in sampler.stream(self._clips(sampler.clip)):
            if not sampler.finishes_blocks:
                self.peers.send(r + 1, block.clip, block.block, block.latents)
                continue
            if publish_first and (block.clip, block.block) == (0, 0):
                self.control.post("put", "first_clip_latent", block.latents[:, :, :1].cpu())
            if self.has_vae:
                frames.add(block, self.decoder.launch(target, block))
            else:
                self.peers.send(lay.vae_rank, block.clip, block.block, block.latents)
        frames.flush()
        if r > 0 and not sampler.ended and self.peers.recv(r - 1, sampler.block_shape, sampler.dtype) is not None:
            raise RuntimeError(f"rank {r - 1} sent a block after the stream ended here")
        successor = r + 1 if r + 1 < lay.dit_ranks else (lay.vae_rank if lay.dedicated_vae else None)
        if successor is not None:
            self.peers.send_end(successor)

    def _run_layers(self, job: dict, settings: GenerationSettings, cond) -> None:
        """A layer layout rank: its layers of every cell, in wavefront order (layers.py); the last
        rank decodes each block it finishes."""
        part, cond = job["sampler"], self._condition(job, cond)
        r, lay = self.rank, self.layout
        mine = lay.layers[r]

        def clip_audio(clip: int):
            audio = self.control.request("clip", clip)
            return None if audio is None else audio.to(self.device)

        sampler = LayerSampler(self.dit, self.dit.encode_text(job["text"].to(self.device), layers=mine), *cond,
                               settings.sampler_config(), cache_factory=functools.partial(self.cache_factory,
                                                                                         layers=mine),
                               layers=mine, rank=r, ranks=lay.dit_ranks, control=self.control, peers=self.peers,
                               clip_audio=clip_audio)
        if part is not None:
            sampler.load_state_dict(part)
        self.sampler = sampler
        # Every rank, this one included, takes the online-decode refresh from the controller.
        target = _Publishing(self.control, sampler.clip_latents)
        frames = _FrameSender(self.control)
        for block in sampler.blocks():
            decoded = self.decoder.launch(target, block)
            if sampler.config.sink_refresh == "caller" and (block.clip, block.last_in_clip) == (0, True) \
                    and not target.refreshed:
                self.control.post("put", "refreshed_condition", None)  # no clip follows: no refresh
            frames.add(block, decoded)
        frames.flush()

    def _run_vae_rank(self, job: dict) -> None:
        """The dedicated VAE rank: decode every block the last DiT rank sends."""
        part = job["sampler"]
        shape = job["clip_latents_shape"]
        dtype = self.dtype
        clip_latents = torch.zeros(shape, dtype=dtype, device=self.device) if part is None else \
            part["tensors"]["clip_latents"].to(self.device, dtype)
        target = _Publishing(self.control, clip_latents)
        frames = _FrameSender(self.control)
        nfb, blocks_per_clip = job["frames_per_block"], job["blocks_per_clip"]
        block_shape = (*shape[:2], nfb, *shape[3:])
        while (got := self.peers.recv(self.layout.dit_ranks - 1, block_shape, dtype)) is not None:
            clip, b, x = got
            clip_latents[:, :, b * nfb:(b + 1) * nfb] = x
            block = LatentBlock(clip, b, clip * shape[2] + b * nfb, x, b == blocks_per_clip - 1)
            frames.add(block, self.decoder.launch(target, block))
        frames.flush()

    def _clips(self, start: int):
        """Clip audio from the controller, from clip `start` on, until it has no more."""
        clip = start
        while (audio := self.control.request("clip", clip)) is not None:
            yield audio.to(self.device)
            clip += 1

    def stats(self, reset_peak: bool = False) -> dict:
        """This rank's device, its total memory, its peak and current allocated GPU memory (the peak
        since the last reset; None on a CPU rank) and the DiT weight bytes it holds (its shards where
        they are sharded); `reset_peak` starts a new peak afterwards (a benchmark's warm-up is over)."""
        peak = total = allocated = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            allocated = torch.cuda.memory_allocated(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            if reset_peak:
                torch.cuda.reset_peak_memory_stats(self.device)
        held = 0 if self.dit is None else _held_bytes(self.dit)
        return {"rank": self.rank, "device": self.layout.devices[self.rank], "peak_bytes": peak, "total_bytes": total,
                "allocated_bytes": allocated, "dit_weight_bytes": held}

    def state(self) -> dict:
        """This rank's part of the resume state, in host memory."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the decoder's state is written on its own stream
        out = {}
        if self.sampler is not None:
            s = self.sampler.state_dict()
            out["sampler"] = {"meta": s["meta"], "tensors": {k: v.cpu() for k, v in s["tensors"].items()}}
        if self.decoder is not None:
            d = self.decoder.state()
            out["decoder"] = {"meta": d["meta"], "tensors": {k: v.cpu() for k, v in d["tensors"].items()}}
        return out


def _held_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters in this process: a sharded one's local shard, none of a meta one."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        if not t.is_meta:
            total += t.numel() * t.element_size()
    return total


class _FrameSender:
    """Sends each block's frames to the controller, one block behind: block k's decode and copy to
    host memory run on the GPU while block k+1 is denoised."""

    def __init__(self, control: ControlClient):
        self.control = control
        self.pending = None

    def add(self, block: LatentBlock, decoded) -> None:
        self.flush()
        self.pending = (block, decoded)

    def flush(self) -> None:
        if self.pending is not None:
            block, decoded = self.pending
            self.pending = None
            self.control.post("frames", block.clip, block.block, block.last_in_clip, decoded.result())


def _report(control: ControlClient, exc: BaseException) -> None:
    fields = (exc.input_name, exc.problem, exc.fix) if isinstance(exc, InputError) else None
    try:
        control.post("error", type(exc).__name__, str(exc), fields, traceback.format_exc())
    except OSError:
        pass


def _connect(address: tuple[str, int], authkey: bytes) -> Connection:
    """The control connection; a rank launched by hand may start before its controller listens."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            return Client(address, authkey=authkey)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _exit_when_closed(conn: Connection) -> None:
    """Exit as soon as the controller's end of `conn` closes, even while this rank is blocked in a
    collective (which an attached rank's controller cannot interrupt with a signal)."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))

    def watch():
        while True:
            readable, _, _ = select.select([sock], [], [], 1.0)
            if readable:
                try:
                    if not sock.recv(1, socket.MSG_PEEK):
                        os._exit(0)
                except OSError:
                    os._exit(0)
                time.sleep(0.2)  # data waiting: the main thread reads it

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {os.environ.get('RANK', '?')} %(message)s")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["LIVEAVATAR_CONTROL"].rsplit(":", 1)
    authkey = bytes.fromhex(os.environ.get("LIVEAVATAR_AUTHKEY") or sys.stdin.readline().strip())
    conn = _connect((host, int(port)), authkey)
    control = ControlClient(conn)
    send_message(conn, ("hello", rank, os.getpid()))
    try:
        _kind, layout, store_address = recv_message(conn)
        _exit_when_closed(conn)
        device = torch.device(os.environ.get("LIVEAVATAR_DEVICE") or layout.devices[rank])
        if store_address is None and device.type == "cuda":  # launched by torchrun: its own GPU on its node
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S)
        if store_address is None:  # torchrun's rendezvous
            dist.init_process_group(layout.backend, rank=rank, world_size=world, timeout=timeout)
        else:
            store = dist.TCPStore(store_address[0], store_address[1], is_master=False, timeout=timeout)
            dist.init_process_group(layout.backend, store=store, rank=rank, world_size=world, timeout=timeout)
        worker = Worker(rank, layout, device, control)
        send_message(conn, ("ready", rank))
        while True:
            try:
                msg = recv_message(conn)
            except EOFError:
                os._exit(0)  # the controller is gone; nothing is left to finish
            kind = msg[0]
            if kind == "load":
                send_message(conn, ("loaded", worker.load(msg[1])))
            elif kind == "job":
                worker.run_job(msg[1])
            elif kind == "state":
                send_message(conn, ("state", worker.state()))
            elif kind == "stats":
                send_message(conn, ("stats", worker.stats(*msg[1:])))
            elif kind == "shutdown":
                break
    except (EOFError, ConnectionError):
        os._exit(0)
    except BaseException as exc:
        _report(control, exc)
        logging.getLogger("liveavatar").exception("rank %d failed", rank)
        os._exit(1)
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
