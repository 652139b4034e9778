"""Header-level reading of `torch.save` zip files (`.pth`, `.pt`, `.bin`) without touching tensor data.

A zip-format torch checkpoint is a stored (uncompressed) zip archive: `<name>/data.pkl` (the pickled
container, a few kB), one member `<name>/data/<key>` per storage, and a central directory at the end
of the file. Reading the directory, the local headers and the pickle, with an unpickler that builds
records instead of tensors, is enough to know every tensor's name, shape and dtype and to prove that
every byte a tensor refers to is in the file. A truncated download loses the central directory, so it
is caught before `torch.load` maps anything.

The unpickler never calls torch: every global it resolves is one of the stubs below, so a file that
names arbitrary code cannot run it here (the loader refuses such files separately, `weights_only`).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsError

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
# Legacy `<type>Storage` classes of `_rebuild_tensor_v2` files; newer dtypes come as UntypedStorage
# plus an explicit dtype (`_rebuild_tensor_v3`).
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexDoubleStorage": torch.complex128, "ComplexFloatStorage": torch.complex64,
}
_UNTYPED = "UntypedStorage"
_FIX = "the file is probably truncated or corrupt; download it again."


@dataclass(frozen=True)
class _StorageType:
    itemsize: int | None  # None: a storage class we do not know; its size is not checked
    dtype: torch.dtype | None  # None for UntypedStorage: the tensor record names the dtype


@dataclass(frozen=True)
class _Storage:
    key: str
    nbytes: int
    dtype: torch.dtype | None


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype | None


class _Opaque:
    """Anything the pickle names that is not a tensor; accepted here, judged by the real loader."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _rebuild_v2(storage, offset, size, stride, *rest):  # also the pre-1.x `_rebuild_tensor`
    return _Tensor(storage, offset, tuple(size), tuple(stride), storage.dtype)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *rest):
    return _Tensor(storage, offset, tuple(size), tuple(stride), dtype if isinstance(dtype, torch.dtype) else None)


def _rebuild_parameter(data, *rest):
    return data


_STUBS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RecordingUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, members: dict[str, int], prefix: str, path: Path, input_name: str):
        super().__init__(io.BytesIO(data))
        self._members = members
        self._prefix = prefix
        self._path = path
        self._input_name = input_name

    def find_class(self, module: str, name: str):
        if (module, name) in _STUBS:
            return _STUBS[(module, name)]
        if module in ("torch", "torch.storage") and name == _UNTYPED:
            return _StorageType(1, None)
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name].itemsize, _STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Opaque

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise WeightsError(self._input_name, f"{self._path} refers to a storage record torch does not write "
                               f"({pid!r:.80}).", _FIX)
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        member = f"{self._prefix}data/{key}"
        if member not in self._members:
            raise WeightsError(self._input_name, f"{self._path} lacks the data of storage {key} "
                               f"(zip member {member}).", _FIX)
        if not isinstance(numel, int) or numel < 0:
            raise WeightsError(self._input_name, f"{self._path}: storage {key} has an invalid size {numel!r}.", _FIX)
        known = isinstance(storage_type, _StorageType) and storage_type.itemsize is not None
        nbytes = numel * storage_type.itemsize if known else self._members[member]
        if self._members[member] != nbytes:
            raise WeightsError(self._input_name, f"{self._path}: storage {key} should hold {nbytes} bytes but its "
                               f"zip member has {self._members[member]}.", _FIX)
        return _Storage(key, nbytes, storage_type.dtype if known else None)


def _members(zf: zipfile.ZipFile, raw, path: Path, input_name: str) -> dict[str, int]:
    """Every member's size, after checking that its bytes lie between its local header and the directory."""
    end = zf.start_dir
    sizes = {}
    for info in zf.infolist():
        raw.seek(info.header_offset)
        header = raw.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
            raise WeightsError(input_name, f"{path}: the zip entry {info.filename} has no local header.", _FIX)
        name_len, extra_len = _LOCAL_HEADER.unpack(header)[1:]
        data_end = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + info.compress_size
        if data_end > end:
            raise WeightsError(input_name, f"{path}: the zip entry {info.filename} runs past the end of the data "
                               f"({data_end} > {end} bytes).", _FIX)
        if info.compress_type != zipfile.ZIP_STORED:
            raise WeightsError(input_name, f"{path}: the zip entry {info.filename} is compressed; torch files are "
                               "stored uncompressed.", "use the checkpoint as torch.save wrote it.")
        sizes[info.filename] = info.file_size
    return sizes


def read_torch_zip(path: str | Path,
                   input_name: str = "checkpoint") -> dict[str, tuple[tuple[int, ...], torch.dtype | None]] | None:
    """`name -> (shape, dtype)` of a zip-format torch checkpoint, proving every tensor's bytes are present.

    Returns None for legacy (pre-1.6, non-zip) torch files, which cannot be checked without loading
    them. Raises `WeightsError` naming the file for a truncated or damaged archive, a missing storage,
    a storage of the wrong size or a tensor that reaches past its storage.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        magic = raw.read(4)
        if magic[:1] == bytes([_PICKLE_PROTO]):
            return None
        if magic != _LOCAL_SIGNATURE:
            raise WeightsError(input_name, f"{path} is not a torch checkpoint (it does not start like a zip or "
                               "pickle file).", _FIX)
        try:
            zf = zipfile.ZipFile(raw)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise WeightsError(input_name, f"{path} is truncated: its zip directory, which torch writes at the "
                               f"end, is missing or damaged ({exc}).", "download the file again.") from None
        with zf:
            members = _members(zf, raw, path, input_name)
            pickles = [n for n in members if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise WeightsError(input_name, f"{path} holds {len(pickles)} data.pkl records, torch writes one.",
                                   _FIX)
            prefix = pickles[0][: -len("data.pkl")]
            try:
                obj = _RecordingUnpickler(zf.read(pickles[0]), members, prefix, path, input_name).load()
            except WeightsError:
                raise
            except Exception as exc:  # a damaged pickle raises anything from EOFError to TypeError
                raise WeightsError(input_name, f"{path}: the tensor index (data.pkl) cannot be read "
                                   f"({type(exc).__name__}: {exc}).", _FIX) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, _Tensor)} if isinstance(obj, dict) else {}
    for name, t in tensors.items():
        _check_extent(name, t, path, input_name)
    return {str(k): (t.shape, t.dtype) for k, t in tensors.items()}


def _check_extent(name, t: _Tensor, path: Path, input_name: str) -> None:
    if t.dtype is None:
        return
    if any(not isinstance(s, int) or s < 0 for s in (*t.shape, *t.stride, t.offset)):
        raise WeightsError(input_name, f"{path}: tensor {name} has an invalid shape, stride or offset.", _FIX)
    extent = 0 if 0 in t.shape else 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride))
    end = (t.offset + extent) * t.dtype.itemsize
    if end > t.storage.nbytes:
        raise WeightsError(input_name, f"{path}: tensor {name} needs bytes up to {end} of storage {t.storage.key}, "
                           f"which has {t.storage.nbytes}.", _FIX)
