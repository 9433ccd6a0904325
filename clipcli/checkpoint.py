"""Reading CLIP checkpoints without running anything inside them.

Three formats are read, all into a flat ``{name: tensor}`` dict with OpenAI's key names:

- OpenAI's released ``.pt`` files, TorchScript archives read by a restricted unpickler
  (:mod:`clipcli.torchscript`): nothing in the file is executed.
- PyTorch state-dict files, through ``torch.load(weights_only=True)``.
- safetensors files.

A file whose sha256 is one of the released models' may, as a last resort, be read with
``torch.jit.load``; no other file is ever executed.

Readers take a ``dtype`` and a ``keep`` predicate on key names. Each floating-point tensor is
converted as it is read (a float16 file never sits in memory beside its float32 copy), and a
key that is not kept comes back as a ``meta`` tensor of the right shape, without its bytes
ever being read: loading only the image tower of ViT-B/32 in float32 takes 350 MB, not 900.
Shapes come first: given ``needed`` (the model loader's
:func:`~clipcli.models.factory.needed_keys`), only the tensors a CLIP of the file's shapes has are
read; junk keys stay ``meta`` for the strict load to name.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .errors import CheckpointError, UnsafeCheckpointError
from .models.config import safetensors_metadata  # noqa: F401 (re-exported)
from .torchscript import (
    KeyFilter,
    StateDict,
    check_torch_save,
    is_torchscript,
    placeholder,
    read_torchscript,
    target_dtype,
)


def _unwrap(obj: Any) -> Any:
    """Accept ``{"state_dict": ...}`` wrappers and DistributedDataParallel's ``module.`` prefixes."""
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _pickle_reason(error: Exception) -> str:
    """What torch's weights-only unpickler refused (``Unsupported global: GLOBAL os.system``),
    without the advice around it: torch suggests ``weights_only=False``, which runs the file."""
    found = re.search(r"([Uu]nsupported (?:GLOBAL|global|operand|class)[^\n]*)", str(error))
    return " ".join(found[1].split())[:160].rstrip(".") if found else "content only full pickle can build"


def read_torch(path: str | Path) -> StateDict:
    """A plain ``torch.save`` state dict, loaded with ``weights_only=True`` (never full pickle)."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch's own advice on refusing a pickle: not for our users
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:  # files in the legacy (pre-zip) format cannot be mapped
                if "mmap" not in str(error):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is a pickle that needs arbitrary code to load ({_pickle_reason(error)}); "
            "convert it to safetensors where you trust it"
        ) from None
    obj = _unwrap(obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


# safetensors' names of the floating-point types a reader may convert.
_SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None, keep: KeyFilter | None = None) -> StateDict:
    """A safetensors file's tensors. Those kept in their stored type are the file's own pages,
    memory-mapped (no copy: a page is read when the model first uses it); those converted
    (a float16 file loaded in float32) are read into a buffer and converted one at a time,
    never mapped, so the file's pages do not count in the process's memory beside the
    converted copy (mapped, a float16 ViT-B/32 image tower would add 175 MB to the peak)."""
    from safetensors import SafetensorError, safe_open

    out: StateDict = OrderedDict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file, \
                contextlib.closing(_ConvertingReader(path)) as converted:  # safe_open checks the header whole
            for key in file.keys():
                sliced = file.get_slice(key)
                if keep is not None and not keep(key):
                    out[key] = placeholder(sliced.get_shape(), torch.float32, dtype)  # dtype unread
                    continue
                stored = _SAFETENSORS_FLOATS.get(sliced.get_dtype())
                if stored is None or target_dtype(stored, dtype) == stored:
                    out[key] = file.get_tensor(key)
                else:
                    out[key] = converted.read(key, stored, dtype)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None
    return out


class _ConvertingReader:
    """Reads tensors of a safetensors file (whose header safetensors has checked) through one
    reused buffer, converting each to the type wanted."""

    def __init__(self, path: str | Path):
        self.path, self.file, self.header, self.start = path, None, {}, 0
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def read(self, key: str, stored: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
        if self.file is None:
            import json

            self.file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
            size = int.from_bytes(self.file.read(8), "little")
            self.header, self.start = json.loads(self.file.read(size)), 8 + size
        entry = self.header[key]
        begin, end = entry["data_offsets"]
        if end - begin > self.buffer.numel():
            self.buffer = torch.empty(end - begin, dtype=torch.uint8)
        data = self.buffer[: end - begin]
        self.file.seek(self.start + begin)
        if self.file.readinto(memoryview(data.numpy())) != end - begin:
            raise ValueError(f"{key} ends early")
        return data.view(stored).reshape(entry["shape"]).to(dtype)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


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
            state[key] = placeholder(value.shape, value.dtype, dtype)
        else:
            state[key] = value.to(target_dtype(value.dtype, dtype))
    return state


def _released_hashes() -> set[str]:
    from .models.registry import MODELS

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
            torchscript = is_torchscript(archive)
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
        with zipfile.ZipFile(path) as archive:
            check_torch_save(archive)
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


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None, keep: KeyFilter | None = None,
                    needed: Callable[[StateDict], KeyFilter] | None = None) -> StateDict:
    """Read any supported checkpoint into ``{OpenAI key name: tensor}``.

    With ``dtype``, floating-point tensors are converted one at a time (so a float16 file
    never exists in memory beside its float32 copy). Keys for which ``keep`` is false come
    back as ``meta`` tensors (shape and dtype only, nothing read), as do keys ``needed(shapes)``
    leaves out (the model loader passes :func:`~clipcli.models.factory.needed_keys`: only the keys a
    CLIP of the file's shapes has). Raises :class:`CheckpointError`
    (or :class:`UnsafeCheckpointError`) naming the file for anything we cannot read.
    """
    return read_checkpoint([path], dtype, keep, needed)


def read_checkpoint(paths: Sequence[str | Path], dtype: torch.dtype | None = None,
                    keep: KeyFilter | None = None, needed: Callable[[StateDict], KeyFilter] | None = None) -> StateDict:
    """:func:`read_state_dict` of a checkpoint in several files (the shards a ``*.index.json``
    names): what a CLIP needs is known from all their shapes before any tensor is read."""
    opened = []
    for path in map(Path, paths):
        with _naming(path):
            opened.append((path, *_open(path, dtype)))
    wanted = needed({key: value for _, shapes, _ in opened for key, value in shapes.items()}) if needed else None
    state: StateDict = OrderedDict()
    for path, _, read in opened:
        with _naming(path):
            state.update(read(lambda key: (keep is None or keep(key)) and (wanted is None or wanted(key))))
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
