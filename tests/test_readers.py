"""A partition folder as the tools people pair it with read it: pandas, ``pyarrow.dataset``,
embedding-reader and a faiss index, on a run with failures, an empty shard and mixed sidecars."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_files import write_shard
from typer.testing import CliRunner

from clipcli.cli import app

pq = pytest.importorskip("pyarrow.parquet")
runner = CliRunner()


def cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result.stdout


def jpeg(colour: tuple) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(out, "JPEG")
    return out.getvalue()


def sidecar(**fields) -> bytes:
    return json.dumps(fields).encode()


@pytest.fixture
def shards(tmp_path) -> Path:
    """Shard 0: two images, img2dataset's sidecar with nulls and its own status/caption fields.
    Shard 1: nothing but failures (a corrupt image, a sample without one). Shard 2: sidecar
    fields the first shard lacks, one of another type, nested objects and a non-object JSON."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "00000.tar", [
        ("a0.jpg", jpeg((200, 10, 10))), ("a0.txt", b"a red square"),
        ("a0.json", sidecar(url="http://x/a0.jpg", status="success", error_message=None, exif=None, width=32,
                            caption="from the sidecar", image_path="theirs")),
        ("a1.jpg", jpeg((10, 200, 10))), ("a1.json", sidecar(url="http://x/a1.jpg", status="success", width=32)),
    ])
    write_shard(folder / "00001.tar", [("b0.jpg", b"\xff\xd8 corrupt"), ("b0.txt", b"broken"), ("b1.txt", b"no image")])
    write_shard(folder / "00002.tar", [
        ("c0.jpg", jpeg((10, 10, 200))), ("c0.json", sidecar(url=7, width="wide", extra={"deep": [1, 2]})),
        ("c1.jpg", jpeg((90, 90, 90))), ("c1.json", b"[1, 2, 3]"),
        ("c2.jpg", jpeg((0, 0, 0))), ("c2.json", b"{not json"),
    ])
    return folder


def test_the_folder_reads_whole_with_pandas_pyarrow_and_embedding_reader(shards, tiny_vit_checkpoint, tmp_path):
    pd = pytest.importorskip("pandas")
    ds = pytest.importorskip("pyarrow.dataset")
    out = tmp_path / "out"
    cli("encode", str(shards / "*.tar"), "-m", str(tiny_vit_checkpoint), "-o", f"{out}/", "--captions",
        "--device", "cpu")
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_2.npy"]  # 1 is empty
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["metadata_0.parquet", "metadata_2.parquet"]

    frame = pd.read_parquet(out / "metadata")  # the folder as one table
    assert list(frame["image_path"]) == ["a0", "a1", "c0", "c1", "c2"]
    assert list(frame.columns) == ["image_path", "caption", "url", "json"]
    assert frame["caption"].tolist()[:2] == ["a red square", None] and frame["url"].tolist()[2] is None  # url 7
    first = json.loads(frame["json"][0])  # the sidecar whole: its own status and caption are kept
    assert (first["status"], first["caption"], first["image_path"], first["exif"]) == ("success", "from the sidecar",
                                                                                       "theirs", None)
    assert json.loads(frame["json"][2])["extra"] == {"deep": [1, 2]} and frame["json"][4] == "{not json"
    table = ds.dataset(str(out / "metadata"), format="parquet").to_table()
    assert table.num_rows == 5 and all(str(t) == "string" for t in table.schema.types)
    failed = pd.read_parquet(out / "failed")
    assert list(failed["image_path"]) == ["b0", "b1"] and failed["error"].notna().all()
    summary = json.loads((out / "_summary.json").read_text())
    assert summary == {"partitions": 3, "total": 7, "ok": 5, "error": 2}

    embedding_reader = pytest.importorskip("embedding_reader")
    reader = embedding_reader.EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy",
                                              metadata_folder=str(out / "metadata"), meta_columns=["image_path"])
    assert reader.count == 5
    batches = list(reader(batch_size=100, start=0, end=reader.count, show_progress=False))
    vectors = np.concatenate([b for b, _ in batches])
    meta = pd.concat([m for _, m in batches])
    expected = np.concatenate([np.load(out / "img_emb" / f"img_emb_{i}.npy") for i in (0, 2)])
    assert list(meta["image_path"]) == ["a0", "a1", "c0", "c1", "c2"] and np.array_equal(vectors, expected)
    texts = np.concatenate([np.load(out / "text_emb" / f"text_emb_{i}.npy") for i in (0, 2)])
    assert texts.shape == expected.shape and texts[0].any() and not texts[1].any()  # a1 has no caption


def test_a_flat_faiss_index_of_the_folder_ranks_as_clipcli_search(tiny_vit_checkpoint, tmp_path):
    faiss = pytest.importorskip("faiss")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        Image.new("RGB", (48, 40), ((i * 53) % 256, (i * 97) % 256, (i * 31) % 256)).save(photos / f"p{i:02d}.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    model, out, db = str(tiny_vit_checkpoint), tmp_path / "out", str(tmp_path / "index.sqlite3")
    cli("encode", str(photos), "-m", model, "-o", f"{out}/", "--partition-size", "5", "--device", "cpu", "-q")
    vectors = np.concatenate([np.load(path) for path in sorted((out / "img_emb").glob("*.npy"))])
    names = [row["image_path"] for path in sorted((out / "metadata").glob("*.parquet"))
             for row in pq.read_table(path).to_pylist()]
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    queries = tmp_path / "queries.txt"
    queries.write_text("a red square\na photo of a dog\n")
    cli("encode", "--text-file", str(queries), "-m", model, "-o", str(tmp_path / "q.npy"), "--device", "cpu", "-q")
    scores, found = flat.search(np.load(tmp_path / "q.npy"), 5)
    assert "broken" not in " ".join(names) and len(names) == 12  # failures never reach the index
    cli("index", str(photos), "--db", db, "-m", model, "--device", "cpu", "-q", code=1)
    for query, ranks, values in zip(["a red square", "a photo of a dog"], found, scores):
        hits = json.loads(cli("search", query, "--db", db, "-m", model, "-k", "5", "--format", "json", "-q"))
        assert [Path(h["image"]).name for h in hits] == [Path(names[r]).name for r in ranks]
        np.testing.assert_allclose([h["score"] for h in hits], values, rtol=0, atol=1e-5)


def test_a_shard_whose_members_are_not_grouped_by_key_stops_with_the_fix(tmp_path, tiny_vit_checkpoint):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "0.tar", [("a.jpg", jpeg((1, 2, 3))), ("b.jpg", jpeg((4, 5, 6))), ("a.txt", b"late caption")])
    result = runner.invoke(app, ["encode", str(folder / "0.tar"), "-m", str(tiny_vit_checkpoint), "-o",
                                 f"{tmp_path}/out/", "--device", "cpu"])
    assert result.exit_code == 1 and "not grouped by key" in result.stderr and "tar --sort=name" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3 and not (tmp_path / "out" / "failed" / "failed_0.parquet").exists()


def test_a_pyarrow_that_fails_to_import_is_shown_as_it_is(monkeypatch, tmp_path, tiny_vit_checkpoint):
    import builtins

    real = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("pyarrow requires NumPy 2.0 or newer")
        return real(name, *args, **kwargs)

    for name in [m for m in sys.modules if m.startswith("pyarrow")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", broken)
    photo = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(photo)
    result = runner.invoke(app, ["encode", str(photo), "-m", str(tiny_vit_checkpoint), "-o", f"{tmp_path}/o/"])
    assert result.exit_code == 2 and "requires NumPy 2.0" in result.stderr and "clipcli[scale]" not in result.stderr
