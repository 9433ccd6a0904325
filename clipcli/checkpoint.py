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
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, UnsafeCheckpointError

StateDict = dict[str, torch.Tensor]

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """An inert stand-in for a pickled TorchScript module: it only remembers its attributes."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> torch.Tensor:
    if not storage.numel():
        return storage.new_empty(size)
    return storage.as_strided(size, stride, offset)


def _identity(value, *_ignored):
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors and containers from a TorchScript ``data.pkl``; refuses everything else."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, dtype: torch.dtype | None):
        super().__init__(file)
        self.archive, self.prefix, self.dtype = archive, prefix, dtype
        self.storages: dict[str, torch.Tensor] = {}
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
        raise UnsafeCheckpointError(
            f"refusing to load: the archive's pickle asks for {module}.{name}, which could run code"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"refusing to load: unexpected persistent id {pid!r:.80}")
        dtype, key = pid[1], str(pid[2])
        if not isinstance(dtype, torch.dtype):
            raise UnsafeCheckpointError(f"refusing to load: unknown storage type {dtype!r:.80}")
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            storage = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            self.storages[key] = storage
        return self.storages[key]


_CLASS = re.compile(r"^class (\w+)\(Module\):\n  __parameters__ = \[(.*?)\]\n  __buffers__ = \[(.*?)\]", re.M)


def _module_slots(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """``{qualified class name: names of its parameters and buffers}`` from the archive's sources."""
    slots = {}
    for member in archive.namelist():
        if not (member.startswith(prefix + "code/") and member.endswith(".py")):
            continue
        module = member[len(prefix + "code/") : -len(".py")].replace("/", ".")
        for name, params, buffers in _CLASS.findall(archive.read(member).decode("utf-8", "replace")):
            slots[f"{module}.{name}"] = set(re.findall(r'"([^"]+)"', params + buffers))
    return slots


def _flatten(obj: _ScriptObject, slots: dict[str, set[str]], prefix: str, out: StateDict) -> None:
    known = slots.get(obj.qualified_name)
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor) and (known is None or name in known):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _flatten(value, slots, f"{prefix}{name}.", out)


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    for member in archive.namelist():
        if member.endswith("data.pkl") and member.count("/") == 1:
            return member[: -len("data.pkl")]
    raise CheckpointError("no data.pkl at the top of the archive")


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
    prefix = _archive_prefix(archive)
    return any(m.startswith(prefix + "code/") or m == prefix + "constants.pkl" for m in archive.namelist())


def read_torchscript(path: str | Path) -> StateDict:
    """The state dict of a TorchScript archive, equal to ``torch.jit.load(path).state_dict()``,
    read without executing anything in the file."""
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive)
        with archive.open(prefix + "data.pkl") as file:
            root = _RestrictedUnpickler(file, archive, prefix, None).load()
        if not isinstance(root, _ScriptObject):
            raise CheckpointError("data.pkl does not hold a TorchScript module")
        out: StateDict = OrderedDict()
        _flatten(root, _module_slots(archive, prefix), "", out)
    return out


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


def read_safetensors(path: str | Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None


def _released_hashes() -> set[str]:
    from .registry import MODELS

    return {info.sha256 for info in MODELS}


def _read_torchscript_or_released(path: Path) -> StateDict:
    try:
        return read_torchscript(path)
    except UnsafeCheckpointError as error:
        from .download import sha256_file

        if sha256_file(path) not in _released_hashes():
            raise UnsafeCheckpointError(f"{path}: {error}") from None
        # A byte-for-byte copy of a file OpenAI released: known content, safe to run.
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


def _sniff(path: Path) -> str:
    with open(path, "rb") as file:
        head = file.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30):
        return "safetensors"
    if path.suffix == ".safetensors":
        return "safetensors"
    return "pickle"


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> StateDict:
    """Read any supported checkpoint into ``{OpenAI key name: tensor}``.

    With ``dtype``, floating-point tensors are converted one at a time (so a float16 file
    never exists in memory beside its float32 copy). Raises :class:`CheckpointError` (or
    :class:`UnsafeCheckpointError`) naming the file for anything we cannot read.
    """
    path = Path(path)
    try:
        kind = _sniff(path)
        if kind == "zip":
            with zipfile.ZipFile(path) as archive:
                torchscript = _is_torchscript(archive)
            state = _read_torchscript_or_released(path) if torchscript else read_torch(path)
        elif kind == "safetensors":
            state = read_safetensors(path)
        else:
            state = read_torch(path)
    except CheckpointError as error:
        if str(path) in str(error):
            raise
        raise type(error)(f"{path}: {error}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    except (zipfile.BadZipFile, EOFError, KeyError, RuntimeError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or not TorchScript, PyTorch or safetensors): {error}"
        ) from None
    if dtype is not None:
        for key, value in state.items():
            if value.is_floating_point():
                state[key] = value.to(dtype)
    return state
