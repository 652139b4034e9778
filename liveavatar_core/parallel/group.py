"""The worker group: one process per rank, started, watched and stopped by the pack itself.

Each rank is `python -m liveavatar_core.parallel.worker` (never a fork of ComfyUI, whose
`main.py` a spawned child would import again), with its own GPU in `CUDA_VISIBLE_DEVICES`. The
ranks meet in a `TCPStore` this process hosts and talk to it over a loopback control socket that
only holds a connection presenting the random authkey (sent on the worker's stdin, never in its
environment or command line); once every rank is in, the socket stops listening. A rank that
dies is noticed within a poll period: the others are killed by PID (a rank blocked in NCCL or
gloo cannot be asked to stop) and `WorkerError` names the rank, its device, how it ended and the
tail of its log. The group is closed when its model is released, at interpreter exit, or by
`close()`; every worker also exits on its own when the control socket closes.

`attach=(host, port)` starts no process: ranks launched elsewhere (`torchrun`, other machines)
connect to that address with the authkey, and the group waits for all of them. Such ranks are
watched through their connections only: one that drops is reported, and closing the group closes
the connections, on which every rank exits.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path

import torch.distributed as dist

from ..errors import InputError, WorkerError
from .layout import LayerLayout, StepLayout
from .transport import recv_message, send_message

log = logging.getLogger("liveavatar")

PACK_ROOT = Path(__file__).resolve().parents[2]  # the folder holding liveavatar_core/
START_TIMEOUT_S = 300  # importing torch and joining the group; loading weights is not included
LOG_TAIL_LINES = 30
EXPANDABLE_SEGMENTS = "expandable_segments:True"


class WorkerGroup:
    """The processes of one layout (`StepLayout`, `LayerLayout`); `start()` launches them, `close()` stops them."""

    def __init__(self, layout: StepLayout | LayerLayout, log_dir: str | os.PathLike | None = None,
                 attach: tuple[str, int] | None = None, authkey: bytes | None = None):
        self.layout = layout
        self.attach = attach
        self.authkey = authkey
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="liveavatar-workers-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection | None] = []
        self.error: WorkerError | None = None
        self._listener: Listener | None = None
        self._store = None
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "WorkerGroup":
        """Launch every rank and wait until all have joined the process group."""
        n = self.layout.world_size
        authkey = self.authkey or secrets.token_bytes(32)
        self._listener = Listener(self.attach or ("127.0.0.1", 0), authkey=authkey)
        self._store = None if self.attach else dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        atexit.register(self.close)
        host, port = self._listener.address
        if self.attach:
            log.info("parallel: waiting for %d ranks at %s:%d (launch them with LIVEAVATAR_CONTROL=%s:%d and the "
                     "authkey in LIVEAVATAR_AUTHKEY: torchrun ... -m liveavatar_core.parallel.worker)", n, host, port,
                     host, port)
        for rank in range(n if not self.attach else 0):
            env = self._env(rank, f"{host}:{port}")
            out = open(self.log_path(rank), "wb")
            proc = subprocess.Popen([sys.executable, "-m", "liveavatar_core.parallel.worker"], env=env,
                                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=PACK_ROOT,
                                    start_new_session=True)  # Ctrl-C in a terminal reaches the controller only
            out.close()
            proc.stdin.write(authkey.hex().encode() + b"\n")
            proc.stdin.close()
            self.procs.append(proc)
        self.conns = [None] * n
        accepted: list[Connection] = []
        threading.Thread(target=self._accept, args=(n, accepted), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(accepted) < n:
            self.check()
            if time.monotonic() > deadline:
                self.close()
                raise WorkerError(len(accepted), "?", f"did not connect within {START_TIMEOUT_S} s")
            time.sleep(0.02)
        # Every rank is in: nothing else may connect, so the port closes.
        self._listener.close()
        for conn in accepted:
            _hello, rank, _pid = recv_message(conn)
            self.conns[rank] = conn
        store = None if self._store is None else ("127.0.0.1", self._store.port)
        for conn in self.conns:
            send_message(conn, ("setup", self.layout, store))
        for rank in range(n):
            self.receive(rank, "ready", timeout=START_TIMEOUT_S)
        log.info("parallel: %d worker processes ready (%s); logs in %s", n, self.layout.describe(), self.log_dir)
        return self

    def _accept(self, n: int, accepted: list) -> None:
        while len(accepted) < n:
            try:
                accepted.append(self._listener.accept())
            except AuthenticationError:  # a client without the authkey: refused, keep listening
                continue
            except OSError:  # closed while waiting
                return

    def _env(self, rank: int, control: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(RANK=str(rank), WORLD_SIZE=str(self.layout.world_size), LOCAL_RANK=str(rank),
                   LIVEAVATAR_CONTROL=control)
        env["PYTHONPATH"] = os.pathsep.join([str(PACK_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        env.pop("LIVEAVATAR_AUTHKEY", None)
        device = self.layout.devices[rank]
        if device.startswith("cuda"):
            visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            index = int(device.split(":")[1])
            env["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
            env["LIVEAVATAR_DEVICE"] = "cuda:0"
            # ComfyUI selects cudaMallocAsync, under which NCCL workers run out of memory. Without a
            # setting of the user's, expandable segments: a rank's decode on its own stream left
            # 10 % of a 24 GiB budget reserved but unusable otherwise (out of memory on one H200
            # with 4 capped ranks; the same run passes with them). Numerics do not change.
            conf = [c for c in env.get("PYTORCH_CUDA_ALLOC_CONF", "").split(",") if c and "cudaMallocAsync" not in c]
            env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(conf or [EXPANDABLE_SEGMENTS])
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["LIVEAVATAR_DEVICE"] = "cpu"
        return env

    def log_path(self, rank: int) -> Path:
        return self.log_dir / f"liveavatar_worker_{rank}.log"

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker: ask, then SIGTERM, then SIGKILL; no process is left behind."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for conn in self.conns:
            try:
                if conn is not None:
                    send_message(conn, ("shutdown",))
            except OSError:
                pass
        self._reap(timeout)
        for conn in self.conns:
            if conn is not None:
                conn.close()
        if self._listener is not None:
            self._listener.close()
        self._store = None

    def kill(self) -> None:
        """Stop every worker at once (a rank died or failed; the others may be blocked in a receive)."""
        self._closed = True
        atexit.unregister(self.close)
        self._reap(0.0)
        if self.attach:  # not ours to signal: each rank exits when its connection closes
            for conn in self.conns:
                if conn is not None:
                    conn.close()
        if self._listener is not None:
            self._listener.close()

    def _reap(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for proc in self.procs:
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        for sig, wait_s in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.procs if p.poll() is None]
            for proc in alive:
                try:
                    os.killpg(proc.pid, sig)  # its own session: the worker and anything it started
                except ProcessLookupError:
                    pass
            end = time.monotonic() + wait_s
            for proc in alive:
                try:
                    proc.wait(max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass

    @property
    def alive(self) -> bool:
        return not self._closed and all(p.poll() is None for p in self.procs)

    # --- messages -----------------------------------------------------------------------------

    def send(self, rank: int, message) -> None:
        try:
            send_message(self.conns[rank], message)
        except OSError:
            self.check(wait_s=1.0)
            raise self._death(rank) from None

    def receive(self, rank: int, kind: str, timeout: float | None = None):
        """The next message of `rank`, which must be of `kind` (an error report raises)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = self.conns[rank]
        while not conn.poll(0.05):
            self.check()
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                raise WorkerError(rank, self.layout.devices[rank], f"did not answer within {timeout:.0f} s",
                                  self.log_tail(rank))
        message = self.read(rank)
        if message[0] != kind:
            self.kill()
            raise RuntimeError(f"rank {rank} sent {message[0]!r}, expected {kind!r}")
        return message

    def read(self, rank: int):
        """One message from `rank` (it must be waiting); a failure report or EOF raises."""
        try:
            message = recv_message(self.conns[rank])
        except (EOFError, OSError):
            self.check(wait_s=1.0)
            raise self._death(rank) from None
        if message[0] == "error":
            self.fail(rank, message)
        return message

    def fail(self, rank: int, report) -> None:
        """Stop the group on a rank's error report and raise it (an InputError as itself)."""
        _kind, name, text, fields, trace = report
        self.kill()
        if fields is not None:
            raise InputError(*fields)
        self.error = WorkerError(rank, self.layout.devices[rank], f"failed: {name}: {text}",
                                 _tail(trace, LOG_TAIL_LINES))
        raise self.error

    def check(self, wait_s: float = 0.0) -> None:
        """Raise WorkerError (after stopping the others) if any rank has exited."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [r for r, p in enumerate(self.procs) if p.poll() is not None]
            if dead or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if dead and not self._closed:
            raise self._death(dead[0])
        if self.error is not None:
            raise self.error

    def _death(self, rank: int) -> WorkerError:
        code = self.procs[rank].poll() if self.procs else None
        self.kill()
        if code is None:
            cause = "closed its control connection"
        elif code < 0:
            name = signal.Signals(-code).name
            cause = f"was killed by {name}" + (" (by hand, or by the out-of-memory killer)" if name == "SIGKILL" else "")
        else:
            cause = f"exited with code {code}"
        self.error = WorkerError(rank, self.layout.devices[rank], cause, self.log_tail(rank))
        return self.error

    def log_tail(self, rank: int) -> str:
        if self.attach:
            return "(an attached rank logs where it was launched)"
        try:
            return _tail(self.log_path(rank).read_text(errors="replace"), LOG_TAIL_LINES)
        except OSError:
            return ""


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
