"""Reading tensors from checkpoint files without holding a second copy in RAM.

Everything that opens a weight file goes through `open_checkpoint`, which returns a read-only,
lazy mapping: keys, shapes and dtypes are known up front (enough to detect a format), and a tensor
is only materialised when it is indexed. Safetensors are memory-mapped; `.pth` files are loaded with
`weights_only=True` and `mmap=True`, so a 10 GB T5 file costs page cache, not process memory.

Before that, every header is validated (safetensors: types, offsets, byte lengths; torch zip files:
directory, members, storage sizes, `torch_zip.py`), so a damaged file is named before any tensor is
read. `check_checkpoint` runs those checks alone, for `check.check_run_files`.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsError
from .torch_zip import read_torch_zip

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    # Unsigned wide integers exist from torch 2.3 on; older installs simply do not know them.
    **{name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
       if hasattr(torch, attr)},
}


class LazyStateDict(Mapping):
    """Read-only `name -> tensor` mapping over one or more checkpoint files.

    `shape(name)` and `dtype(name)` answer without reading tensor data. `metadata` holds the
    safetensors header metadata (empty for `.pth`). `source` is the path the user gave, for
    messages.
    """

    def __init__(self, source: Path, entries: dict[str, tuple], loaders: dict, metadata: dict):
        self.source = source
        self._entries = entries  # name -> (loader key, shape, dtype)
        self._loaders = loaders  # loader key -> callable(name) -> tensor
        self.metadata = metadata

    def __getitem__(self, name: str) -> torch.Tensor:
        loader_key = self._entries[name][0]
        return self._loaders[loader_key](name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][2]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """All keys with their shapes, without reading any tensor data."""
        return {k: v[1] for k, v in self._entries.items()}

    def dtype_summary(self) -> str:
        """The dominant floating dtype, e.g. 'bf16' or 'fp8_e4m3fn', for one-line descriptions."""
        counts: dict[torch.dtype, int] = {}
        for _, shape, dtype in self._entries.values():
            if dtype.is_floating_point:
                n = 1
                for s in shape:
                    n *= s
                counts[dtype] = counts.get(dtype, 0) + n
        if not counts:
            return "no float tensors"
        top = max(counts, key=counts.get)
        return _DTYPE_NAMES.get(top, str(top).replace("torch.", ""))


_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8_e4m3fn",
    torch.float8_e5m2: "fp8_e5m2",
}


@dataclass(frozen=True)
class CheckedFile:
    """A weight file whose header, directory and size were checked: `tensors` it holds, `size` in bytes."""

    path: Path
    size: int
    tensors: int


def open_checkpoint(path: str | os.PathLike, input_name: str = "checkpoint") -> LazyStateDict:
    """Open a `.safetensors`, `.pth`/`.pt`/`.bin` file or a sharded `*.safetensors.index.json`.

    Raises `WeightsError` naming `input_name` for a missing, empty, truncated or unreadable file.
    """
    path = _existing_file(path, input_name)
    container = _container(path, input_name)
    if container == "index":
        return _open_sharded(path, input_name)
    if container == "safetensors":
        entries, metadata = _safetensors_header(path, input_name)
        loader = _safetensors_loader(path, input_name)
        return LazyStateDict(path, {k: (0, s, d) for k, (s, d) in entries.items()}, {0: loader}, metadata)
    return _open_torch(path, input_name)


def check_checkpoint(path: str | os.PathLike, input_name: str = "checkpoint") -> CheckedFile:
    """Check a weight file as `open_checkpoint` would open it, reading only headers and zip directories.

    Proves that the file (every shard of an index) exists, that its header parses and that every
    tensor's bytes lie inside it; legacy non-zip torch files are only checked for presence.
    """
    path = _existing_file(path, input_name)
    container = _container(path, input_name)
    if container == "index":
        shards = _index_shards(path, input_name)
        tensors = sum(len(_safetensors_header(s, input_name)[0]) for s in shards)
        return CheckedFile(path, path.stat().st_size + sum(s.stat().st_size for s in shards), tensors)
    if container == "safetensors":
        return CheckedFile(path, path.stat().st_size, len(_safetensors_header(path, input_name)[0]))
    entries = read_torch_zip(path, input_name)
    return CheckedFile(path, path.stat().st_size, len(entries) if entries is not None else 0)


def read_json_object(path: Path, input_name: str) -> dict:
    """A JSON settings file as a dict; `WeightsError` naming it when unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(input_name, f"cannot read {path} ({exc}).", "download the file again.") from None
    if not isinstance(value, dict):
        raise WeightsError(input_name, f"{path} holds a JSON {type(value).__name__}, not an object of settings.",
                           "download the file again.")
    return value


def _existing_file(path: str | os.PathLike, input_name: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise WeightsError(input_name, f"file not found: {path}.", "check the path or download the file.")
    if path.is_dir():
        raise WeightsError(input_name, f"{path} is a folder, a weight file was expected.",
                           "pass the file inside it.")
    if path.stat().st_size == 0:
        raise WeightsError(input_name, f"{path} is empty (0 bytes).", "download the file again.")
    return path


def _container(path: Path, input_name: str) -> str:
    name = path.name.lower()
    if name.endswith(".index.json"):
        return "index"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith((".pth", ".pt", ".bin", ".ckpt")):
        return "torch"
    raise WeightsError(input_name, f"unsupported file type '{path.suffix}' for {path}.",
                       "use a .safetensors, .pth or .bin file, or a *.safetensors.index.json.")


def _safetensors_header(path: Path, input_name: str) -> tuple[dict, dict]:
    """Parse and validate the JSON header directly: cheap, and it reports damage precisely."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("shorter than the 8-byte header length")
            header_len = int.from_bytes(raw_len, "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length points past the end of the file")
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(input_name, f"{path} is not a valid safetensors file ({exc}).",
                           "the download is probably truncated or corrupt; download it again.") from None
    return _validate_header(header, size - 8 - header_len, path, input_name)


def _validate_header(header, data_size: int, path: Path, input_name: str) -> tuple[dict, dict]:
    """`name -> (shape, dtype)` and the metadata of a parsed header, after the checks safetensors makes.

    Tensors must tile the data section from byte 0 to its end without gaps or overlaps, each exactly
    as long as its shape and dtype say; a shorter file than the header describes is truncated.
    """
    def bad(problem: str, fix: str = "the file is corrupt or was not written by safetensors; download it again."):
        return WeightsError(input_name, f"{path}: {problem}.", fix)

    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object of tensors")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise bad("the header's __metadata__ is not an object")
    entries, spans = {}, []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"tensor {key} is described by a JSON {type(info).__name__}, not an object")
        missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
        if missing:
            raise bad(f"tensor {key} has no {', '.join(missing)}")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise bad(f"tensor {key} has unsupported dtype {info['dtype']!r} (known: {', '.join(_SAFETENSORS_DTYPES)})",
                      "convert the file to one of these dtypes.")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise bad(f"tensor {key} has shape {shape!r}, not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
                or offsets[0] > offsets[1]:
            raise bad(f"tensor {key} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
        numel = 1
        for s in shape:
            numel *= s
        if offsets[1] - offsets[0] != numel * dtype.itemsize:
            raise bad(f"tensor {key} of shape {shape} and dtype {info['dtype']} needs {numel * dtype.itemsize} "
                      f"bytes but its data_offsets span {offsets[1] - offsets[0]}")
        entries[key] = (tuple(shape), dtype)
        spans.append((offsets[0], offsets[1], key))
    position, previous = 0, None
    for begin, end, key in sorted(spans):
        if begin < position:
            raise bad(f"tensors {previous} and {key} overlap (bytes {begin}-{position})")
        if begin > position:
            raise bad(f"no tensor covers bytes {position}-{begin} of the data (before {key})")
        position, previous = end, key
    if position > data_size:
        raise WeightsError(input_name, f"{path} is truncated: the header describes {position} bytes of tensor "
                           f"data but the file has {data_size}.", "download the file again.")
    if position < data_size:
        raise bad(f"{data_size - position} bytes after the last tensor belong to no tensor")
    return entries, metadata


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safetensors_loader(path: Path, input_name: str):
    from safetensors import safe_open

    handle = {}

    def load(name: str) -> torch.Tensor:
        if "f" not in handle:
            try:
                handle["f"] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise WeightsError(input_name, f"cannot read {path}: {exc}.", "download the file again.") from None
        return handle["f"].get_tensor(name)

    return load


def _open_torch(path: Path, input_name: str) -> LazyStateDict:
    read_torch_zip(path, input_name)  # a damaged archive is named before torch maps any of it
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (non-zip) torch.save files cannot be memory-mapped.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise WeightsError(input_name, f"cannot read {path}: {str(exc).splitlines()[0]}.",
                           "the file is probably truncated or corrupt; download it again.") from None
    except Exception as exc:  # pickle.UnpicklingError for files that need arbitrary code
        raise WeightsError(input_name, f"{path} is not a plain tensor checkpoint ({type(exc).__name__}).",
                           "use the official state-dict file or a .safetensors file.") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(input_name, f"{path} does not contain a state dict of tensors.",
                           "use the official state-dict file or a .safetensors file.")
    entries = {k: (0, tuple(v.shape), v.dtype) for k, v in obj.items()}
    return LazyStateDict(path, entries, {0: obj.__getitem__}, {})


def _index_shards(index_path: Path, input_name: str) -> list[Path]:
    """The shard files a `*.safetensors.index.json` lists, after checking that every one exists."""
    weight_map = _weight_map(index_path, input_name)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise WeightsError(input_name, f"shard(s) listed in {index_path} are missing: {', '.join(missing)}.",
                           f"download them into {index_path.parent}.")
    return [index_path.parent / s for s in shards]


def _weight_map(index_path: Path, input_name: str) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(input_name, f"{index_path} is not a valid shard index ({type(exc).__name__}: {exc}).",
                           "download the index file again.") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(input_name, f"{index_path}: weight_map is not an object of tensor -> shard file names.",
                           "download the index file again.")
    return weight_map


def _open_sharded(index_path: Path, input_name: str) -> LazyStateDict:
    weight_map = _weight_map(index_path, input_name)
    entries = {}
    loaders = {}
    metadata: dict = {}
    for i, shard_path in enumerate(_index_shards(index_path, input_name)):
        header, meta = _safetensors_header(shard_path, input_name)
        metadata.update(meta)
        loaders[i] = _safetensors_loader(shard_path, input_name)
        for key, (shape, dtype) in header.items():
            entries[key] = (i, shape, dtype)
    absent = [k for k, s in weight_map.items() if k not in entries]
    if absent:
        raise WeightsError(input_name, f"{len(absent)} tensors listed in {index_path.name} are not in their "
                           f"shards (e.g. {absent[0]}).", "download the shards again.")
    return LazyStateDict(index_path, entries, loaders, metadata)
