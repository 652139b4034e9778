"""Say what a weight file or folder is, in words, from keys, shapes and settings files alone.

Used by the CLI's `inspect` command. Recognised: the official Wan2.2-S2V-14B folder (every part,
missing ones named), a wav2vec2 folder, a umT5 tokenizer folder, a LiveAvatar LoRA folder, a folder
holding any of these, one shard of a sharded checkpoint (and the model it belongs to), and every
single file the loaders accept. Nothing here reads tensor data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..config import DiTConfig
from ..errors import WeightsError
from .dit import detect_dit, resolve_dit_files
from .io import open_checkpoint, read_json_object
from .layout import (DIT_CONFIG, DIT_INDEX, DIT_SINGLE, LORA_FILE, LORA_REPO, T5_FILE, TOKENIZER_DIR,
                     TOKENIZER_FILE, VAE_FILE, WAV2VEC2_DIR, WAV2VEC2_WEIGHT_FILES)
from .t5 import describe_tokenizer, load_t5_weights
from .vae import describe_vae
from .wav2vec2 import describe_wav2vec2

_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")
# hf_hub_download(cache_dir=...) keeps files as models--<owner>--<name>/snapshots/<revision>/<file>.
_HUB_CACHE_LORA = f"models--{LORA_REPO.replace('/', '--')}/snapshots/*/{LORA_FILE}"


# What a shard without its index is part of: its own keys name the model, not its size.
_SHARD_OWNERS = {"s2v": "a Wan2.2-S2V DiT", "dit_part": "a Wan DiT", "t5": "a umT5 text encoder",
                 "wav2vec2": "a wav2vec2 audio encoder", "vae": "a Wan VAE", "lora": "a LoRA"}


@dataclass(frozen=True)
class Found:
    """What a path holds (`text`, one or more lines) and whether it is usable as it is (`ok`)."""

    text: str
    ok: bool


def inspect_path(path: str | Path) -> Found:
    """Describe a file or folder; `ok` is False for anything unrecognised, incomplete or damaged."""
    path = Path(path)
    if not path.exists():
        return Found(f"{path}: not found", False)
    try:
        if path.is_dir():
            return _folder(path, nested=False)
        return Found(f"{path}: {_file(path)}", True)
    except _Unrecognised as exc:
        return Found(f"{path}: {exc}", False)
    except WeightsError as exc:
        return _damaged(path, exc)


def _damaged(path: Path, exc: WeightsError) -> Found:
    return Found(f"{path}: damaged or unusable: {exc.problem}" + (f" Fix: {exc.fix}" if exc.fix else ""), False)


class _Unrecognised(Exception):
    """A file whose keys match no model the pack knows."""


def _file(path: Path) -> str:
    shard = _SHARD_RE.match(path.name)
    if shard:
        return _shard(path, int(shard["i"]), int(shard["n"]))
    lazy = open_checkpoint(path, "checkpoint")
    found = detect_dit(lazy)
    if found.kind == "vae":
        return describe_vae(lazy.shapes(), lazy.dtype_summary())
    if found.kind == "t5":
        return load_t5_weights(path)[2]
    if found.kind in ("unknown", "empty"):
        raise _Unrecognised(found.description)
    if path.name.endswith(".index.json"):
        shards = len({v for v in read_json_object(path, "checkpoint")["weight_map"].values()})
        return f"{found.description} in {shards} shards"
    return found.description


def _shard(path: Path, i: int, n: int) -> str:
    """A shard is named with the model its index assembles, or, without an index, from its own keys."""
    own = open_checkpoint(path, "checkpoint")
    for index in sorted(path.parent.glob("*.index.json")):
        weight_map = read_json_object(index, "checkpoint").get("weight_map", {})
        if isinstance(weight_map, dict) and path.name in weight_map.values():
            model = detect_dit(open_checkpoint(index, "checkpoint"))
            return f"shard {i} of {n} of {model.name} ({index.name}): {len(own)} tensors, {own.dtype_summary()}"
    found = detect_dit(own)
    what = _SHARD_OWNERS.get(found.kind, "an unrecognised model")
    return (f"shard {i} of {n} of {what}: {len(own)} tensors, {own.dtype_summary()} (no *.index.json beside it "
            "lists this shard, so the model it belongs to cannot be checked)")


def _folder(path: Path, nested: bool) -> Found:
    if _is_official(path):
        return _official(path)
    if any((path / n).exists() for n in WAV2VEC2_WEIGHT_FILES) or _model_type(path) == "wav2vec2":
        return Found(f"{path}: wav2vec2 audio encoder folder: {describe_wav2vec2(path)}", True)
    if (path / TOKENIZER_FILE).exists():
        return Found(f"{path}: {describe_tokenizer(path)}", True)
    loras = [path / LORA_FILE] if (path / LORA_FILE).exists() else sorted(path.glob(_HUB_CACHE_LORA))
    if loras:
        return Found(f"{path}: LiveAvatar LoRA folder: {loras[0].relative_to(path)}: {_file(loras[0])}", True)
    if nested:
        raise _Unrecognised("nothing recognised")
    # A folder of downloads (e.g. ckpt/ with Wan2.2-S2V-14B/ and LiveAvatar/): one level down.
    parts = [found for child in sorted(path.iterdir()) if (found := _child(child)) is not None]
    if not parts:
        raise _Unrecognised("no Live Avatar weights recognised here (looked for the Wan2.2-S2V-14B folder, a "
                            "wav2vec2 or umT5 tokenizer folder, a LoRA folder and weight files, one level deep)")
    return Found("\n".join(p.text for p in parts), all(p.ok for p in parts))


def _child(path: Path) -> Found | None:
    """A recognised (or recognisably damaged) entry of a folder of downloads; None for anything else."""
    if path.is_file() and not path.name.endswith((".safetensors", ".index.json", ".pth", ".pt", ".bin", ".ckpt")):
        return None
    try:
        return _folder(path, nested=True) if path.is_dir() else Found(f"{path}: {_file(path)}", True)
    except _Unrecognised:
        return None
    except WeightsError as exc:
        return _damaged(path, exc)


def _model_type(path: Path) -> str | None:
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        return read_json_object(config, "config.json").get("model_type")
    except WeightsError:
        return None


def _is_official(path: Path) -> bool:
    return any((path / n).exists() for n in (DIT_INDEX, DIT_SINGLE, T5_FILE, VAE_FILE, WAV2VEC2_DIR)) \
        or _model_type(path) == "s2v"


def _official(path: Path) -> Found:
    """Every part of the official folder, each described or named as missing or damaged."""
    lines, ok = [], True

    def part(role: str, describe, *needed: Path) -> None:
        nonlocal ok
        absent = [p for p in needed if not p.exists()]
        if absent:
            lines.append(f"{role}: MISSING ({', '.join(str(p.relative_to(path)) for p in absent)})")
            ok = False
            return
        try:
            lines.append(f"{role}: {describe()}")
        except (WeightsError, _Unrecognised) as exc:
            lines.append(f"{role}: DAMAGED ({exc.problem if isinstance(exc, WeightsError) else exc})")
            ok = False

    def dit() -> str:
        weights, config, _ = resolve_dit_files(path)
        cfg = DiTConfig.from_json(config) if config is not None else None
        shape = f"; config.json: dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads" if cfg else ""
        return _file(weights) + shape

    index = path / DIT_INDEX if (path / DIT_INDEX).exists() or not (path / DIT_SINGLE).exists() else path / DIT_SINGLE
    part("DiT", dit, index, path / DIT_CONFIG)
    part("text encoder", lambda: _file(path / T5_FILE), path / T5_FILE)
    part("tokenizer", lambda: describe_tokenizer(path / TOKENIZER_DIR), path / TOKENIZER_DIR / TOKENIZER_FILE)
    part("VAE", lambda: _file(path / VAE_FILE), path / VAE_FILE)
    part("audio encoder", lambda: describe_wav2vec2(path / WAV2VEC2_DIR), path / WAV2VEC2_DIR)
    return Found(f"{path}: Wan2.2-S2V-14B folder\n  " + "\n  ".join(lines), ok)
