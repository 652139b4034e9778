"""FSDP: the DiT's block units sharded over the DiT ranks of a step layout (PyTorch FSDP2).

Each block unit (transformer block i with its audio injector slot, `LiveAvatarDiT.unit_modules`)
is one `fully_shard` group: every rank keeps 1/N of it, and it is all-gathered whole only while a
call runs through it, with the next unit's gather in flight meanwhile (prefetch one ahead), so a
rank holds the base, its shards and about two whole units. The base (embeddings, head, audio
encoder; 0.7 GiB) stays whole on every rank: FSDP never gathers a multi-GB root unit. FP8 weights
shard as they are (FSDP2 gathers mixed dtypes as bytes), so the numbers are those of one process.

An all-gather is a collective: every rank of the group must gather the same unit at the same
time, but a pipeline stage is often idle (the first blocks, waiting for its input, the sink
refresh of another rank). So gathers run in cycles over all units in layer order, each opened by
a one-int all-reduce in which every rank says whether it runs a pass now (`RUN`), waits (`IDLE`)
or has finished its job (`DONE`). A rank that waits serves the cycle with gathers that it
discards (`serve`); the stage calls it while it polls for its input (transport.py) and for the
controller's answers, so no rank blocks where another needs it. Every pass through the model
(a block call, the sink, the text keys/values) runs through all units in order, which the step
layout's ranks do; the layer layout, whose ranks run different units at once, is refused.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from ..model.dit import LiveAvatarDiT
from .block_swap import place_outside_units

DONE, IDLE, RUN = 0, 1, 2
_IDLE_SLEEP_S = 0.001  # every rank waits: poll again shortly instead of gathering for nobody


class _Unit(nn.Module):
    """One block unit as a module of its own (it shares the block's and the injector's modules),
    so FSDP shards it as one group; it is never called, the sharding state drives it."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(modules)


class ShardedUnits:
    """The FSDP state of one model; created by `apply_fsdp`."""

    def __init__(self, units: list[_Unit], group, device: torch.device):
        self.units, self.group, self.device = units, group, device
        self.flag = torch.zeros(1, dtype=torch.int32, device=device if dist.get_backend(group) == "nccl" else "cpu")
        self.current: int | None = None  # the unit gathered for the running pass
        self.pending: tuple[int, object] | None = None  # (unit, handle) of the prefetch in flight
        self.gathers = 0

    def enter(self, layer: int) -> None:
        """Before block `layer` runs (or its text keys/values are computed): block 0 opens a cycle."""
        if layer == 0:
            self._release()
            self._open(RUN)
        if self.pending is not None and self.pending[0] == layer:
            self.pending[1].wait()
            self.pending = None
        else:
            self.units[layer].unshard()
            self.gathers += 1
        if self.current is not None:
            self.units[self.current].reshard()
        self.current = layer
        if layer + 1 < len(self.units):
            self.pending = (layer + 1, self.units[layer + 1].unshard(async_op=True))
            self.gathers += 1

    def serve(self) -> None:
        """One cycle while this rank waits: take part in the gathers of the ranks that run a pass
        (or sleep briefly when none does)."""
        self._release()
        if self._open(IDLE) == RUN:
            self._discard()
        else:
            time.sleep(_IDLE_SLEEP_S)

    def finish(self) -> None:
        """After this rank's last pass of a job: serve until every rank of the group has finished."""
        self._release()
        while (state := self._open(DONE)) != DONE:
            if state == RUN:
                self._discard()
            else:
                time.sleep(_IDLE_SLEEP_S)

    def _open(self, state: int) -> int:
        """The all-reduce that opens a cycle: the largest state of any rank."""
        self.flag.fill_(state)
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(self.flag.item())

    def _discard(self) -> None:
        for unit in self.units:
            unit.unshard()
            unit.reshard()
        self.gathers += len(self.units)

    def _release(self) -> None:
        if self.current is not None:
            self.units[self.current].reshard()
            self.current = None


def apply_fsdp(model: LiveAvatarDiT, group, device: str | torch.device) -> ShardedUnits:
    """Shard `model`'s block units over `group` (every rank of which calls this with the same
    weights) and move the base to `device`. Apply after LoRA merge and FP8 conversion, as the
    last placement step; do not call `.to()` on the model afterwards."""
    device = torch.device(device)
    mesh = DeviceMesh.from_group(group, device.type)
    units = []
    for layer in range(model.cfg.num_layers):
        unit = _Unit(model.unit_modules(layer))
        fully_shard(unit, mesh=mesh, reshard_after_forward=False)  # moves the unit to `device`, then shards it
        units.append(unit)
    place_outside_units(model, range(model.cfg.num_layers), device)
    state = ShardedUnits(units, group, device)
    for layer, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda _m, _a, layer=layer: state.enter(layer), prepend=True)
        block.text_kv = _entered(block.text_kv, state, layer)
    return state


def _entered(fn, state: ShardedUnits, layer: int):
    # `text_kv` runs outside forward (once per prompt), so the block's hook does not see it.
    def run(*args, **kwargs):
        state.enter(layer)
        return fn(*args, **kwargs)
    return run
