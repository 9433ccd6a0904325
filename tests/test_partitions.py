"""Partitioned encoding (`clipcli encode -o DIR/`): clip-retrieval's layout, shares by rank,
resume by partition, torchrun on the CPU (one node and a simulated two), and refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.partitions import share

pq = pytest.importorskip("pyarrow.parquet")
runner = CliRunner()


@pytest.fixture
def images(tmp_path) -> Path:
    """23 small images and one broken file, 24 inputs."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(23):
        Image.new("RGB", (40, 30), (i * 10, 255 - i * 10, (i * 37) % 256)).save(folder / f"{i:03d}.png")
    (folder / "011b.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return folder


@pytest.fixture
def model(tiny_vit_checkpoint) -> str:
    return str(tiny_vit_checkpoint)


def cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result.stderr


def encode(images: Path, out: Path, model: str, *extra: str, code: int = 0, size: int = 5) -> str:
    return cli("encode", str(images), "-m", model, "-o", f"{out}/", "--device", "cpu", "--partition-size", str(size),
               *extra, code=code)


# Rows computed in other batches or with another number of threads: matrix kernels may round
# differently (measured up to 1.04e-7 on an AVX-512 EPYC), so only the same computation is
# compared byte for byte.
ATOL = 1e-6


def read_back(out: Path) -> tuple[np.ndarray, list[dict]]:
    """What embedding-reader does: every partition in order, rows aligned with metadata."""
    names = sorted(p.name for p in (out / "img_emb").glob("img_emb_*.npy"))
    matrix = np.concatenate([np.load(out / "img_emb" / name) for name in names])
    rows = []
    for name in names:
        rows += pq.read_table(out / "metadata" / name.replace("img_emb", "metadata").replace(".npy", ".parquet")).to_pylist()
    return matrix, rows


def failures(out: Path) -> list[dict]:
    return [row for path in sorted((out / "failed").glob("failed_*.parquet")) for row in pq.read_table(path).to_pylist()]


def test_the_layout_and_rows_equal_a_single_file_encode(images, model, tmp_path):
    said = encode(images, tmp_path / "out", model)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{i}.npy" for i in range(5)]
    assert sorted(p.name for p in (out / "failed").iterdir()) == [f"failed_{i}.parquet" for i in range(5)]
    matrix, rows = read_back(out)
    assert len(rows) == matrix.shape[0] == 23 and list(rows[0]) == ["image_path"]  # only what succeeded
    assert [Path(r["image_path"]).name for r in rows] == sorted(p.name for p in images.iterdir() if p.suffix == ".png")
    [broken] = failures(out)
    assert Path(broken["image_path"]).name == "011b.jpg" and broken["error"]
    assert np.all(np.abs(np.linalg.norm(matrix, axis=1) - 1) < 1e-5)  # no zero rows
    cli("encode", str(images), "-m", model, "-o", str(tmp_path / "one.npy"), "--device", "cpu", code=1)
    single = np.load(tmp_path / "one.npy")  # batches of 32, not of 5
    np.testing.assert_allclose(matrix, single, rtol=0, atol=ATOL)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (manifest["count"], manifest["partitions"], manifest["partition_size"], manifest["dim"]) == (24, 5, 5, 32)
    assert (manifest["layout"], manifest["dtype"]) == (2, "float32")
    assert json.loads((out / "_summary.json").read_text()) == {"partitions": 5, "total": 24, "ok": 23, "error": 1}
    assert "all 5 partitions are done: 23 of 24 inputs embedded; 1 failed, listed in failed/" in said


def test_float16_is_stored_as_asked_and_recorded(images, model, tmp_path):
    encode(images, tmp_path / "half", model, "--dtype", "float16")
    encode(images, tmp_path / "full", model)
    half, full = read_back(tmp_path / "half")[0], read_back(tmp_path / "full")[0]
    assert half.dtype == np.float16 and full.dtype == np.float32
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=0, atol=1e-3)
    assert json.loads((tmp_path / "half" / "_manifest.json").read_text())["dtype"] == "float16"
    result = runner.invoke(app, ["encode", str(images), "-m", model, "-o", f"{tmp_path}/half/", "--device", "cpu",
                                 "--partition-size", "5"])
    assert result.exit_code == 2 and "dtype" in result.stderr  # a run of another stored type is refused


def test_a_partition_in_which_everything_failed_has_no_embedding_pair(tmp_path, model):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"bad{i}.jpg").write_bytes(b"not an image")
    Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / "good.png")
    out = tmp_path / "out"
    encode(folder, out, model, size=3)  # partition 0: three broken files; partition 1: one image
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_1.npy"]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["metadata_1.parquet"]
    assert len(failures(out)) == 3
    assert json.loads((out / "_summary.json").read_text()) == {"partitions": 2, "total": 4, "ok": 1, "error": 3}
    assert "0 written, 2 already done" in encode(folder, out, model, size=3)


def test_shares_by_rank_make_the_same_files_in_any_order(images, model, tmp_path):
    encode(images, tmp_path / "one", model)
    for rank in (2, 0, 1):
        encode(images, tmp_path / "three", model, "--rank", str(rank), "--world", "3")
    for folder in ("img_emb", "metadata", "failed"):  # the same batches and threads: the same bytes
        for path in sorted((tmp_path / "one" / folder).iterdir()):
            assert path.read_bytes() == (tmp_path / "three" / folder / path.name).read_bytes(), path.name
    assert (tmp_path / "three" / "_summary.json").read_bytes() == (tmp_path / "one" / "_summary.json").read_bytes()


def test_a_rerun_with_another_world_size_redoes_only_unfinished_partitions(images, model, tmp_path):
    out = tmp_path / "out"
    encode(images, out, model, "--rank", "0", "--world", "3")  # partitions 0 and 3
    assert not (out / "_summary.json").exists()
    done = {p: p.stat().st_mtime_ns for p in (out / "failed").iterdir()}
    said = encode(images, out, model, "--rank", "1", "--world", "2")  # 1 and 3: 3 is done
    assert "1 written, 1 already done" in said
    encode(images, out, model)
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    encode(images, tmp_path / "clean", model)
    assert read_back(out)[0].tobytes() == read_back(tmp_path / "clean")[0].tobytes()


def test_another_model_options_or_inputs_are_refused(images, model, tmp_path, tiny_rn_checkpoint):
    out = tmp_path / "out"
    encode(images, out, model, "--rank", "0", "--world", "2")
    for extra, what in [((), "identity"), (("--exact-decode",), "exact_decode"), (("--partition-size", "4"), "partition_size")]:
        args = ["encode", str(images), "-m", str(tiny_rn_checkpoint) if not extra else model, "-o", f"{out}/",
                "--device", "cpu", *(extra or ("--partition-size", "5"))]
        if extra and extra[0] != "--partition-size":
            args += ["--partition-size", "5"]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and what in result.stderr and "another folder" in result.stderr
    (images / "new.png").write_bytes((images / "000.png").read_bytes())
    result = runner.invoke(app, ["encode", str(images), "-m", model, "-o", f"{out}/", "--device", "cpu", "--partition-size", "5"])
    assert result.exit_code == 2 and "inputs" in result.stderr


def test_user_mistakes_are_one_line(images, model, tmp_path, monkeypatch):
    for args, message in [(["--text", str(images / "000.png")], "takes images"), (["--resume"], "resumes by itself"),
                          (["--rank", "2", "--world", "2"], "rank must be in"), (["--rank", "1"], "both rank and world")]:
        inputs = [] if args[0] == "--text" else [str(images)]
        result = runner.invoke(app, ["encode", *inputs, "-m", model, "-o", f"{tmp_path}/x/", "--device", "cpu", *args])
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    result = runner.invoke(app, ["encode", str(images), "-m", model, "-o", f"{tmp_path}/y/", "--device", "cpu"])
    assert result.exit_code == 2 and "clipcli[scale]" in result.stderr


def test_the_share_comes_from_torchrun_or_slurm(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    assert (share().rank, share().world) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    assert (share().rank, share().world) == (3, 8)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (share().rank, share().world) == (1, 2)
    assert (share(0, 4).rank, share(0, 4).world) == (0, 4)


# ----------------------------------------------------------------------------- several processes


def run_encode(images: Path, out: Path, model: str, launcher: list[str], size: int = 5) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [*launcher, "-m", "clipcli", "encode", str(images), "-m", model, "-o", f"{out}/", "--device", "cpu",
               "--partition-size", str(size), "--workers", "0", "--threads", "1", "-q"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_on_one_node_and_on_two_simulated_nodes_equal_one_process(images, model, tmp_path):
    encode(images, tmp_path / "one", model)
    single = run_encode(images, tmp_path / "local", model, torchrun("--standalone", "--nproc-per-node", "2"))
    assert single.wait(timeout=300) == 0, single.stderr.read().decode()[-3000:]
    port = free_port()
    nodes = [run_encode(images, tmp_path / "nodes", model, torchrun(
        "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "clipcli-test")) for rank in (0, 1)]
    for node in nodes:
        assert node.wait(timeout=300) == 0, node.stderr.read().decode()[-3000:]
    for run in ("local", "nodes"):
        for folder in ("metadata", "failed"):
            for path in sorted((tmp_path / "one" / folder).iterdir()):
                assert path.read_bytes() == (tmp_path / run / folder / path.name).read_bytes(), (run, path.name)
        # One thread per process against this process's threads: equal to ATOL, not bit for bit.
        np.testing.assert_allclose(read_back(tmp_path / run)[0], read_back(tmp_path / "one")[0], rtol=0, atol=ATOL)
    for path in sorted((tmp_path / "local" / "img_emb").iterdir()):  # the same batches and threads
        assert path.read_bytes() == (tmp_path / "nodes" / "img_emb" / path.name).read_bytes(), path.name


@pytest.mark.slow
def test_a_killed_process_leaves_whole_partitions_and_a_rerun_finishes(images, model, tmp_path):
    out = tmp_path / "out"
    process = run_encode(images, out, model, [sys.executable], size=1)  # 24 partitions: killed part-way
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "failed").glob("failed_*.parquet")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = list((out / "failed").glob("failed_*.parquet"))
    assert 1 <= len(finished) < 24
    rerun = run_encode(images, out, model, [sys.executable], size=1)
    assert rerun.wait(timeout=300) == 0
    encode(images, tmp_path / "clean", model, size=1)  # in this process, with its threads
    np.testing.assert_allclose(read_back(out)[0], read_back(tmp_path / "clean")[0], rtol=0, atol=ATOL)
    assert read_back(out)[1] == read_back(tmp_path / "clean")[1] and failures(out) == failures(tmp_path / "clean")


# ----------------------------------------------------------------------------- WebDataset


def make_shards(folder: Path) -> Path:
    """Three shards of five samples (jpg + txt + json); in shard 0 one sample has no image
    and one a corrupt one; shard 2 is cut in half (truncated)."""
    import io
    import tarfile

    folder.mkdir()

    def add(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s in range(3):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i in range(5):
                key = f"{s:05d}/{s:05d}{i:04d}"
                image = io.BytesIO()
                Image.new("RGB", (40, 30), (s * 80, i * 50, 100)).save(image, "JPEG")
                if (s, i) != (0, 2):
                    add(tar, key + ".jpg", b"\xff\xd8 broken" if (s, i) == (0, 3) else image.getvalue())
                add(tar, key + ".txt", f"a photo number {i}".encode())
                add(tar, key + ".json", json.dumps({"url": f"http://example.com/{i}.jpg", "width": 40}).encode())
        data = buffer.getvalue()
        (folder / f"{s:05d}.tar").write_bytes(data[: len(data) // 2] if s == 2 else data)
    return folder


def test_webdataset_shards_give_one_partition_each_with_captions(tmp_path, model):
    from clipcli.batching import embed_texts
    from clipcli.pipeline import load_model

    shards = make_shards(tmp_path / "shards")
    out = tmp_path / "out"
    cli("encode", f"{shards}/{{00000..00002}}.tar", "-m", model, "-o", f"{out}/", "--captions", "--device", "cpu")
    matrix, rows = read_back(out)
    assert [r["image_path"] for r in rows[:3]] == ["00000/000000000", "00000/000000001", "00000/000000004"]
    assert rows[0]["url"] == "http://example.com/0.jpg" and json.loads(rows[0]["json"])["width"] == 40
    assert rows[1]["caption"] == "a photo number 1" and list(rows[0]) == ["image_path", "caption", "url", "json"]
    assert [r["image_path"] for r in rows[3:8]] == [f"00001/0000100{i:02d}" for i in range(5)]
    failed = failures(out)
    assert [f["image_path"] for f in failed[:2]] == ["00000/000000002", "00000/000000003"] and "no image" in failed[0]["error"]
    damaged = failed[-1]
    assert "damaged" in damaged["error"] and damaged["image_path"].endswith("00002.tar#damaged")
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["ok"] == len(rows) == matrix.shape[0] and summary["total"] == len(rows) + len(failed)
    texts = np.concatenate([np.load(out / "text_emb" / f"text_emb_{i}.npy") for i in range(3)])
    assert texts.shape == matrix.shape  # row for row
    loaded = load_model(model, device="cpu", towers=("text",))
    expected = embed_texts(loaded, ["a photo number 1"])[0].embedding
    np.testing.assert_allclose(texts[1], expected, rtol=0, atol=ATOL)
    again = cli("encode", str(shards / "*.tar"), "-m", model, "-o", f"{out}/", "--captions", "--device", "cpu")
    assert "0 written, 3 already done" in again  # a glob names the same shards


def test_brace_patterns_expand_as_webdataset_writes_them():
    from clipcli.webdataset import expand_braces

    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def jpeg(colour: tuple) -> bytes:
    import io

    out = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(out, "JPEG")
    return out.getvalue()


def test_odd_shards_gzip_empty_dotted_names_hidden_members_and_mixed_sidecars(tmp_path, model):
    import pyarrow.dataset as ds

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar.gz").write_bytes(tar_bytes({
        "./k1.jpg": jpeg((200, 0, 0)), "./k1.json": b'{"width": 32, "note": "x"}',
        "._k1.jpg": b"macOS resource fork", "v1.2/k2.jpg": jpeg((0, 200, 0)), "v1.2/k2.json": b'{"width": "wide"}',
        "k3.mp4": b"\x00" * 1000}, mode="w:gz"))
    (shards / "b.tar").write_bytes(tar_bytes({}))
    out = tmp_path / "out"
    cli("encode", str(shards / "a.tar.gz"), str(shards / "b.tar"), "-m", model, "-o", f"{out}/", "--device", "cpu")
    matrix, rows = read_back(out)
    assert [r["image_path"] for r in rows] == ["./k1", "v1.2/k2"] and matrix.shape == (2, 32)
    [missing] = failures(out)
    assert missing["image_path"] == "k3" and "no image" in missing["error"]
    table = ds.dataset(str(out / "metadata"), format="parquet").to_table()  # one dataset over every partition
    assert table.num_rows == 2 and table.schema.field("json").type == "string"


def test_a_shard_that_cannot_be_read_stops_the_run_and_is_retried(tmp_path, model):
    shards = make_shards(tmp_path / "shards")
    moved = tmp_path / "00001.tar"
    (shards / "00001.tar").rename(moved)
    out = tmp_path / "out"
    names = [str(shards / "00000.tar"), str(shards / "00001.tar")]
    missing = runner.invoke(app, ["encode", *names, "-m", model, "-o", f"{out}/", "--device", "cpu"])
    assert missing.exit_code == 2 and "no shard matches" in missing.stderr
    moved.rename(shards / "00001.tar")
    (shards / "00001.tar").chmod(0o644)
    cli("encode", *names, "-m", model, "-o", f"{out}/", "--device", "cpu")
    assert json.loads((out / "_summary.json").read_text())["total"] == 10


def test_shards_need_a_folder_output_and_are_not_mixed_with_images(tmp_path, model, images):
    shards = make_shards(tmp_path / "shards")
    for args, message in [([str(shards / "00000.tar"), "-o", str(tmp_path / "e.npy")], "into a folder"),
                          ([str(shards / "00000.tar"), str(images), "-o", f"{tmp_path}/o/"], "not both")]:
        result = runner.invoke(app, ["encode", *args, "-m", model, "--device", "cpu"])
        assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_an_unreadable_shard_in_the_middle_of_a_run_is_not_marked_done(tmp_path, model, monkeypatch):
    from clipcli import webdataset

    shards = make_shards(tmp_path / "shards")
    real = open

    def failing(path, *args, **kwargs):
        if str(path).endswith("00001.tar"):
            raise OSError(5, "Input/output error")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(webdataset, "open", failing, raising=False)
    out = tmp_path / "out"
    names = [str(shards / f"0000{i}.tar") for i in range(3)]
    result = runner.invoke(app, ["encode", *names, "-m", model, "-o", f"{out}/", "--device", "cpu"])
    assert result.exit_code == 1 and "cannot read shard" in result.stderr
    assert not (out / "failed" / "failed_1.parquet").exists()
    monkeypatch.undo()
    again = cli("encode", *names, "-m", model, "-o", f"{out}/", "--device", "cpu")
    assert "1 written" in again or "2 written" in again


def test_a_rerun_where_nothing_succeeds_removes_a_pair_a_killed_run_left(tmp_path, model):
    """A run killed between renaming a partition's pair and its failed file, then rerun when every
    input fails (URLs gone): the old pair must not stand beside a failed file of the same inputs."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / "a.png")
    out = tmp_path / "out"
    encode(folder, out, model)
    (out / "failed" / "failed_0.parquet").unlink()  # as if killed before this last rename
    (out / "_summary.json").unlink()
    (folder / "a.png").write_bytes(b"now broken")
    cli("encode", str(folder), "-m", model, "-o", f"{out}/", "--device", "cpu", "--partition-size", "5")
    assert not (out / "img_emb" / "img_emb_0.npy").exists() and not (out / "metadata" / "metadata_0.parquet").exists()
    assert json.loads((out / "_summary.json").read_text()) == {"partitions": 1, "total": 1, "ok": 0, "error": 1}
