"""OpenAI's released ``.pt`` files read without running anything inside them.

They are TorchScript archives: a zip holding a pickled module tree (``data.pkl``), one file
per tensor storage (``data/<key>``) and the module classes as source (``code/``). We unpickle
``data.pkl`` with a restricted unpickler that can only build tensors, plain containers and
inert placeholder objects for the module classes, then read which attributes are parameters
and buffers from the ``__parameters__``/``__buffers__`` lines of the class sources.

A zip's sizes can lie: nothing is inflated in one piece, and entries that disagree with their
storage, storages shorter than their tensors, zip bombs and class sources over a fixed size
are refused. :mod:`clipcli.checkpoint` reads the other formats and chooses between them.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CheckpointError, UnsafeCheckpointError

StateDict = dict[str, torch.Tensor]
KeyFilter = Callable[[str], bool]

_CHUNK = 16 << 20  # bytes inflated per read of a zip entry: never a whole entry at once
_SOURCE_LIMIT, _SOURCES_LIMIT = 16 << 20, 64 << 20  # data.pkl or one code/*.py; all code/*.py (a CLIP's: kBs)
_INFLATION, _INFLATION_SLACK = 32, 64 << 20  # tensor data may inflate to 32 times its size in the zip, + 64 MiB

_STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ScriptObject:
    """An inert stand-in for a pickled TorchScript module: it only remembers its attributes."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


@dataclass(frozen=True)
class _StorageRef:
    """A storage of the archive, not read yet: ``data/<key>`` holding ``numel`` ``dtype`` elements."""

    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A view of a :class:`_StorageRef`, rebuilt into a tensor only if it is wanted."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def extent(self) -> int:
        """How many elements of its storage the tensor reaches, its offset included."""
        return self.offset + (0 if 0 in self.size else 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride)))


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise CheckpointError("data.pkl holds a tensor without a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(type(n) is int and n >= 0 for n in (offset, *size, *stride)):
        raise CheckpointError(f"data.pkl holds a tensor of size {size!r:.60}, stride {stride!r:.60} and offset "
                              f"{offset!r:.20}: not whole numbers of at least 0")
    return _TensorRef(storage, offset, size, stride)


def _identity(value, *_ignored):
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors and containers from a TorchScript ``data.pkl``; refuses everything else."""

    def __init__(self, file):
        super().__init__(file)
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (_ScriptObject,), {"qualified_name": qualified})
            return self.classes[qualified]
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _identity
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_floatlist", "build_boollist", "build_doublelist", "restore_type_tag"):
            return _identity
        raise UnsafeCheckpointError(f"refusing to load: the archive's pickle asks for {module}.{name}, which could run code")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):  # (.., type, key, place, numel)
            raise UnsafeCheckpointError(f"refusing to load: unexpected persistent id {pid!r:.80}")
        if not isinstance(pid[1], torch.dtype):
            raise UnsafeCheckpointError(f"refusing to load: unknown storage type {pid[1]!r:.80}")
        if len(pid) < 5 or type(pid[4]) is not int or pid[4] < 0:
            raise CheckpointError(f"storage data/{pid[2]!s:.40} declares no number of elements")
        return _StorageRef(str(pid[2]), pid[1], pid[4])


_CLASS = re.compile(r"^class (\w+)\(Module\):\n  __parameters__ = \[(.*?)\]\n  __buffers__ = \[(.*?)\]", re.M)


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int | None = None) -> bytearray:
    """The first ``size`` bytes of an entry (None: a source, whole, up to its limit). One stored as torch
    writes them (uncompressed, sizes agreeing) is read whole; any other is inflated a chunk at a time, never
    more than asked for whatever the zip claims (an entry longer than it says is cut, and fails its CRC)."""
    if size is None and info.file_size > _SOURCE_LIMIT:
        raise CheckpointError(f"{info.filename} is {info.file_size / 2**20:,.1f} MiB, more than a CLIP archive's "
                              f"(clipcli reads at most {_SOURCE_LIMIT >> 20} MiB of it)")
    size = info.file_size if size is None else size
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size == info.file_size == size:
        return bytearray(archive.read(info))
    data, done = bytearray(size), 0
    with archive.open(info) as file:
        while done < size:
            chunk = file.read(min(_CHUNK, size - done))
            if not chunk:
                raise CheckpointError(f"{info.filename} ends after {done:,} of its {size:,} bytes")
            data[done : done + len(chunk)] = chunk
            done += len(chunk)
    return data


def _module_slots(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """``{qualified class name: names of its parameters and buffers}`` from the archive's sources."""
    sources = [info for info in archive.infolist()
               if info.filename.startswith(prefix + "code/") and info.filename.endswith(".py")]
    total = sum(info.file_size for info in sources)
    if total > _SOURCES_LIMIT:
        raise CheckpointError(f"its code/ sources are {total / 2**20:,.1f} MiB, more than a CLIP archive's "
                              f"(clipcli reads at most {_SOURCES_LIMIT >> 20} MiB of them)")
    slots = {}
    for info in sources:
        module = info.filename[len(prefix + "code/") : -len(".py")].replace("/", ".")
        for name, params, buffers in _CLASS.findall(_read(archive, info).decode("utf-8", "replace")):
            slots[f"{module}.{name}"] = set(re.findall(r'"([^"]+)"', params + buffers))
    return slots


def _flatten(obj: _ScriptObject, slots: dict[str, set[str]], prefix: str, out: dict[str, _TensorRef]) -> None:
    known = slots.get(obj.qualified_name)
    for name, value in obj.state.items():
        if isinstance(value, _TensorRef) and (known is None or name in known):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _flatten(value, slots, f"{prefix}{name}.", out)


def target_dtype(dtype: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    return wanted if wanted is not None and dtype.is_floating_point else dtype


def placeholder(shape, dtype: torch.dtype, wanted: torch.dtype | None) -> torch.Tensor:
    """A ``meta`` tensor standing for a key that is not kept: its shape, no data."""
    return torch.empty(tuple(shape), dtype=target_dtype(dtype, wanted), device="meta")


def _checked_storages(refs: dict[str, _TensorRef], archive: zipfile.ZipFile, prefix: str) -> dict[str, zipfile.ZipInfo]:
    """Each storage's zip entry, having checked that it holds what its pickle declares, that every
    tensor fits in its storage (none is left uninitialised or reads its neighbour's bytes), and
    that the storages do not inflate far beyond the zip."""
    infos: dict[str, zipfile.ZipInfo] = {}
    for name, ref in refs.items():
        key, numel, itemsize = ref.storage.key, ref.storage.numel, ref.storage.dtype.itemsize
        if key not in infos:
            try:
                infos[key] = archive.getinfo(f"{prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"{name} is stored in data/{key:.40}, which the archive lacks") from None
        if infos[key].file_size != numel * itemsize:
            raise CheckpointError(f"data/{key} holds {infos[key].file_size:,} bytes but its storage declares "
                                  f"{numel:,} {str(ref.storage.dtype)[6:]} elements ({numel * itemsize:,} bytes)")
        if ref.extent > numel:
            raise CheckpointError(f"{name} of shape {list(ref.size)} needs {ref.extent:,} elements of its storage "
                                  f"data/{key}, which holds {numel:,}")
    inflated, packed = (sum(getattr(i, size) for i in infos.values()) for size in ("file_size", "compress_size"))
    if inflated > _INFLATION * packed + _INFLATION_SLACK:
        raise CheckpointError(f"its tensors would inflate from {packed:,} to {inflated:,} bytes: a zip bomb, refused")
    return infos


class _Inert:
    """Stands for any other object a ``torch.save`` pickle builds (a ``torch.Size``, an optimizer's
    settings): it keeps what it was built from, to look for tensors in, and runs nothing."""

    def __init__(self, *args, **kwargs):
        self.parts = [args, kwargs]

    def __setstate__(self, state) -> None:  # also on one made by __new__ alone (NEWOBJ)
        self.__dict__.setdefault("parts", []).append(state)


class _Census(_RestrictedUnpickler):
    """The restricted unpickler for taking stock of a ``torch.save`` pickle's tensors: any global
    it does not know becomes :class:`_Inert` (never the real thing), so every tensor is found."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except UnsafeCheckpointError:
            return _Inert


def check_torch_save(archive: zipfile.ZipFile) -> None:
    """The checks of :func:`_checked_storages` on a ``torch.save`` zip, which torch maps without
    them (a storage entry shorter than its tensor reads the bytes after it). Whether the rest of
    the pickle may be loaded is ``torch.load(weights_only=True)``'s to decide."""
    prefix = _archive_prefix(archive)
    try:
        root = _Census(io.BytesIO(_read(archive, archive.getinfo(prefix + "data.pkl")))).load()
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError):
        return  # damaged: torch.load says so
    refs: dict[str, _TensorRef] = {}
    todo: list[tuple[str, Any]] = [("", root)]
    while todo:  # every tensor in the containers, named by its path
        path, value = todo.pop()
        if isinstance(value, _TensorRef):
            refs[path or "the tensor"] = value
        elif isinstance(value, dict):
            todo += [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            todo += [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, _Inert):
            todo += [(path, part) for part in getattr(value, "parts", ())]
    _checked_storages(refs, archive, prefix)


def _materialize(refs: dict[str, _TensorRef], archive: zipfile.ZipFile, prefix: str,
                 dtype: torch.dtype | None, keep: KeyFilter | None) -> StateDict:
    """Read the kept tensors' storages, each only as far as they reach and converted to ``dtype`` as
    it is read; first check them all: each storage's entry holds what it declares, every tensor fits
    in its storage (none is left uninitialised), and they do not inflate far beyond the zip."""
    infos = _checked_storages(refs, archive, prefix)
    reach: dict[str, int] = {}
    for name, ref in refs.items():
        if keep is None or keep(name):
            reach[ref.storage.key] = max(reach.get(ref.storage.key, 0), ref.extent)
    storages: dict[str, torch.Tensor] = {}
    out: StateDict = OrderedDict()
    for name, ref in refs.items():
        key, stored = ref.storage.key, ref.storage.dtype
        if keep is not None and not keep(name):
            out[name] = placeholder(ref.size, stored, dtype)
            continue
        if key not in storages:
            data = _read(archive, infos[key], reach[key] * stored.itemsize)
            storage = torch.frombuffer(data, dtype=stored) if data else torch.empty(0, dtype=stored)
            storages[key] = storage.to(target_dtype(stored, dtype))
        out[name] = storages[key].as_strided(ref.size, ref.stride, ref.offset)
    return out


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    for member in archive.namelist():
        if member.endswith("data.pkl") and member.count("/") == 1:
            return member[: -len("data.pkl")]
    raise CheckpointError("no data.pkl at the top of the archive")


def is_torchscript(archive: zipfile.ZipFile) -> bool:
    prefix = _archive_prefix(archive)
    return any(m.startswith(prefix + "code/") or m == prefix + "constants.pkl" for m in archive.namelist())


def read_torchscript(path: str | Path, dtype: torch.dtype | None = None, keep: KeyFilter | None = None) -> StateDict:
    """The state dict of a TorchScript archive, equal to ``torch.jit.load(path).state_dict()``,
    read without executing anything in the file."""
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive)
        root = _RestrictedUnpickler(io.BytesIO(_read(archive, archive.getinfo(prefix + "data.pkl")))).load()
        if not isinstance(root, _ScriptObject):
            raise CheckpointError("data.pkl does not hold a TorchScript module")
        refs: dict[str, _TensorRef] = OrderedDict()
        _flatten(root, _module_slots(archive, prefix), "", refs)
        return _materialize(refs, archive, prefix, dtype, keep)
