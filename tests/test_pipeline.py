"""Batching with a fake model: order kept whatever the batch size and worker count, errors
in place, out-of-memory batches split, non-finite rows reported."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from clipcli.batching import embed_images, run_batches
from clipcli.errors import ClipcliError
from clipcli.items import Item
from clipcli.pipeline import LoadedModel
from clipcli.preprocess import Preprocess


class FakeModel:
    """Embeds an image as its mean colour plus a constant; remembers batch sizes and threads."""

    def __init__(self, fail_above: int | None = None, nan_for_red: bool = False):
        self.batches: list[int] = []
        self.fail_above, self.nan_for_red = fail_above, nan_for_red
        self.logit_scale = torch.tensor(4.6)

    def encode_image(self, x):  # (B, 3, H, W) -> (B, 4)
        if self.fail_above is not None and len(x) > self.fail_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        self.batches.append(len(x))
        out = torch.cat([x.mean(dim=(2, 3)), torch.ones(len(x), 1)], dim=1)
        if self.nan_for_red:
            out[x[:, 0].mean(dim=(1, 2)) > 0.9] = float("nan")
        return out


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)


def loaded(model) -> LoadedModel:
    return LoadedModel(model, to_tensor, "fake", None, torch.device("cpu"), torch.float32)


@pytest.fixture
def corpus(tmp_path):
    """20 items: coloured squares, with an unreadable item every fifth place."""
    items = []
    for i in range(20):
        path = tmp_path / f"{i:02d}.png"
        if i % 5 == 3:
            path.write_bytes(b"")
        else:
            Image.new("RGB", (8, 8), (i * 12, 255 - i * 12, 7)).save(path)
        items.append(Item(name=str(path), path=str(path)))
    return items


@pytest.mark.parametrize("batch_size, workers", [(1, 0), (3, 0), (4, 2), (7, 4), (64, 3)])
def test_order_and_errors_are_kept(corpus, batch_size, workers):
    model = FakeModel()
    results = list(embed_images(loaded(model), corpus, batch_size=batch_size, workers=workers))
    assert [r.name for r in results] == [item.name for item in corpus]
    for i, result in enumerate(results):
        if i % 5 == 3:
            assert result.error == "empty file (0 bytes)" and result.embedding is None
        else:
            expected = np.array([i * 12 / 255, (255 - i * 12) / 255, 7 / 255, 1.0], dtype=np.float32)
            np.testing.assert_allclose(result.embedding, expected / np.linalg.norm(expected), rtol=1e-5)
    assert max(model.batches) <= batch_size and sum(model.batches) == 16


def test_results_stream_before_the_end(corpus):
    stream = embed_images(loaded(FakeModel()), corpus, batch_size=2, workers=2)
    first = next(stream)
    assert first.name == corpus[0].name
    stream.close()  # stops the workers cleanly


def test_decoding_runs_on_worker_threads(corpus, monkeypatch):
    from clipcli import batching

    threads = set()
    real = batching.read_image

    def spy(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(batching, "read_image", spy)
    list(embed_images(loaded(FakeModel()), corpus, batch_size=4, workers=3))
    assert threads and all(name.startswith("clipcli-decode") for name in threads)


def test_a_preprocess_hands_pixels_to_the_workers_and_normalises_each_batch(corpus):
    """Rows, order, errors and thumbnails equal what decoding in this thread gives."""
    model = LoadedModel(FakeModel(), Preprocess(8), "fake", None, torch.device("cpu"), torch.float32)
    inline = list(embed_images(model, corpus, batch_size=3, workers=0, thumbnails=True))
    pooled = list(embed_images(model, corpus, batch_size=3, workers=3, thumbnails=True))
    assert [(r.name, r.error) for r in pooled] == [(r.name, r.error) for r in inline]
    assert all(a.error or np.array_equal(a.embedding, b.embedding) for a, b in zip(inline, pooled))
    expected = Preprocess(8)(Image.open(corpus[0].path)).mean(dim=(1, 2))
    assert np.allclose(inline[0].embedding[:3] / inline[0].embedding[3], expected.numpy())


def test_defaults_follow_the_device():
    from clipcli.batching import default_batch_size, default_workers

    assert default_batch_size(torch.device("cpu")) == 32 and default_batch_size(torch.device("cuda", 0)) == 256
    assert default_workers(torch.device("cpu")) <= 4 <= default_workers(torch.device("cuda", 0)) or os.cpu_count() < 4


def test_out_of_memory_splits_the_batch():
    model = FakeModel(fail_above=2)
    rows = run_batches(model.encode_image, torch.rand(7, 3, 4, 4), normalize=True)
    assert all(isinstance(r, np.ndarray) for r in rows) and len(rows) == 7
    assert max(model.batches) <= 2


def test_out_of_memory_for_one_input_is_that_inputs_error():
    model = FakeModel(fail_above=0)
    reasons = run_batches(model.encode_image, torch.rand(2, 3, 4, 4), normalize=True)
    assert reasons == ["out of memory in the model, even alone"] * 2
    assert [reason.fix for reason in reasons] == ["memory"] * 2  # the CLI: "try --device cpu or a smaller model"


def test_other_model_errors_are_not_hidden():
    def broken(x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        run_batches(broken, torch.rand(2, 3), normalize=True)


def test_non_finite_embeddings_become_errors(tmp_path):
    items = []
    for name, colour in [("red", (255, 0, 0)), ("green", (0, 255, 0))]:
        Image.new("RGB", (4, 4), colour).save(tmp_path / f"{name}.png")
        items.append(Item(name=name, path=str(tmp_path / f"{name}.png")))
    red, green = embed_images(loaded(FakeModel(nan_for_red=True)), items, batch_size=2, workers=0)
    assert red.embedding is None and "non-finite" in red.error
    assert green.ok and np.isfinite(green.embedding).all()


def test_thumbnails_only_when_asked(corpus):
    plain = next(embed_images(loaded(FakeModel()), corpus[:1], workers=0))
    with_thumb = next(embed_images(loaded(FakeModel()), corpus[:1], workers=0, thumbnails=True))
    assert plain.thumbnail is None and with_thumb.thumbnail.size == (8, 8)


def test_texts_are_batched_by_length_and_returned_in_input_order(tiny_vit_checkpoint):
    import clipcli
    from clipcli.batching import embed_texts
    from clipcli.pipeline import load_model

    real = load_model(str(tiny_vit_checkpoint), device="cpu", towers=("text",))
    texts = ["a much longer caption about a dog playing in the park", "cat", "a photo of a cat",
             "dog", "a photo of a small red car parked outside", "", "an astronaut"]
    lengths: list[int] = []
    encode_text = real.model.encode_text

    def recording(tokens, *args, **kwargs):
        lengths.append(int(tokens.argmax(dim=-1).max()))
        return encode_text(tokens, *args, **kwargs)

    real.model.encode_text = recording
    results = embed_texts(real, texts, batch_size=2)
    assert [r.name for r in results] == texts
    assert lengths == sorted(lengths) and len(lengths) == 4
    with torch.no_grad():
        alone = torch.cat([encode_text(clipcli.tokenize([t]), normalize=True) for t in texts])
    np.testing.assert_allclose(np.stack([r.embedding for r in results]), alone.numpy(), atol=1e-6)


def test_slow_precision_is_noted_only_where_it_is_emulated():
    from clipcli.precision import slow_precision_note

    cpu = torch.device("cpu")
    assert slow_precision_note(cpu, torch.float32) is None
    assert slow_precision_note(torch.device("cuda"), torch.bfloat16) is None
    emulated = not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    note = slow_precision_note(cpu, torch.bfloat16)
    assert (note is not None) == emulated
    if emulated:
        assert "bf16" in note and "fp32" in note


@pytest.mark.parametrize("native", [True, False, None])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(native, monkeypatch):
    from clipcli import precision

    monkeypatch.setattr(precision, "native_on_cpu", lambda name: native)
    cpu = torch.device("cpu")
    assert precision.resolve_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert precision.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert precision.resolve_dtype(None, cpu) == torch.float32  # the default stays exact
    with pytest.raises(precision.ClipcliError, match="auto"):
        precision.resolve_dtype("fp8", cpu)


def test_precision_auto_on_the_command_line(tiny_vit_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from clipcli.cli import app

    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 30, 10)).save(image)
    out = tmp_path / "a.npy"
    result = CliRunner().invoke(app, ["encode", str(image), "-m", str(tiny_vit_checkpoint), "--device", "cpu",
                                      "--precision", "AUTO", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (1, 32)
    import typer

    from clipcli.cli.options import fixed_precision_name

    with pytest.raises(typer.BadParameter, match="auto"):  # training's --precision names one
        fixed_precision_name("auto")


def test_threads_sets_torchs_thread_count(tiny_vit_checkpoint):
    from clipcli.errors import ClipcliError
    from clipcli.pipeline import load_model

    before = torch.get_num_threads()
    try:
        load_model(str(tiny_vit_checkpoint), device="cpu", towers=("text",), threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ClipcliError, match="at least 1"):
            load_model(str(tiny_vit_checkpoint), device="cpu", threads=0)
    finally:
        torch.set_num_threads(before)


def test_under_torchrun_cuda_means_this_ranks_gpu(monkeypatch):
    import torch

    from clipcli.pipeline import resolve_device
    from clipcli.topology import Topology, from_environment

    assert from_environment() == Topology()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_environment() == Topology(3, 4, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_always_comes_back_with_an_index(monkeypatch):
    """``torch.cuda.set_device`` refuses a bare ``cuda``; a world of one under torchrun used to pass one."""
    import torch

    from clipcli.pipeline import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ClipcliError, match="only 2 CUDA device"):
        resolve_device("cuda")


def test_slurm_tasks_sharing_a_nodes_gpus_take_their_local_id(monkeypatch):
    import torch

    from clipcli.pipeline import resolve_device

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # --gpus-per-task: its own GPU is cuda:0
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_a_stuck_decoder_fails_its_file_and_the_run_goes_on(corpus, monkeypatch):
    """A decoder that never returns (a hostile file) is left behind after --decode-timeout; its
    file fails with the flag to raise, the others are embedded, and the run ends at once."""
    import time

    from clipcli import batching
    from clipcli.images import DecodeOptions
    from clipcli.messages import hinted

    release = threading.Event()
    real = batching.read_image

    def stuck_on_the_first(item, *args, **kwargs):
        if item.name == corpus[0].name:
            release.wait(30)  # stuck until the test ends
        return real(item, *args, **kwargs)

    monkeypatch.setattr(batching, "read_image", stuck_on_the_first)
    started = time.monotonic()
    try:
        results = list(embed_images(loaded(FakeModel()), corpus, batch_size=4, workers=2,
                                    decode=DecodeOptions(timeout=0.5)))
    finally:
        release.set()
    assert time.monotonic() - started < 10
    assert [r.name for r in results] == [item.name for item in corpus]
    assert results[0].error.startswith("decoding took over 0.5 s")
    assert hinted(results[0].error).endswith("raise --decode-timeout to wait longer")
    assert sum(r.ok for r in results) == 15  # all the others but the four empty files
