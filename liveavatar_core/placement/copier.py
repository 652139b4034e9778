"""Host <-> device copies on a side stream, ordered with events (a no-op wrapper on the CPU).

Block swap and KV streaming both need the same three things: a side stream for transfers so they
overlap with compute, an event per transfer that compute waits on, and an event per use that the
next transfer into the same buffer waits on. On the CPU (tests, demo) copies are synchronous and
every event is `None`, so the same code paths run and give the same results.
"""

from __future__ import annotations

import torch


class Copier:
    """Side-stream transfers for one device."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.bytes_moved = 0

    def host_empty(self, nbytes: int) -> torch.Tensor:
        """A host byte buffer, pinned when transfers go to a GPU (asynchronous copies need it)."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def host_like(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, pin_memory=self.cuda)

    def mark_used(self) -> torch.cuda.Event | None:
        """An event on the compute stream: everything enqueued so far has finished with a buffer."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None = None,
             after_compute: bool = False) -> torch.cuda.Event | None:
        """`dst.copy_(src)` on the side stream once `after` (and, if asked, current compute) is done.

        Returns the event compute must wait on before reading `dst`.
        """
        self.bytes_moved += src.numel() * src.element_size()
        if not self.cuda:
            dst.copy_(src)
            return None
        if after_compute:
            after_compute_ev = self.mark_used()
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            if after_compute:
                self.stream.wait_event(after_compute_ev)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait(self, event: torch.cuda.Event | None) -> None:
        """Make the compute stream wait for a transfer."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @staticmethod
    def host_wait(event: torch.cuda.Event | None) -> None:
        """Block the host until a transfer has landed (before reading host memory)."""
        if event is not None:
            event.synchronize()
