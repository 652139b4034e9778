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

Layouts over several processes save one part per rank; the parts merge into this single-process
format (`merge_stage_states`) and a state splits into any layout's parts (`stage_part`), so a
resume file is valid whatever the layout. A rank of the step layout holds some steps' caches, one
of the layer layout a layer range of every step's cache and of the condition cache (marked by
`meta["layers"]`, absent in a whole state); cache tensors keep their names, with only the part's
layers along their first dimension.

Files load with `torch.load(weights_only=True)`: only tensors, strings, numbers, lists and dicts.
At release size the step caches are large (4 steps x 2 x 40 layers x 12 frames of tokens).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from ..model.cache import CondCache, check_layers
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
    total, layers = sampler.model.cfg.num_layers, sampler.caches[0].layers
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
        meta["cond"] = {"ref": _grid(cond.ref), "motion": [_grid(g) for g in cond.motion], "layers": total}
        for i, k, v in zip(cond.layers, cond.k, cond.v):
            tensors[f"cond.k.layer{i}"], tensors[f"cond.v.layer{i}"] = k, v
    if layers != range(total):
        meta["layers"] = _layer_meta(layers, total)
    tensors["ref_latents"] = sampler.ref_latents
    tensors["motion_latents"] = sampler.motion_latents
    tensors["clip_latents"] = sampler.clip_latents
    return {"meta": meta, "tensors": tensors}


def restore_cond(meta: dict, tensors: dict[str, torch.Tensor], device, dtype: torch.dtype) -> CondCache | None:
    """The condition cache of a saved state, on `device` in `dtype` (None if no sink ran yet)."""
    info = meta["cond"]
    if info is None:
        return None
    layers = part_layers(meta) or range(int(info["layers"]))
    try:
        k = [tensors[f"cond.k.layer{i}"].to(device=device, dtype=dtype) for i in layers]
        v = [tensors[f"cond.v.layer{i}"].to(device=device, dtype=dtype) for i in layers]
    except KeyError as exc:
        raise InputError("resume_state", f"the condition cache tensor {exc.args[0]} is missing.",
                         "save the state again with sampler.save().") from None
    ref = TokenGrid(*(tuple(p) for p in info["ref"]))
    motion = [TokenGrid(*(tuple(p) for p in g)) for g in info["motion"]]
    return CondCache(k, v, ref, motion, layers)


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


def _layer_meta(layers: range, total: int) -> dict[str, int]:
    return {"start": layers.start, "stop": layers.stop, "of": total}


def part_layers(meta: dict) -> range | None:
    """The layer range a rank's part holds, None for a whole state (every layer)."""
    info = meta.get("layers")
    return None if info is None else range(int(info["start"]), int(info["stop"]))


def merge_stage_states(parts: list[SamplerState], finishing: int) -> SamplerState:
    """One sampler state from the parts of ranks that stopped after the same block.

    Each part holds some steps' caches, of all layers or of a layer range (`stage_part`); every
    step cache is put together from the parts holding it, in layer order, and must cover all
    layers once. Condition cache layers come from whichever part holds them, everything else from
    the part of the rank that finishes blocks (`finishing`, whose clip buffer holds denoised
    latents). The result resumes on any layout, one process included."""
    base = parts[finishing]
    where = (base["meta"]["clip"], base["meta"]["block"])
    tensors = {k: v for k, v in base["tensors"].items() if not k.startswith("cache")}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    totals = set()
    for r, part in enumerate(parts):
        if (part["meta"]["clip"], part["meta"]["block"]) != where:
            raise InputError("resume_state", f"part {r} stopped at clip {part['meta']['clip']} block "
                             f"{part['meta']['block']}, part {finishing} at clip {where[0]} block {where[1]}.",
                             "merge the parts of one stop (all ranks drain to the same block boundary).")
        info = part["meta"].get("layers")
        if info is not None:
            totals.add(int(info["of"]))
        for k, v in part["tensors"].items():
            if k.startswith("cache"):
                pieces.setdefault(k, []).append((0 if info is None else int(info["start"]), v))
            elif k.startswith("cond.") and k not in tensors:
                tensors[k] = v
    for k, got in pieces.items():
        got.sort(key=lambda p: p[0])
        stop = 0
        for start, t in got:
            if start != stop:
                raise InputError("resume_state", f"{k}: the parts hold layers from {start}, expected {stop} "
                                 "(a layer range missing or held twice).", "merge the parts of every rank.")
            stop += t.shape[0]
        if totals and totals != {stop}:
            raise InputError("resume_state", f"{k}: the parts cover {stop} layers, the model has "
                             f"{sorted(totals)}.", "merge the parts of every rank.")
        tensors[k] = got[0][1] if len(got) == 1 else torch.cat([t for _, t in got])
    meta = {k: v for k, v in base["meta"].items() if k != "layers"}
    return {"meta": meta, "tensors": tensors}


def stage_part(state: SamplerState, steps: tuple[int, ...], layers: range | None = None) -> SamplerState:
    """The part of a whole sampler state a rank running `steps` needs: those step caches (only
    `layers` of them and of the condition cache when given: a layer layout rank) and the rest."""
    if "layers" in state["meta"]:
        raise InputError("resume_state", "this state is already one rank's part of a layer layout.",
                         "merge the parts with merge_stage_states before splitting them again.")
    mine = {f"cache{i}." for i in steps}
    tensors = {k: v for k, v in state["tensors"].items() if not k.startswith("cache") or k[:k.index(".") + 1] in mine}
    if layers is None:
        return {"meta": state["meta"], "tensors": tensors}
    total = next((v.shape[0] for k, v in state["tensors"].items() if k.startswith("cache")), None)
    if total is None:
        raise InputError("resume_state", "the state holds no step cache.", "pass a whole sampler state.")
    layers = check_layers(layers, total)
    part: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.startswith("cache"):
            # A copy: a saved view would carry the whole ring's storage into the part's file.
            part[k] = v[layers.start:layers.stop].clone()
        elif not k.startswith("cond.") or int(k.rsplit("layer", 1)[1]) in layers:
            part[k] = v
    return {"meta": {**state["meta"], "layers": _layer_meta(layers, total)}, "tensors": part}
