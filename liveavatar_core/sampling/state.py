"""Resume state of a `BlockSampler`: tensors plus JSON-able metadata, saved with `torch.save`.

What is kept (enough to continue bit-identically, spec/pipeline.md 3.4-3.9):
* every step cache's k/v ring (with an FP8 ring its scales) and the shared condition cache
  (un-rotated k/v and its RoPE layout);
* the clip/block counters and the clip boundary of the last sink refresh;
* the reference-offset source as (its config, number of draws so far): a fresh source replays the
  draws, so no private RNG state is serialised;
* the current reference/motion latents and the clip's output buffer (needed by sink refreshes).
The noise is not stored: clip r's noise is regenerated from `seed + r` on a CPU generator.
The text cache is not stored either: it is rebuilt from the prompt given to the new sampler.

Files load with `torch.load(weights_only=True)`: only tensors, strings, numbers, lists and dicts.
At release size the step caches are large (4 steps x 2 x 40 layers x 12 frames of tokens).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from ..model.cache import CondCache
from ..model.rope import TokenGrid

if TYPE_CHECKING:
    from .generator import BlockSampler

FORMAT = "liveavatar.block_sampler.v1"
SamplerState = dict[str, Any]  # {"meta": JSON-able dict, "tensors": {name: tensor}}


def _grid(g: TokenGrid) -> list[list[int]]:
    return [list(g.t), list(g.h), list(g.w)]


def snapshot(sampler: "BlockSampler") -> SamplerState:
    """The sampler's state; tensors are the live ones (save or clone before continuing)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, cache in zip(sampler.steps, sampler.caches):
        tensors.update({f"cache{i}.{name}": t for name, t in cache.tensors().items()})
    cond = sampler.caches[0].cond
    meta: dict[str, Any] = {
        "format": FORMAT,
        "config": sampler.config.to_dict(),
        "lat_hw": list(sampler.lat_hw),
        "clip": sampler.clip,
        "block": sampler.block,
        "refreshed_at": sampler.refreshed_at,
        "offset_calls": sampler.policy.calls,
        "cond": None,
    }
    if cond is not None:
        meta["cond"] = {"ref": _grid(cond.ref), "motion": [_grid(g) for g in cond.motion], "layers": len(cond.k)}
        for i, (k, v) in enumerate(zip(cond.k, cond.v)):
            tensors[f"cond.k.layer{i}"], tensors[f"cond.v.layer{i}"] = k, v
    tensors["ref_latents"] = sampler.ref_latents
    tensors["motion_latents"] = sampler.motion_latents
    tensors["clip_latents"] = sampler.clip_latents
    return {"meta": meta, "tensors": tensors}


def restore_cond(meta: dict, tensors: dict[str, torch.Tensor], device, dtype: torch.dtype) -> CondCache | None:
    """The condition cache of a saved state, on `device` in `dtype` (None if no sink ran yet)."""
    info = meta["cond"]
    if info is None:
        return None
    n = int(info["layers"])
    try:
        k = [tensors[f"cond.k.layer{i}"].to(device=device, dtype=dtype) for i in range(n)]
        v = [tensors[f"cond.v.layer{i}"].to(device=device, dtype=dtype) for i in range(n)]
    except KeyError as exc:
        raise InputError("resume_state", f"the condition cache tensor {exc.args[0]} is missing.",
                         "save the state again with sampler.save().") from None
    ref = TokenGrid(*(tuple(p) for p in info["ref"]))
    motion = [TokenGrid(*(tuple(p) for p in g)) for g in info["motion"]]
    return CondCache(k, v, ref, motion)


def save_state(state: SamplerState, path: str | os.PathLike) -> None:
    """Write a state to `path` (tensors moved to the CPU one at a time)."""
    tensors = {k: v.detach().cpu() for k, v in state["tensors"].items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"meta": state["meta"], "tensors": tensors}, tmp)
    # Rename last, so an interrupted save never leaves a truncated state under the real name.
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> SamplerState:
    """Read a state written by `save_state` (weights_only: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("resume_state", f"{path} does not exist.", "pass the file written by sampler.save().")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        raise InputError("resume_state", f"{path} is not a readable sampler state ({type(exc).__name__}: "
                         f"{exc}).", "pass the file written by sampler.save(); it may be truncated.") from None
    if not isinstance(state, dict) or not isinstance(state.get("meta"), dict) \
            or state["meta"].get("format") != FORMAT or not isinstance(state.get("tensors"), dict):
        raise InputError("resume_state", f"{path} is not a block sampler state ({FORMAT}).",
                         "pass the file written by sampler.save().")
    return state


def merge_stage_states(parts: list[SamplerState], finishing: int) -> SamplerState:
    """One sampler state from the states of pipeline stages that stopped after the same block:
    every stage's step caches, the rest from the stage that runs the last step (`finishing`,
    the one whose clip buffer holds denoised latents). The result resumes on any stage split,
    one process included."""
    base = parts[finishing]
    tensors = dict(base["tensors"])
    for part in parts:
        tensors.update({k: v for k, v in part["tensors"].items() if k.startswith("cache")})
    return {"meta": base["meta"], "tensors": tensors}


def stage_part(state: SamplerState, steps: tuple[int, ...]) -> SamplerState:
    """The part of a sampler state a stage running `steps` needs (its step caches and the rest)."""
    mine = {f"cache{i}." for i in steps}
    tensors = {k: v for k, v in state["tensors"].items() if not k.startswith("cache") or k[:k.index(".") + 1] in mine}
    return {"meta": state["meta"], "tensors": tensors}
