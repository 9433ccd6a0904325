"""The library's encode task: what `clipcli encode` writes, from Python."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipcli import tasks
from clipcli.cli import app
from clipcli.errors import BusyError, InputError
from clipcli.items import expand_inputs
from clipcli.pipeline import load_model

DATA = Path(__file__).parent / "data"


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("rocket.jpg", "chelsea.png", "camera.png"):
        shutil.copy(DATA / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def test_encode_from_python_writes_what_the_cli_writes(photos, tmp_path, tiny_vit_checkpoint):
    cli = tmp_path / "cli.npy"
    assert CliRunner().invoke(app, ["encode", str(photos), "-o", str(cli), "-m", str(tiny_vit_checkpoint),
                                    "-q"]).exit_code == 1
    seen = []
    result = tasks.encode(load_model(str(tiny_vit_checkpoint), device="cpu"), items=expand_inputs([str(photos)]),
                          output=tmp_path / "lib.npy", on_result=lambda name, error: seen.append((name, error)))
    assert result.failed == 1 and len(seen) == 4 and result.outputs == [str(tmp_path / "lib.npy"),
                                                                       str(tmp_path / "lib.jsonl")]
    assert (tmp_path / "lib.npy").read_bytes() == cli.read_bytes()
    assert (tmp_path / "lib.jsonl").read_text() == cli.with_suffix(".jsonl").read_text()
    assert [r["status"] for r in result.records] == ["error", "ok", "ok", "ok"]


def test_encode_texts_to_records(tiny_vit_checkpoint):
    records = []
    loaded = load_model(str(tiny_vit_checkpoint), device="cpu", towers=("text",))
    result = tasks.encode(loaded, texts=["a cat", "a dog"], on_record=records.append, store="float16")
    assert result.failed == 0 and [r["text"] for r in records] == ["a cat", "a dog"]
    assert len(records[0]["embedding"]) == loaded.embed_dim
    assert np.isclose(np.linalg.norm(records[0]["embedding"]), 1.0, atol=1e-2)


def test_encode_checks_its_arguments_and_the_lock(tmp_path, tiny_vit_checkpoint):
    from clipcli.fsutil import exclusive_lock

    loaded = load_model(str(tiny_vit_checkpoint), device="cpu")
    with pytest.raises(InputError, match="either images or texts"):
        tasks.encode(loaded)
    with pytest.raises(InputError, match="use a .npy"):
        tasks.encode(loaded, texts=["x"], output=tmp_path / "out.txt")
    with pytest.raises(InputError, match="resuming needs"):
        tasks.encode(loaded, texts=["x"], output=tmp_path / "out.jsonl", resume=True)
    with exclusive_lock(tmp_path / "out.npy"), pytest.raises(BusyError):
        tasks.encode(loaded, texts=["x"], output=tmp_path / "out.npy")


def test_convert_from_python(tiny_vit_checkpoint, tmp_path, capsys):
    import torch

    from clipcli.errors import OutputExistsError
    from clipcli.loading import load_model as load_exact

    dst = tmp_path / "out" / "tiny.safetensors"
    done = tasks.convert_checkpoint(tiny_vit_checkpoint, dst, dtype="bfloat16")
    assert done.path == dst and done.dtypes == ["bfloat16"] and done.size == dst.stat().st_size
    converted = load_exact(dst, dtype="float32")
    original = load_exact(tiny_vit_checkpoint, dtype="float32")
    assert converted.config == original.config
    image = torch.rand(1, 3, 32, 32)
    cosine = torch.nn.functional.cosine_similarity(converted.encode_image(image), original.encode_image(image))
    assert cosine.item() > 0.999  # bf16 weights: close, not equal
    assert capsys.readouterr() == ("", "")
    with pytest.raises(OutputExistsError) as caught:
        tasks.convert_checkpoint(tiny_vit_checkpoint, dst)
    assert caught.value.fix == "overwrite"
    with pytest.raises(InputError) as caught:
        tasks.convert_checkpoint(tiny_vit_checkpoint, tmp_path / "x.safetensors", dtype="int8")
    assert caught.value.option == "dtype"
