"""Block swap: keep some DiT blocks on the GPU, stream the others from pinned host memory.

A swap unit is transformer block i together with the audio injector that follows it (when layer i
injects audio): they are used back to back, so they travel together. Each swapped unit is packed
into one pinned host buffer (one DMA per unit). The GPU holds `SWAP_SLOTS` staging buffers; when
unit i starts, the next swapped unit in layer order is copied into a free slot on a side stream,
so the transfer overlaps the compute of i and of the resident blocks in between (the plan spreads
the swapped units evenly for this reason). Compute waits on the copy's event; a copy into a slot
waits on the event recorded after the slot's previous unit was last used.

Outside its use a swapped unit's parameters point at their host copy, so a call that bypassed the
hooks would fail loudly (device mismatch) instead of reading another unit's weights. The order is
cyclic, so the last unit of one call prefetches the first of the next (sink, text keys/values and
block calls all run the layers in order). Weights are read-only: nothing is copied back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import InputError
from ..model.dit import LiveAvatarDiT
from ..plan import SWAP_SLOTS, swapped_layers
from .copier import Copier

_ALIGN = 256  # byte alignment of every tensor inside a packed buffer


@dataclass
class _Unit:
    layer: int
    tensors: list[tuple[nn.Module, str, bool, torch.Size, torch.dtype, int]]  # module, name, is_param, ...
    host: torch.Tensor  # packed bytes
    host_views: list[torch.Tensor] = field(default_factory=list)
    slot: int | None = None
    loaded: torch.cuda.Event | None = None


def _view(buf: torch.Tensor, offset: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    n = shape.numel() * torch.empty((), dtype=dtype).element_size()
    return buf[offset:offset + n].view(dtype).view(shape)


def _set(module: nn.Module, name: str, is_param: bool, value: torch.Tensor) -> None:
    if is_param:
        getattr(module, name).data = value
    else:
        module._buffers[name] = value


class BlockSwap:
    """The swap state of one model; created by `apply_block_swap`."""

    def __init__(self, model: LiveAvatarDiT, layers: tuple[int, ...], device: torch.device):
        self.copier = Copier(device)
        self.order = layers
        self.units: dict[int, _Unit] = {}
        for layer in layers:
            self.units[layer] = self._pack(layer, model.unit_modules(layer))
        size = max((u.host.numel() for u in self.units.values()), default=0)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(min(SWAP_SLOTS, len(layers)))]
        self.slot_unit: list[int | None] = [None] * len(self.slots)
        self.slot_used: list[torch.cuda.Event | None] = [None] * len(self.slots)
        self.loads = 0

    def _pack(self, layer: int, modules: list[nn.Module]) -> _Unit:
        entries, offset = [], 0
        for mod in modules:
            for sub in mod.modules():
                for name, t in list(sub._parameters.items()) + list(sub._buffers.items()):
                    if t is None:
                        continue
                    entries.append((sub, name, name in sub._parameters, t.shape, t.dtype, offset))
                    offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        host = self.copier.host_empty(offset)
        unit = _Unit(layer, entries, host)
        for sub, name, is_param, shape, dtype, off in entries:
            view = _view(host, off, shape, dtype)
            current = sub._parameters[name] if is_param else sub._buffers[name]
            view.copy_(current.detach())
            unit.host_views.append(view)
            _set(sub, name, is_param, view)  # frees the original storage
        return unit

    # --- hooks --------------------------------------------------------------------------------

    def enter(self, layer: int) -> None:
        """Before unit `layer` runs: make sure it is on the device and prefetch the next one."""
        unit = self.units[layer]
        if unit.slot is None:
            self._load(unit, busy=None)
        self.copier.wait(unit.loaded)
        nxt = self._next(layer)
        if nxt is not None and self.units[nxt].slot is None:
            self._load(self.units[nxt], busy=unit.slot)

    def used(self, layer: int) -> None:
        """After a use of unit `layer`: a later copy into its slot must wait for this point."""
        slot = self.units[layer].slot
        if slot is not None:
            self.slot_used[slot] = self.copier.mark_used()

    def _next(self, layer: int) -> int | None:
        if len(self.order) < 2:
            return None
        i = self.order.index(layer)
        return self.order[(i + 1) % len(self.order)]

    def _load(self, unit: _Unit, busy: int | None) -> None:
        free = [s for s in range(len(self.slots)) if s != busy]
        # An empty slot if there is one; never the slot of the unit about to run.
        slot = next((s for s in free if self.slot_unit[s] is None), free[0])
        old = self.slot_unit[slot]
        if old is not None:
            self._evict(self.units[old])
        buf = self.slots[slot]
        unit.loaded = self.copier.copy(buf[:unit.host.numel()], unit.host, after=self.slot_used[slot])
        for (sub, name, is_param, shape, dtype, off) in unit.tensors:
            _set(sub, name, is_param, _view(buf, off, shape, dtype))
        unit.slot = slot
        self.slot_unit[slot] = unit.layer
        self.loads += 1

    def _evict(self, unit: _Unit) -> None:
        for (sub, name, is_param, *_), view in zip(unit.tensors, unit.host_views):
            _set(sub, name, is_param, view)
        self.slot_unit[unit.slot] = None
        unit.slot = None
        unit.loaded = None

    @property
    def bytes_moved(self) -> int:
        return self.copier.bytes_moved


def apply_block_swap(model: LiveAvatarDiT, blocks_on_gpu: int, device: str | torch.device,
                     layers: tuple[int, ...] | None = None) -> BlockSwap:
    """Place `model` on `device` keeping only `blocks_on_gpu` swap units resident.

    The swapped units (default: `plan.swapped_layers`, spread evenly) move to pinned host memory;
    everything else moves to `device` (units left on the meta device stay there: a layer layout
    rank swaps some of its own layers). Apply after LoRA merge and FP8 conversion, as the last
    placement step; do not call `.to()` on the model afterwards. Returns the swap state (counters).
    """
    n = model.cfg.num_layers
    if not isinstance(blocks_on_gpu, int) or not 0 <= blocks_on_gpu <= n:
        raise InputError("blocks_on_gpu", f"{blocks_on_gpu!r} is outside 0..{n}.", f"use 0..{n}.")
    device = torch.device(device)
    layers = tuple(sorted(layers)) if layers is not None else swapped_layers(n, blocks_on_gpu)
    swap = BlockSwap(model, layers, device)
    place_outside_units(model, layers, device)
    for layer in layers:
        block = model.blocks[layer]
        block.register_forward_pre_hook(lambda _m, _a, layer=layer: swap.enter(layer))
        block.register_forward_hook(lambda _m, _a, _o, layer=layer: swap.used(layer))
        block.text_kv = _wrapped(block.text_kv, swap, layer)
    injected = {layer for layer in layers if layer in model.audio_injector.slot}
    if injected:
        def pre(_m, args):
            if args[0] in injected:
                swap.enter(args[0])

        def post(_m, args, _out):
            if args[0] in injected:
                swap.used(args[0])
        model.audio_injector.register_forward_pre_hook(pre)
        model.audio_injector.register_forward_hook(post)
    return swap


def place_outside_units(model: LiveAvatarDiT, layers, device: torch.device) -> None:
    """Move every parameter and buffer of `model` outside the block units of `layers` to `device`
    (the units are placed by block swap or FSDP). Meta tensors stay: the units of other layers on a
    layer layout rank, never run there."""
    unit_ids = {id(m) for layer in layers for top in model.unit_modules(layer) for m in top.modules()}
    for mod in model.modules():
        if id(mod) in unit_ids:
            continue
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None and t.device != device and not t.is_meta:
                _set(mod, name, name in mod._parameters, t.detach().to(device))


def _wrapped(fn, swap: BlockSwap, layer: int):
    # `text_kv` is called outside forward (once per prompt), so hooks would not see it.
    def run(*args, **kwargs):
        swap.enter(layer)
        out = fn(*args, **kwargs)
        swap.used(layer)
        return out
    return run
