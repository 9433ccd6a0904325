"""The checkpoint readers: exact equality with torch.jit.load, safety, and clear errors."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from checkpoints import random_reference_model, released_state_dict, save_state_dict

import clipcli
from clipcli.checkpoint import read_state_dict, read_torchscript
from clipcli.errors import CheckpointError, ClipcliError, UnsafeCheckpointError


@pytest.mark.parametrize("fixture", ["tiny_vit_checkpoint", "tiny_rn_checkpoint"])
def test_restricted_reader_equals_jit_load(fixture, request):
    path = request.getfixturevalue(fixture)
    ours = read_torchscript(path)
    theirs = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    assert {"input_resolution", "context_length", "vocab_size"} <= set(ours)
    assert ours["visual.conv1.weight"].dtype == torch.float16


def test_reader_converts_one_tensor_at_a_time_to_the_asked_dtype(tiny_vit_checkpoint):
    state = read_state_dict(tiny_vit_checkpoint, dtype=torch.float32)
    assert state["visual.proj"].dtype == torch.float32
    assert state["vocab_size"].dtype == torch.int64 and int(state["vocab_size"]) == 49408


def test_reader_never_executes_a_malicious_archive(tmp_path, tiny_vit_checkpoint):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(tiny_vit_checkpoint) as source, zipfile.ZipFile(evil, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(Payload(), protocol=2)
            target.writestr(item, data)
    with pytest.raises(UnsafeCheckpointError, match="could run code"):
        clipcli.load(evil, device="cpu")
    assert not marker.exists()


def test_plain_pickle_needing_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "evil.bin"
    torch.save({"visual.proj": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        read_state_dict(path)
    assert not marker.exists()


def test_wrapped_and_prefixed_state_dicts_are_accepted(tmp_path):
    state = random_reference_model("tiny-vit").state_dict()
    path = save_state_dict(state, tmp_path / "wrapped.pt", wrap=True)
    assert set(read_state_dict(path)) == set(state)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is not a checkpoint file"),
        (b"hello, I am a text file\n" * 10, "is not a checkpoint file"),
        (b"PK\x03\x04" + b"\0" * 40, "not a readable checkpoint"),
    ],
    ids=["empty", "text", "broken-zip"],
)
def test_files_that_are_not_checkpoints_give_typed_errors(tmp_path, content, message):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        clipcli.load(path, device="cpu")
    assert str(path) in str(info.value)


def test_truncated_released_file_gives_a_typed_error(tmp_path, tiny_vit_checkpoint):
    data = Path(tiny_vit_checkpoint).read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        clipcli.load(path, device="cpu")
    assert str(path) in str(info.value)


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_vit_checkpoint):
    state = {k: v.float() for k, v in released_state_dict(tiny_vit_checkpoint).items()}
    del state["ln_final.bias"]
    state["extra.head.weight"] = torch.zeros(3)
    path = save_state_dict(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as info:
        clipcli.load(path, device="cpu")
    message = str(info.value)
    assert "missing keys: ln_final.bias" in message and "unexpected keys: extra.head.weight" in message
    assert str(path) in message


def test_wrong_shapes_are_named(tmp_path, tiny_vit_checkpoint):
    state = {k: v.float() for k, v in released_state_dict(tiny_vit_checkpoint).items()}
    state["visual.ln_post.weight"] = torch.ones(7)
    path = save_state_dict(state, tmp_path / "shapes.pt")
    with pytest.raises(CheckpointError, match=r"visual.ln_post.weight \(7,\) \(expected \(64,\)\)"):
        clipcli.load(path, device="cpu")


def test_a_state_dict_of_something_else_is_not_a_clip(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
        clipcli.load(path, device="cpu")


def test_unknown_name_is_a_typed_error():
    with pytest.raises(ClipcliError):
        clipcli.load("no-such-model-or-file", device="cpu")


def test_load_defaults_and_dtype_override(tiny_vit_checkpoint):
    model, preprocess = clipcli.load(tiny_vit_checkpoint, device="cpu")
    assert model.dtype == torch.float32 and not model.training
    model, _ = clipcli.load(tiny_vit_checkpoint, device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    features = model.encode_image(torch.zeros(1, 3, 32, 32))
    assert features.dtype == torch.bfloat16 and features.shape == (1, 32)


def test_only_released_files_may_fall_back_to_torch_jit_load(monkeypatch, tiny_vit_checkpoint):
    from clipcli import checkpoint
    from clipcli.fsutil import sha256_file

    def refuse(path, *options):
        raise UnsafeCheckpointError("the restricted reader could not read it")

    monkeypatch.setattr(checkpoint, "read_torchscript", refuse)
    with pytest.raises(UnsafeCheckpointError, match="restricted reader"):
        read_state_dict(tiny_vit_checkpoint)
    monkeypatch.setattr(checkpoint, "_released_hashes", lambda: {sha256_file(tiny_vit_checkpoint)})
    state = read_state_dict(tiny_vit_checkpoint)
    assert torch.equal(state["visual.proj"], torch.jit.load(str(tiny_vit_checkpoint)).state_dict()["visual.proj"])


def test_skipped_keys_are_never_read_and_each_storage_is_read_once(monkeypatch, tiny_vit_checkpoint):
    from clipcli.models.clip import tower_of

    reads: list[str] = []
    original = zipfile.ZipFile.read

    def recording_read(self, name, *args):
        reads.append(name if isinstance(name, str) else name.filename)
        return original(self, name, *args)

    monkeypatch.setattr(zipfile.ZipFile, "read", recording_read)
    full = read_torchscript(tiny_vit_checkpoint)
    all_storages = [r for r in reads if "/data/" in r]
    reads.clear()
    image_only = read_state_dict(tiny_vit_checkpoint, dtype=torch.float32, keep=lambda key: tower_of(key) != "text")
    image_storages = [r for r in reads if "/data/" in r]
    assert len(set(all_storages)) == len(all_storages) and len(set(image_storages)) == len(image_storages)
    assert 0 < len(image_storages) < len(all_storages)
    for key, value in full.items():
        if tower_of(key) == "text":
            assert image_only[key].is_meta and image_only[key].shape == value.shape
        else:
            assert torch.equal(image_only[key], value.to(torch.float32) if value.is_floating_point() else value)
