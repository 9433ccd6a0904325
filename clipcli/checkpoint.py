"""Reading CLIP checkpoints without running anything inside them.

Three formats are read, all into a flat ``{name: tensor}`` dict with OpenAI's key names:

- OpenAI's released ``.pt`` files are TorchScript archives: a zip holding a pickled module
  tree (``data.pkl``), one file per tensor storage (``data/<key>``) and the module classes as
  source (``code/``). We unpickle ``data.pkl`` with a restricted unpickler that can only build
  tensors, plain containers and inert placeholder objects for the module classes, then read
  which attributes are parameters and buffers from the ``__parameters__``/``__buffers__``
  lines of the class sources. Nothing in the file is executed.
- PyTorch state-dict files, through ``torch.load(weights_only=True)``.
- safetensors files.

A file whose sha256 is one of the released models' may, as a last resort, be read with
``torch.jit.load``; no other file is ever executed.

Readers take a ``dtype`` and a ``keep`` predicate on key names. Each floating-point tensor is
converted as it is read (a float16 file never sits in memory beside its float32 copy), and a
key that is not kept comes back as a ``meta`` tensor of the right shape, without its bytes
ever being read: loading only the image tower of ViT-B/32 in float32 takes 350 MB, not 900.
Shapes come first: only the tensors a CLIP of the file's shapes has are read; junk keys stay
``meta`` for the strict load to name. A zip's sizes can lie: nothing is inflated in one piece,
and entries that disagree with their storage, storages shorter than their tensors, zip bombs
and class sources over a fixed size are refused.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import safetensors_metadata  # noqa: F401 (re-exported)
from .convert import needed_keys
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


def _target(dtype: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    return wanted if wanted is not None and dtype.is_floating_point else dtype


def _placeholder(shape, dtype: torch.dtype, wanted: torch.dtype | None) -> torch.Tensor:
    """A ``meta`` tensor standing for a key that is not kept: its shape, no data."""
    return torch.empty(tuple(shape), dtype=_target(dtype, wanted), device="meta")


def _materialize(refs: dict[str, _TensorRef], archive: zipfile.ZipFile, prefix: str,
                 dtype: torch.dtype | None, keep: KeyFilter | None) -> StateDict:
    """Read the kept tensors' storages, each only as far as they reach and converted to ``dtype`` as
    it is read; first check them all: each storage's entry holds what it declares, every tensor fits
    in its storage (none is left uninitialised), and they do not inflate far beyond the zip."""
    infos: dict[str, zipfile.ZipInfo] = {}
    reach: dict[str, int] = {}
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
        if keep is None or keep(name):
            reach[key] = max(reach.get(key, 0), ref.extent)
    inflated, packed = (sum(getattr(i, size) for i in infos.values()) for size in ("file_size", "compress_size"))
    if inflated > _INFLATION * packed + _INFLATION_SLACK:
        raise CheckpointError(f"its tensors would inflate from {packed:,} to {inflated:,} bytes: a zip bomb, refused")
    storages: dict[str, torch.Tensor] = {}
    out: StateDict = OrderedDict()
    for name, ref in refs.items():
        key, stored = ref.storage.key, ref.storage.dtype
        if keep is not None and not keep(name):
            out[name] = _placeholder(ref.size, stored, dtype)
            continue
        if key not in storages:
            data = _read(archive, infos[key], reach[key] * stored.itemsize)
            storage = torch.frombuffer(data, dtype=stored) if data else torch.empty(0, dtype=stored)
            storages[key] = storage.to(_target(stored, dtype))
        out[name] = storages[key].as_strided(ref.size, ref.stride, ref.offset)
    return out


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    for member in archive.namelist():
        if member.endswith("data.pkl") and member.count("/") == 1:
            return member[: -len("data.pkl")]
    raise CheckpointError("no data.pkl at the top of the archive")


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
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


def _unwrap(obj: Any) -> Any:
    """Accept ``{"state_dict": ...}`` wrappers and DistributedDataParallel's ``module.`` prefixes."""
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def read_torch(path: str | Path) -> StateDict:
    """A plain ``torch.save`` state dict, loaded with ``weights_only=True`` (never full pickle)."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # files in the legacy (pre-zip) format cannot be mapped
            if "mmap" not in str(error):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0] if str(error) else "unsupported pickle content"
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is a pickle that needs arbitrary code to load ({reason}); "
            "convert it to safetensors where you trust it"
        ) from None
    obj = _unwrap(obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None, keep: KeyFilter | None = None) -> StateDict:
    from safetensors import SafetensorError, safe_open

    out: StateDict = OrderedDict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            for key in file.keys():
                if keep is None or keep(key):
                    tensor = file.get_tensor(key)
                    out[key] = tensor.to(_target(tensor.dtype, dtype))
                else:
                    out[key] = _placeholder(file.get_slice(key).get_shape(), torch.float32, dtype)  # dtype unread
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None
    return out


def _storable(state: dict) -> StateDict:
    """Tensors only, detached, contiguous and unshared: what safetensors accepts."""
    out, seen = {}, set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach().contiguous()
        storage = (value.untyped_storage().data_ptr(), value.device)
        if value.numel() and storage in seen:
            value = value.clone()  # safetensors refuses tensors sharing memory
        seen.add(storage)
        out[key] = value
    return out


def write_safetensors(tensors: StateDict, path: str | Path, metadata: dict[str, str]) -> StateDict:
    """``tensors`` as a safetensors file at ``path``, written atomically (a failure or an
    interrupt leaves no temporary file and ``path`` as it was; a full disk names ``path``).
    Returns the tensors as written (non-tensors dropped, shared memory copied)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from .fsutil import atomic_path, write_error

    tensors = _storable(tensors)
    try:
        with atomic_path(path, overwrite=True) as temp:
            save_file(tensors, str(temp), metadata=metadata)
    except SafetensorError as error:  # its own wrapper around an I/O error
        raise write_error(OSError(None, str(error)), path) from None
    return tensors


def _select(state: StateDict, dtype: torch.dtype | None, keep: KeyFilter | None) -> StateDict:
    """Convert the kept tensors one at a time; the others become ``meta`` tensors (their
    pages of a memory-mapped file are never touched)."""
    for key, value in state.items():
        if keep is not None and not keep(key):
            state[key] = _placeholder(value.shape, value.dtype, dtype)
        else:
            state[key] = value.to(_target(value.dtype, dtype))
    return state


def _released_hashes() -> set[str]:
    from .registry import MODELS

    return {info.sha256 for info in MODELS}


_nothing: KeyFilter = frozenset().__contains__  # keeps no key: shapes only


def _open(path: Path, dtype: torch.dtype | None) -> tuple[StateDict, Callable[[KeyFilter], StateDict]]:
    """``(every key with its shape, read)``, having read no tensor (a ``torch.save`` file is
    mapped); ``read(keep)`` then reads the kept tensors, the others coming back as ``meta``."""
    kind = _sniff(path)
    if kind == "safetensors":
        return read_safetensors(path, dtype, _nothing), lambda keep: read_safetensors(path, dtype, keep)
    if kind == "zip":
        with zipfile.ZipFile(path) as archive:
            torchscript = _is_torchscript(archive)
            packed = [i.filename for i in archive.infolist() if "/data/" in i.filename and i.compress_type]
        if torchscript:
            try:
                return read_torchscript(path, dtype, _nothing), lambda keep: read_torchscript(path, dtype, keep)
            except UnsafeCheckpointError as error:
                from .fsutil import sha256_file

                if sha256_file(path) not in _released_hashes():
                    raise UnsafeCheckpointError(f"{path}: {error}") from None
                # A byte-for-byte copy of a file OpenAI released: known content, safe to run.
                state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
                return state, lambda keep: _select(state, dtype, keep)
        if packed:  # torch maps its tensors from the file: it would take compressed bytes for weights
            raise CheckpointError(f"{packed[0]} is compressed, which torch.save never does (a re-zipped file?)")
    elif kind != "pickle":
        raise CheckpointError(f"{path} is not a checkpoint file (neither TorchScript, PyTorch nor safetensors)")
    state = read_torch(path)
    return state, lambda keep: _select(state, dtype, keep)


def _sniff(path: Path) -> str:
    with open(path, "rb") as file:
        head = file.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if (len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)) \
            or path.suffix == ".safetensors":
        return "safetensors"
    return "pickle" if head[:1] == b"\x80" else "unknown"  # PROTO opcode: torch.save's legacy (non-zip) format


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None, keep: KeyFilter | None = None) -> StateDict:
    """Read any supported checkpoint into ``{OpenAI key name: tensor}``.

    With ``dtype``, floating-point tensors are converted one at a time (so a float16 file
    never exists in memory beside its float32 copy). Keys for which ``keep`` is false come
    back as ``meta`` tensors (shape and dtype only, nothing read), as do keys no CLIP of the
    file's shapes has (:func:`~clipcli.convert.needed_keys`). Raises :class:`CheckpointError`
    (or :class:`UnsafeCheckpointError`) naming the file for anything we cannot read.
    """
    return read_checkpoint([path], dtype, keep)


def read_checkpoint(paths: Sequence[str | Path], dtype: torch.dtype | None = None,
                    keep: KeyFilter | None = None) -> StateDict:
    """:func:`read_state_dict` of a checkpoint in several files (the shards a ``*.index.json``
    names): what a CLIP needs is known from all their shapes before any tensor is read."""
    opened = []
    for path in map(Path, paths):
        with _naming(path):
            opened.append((path, *_open(path, dtype)))
    needed = needed_keys({key: value for _, shapes, _ in opened for key, value in shapes.items()})
    state: StateDict = OrderedDict()
    for path, _, read in opened:
        with _naming(path):
            state.update(read(lambda key: (keep is None or keep(key)) and needed(key)))
    return state


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Whatever reading ``path`` raises, as a :class:`CheckpointError` that names it."""
    try:
        yield
    except CheckpointError as error:
        if str(path) in str(error):
            raise
        raise type(error)(f"{path}: {error.message}", option=error.option, fix=error.fix) from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        why = {FileNotFoundError: ": no such file", IsADirectoryError: " is a folder, not a checkpoint file"}
        raise CheckpointError(f"{path}{why.get(type(error), ': permission denied')}") from None
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a hostile or damaged file: anything its parsing raises
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint (damaged, truncated, or not TorchScript, PyTorch or "
            f"safetensors): {reason}"
        ) from None
