"""What crosses processes: block latents between ranks (torch.distributed point-to-point, in
block order) and control messages between a rank and the controller (a loopback socket).

A message is a header `(clip, block)` followed by the block's latents, or the header END alone
when the sending rank's stream has ended (audio exhausted, a cancel). Messages only flow forward
(rank r to r + 1, the last DiT rank to a dedicated VAE rank), each pair in block order, so blocking
sends and receives cannot deadlock. The layer layout's messages (`post` / `take`: a header of
ints, then tensors) also flow from the last rank back to the head, so its sends do not block
(`isend`; layers.py). With sharded weights (placement/fsdp.py) a rank must keep serving the
group's gathers while it waits: `Peers.idle` is then called until a transfer completes, and
sends do not block either. NCCL moves CUDA tensors directly; gloo (CPU ranks, or ranks
sharing one GPU in tests and benchmarks) moves them through host memory.
"""

from __future__ import annotations

import io
import pickle
import sys
import threading
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

END = -1
# The name this process knows the core by: "liveavatar_core" in a worker or a script, but inside
# ComfyUI the pack is imported under its folder's path, so its classes pickle as
# "<path>.liveavatar_core.plan.RunPlan". Messages name core classes relative to the core.
_CORE = "liveavatar_core"
_HERE = __name__[:-len(".parallel.transport")]


class Peers:
    """This rank's side of the point-to-point links; `device` is where its latents live."""

    def __init__(self, device: torch.device, backend: str):
        self.device = device
        # gloo sends host tensors only; NCCL sends device tensors only.
        self.wire = device if backend == "nccl" else torch.device("cpu")
        self._posted: list[tuple[object, torch.Tensor]] = []  # isend works and the tensors they read
        self.idle = None  # called while a transfer is pending (a sharded model's `serve`), or None: block

    def send(self, dst: int, clip: int, block: int, x: torch.Tensor) -> None:
        """Block `(clip, block)`'s latents to rank `dst`."""
        if self.idle is not None:
            self.post(dst, (clip, block), x)
            return
        dist.send(torch.tensor([clip, block], dtype=torch.int64, device=self.wire), dst)
        dist.send(x.detach().to(self.wire).contiguous(), dst)

    def send_end(self, dst: int) -> None:
        """Tell rank `dst` that no block follows."""
        if self.idle is not None:
            self.post(dst, (END, END))
            return
        dist.send(torch.tensor([END, END], dtype=torch.int64, device=self.wire), dst)

    def recv(self, src: int, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, int, torch.Tensor] | None:
        """The next block from rank `src` as (clip, block, latents on `device`), or None at END."""
        header = torch.empty(2, dtype=torch.int64, device=self.wire)
        self._recv(header, src)
        clip, block = (int(v) for v in header.tolist())
        if clip == END:
            return None
        x = torch.empty(shape, dtype=dtype, device=self.wire)
        self._recv(x, src)
        return clip, block, x.to(self.device)

    def _recv(self, t: torch.Tensor, src: int) -> None:
        self._wait(dist.irecv(t, src))

    def _wait(self, work) -> None:
        if self.idle is None:
            work.wait()
            return
        # Waited for on a thread: a gloo transfer reports completion only from inside its wait().
        failed: list[BaseException] = []

        def wait():
            try:
                work.wait()
            except BaseException as exc:  # re-raised here, on the rank's main thread
                failed.append(exc)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        while waiter.is_alive():
            self.idle()
        if failed:
            raise failed[0]

    def post(self, dst: int, header: tuple[int, ...], *tensors: torch.Tensor) -> None:
        """Send `header` (ints) and `tensors` to rank `dst` without waiting for it to receive them."""
        self._posted = [(w, t) for w, t in self._posted if not w.is_completed()]
        for t in (torch.tensor(header, dtype=torch.int64, device=self.wire),
                  *(x.detach().to(self.wire).contiguous() for x in tensors)):
            self._posted.append((dist.isend(t, dst), t))

    def take(self, src: int, header_len: int, specs=()) -> tuple[tuple[int, ...], list[torch.Tensor]]:
        """The next `post` from rank `src`: its header, then (unless the header starts with END)
        one tensor per `(shape, dtype)` of `specs`, on `device`."""
        header = torch.empty(header_len, dtype=torch.int64, device=self.wire)
        self._recv(header, src)
        values = tuple(int(v) for v in header.tolist())
        if values[0] == END:
            return values, []
        out = []
        for shape, dtype in specs:
            x = torch.empty(shape, dtype=dtype, device=self.wire)
            self._recv(x, src)
            out.append(x.to(self.device))
        return values, out

    def flush(self) -> None:
        """Wait until every posted message has been sent."""
        for work, _ in self._posted:
            self._wait(work)
        self._posted = []


def send_message(conn: Connection, message) -> None:
    """A control message by value: plain pickle, since torch's multiprocessing reducers would
    pass tensors as shared-memory handles that only a forked child could open."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv_message(conn: Connection):
    """The next control message (see `send_message`)."""
    return _Unpickler(io.BytesIO(conn.recv_bytes())).load()


class _Unpickler(pickle.Unpickler):
    """Finds a core class under this process's name for the core, whatever the sender's was."""

    def find_class(self, module: str, name: str):
        head, sep, rest = module.partition(_CORE)
        if sep and (not head or head.endswith(".")) and (not rest or rest.startswith(".")):
            module = _HERE + rest
            __import__(module)
            return getattr(sys.modules[module], name)
        return super().find_class(module, name)
