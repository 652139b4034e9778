"""Who does what in a multi-process run: the step layout (timestep-forcing pipeline parallelism)
or the layer layout.

Each DiT rank owns a contiguous range of whole denoising steps of every block and passes the
latents on (spec/parallel.md 2): with 4 steps, N = 2 gives {0,1} {2,3}, N = 3 gives {0,1} {2} {3}
(the first rank carries the extra step, so the ranks after it never wait for a busy successor),
N = 4 one step each. The VAE (conditioning encode, block decode) runs on the last DiT rank, on its
own CUDA stream, or on a rank of its own (`vae_device`), which with 4 DiT GPUs is the official
five-GPU layout. One process is the N = 1 case of the same layout.

The layer layout (`LayerLayout`) gives each rank a contiguous range of the DiT's layers for every
step; the hidden state passes rank to rank within a step, the last rank (which also runs the VAE,
so it gets fewer layers) finishes each step (spec/parallel.md 2; runtime in layers.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..errors import InputError

LAYOUTS = ("steps", "layers")
# Weights per DiT rank: whole, or the block units sharded over the DiT ranks (placement/fsdp.py).
SHARDS = ("none", "fsdp")


@dataclass(frozen=True)
class StepLayout:
    """Ranks 0..N-1 run the DiT (rank r the steps `steps[r]`); rank `vae_rank` runs the VAE:
    N - 1 (the last DiT rank) or N (a dedicated rank, then `world_size` is N + 1)."""

    devices: tuple[str, ...]  # one per rank, the VAE rank's last when it is dedicated
    steps: tuple[tuple[int, ...], ...]
    vae_rank: int

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def dit_ranks(self) -> int:
        return len(self.steps)

    @property
    def num_steps(self) -> int:
        return sum(len(s) for s in self.steps)

    @property
    def dedicated_vae(self) -> bool:
        return self.vae_rank == self.dit_ranks

    @property
    def backend(self) -> str:
        """The torch.distributed backend (see `backend_for`)."""
        return backend_for(self.devices)

    def part(self, rank: int) -> tuple[tuple[int, ...], range | None]:
        """(steps, layers) of DiT rank `rank`'s share of a sampler state (layers None: all)."""
        return self.steps[rank], None

    def owner(self, step: int) -> int:
        """The rank that runs denoising step `step`."""
        return next(r for r, owned in enumerate(self.steps) if step in owned)

    def describe(self) -> str:
        parts = [f"rank {r} ({self.devices[r]}): step{'s' if len(s) > 1 else ''} {','.join(map(str, s))}"
                 + (" + VAE" if r == self.vae_rank else "") for r, s in enumerate(self.steps)]
        if self.dedicated_vae:
            parts.append(f"rank {self.vae_rank} ({self.devices[self.vae_rank]}): VAE")
        return "; ".join(parts)


@dataclass(frozen=True)
class LayerLayout:
    """Ranks 0..N-1 run the DiT, rank r the layers `layers[r]` of every one of `num_steps` steps;
    the last rank finishes each step and runs the VAE (no dedicated VAE rank)."""

    devices: tuple[str, ...]
    layers: tuple[range, ...]
    num_steps: int

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def dit_ranks(self) -> int:
        return len(self.layers)

    @property
    def vae_rank(self) -> int:
        return self.dit_ranks - 1

    @property
    def dedicated_vae(self) -> bool:
        return False

    @property
    def backend(self) -> str:
        """The torch.distributed backend (see `backend_for`)."""
        return backend_for(self.devices)

    def part(self, rank: int) -> tuple[tuple[int, ...], range | None]:
        """(steps, layers) of DiT rank `rank`'s share of a sampler state: all steps, its layers."""
        return tuple(range(self.num_steps)), self.layers[rank]

    def describe(self) -> str:
        return "; ".join(f"rank {r} ({self.devices[r]}): layers {p.start}-{p.stop - 1}"
                         + (" + VAE" if r == self.vae_rank else "") for r, p in enumerate(self.layers))


def check_shard(shard: str, layout: StepLayout | LayerLayout | str, dit_ranks: int) -> None:
    """Refuse an unknown sharding, or FSDP where it cannot work: one DiT rank (nothing to shard
    over), or the layer layout, whose ranks run different layers at any moment, so no unit is
    needed by all of them at once (and each already holds only its own layers)."""
    if shard not in SHARDS:
        raise InputError("shard", f"unknown value {shard!r}.", f"choose one of {', '.join(SHARDS)}.")
    if shard == "none":
        return
    kind = layout if isinstance(layout, str) else ("layers" if isinstance(layout, LayerLayout) else "steps")
    if kind == "layers":
        raise InputError("shard", "FSDP gathers every unit on all ranks at the same moment, but the layer layout's "
                         "ranks run different layers at any moment; its ranks already hold only their own "
                         "layers' weights, a share of the model like FSDP's.",
                         "use shard 'none' with the layer layout, or the step layout with shard 'fsdp'.")
    if dit_ranks < 2:
        raise InputError("shard", "FSDP shards the weights over several DiT ranks; this run has one.",
                         "use shard 'none', or list two or more devices.")


def backend_for(devices: tuple[str, ...]) -> str:
    """The torch.distributed backend: NCCL between CUDA ranks, gloo when any rank is a CPU or two
    ranks share a GPU (NCCL refuses that; tensors are then staged through host memory)."""
    cuda = [d for d in devices if d.startswith("cuda")]
    if len(cuda) == len(devices) and len(set(cuda)) == len(cuda):
        return "nccl"
    return "gloo"


def split_layers(num_layers: int, ranks: int, decode_layers: int | None = None) -> tuple[range, ...]:
    """Contiguous layer ranges, the last (VAE) rank `decode_layers` lighter (default a tenth of the
    layers: a block decode costs about 4 layers x 4 steps of the 40-layer model, spec 2's table
    22/18, 15/15/10, 11/11/11/7, 9/9/9/9/4); the remainder goes to the first ranks."""
    if not 1 <= ranks <= num_layers:
        raise InputError("devices", f"{ranks} ranks for {num_layers} layers.", f"use 1 to {num_layers} ranks.")
    extra = num_layers // 10 if decode_layers is None else decode_layers
    while True:
        base, rest = divmod(num_layers + extra, ranks)
        sizes = [base + (r < rest) for r in range(ranks)]
        sizes[-1] -= extra
        if sizes[-1] >= 1 or extra == 0:
            break
        extra -= 1
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return tuple(out)


def split_steps(num_steps: int, ranks: int) -> tuple[tuple[int, ...], ...]:
    """Contiguous step ranges, the longer ones first."""
    base, extra = divmod(num_steps, ranks)
    out, start = [], 0
    for r in range(ranks):
        n = base + (r < extra)
        out.append(tuple(range(start, start + n)))
        start += n
    return tuple(out)


def parse_devices(text: str, input_name: str = "devices") -> tuple[str, ...]:
    """`cuda:0,cuda:1`, `0,1` (GPU indices) or `cpu,cpu` -> canonical device names, checked."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise InputError(input_name, "no device given.", "list devices such as cuda:0,cuda:1 (or cpu,cpu).")
    out = []
    for item in items:
        name = f"cuda:{item}" if item.isdigit() else ("cuda:0" if item == "cuda" else item)
        try:
            dev = torch.device(name)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cuda", "cpu") or (dev.type == "cuda" and dev.index is None):
            raise InputError(input_name, f"'{item}' is not a device.",
                             "list devices such as cuda:0,cuda:1 (GPU indices also work: 0,1) or cpu,cpu.")
        out.append(str(dev))
    return tuple(out)


def step_layout(devices: tuple[str, ...] | list[str], num_steps: int = 4, vae_device: str | None = None,
                share_gpus: bool = False, input_name: str = "devices") -> StepLayout:
    """The step layout over `devices` (one DiT rank each), the VAE on `vae_device` or on the last.

    Refused with the reason and the alternative: more DiT ranks than steps, one GPU listed twice
    (CPU ranks may repeat; `share_gpus` lets GPU ranks share too, over gloo through host memory,
    which tests and benchmarks use on one GPU), NCCL ranks on a platform without NCCL.
    """
    devices = tuple(devices)
    n = len(devices)
    if n > num_steps:
        alt = ("two independent 4-GPU pipelines need two streams: run two jobs with 4 GPUs each"
               if n == 2 * num_steps else f"use at most {num_steps} DiT GPUs")
        raise InputError(input_name, f"{n} DiT ranks for {num_steps} denoising steps: the step layout gives each "
                         "rank whole steps, so a rank would have none.",
                         f"{alt}, and --vae_gpu for one more GPU (the official 4 + 1 layout).")
    everything = devices + ((vae_device,) if vae_device is not None else ())
    _check_devices(everything, n, share_gpus, input_name)
    steps = split_steps(num_steps, n)
    vae_rank = n if vae_device is not None else n - 1
    return StepLayout(everything, steps, vae_rank)


def layer_layout(devices: tuple[str, ...] | list[str], num_layers: int, num_steps: int = 4,
                 vae_device: str | None = None, share_gpus: bool = False, decode_layers: int | None = None,
                 input_name: str = "devices") -> LayerLayout:
    """The layer layout over `devices` (2 or more DiT ranks, the VAE on the last).

    Refused with the reason and the alternative: one rank (nothing to split: the step layout or one
    process), more ranks than layers, a dedicated VAE rank (not available for this layout yet), and
    as for `step_layout`, a GPU listed twice or NCCL ranks on a platform without NCCL.
    """
    devices = tuple(devices)
    n = len(devices)
    if n < 2:
        raise InputError(input_name, "the layer layout needs at least 2 DiT ranks.",
                         "list two or more devices, or run in one process (the step layout's N = 1).")
    if n > num_layers:
        raise InputError(input_name, f"{n} DiT ranks for the {num_layers} layers of this DiT: the layer layout "
                         "gives each rank whole layers, so a rank would have none.",
                         f"use at most {num_layers} DiT ranks.")
    if vae_device is not None:
        raise InputError("vae_device", "the layer layout runs the VAE on its last rank; a dedicated VAE rank is "
                         "not available for it.", "leave the VAE device unset, or use the step layout.")
    _check_devices(devices, n, share_gpus, input_name)
    return LayerLayout(devices, split_layers(num_layers, n, decode_layers), num_steps)


def _check_devices(everything: tuple[str, ...], n: int, share_gpus: bool, input_name: str) -> None:
    gpus = [d for d in everything if d.startswith("cuda")]
    repeated = sorted({d for d in gpus if gpus.count(d) > 1})
    if repeated and not share_gpus:
        raise InputError(input_name, f"{', '.join(repeated)} is listed more than once: each rank needs a GPU of "
                         "its own (NCCL refuses two ranks on one GPU).", "list each GPU once.")
    if gpus and n > 1 and not sys.platform.startswith("linux"):
        raise InputError(input_name, f"several GPUs need NCCL, which PyTorch ships for Linux only (this is "
                         f"{sys.platform}).", "run on Linux (on Windows: WSL2), or use one GPU.")
