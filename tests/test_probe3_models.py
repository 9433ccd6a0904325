"""Issue 21 (the third adversarial probe), the checkpoint classes: one test each, run on variants.

3. TorchScript zip bombs: a small ``.pt`` whose ``data/N`` or ``code/*.py`` entry inflates to
   gigabytes was read whole; storages shorter than their tensors loaded as uninitialised memory.
8. Malformed OpenCLIP, transformers and stored clipcli configs were tracebacks, or silently
   another model (``num_attention_heads: -3`` ran with one head).
15. A safetensors file's junk keys were read and converted whole before the key check.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from checkpoints import released_state_dict
from foreign import open_clip_model, save_open_clip, save_transformers, transformers_model
from typer.testing import CliRunner

import clipcli
from clipcli.checkpoint import read_checkpoint, read_state_dict
from clipcli.cli import app
from clipcli.errors import CheckpointError
from clipcli.models.factory import needed_keys

MIB = 1 << 20
BOMB = 128 * MIB  # what each bomb inflates to: 2 to 4 times that in memory before these fixes
runner = CliRunner()


def one_line_error(target, *expected: str) -> str:
    """``clipcli encode`` of a text (a text tower: the token embedding's storage is read) with
    ``target``: exit code 2 and one line on stderr naming ``expected``."""
    result = runner.invoke(app, ["encode", "--text", "a cat", "-m", str(target)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr and all(e in result.stderr for e in expected), result.stderr
    return result.stderr


# --------------------------------------------------------------------------- 3: TorchScript zip bombs

def _numel(pickled: bytes, key: str, numel: int) -> bytes:
    """``data.pkl`` with the element count its storage ``key`` declares changed (protocol 2 has
    no frames: the pickle may change length)."""
    start = pickled.index(b"X" + len(key).to_bytes(4, "little") + key.encode())
    end = pickled.index(b"tQ", start)  # the end of ("storage", type, key, location, numel)
    op = next(end - 1 - width for width, code in ((4, b"J"), (2, b"M"), (1, b"K"))
              if pickled[end - 1 - width : end - width] == code)  # BININT, BININT2 or BININT1
    return pickled[:op] + b"J" + numel.to_bytes(4, "little", signed=True) + pickled[end:]


def _understate(path: Path, member: str, size: int) -> None:
    """Make the zip's central directory state ``size`` as ``member``'s inflated size."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")
    while data[at + 46 : at + 46 + int.from_bytes(data[at + 28 : at + 30], "little")] != member.encode():
        at = data.index(b"PK\x01\x02", at + 4)
    data[at + 24 : at + 28] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def hostile(source: Path, target: Path, replace: dict[str, bytes | int | None],
            numel: tuple[str, int] | None = None, understate: str | None = None) -> Path:
    """A copy of a TorchScript archive with members replaced: ``bytes`` stored, an ``int`` as that
    many zeros deflated (a few hundred kB on disk), None dropped; ``numel``: (storage key, the
    elements its storage declares); ``understate``: a member whose size the central directory
    states as its original one, whatever it inflates to."""
    original = {}
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compresslevel=1) as dst:
        for item in src.infolist():
            suffix = next((s for s in replace if item.filename.endswith(s)), None)
            content = src.read(item)
            original[item.filename] = len(content)
            if item.filename.endswith("/data.pkl") and numel is not None:
                content = _numel(content, *numel)
            if suffix is None or isinstance(replace[suffix], bytes):
                dst.writestr(item.filename, content if suffix is None else replace[suffix])
            elif isinstance(replace[suffix], int):
                info = zipfile.ZipInfo(item.filename)
                info.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(info, "w") as out:
                    for left in range(replace[suffix], 0, -16 * MIB):
                        out.write(bytes(min(left, 16 * MIB)))
    if understate:
        member = next(name for name in original if name.endswith(understate))
        _understate(target, member, original[member])
    return target


def _bombs(tiny: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Hostile archives from the tiny ViT, each with a part of the message it must give; most
    change the storage of the token embedding (49408 x 64 float16, its largest)."""
    code = "code/__torch__/torch/nn/modules/linear.py"
    whole = 49408 * 64
    with zipfile.ZipFile(tiny) as archive:
        tokens = max(archive.infolist(), key=lambda info: info.file_size).filename.rsplit("/", 1)[1]
    return {
        "data-entry-inflating-past-its-storage": (
            hostile(tiny, folder / "inflating.pt", {f"/data/{tokens}": BOMB}),
            f"data/{tokens} holds 134,217,728 bytes but its storage declares 3,162,112 float16 elements"),
        "directory-understating-an-entry": (
            hostile(tiny, folder / "understated.pt", {f"/data/{tokens}": BOMB}, understate=f"/data/{tokens}"),
            "Bad CRC-32"),
        "storage-declaring-the-bomb-too": (
            hostile(tiny, folder / "honest.pt", {f"/data/{tokens}": BOMB}, numel=(tokens, BOMB // 2)),
            "would inflate from"),
        "code-bomb": (hostile(tiny, folder / "code.pt", {code: BOMB}), "code/ sources are 128.0 MiB"),
        "data.pkl-bomb": (hostile(tiny, folder / "pickle.pt", {"/data.pkl": 64 * MIB}), "data.pkl is 64.0 MiB"),
        "storage-shorter-than-its-tensor": (
            hostile(tiny, folder / "short.pt", {f"/data/{tokens}": bytes(whole)}, numel=(tokens, whole // 2)),
            f"token_embedding.weight of shape [49408, 64] needs 3,162,112 elements of its storage data/{tokens}, "
            "which holds 1,581,056"),
        "empty-storage": (hostile(tiny, folder / "empty.pt", {f"/data/{tokens}": b""}, numel=(tokens, 0)), "which holds 0"),
        "entry-shorter-than-its-storage": (
            hostile(tiny, folder / "cut.pt", {f"/data/{tokens}": bytes(whole)}),
            "holds 3,162,112 bytes but its storage declares 3,162,112 float16 elements (6,324,224 bytes)"),
        "storage-missing": (hostile(tiny, folder / "missing.pt", {f"/data/{tokens}": None}), "which the archive lacks"),
    }


@pytest.fixture(scope="module")
def bombs(tiny_vit_checkpoint, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return _bombs(tiny_vit_checkpoint, tmp_path_factory.mktemp("bombs"))


@pytest.mark.parametrize("case", ["data-entry-inflating-past-its-storage", "directory-understating-an-entry",
                                  "storage-declaring-the-bomb-too", "code-bomb", "data.pkl-bomb",
                                  "storage-shorter-than-its-tensor", "empty-storage",
                                  "entry-shorter-than-its-storage", "storage-missing"])
def test_hostile_torchscript_archives_are_one_line(bombs, case):
    path, message = bombs[case]
    assert path.stat().st_size < 8 * MIB
    with pytest.raises(CheckpointError, match=re.escape(message)):
        clipcli.load(path, device="cpu")
    one_line_error(path, str(path), message)


def _sparse_safetensors(state: dict[str, torch.Tensor], path: Path, key: str, size: int) -> Path:
    """``state`` as safetensors with one more float16 tensor ``key`` of ``size`` bytes, its data a
    hole in a sparse file (nothing on disk)."""
    header, offset = {}, 0
    for name, tensor in state.items():
        header[name] = {"dtype": {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}[tensor.dtype],
                        "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    header[key] = {"dtype": "F16", "shape": [size // 2], "data_offsets": [offset, offset + size]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(len(text).to_bytes(8, "little") + text)
        for tensor in state.values():
            file.write(tensor.contiguous().numpy().tobytes())
        file.truncate(8 + len(text) + offset + size)
    return path


@pytest.fixture(scope="module")
def junk_files(tiny_vit_checkpoint, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("junk")
    state = released_state_dict(tiny_vit_checkpoint)
    without = {k: v for k, v in state.items() if k != "visual.ln_post.weight"}
    return {
        "junk-key": (_sparse_safetensors(state, folder / "junk.safetensors", "junk", BOMB), "unexpected keys: junk"),
        "clip-key-of-a-wrong-shape": (
            _sparse_safetensors(without, folder / "shape.safetensors", "visual.ln_post.weight", BOMB),
            "visual.ln_post.weight (67108864,) (expected (64,))"),
    }


@pytest.mark.parametrize("case", ["junk-key", "clip-key-of-a-wrong-shape"])
def test_keys_a_clip_does_not_have_are_named_and_never_read(junk_files, case):
    path, message = junk_files[case]
    key = "junk" if case == "junk-key" else "visual.ln_post.weight"
    state = read_state_dict(path, dtype=torch.float32, needed=needed_keys)
    assert state[key].is_meta and not state["visual.proj"].is_meta
    one_line_error(path, message)


def test_bombs_and_junk_stay_within_a_fixed_memory_budget(bombs, junk_files, tiny_vit_checkpoint):
    """One process tries every hostile file, after one that fails at once (the baseline: torch and
    the loading path imported): none may raise its peak resident memory by 64 MiB (before: each
    took 250 MiB to 1 GiB more, or loaded)."""
    others = dict(bombs)
    paths = [str(path) for path, _ in [others.pop("storage-missing"), *others.values(), *junk_files.values()]]
    probe = """
import json, resource, sys, clipcli
from clipcli.errors import CheckpointError
peaks = {}
for path in sys.argv[1:]:
    try:
        clipcli.load(path, device="cpu")
        peaks[path] = "loaded"
    except CheckpointError:
        peaks[path] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    peaks.setdefault("baseline", peaks[path])
print(json.dumps(peaks))
"""
    out = subprocess.run([sys.executable, "-c", probe, *paths], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    peaks = json.loads(out.splitlines()[-1])
    baseline = peaks.pop("baseline")
    assert all(isinstance(mib, int) and mib - baseline < 64 for mib in peaks.values()), (baseline, peaks)


def test_a_re_zipped_torch_save_file_is_refused(tmp_path, tiny_vit_checkpoint):
    """torch maps a state dict's tensors from the file: compressed members would be read as weights."""
    saved = tmp_path / "sd.pt"
    torch.save(released_state_dict(tiny_vit_checkpoint), saved)
    rezipped = tmp_path / "rezipped.pt"
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(rezipped, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item))
    one_line_error(rezipped, "is compressed, which torch.save never does")
    assert clipcli.load(saved, device="cpu")[0].visual.input_resolution == 32


# --------------------------------------------------------------------------- 15: only the tensors a CLIP needs


def test_only_the_tensors_a_clip_has_are_read_from_every_format(tmp_path, tiny_vit_checkpoint):
    state = {k: v.float() for k, v in released_state_dict(tiny_vit_checkpoint).items()}
    hostile_state = {**state, "optimizer.momentum": torch.ones(5), "visual.ln_post.weight": torch.ones(7)}
    from safetensors.torch import save_file

    save_file(hostile_state, str(tmp_path / "m.safetensors"))
    torch.save(hostile_state, tmp_path / "m.pt")
    for path in (tmp_path / "m.safetensors", tmp_path / "m.pt"):
        read = read_state_dict(path, needed=needed_keys)
        assert read["optimizer.momentum"].is_meta and read["visual.ln_post.weight"].is_meta
        assert torch.equal(read["visual.proj"], state["visual.proj"])
        one_line_error(path, str(path), "unexpected keys: optimizer.momentum")
    # the shards of one checkpoint are judged together: one alone is no whole CLIP
    keys = sorted(hostile_state)
    save_file({k: hostile_state[k] for k in keys[::2]}, str(tmp_path / "a.safetensors"))
    save_file({k: hostile_state[k] for k in keys[1::2]}, str(tmp_path / "b.safetensors"))
    read = read_checkpoint([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], needed=needed_keys)
    assert read["visual.ln_post.weight"].is_meta and read["optimizer.momentum"].is_meta
    assert sum(not v.is_meta for v in read.values()) == len(state) - 1


def test_transformers_keys_a_clip_does_not_have_are_never_read(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_transformers(transformers_model("gelu-eos49407"), tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    state["junk.weight"] = torch.ones(3)
    state["vision_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.ones(240, 7)  # q, k, v do not pack
    save_file(state, str(folder / "model.safetensors"))
    read = read_state_dict(folder / "model.safetensors", needed=needed_keys)
    assert read["junk.weight"].is_meta and read["vision_model.encoder.layers.0.self_attn.k_proj.weight"].is_meta
    assert not read["vision_model.encoder.layers.1.self_attn.k_proj.weight"].is_meta
    one_line_error(folder, "missing keys: visual.transformer.resblocks.0.attn.in_proj_weight", "junk.weight")


# --------------------------------------------------------------------------- 8: malformed configs


def _deep(depth: int):
    value: object = 64
    for _ in range(depth):
        value = [value]
    return value


def _with(config, dotted: str, value):
    """``config`` with the field at ``dotted`` (``a.b.c``) set to ``value``; ``value`` for ""."""
    if not dotted:
        return value
    *parents, leaf = dotted.split(".")
    inner = config
    for name in parents:
        inner = inner[name]
    inner[leaf] = value
    return config


INF, NAN = float("inf"), float("nan")

# (dotted field or "" for the whole file, hostile value, what the one line must name)
OPEN_CLIP = [
    ("model_cfg.vision_cfg.head_width", 0, "vision_cfg.head_width is 0"),
    ("model_cfg.vision_cfg.head_width", "abc", 'vision_cfg.head_width is "abc"'),
    ("model_cfg.vision_cfg.head_width", None, "vision_cfg.head_width is null"),
    ("model_cfg.vision_cfg.head_width", INF, "vision_cfg.head_width is Infinity"),
    ("model_cfg.vision_cfg.head_width", 64.5, "vision_cfg.head_width is 64.5"),
    ("model_cfg.vision_cfg.head_width", True, "vision_cfg.head_width is true"),
    ("model_cfg.vision_cfg.head_width", _deep(400), "vision_cfg.head_width is [[[["),
    ("model_cfg.vision_cfg.head_width", 1_000_000, "1000000-wide attention heads"),  # was silently one head
    ("model_cfg.text_cfg.heads", "8", 'text_cfg.heads is "8"'),
    ("model_cfg.text_cfg.heads", [8], "text_cfg.heads is [8]"),
    ("model_cfg.text_cfg.heads", -3, "text_cfg.heads is -3"),
    ("model_cfg.quick_gelu", "abc", "quick_gelu is \"abc\""),
    ("model_cfg.vision_cfg.timm_model_name", ["vit"], "vision_cfg.timm_model_name is [\"vit\"]"),
    ("model_cfg.vision_cfg", [], "vision_cfg is []"),
    ("model_cfg", "x", 'model_cfg is "x"'),
    ("preprocess_cfg", [], "preprocess_cfg is []"),
    ("preprocess_cfg.mean", ["a", "b", "c"], "preprocess_cfg.mean is [\"a\""),
    ("preprocess_cfg.mean", [NAN, 0.5, 0.5], "preprocess_cfg.mean is [NaN"),
    ("preprocess_cfg.std", [0.5, 0, 0.5], "preprocess_cfg.std is [0.5, 0, 0.5]"),
    ("preprocess_cfg.mean", [10**400, 0.5, 0.5], "preprocess_cfg.mean is [1000"),
    ("preprocess_cfg.interpolation", 3, "preprocess_cfg.interpolation is 3"),
    ("", [], "open_clip_config.json is []"),
]
TRANSFORMERS = [
    ("config.json", "vision_config.num_attention_heads", 0, "vision_config.num_attention_heads is 0"),
    ("config.json", "vision_config.num_attention_heads", -3, "vision_config.num_attention_heads is -3"),
    ("config.json", "text_config.num_attention_heads", -3, "text_config.num_attention_heads is -3"),
    ("config.json", "text_config.num_attention_heads", True, "text_config.num_attention_heads is true"),
    ("config.json", "text_config.layer_norm_eps", "tiny", 'text_config.layer_norm_eps is "tiny"'),
    ("config.json", "vision_config.layer_norm_eps", 10**400, "vision_config.layer_norm_eps is 1000"),
    ("config.json", "text_config", "x", 'text_config is "x"'),
    ("config.json", "vision_config_dict", [1], "vision_config_dict is [1]"),
    ("config.json", "model_type", ["clip"], 'model_type is ["clip"]'),
    ("config.json", "model_type", None, "model_type is null"),
    ("config.json", "vision_config.hidden_size", "240", 'vision_config.hidden_size is "240"'),
    ("config.json", "text_config.vocab_size", INF, "text_config.vocab_size is Infinity"),
    ("config.json", "vision_config.hidden_act", ["gelu"], 'vision_config.hidden_act is ["gelu"]'),
    ("config.json", "vision_config.patch_size", _deep(400), "vision_config.patch_size is [[[["),
    ("preprocessor_config.json", "image_mean", "abc", 'image_mean is "abc"'),
    ("preprocessor_config.json", "image_std", [0.5, 0, 0.5], "image_std is [0.5, 0, 0.5]"),
    ("preprocessor_config.json", "resample", [3], "resample is [3]"),
    ("preprocessor_config.json", "", [], "preprocessor_config.json is []"),
]
STORED = [
    ("transformer_heads", 0, "transformer_heads is 0"),
    ("transformer_heads", -2, "transformer_heads is -2"),
    ("transformer_heads", INF, "transformer_heads is Infinity"),
    ("vision_head_width", 0, "vision_head_width is 0"),
    ("vision_head_width", "64", 'vision_head_width is "64"'),
    ("vision_layers", [2, 2], "vision_layers is [2, 2]"),
    ("image_mean", ["a", 1, 2], 'image_mean is ["a", 1, 2]'),
    ("activation", 5, "activation is 5"),
    ("", [], "clipcli_config metadata is []"),
    ("raw", "[" * 100_000 + "]" * 100_000, "clipcli_config metadata is not valid JSON"),
]


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory) -> Path:
    return save_open_clip(open_clip_model("quickgelu"), "quickgelu", tmp_path_factory.mktemp("oc") / "m")


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory) -> Path:
    return save_transformers(transformers_model("gelu-eos49407"), tmp_path_factory.mktemp("tf") / "m", mean=[0.5] * 3)


def _rewritten(folder: Path, target: Path, filename: str, dotted: str, value) -> Path:
    shutil.copytree(folder, target)
    config = json.loads((target / filename).read_text())
    (target / filename).write_text(json.dumps(_with(config, dotted, value)))
    return target


@pytest.mark.parametrize("dotted, value, named", OPEN_CLIP, ids=[f"{d}={v!r:.20}" for d, v, _ in OPEN_CLIP])
def test_malformed_open_clip_configs_are_one_line(open_clip_folder, tmp_path, dotted, value, named):
    folder = _rewritten(open_clip_folder, tmp_path / "m", "open_clip_config.json", dotted, value)
    one_line_error(folder, named, *([] if "wide attention" in named else ["open_clip_config.json"]))


@pytest.mark.parametrize("filename, dotted, value, named", TRANSFORMERS,
                         ids=[f"{f[:6]}:{d}={v!r:.20}" for f, d, v, _ in TRANSFORMERS])
def test_malformed_transformers_configs_are_one_line(transformers_folder, tmp_path, filename, dotted, value, named):
    folder = _rewritten(transformers_folder, tmp_path / "m", filename, dotted, value)
    one_line_error(folder, named, filename)


@pytest.fixture(scope="module")
def stored_config(open_clip_folder) -> tuple[dict, dict]:
    from clipcli.models.config import config_to_json

    model, _ = clipcli.load(open_clip_folder, device="cpu")
    return json.loads(config_to_json(model.config)), {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dotted, value, named", STORED, ids=[f"{d}={v!r:.20}" for d, v, _ in STORED])
def test_malformed_stored_configs_are_one_line(stored_config, tmp_path, dotted, value, named):
    from safetensors.torch import save_file

    config, state = json.loads(json.dumps(stored_config[0])), stored_config[1]
    if dotted != "raw":
        value = json.dumps(_with(config, dotted, value))
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={"clipcli_config": value})
    one_line_error(path, str(path), named)


@pytest.mark.parametrize("filename", ["open_clip_config.json", "config.json"])
def test_configs_nested_past_the_parsers_limit_are_one_line(open_clip_folder, transformers_folder, tmp_path,
                                                            filename):
    folder = open_clip_folder if filename == "open_clip_config.json" else transformers_folder
    target = shutil.copytree(folder, tmp_path / "m")
    (target / filename).write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(target, filename)


def test_configs_that_are_valid_still_load(open_clip_folder, transformers_folder, tmp_path):
    """The checks refuse nothing real: null patch size (ResNet), one number for mean and std."""
    folder = _rewritten(transformers_folder, tmp_path / "tf", "preprocessor_config.json", "image_mean", 0.5)
    assert clipcli.load(folder, device="cpu")[0].config.image_mean == (0.5, 0.5, 0.5)
    folder = _rewritten(open_clip_folder, tmp_path / "oc", "open_clip_config.json", "model_cfg.quick_gelu", None)
    assert clipcli.load(folder, device="cpu")[0].config.activation == "gelu"


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_torch_save_storage_shorter_than_its_tensor_is_refused(tmp_path, wrapped):
    """torch maps a torch.save zip's storages without checking their entries' sizes: a short one
    would read the bytes after it as weights. Objects around the tensors (a training run's
    arguments, a torch.Size) do not hide them from the check."""
    import argparse
    import zipfile

    good, short = tmp_path / "good.pt", tmp_path / "short.pt"
    state = {"visual.proj": torch.randn(8, 4), "other": torch.randn(100)}
    torch.save({"args": argparse.Namespace(lr=1), "size": torch.Size([2, 3]), "state_dict": state} if wrapped
               else state, good)
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(short, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            data = source.read(info)
            out.writestr(info, data[: len(data) // 2] if info.filename.endswith("data/0") else data)
    if not wrapped:
        assert len(read_state_dict(good)) == 2
    with pytest.raises(CheckpointError, match="holds 64 bytes but its storage declares 32 float32 elements"):
        read_state_dict(short)
