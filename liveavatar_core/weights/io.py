"""Reading tensors from checkpoint files without holding a second copy in RAM.

Everything that opens a weight file goes through `open_checkpoint`, which returns a read-only,
lazy mapping: keys, shapes and dtypes are known up front (enough to detect a format), and a tensor
is only materialised when it is indexed. Safetensors are memory-mapped; `.pth` files are loaded with
`weights_only=True` and `mmap=True`, so a 10 GB T5 file costs page cache, not process memory.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import WeightsError

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


def open_checkpoint(path: str | os.PathLike, input_name: str = "checkpoint") -> LazyStateDict:
    """Open a `.safetensors`, `.pth`/`.pt`/`.bin` file or a sharded `*.safetensors.index.json`.

    Raises `WeightsError` naming `input_name` for a missing, empty, truncated or unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(input_name, f"file not found: {path}.", "check the path or download the file.")
    if path.is_dir():
        raise WeightsError(input_name, f"{path} is a folder, a weight file was expected.",
                           "pass the file inside it.")
    if path.stat().st_size == 0:
        raise WeightsError(input_name, f"{path} is empty (0 bytes).", "download the file again.")
    name = path.name.lower()
    if name.endswith(".index.json"):
        return _open_sharded(path, input_name)
    if name.endswith(".safetensors"):
        entries, metadata = _safetensors_header(path, input_name)
        loader = _safetensors_loader(path, input_name)
        return LazyStateDict(path, {k: (0, s, d) for k, (s, d) in entries.items()}, {0: loader}, metadata)
    if name.endswith((".pth", ".pt", ".bin", ".ckpt")):
        return _open_torch(path, input_name)
    raise WeightsError(input_name, f"unsupported file type '{path.suffix}' for {path}.",
                       "use a .safetensors, .pth or .bin file, or a *.safetensors.index.json.")


def _safetensors_header(path: Path, input_name: str) -> tuple[dict, dict]:
    """Parse the JSON header directly: cheap, and it lets us report truncation precisely."""
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
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    data_end = 0
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WeightsError(input_name, f"{path}: tensor {key} has unsupported dtype {info.get('dtype')}.")
        entries[key] = (tuple(info["shape"]), dtype)
        data_end = max(data_end, info["data_offsets"][1])
    if 8 + header_len + data_end > size:
        raise WeightsError(
            input_name,
            f"{path} is truncated: the header describes {8 + header_len + data_end} bytes but the file "
            f"has {size}.",
            "download the file again.")
    return entries, metadata


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


def _open_sharded(index_path: Path, input_name: str) -> LazyStateDict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise WeightsError(input_name, f"{index_path} is not a valid shard index ({exc}).",
                           "download the index file again.") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_path.parent / s).exists()]
    if missing:
        raise WeightsError(input_name, f"shard(s) listed in {index_path.name} are missing: {', '.join(missing)}.",
                           f"download them into {index_path.parent}.")
    entries = {}
    loaders = {}
    metadata: dict = {}
    for i, shard in enumerate(shards):
        shard_path = index_path.parent / shard
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
