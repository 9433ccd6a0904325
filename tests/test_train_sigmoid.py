"""Training with SigLIP's sigmoid loss: the loss against open_clip's ``SigLipLoss``, its
distributed form against one process, runs that learn and save a logit bias, SigLIP presets
and checkpoints, and the refusals.

Tolerances: the loss and its gradients equal open_clip's to 1e-6 in float32 (the same
operations in the same order; measured differences 0); the distributed form equals one
process to 1e-12 in float64 (measured below 4e-16).
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.models.clip import CLIPConfig
from clipcli.models.factory import create_model
from clipcli.train import shapes
from clipcli.train.loss import sigmoid_loss, sigmoid_loss_part
from clipcli.train.model import FROZEN_NEVER, apply_freeze, save_checkpoint

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
runner = CliRunner()


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return shapes.make_dataset(tmp_path_factory.mktemp("shapes"), train=64, test=24, seed=0)


@pytest.fixture
def pairs(shapes_data, tmp_path) -> Path:
    """32 training pairs of the shapes set, as a CSV with absolute paths."""
    lines = (shapes_data / "train.csv").read_text().splitlines()[:33]
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(lines).replace("train/", str(shapes_data / "train") + "/") + "\n")
    return path


def train_cli(*args: str) -> str:
    result = runner.invoke(app, ["train", "--workers", "0", "--quiet", "--device", "cpu", *args])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout.strip()


def train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def features(n: int, dim: int = 16, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator, dtype=dtype), dim=-1)
    text = torch.nn.functional.normalize(image + 0.8 * torch.randn(n, dim, generator=generator, dtype=dtype), dim=-1)
    return image, text


# ----------------------------------------------------------------------------- the loss


def test_sigmoid_loss_and_gradients_equal_open_clips_siglip_loss():
    from open_clip.loss import SigLipLoss

    results = []
    for loss in (sigmoid_loss, SigLipLoss()):
        image, text = (t.clone().requires_grad_() for t in features(12))
        logit_scale = torch.tensor(math.log(7.3), requires_grad=True)  # not SigLIP's start: no saturated terms
        logit_bias = torch.tensor(-3.1, requires_grad=True)
        value = loss(image, text, logit_scale.exp(), logit_bias)
        value.backward()
        results.append([value.detach(), image.grad, text.grad, logit_scale.grad, logit_bias.grad])
    for ours, theirs, what in zip(*results, ("loss", "image grad", "text grad", "scale grad", "bias grad")):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), what
    # One process: the part of the only rank is the whole loss.
    image, text = features(12)
    assert torch.equal(sigmoid_loss_part(image, text, torch.tensor(7.3), torch.tensor(-3.1), [12]),
                       sigmoid_loss(image, text, torch.tensor(7.3), torch.tensor(-3.1)))
    # A human check: matching pairs cost less than shuffled ones; at SigLIP's start (scale 10,
    # bias -10) each of the N^2 - N negatives costs about e^-10 and each positive about 10.
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    assert sigmoid_loss(image, text, scale, bias) < sigmoid_loss(image, text[torch.randperm(12)], scale, bias)
    orthogonal = torch.eye(12)
    assert sigmoid_loss(orthogonal, orthogonal, scale, bias).item() == pytest.approx(math.log(2) + 11 * 4.54e-5, rel=1e-3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CASES = ([5, 3], [0, 8], [4, 4])  # uneven shares, a rank whose images were all unreadable, even shares


def _rank_worker(rank: int, port: int, out: str, oracle: bool) -> None:
    """One of 2 gloo ranks: its share of each case's features, its part of the loss scaled by
    the world size (as the training loop back-propagates it), and its gradients."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = []
    for sizes in CASES:
        image, text = features(sum(sizes), dtype=torch.float64)
        start = sum(sizes[:rank])
        image, text = (t[start : start + sizes[rank]].clone().requires_grad_() for t in (image, text))
        scale = torch.tensor(7.3, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-3.1, dtype=torch.float64, requires_grad=True)
        part = sigmoid_loss_part(image, text, scale, bias, sizes)
        (part * 2).backward()
        result = {"part": part.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad, "bias": bias.grad}
        if oracle and sizes[0] == sizes[1]:  # open_clip's own neighbour exchange, on the same shares
            from open_clip.loss import SigLipLoss

            image, text = (t.detach().clone().requires_grad_() for t in (image, text))
            theirs = SigLipLoss(rank=rank, world_size=2)(image, text, scale.detach(), bias.detach())
            theirs.backward()
            result["open_clip"] = {"loss": theirs.detach(), "image": image.grad, "text": text.grad}
        results.append(result)
    torch.save(results, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def _two_ranks(tmp_path: Path, oracle: bool) -> list[list[dict]]:
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path), oracle), nprocs=2)
    return [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.slow  # two processes: with the whole training runs in `pytest -m slow`
def test_two_gloo_processes_passing_captions_round_the_ring_equal_one_process(tmp_path):
    """Each rank's part, its images against both ranks' captions, sums to the loss of one
    process on the whole batch; DDP's average of the ranks' (doubled) gradients is its gradient."""
    ranks = _two_ranks(tmp_path, oracle=False)
    for case, sizes in enumerate(CASES):
        image, text = (t.requires_grad_() for t in features(sum(sizes), dtype=torch.float64))
        scale = torch.tensor(7.3, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-3.1, dtype=torch.float64, requires_grad=True)
        whole = sigmoid_loss(image, text, scale, bias)
        whole.backward()
        parts = [ranks[rank][case] for rank in range(2)]
        assert sum(p["part"] for p in parts).item() == pytest.approx(whole.item(), abs=1e-12), sizes
        for name, expected in (("image", image.grad), ("text", text.grad)):
            got = torch.cat([p[name] for p in parts]) / 2  # DDP averages over the 2 ranks
            assert torch.allclose(got, expected, rtol=0, atol=1e-12), (sizes, name)
        for name, expected in (("scale", scale.grad), ("bias", bias.grad)):
            assert (sum(p[name] for p in parts) / 2).item() == pytest.approx(expected.item(), abs=1e-12), (sizes, name)


@pytest.mark.slow
def test_each_ranks_part_equals_open_clips_distributed_siglip_loss(tmp_path):
    """With even shares open_clip's per-rank loss (divided by the rank's own batch) is our
    part times the world size, and so are the gradients of each rank's features."""
    ranks = _two_ranks(tmp_path, oracle=True)
    case = CASES.index([4, 4])
    for rank in range(2):
        ours, theirs = ranks[rank][case], ranks[rank][case]["open_clip"]
        assert (2 * ours["part"]).item() == pytest.approx(theirs["loss"].item(), abs=1e-12)
        assert torch.allclose(ours["image"], theirs["image"], rtol=0, atol=1e-12)
        assert torch.allclose(ours["text"], theirs["text"], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- runs


def test_a_sigmoid_run_learns_and_saves_its_logit_bias(pairs, tmp_path, one_thread):
    import clipcli
    from clipcli.models.config import METADATA_KEY, config_from_json, safetensors_metadata

    run = tmp_path / "run"
    checkpoint = train_cli("--train-data", str(pairs), "--arch", "tiny", "--vision-layers", "1", "--text-layers", "1",
                           "--loss", "sigmoid", "--epochs", "4", "--batch-size", "16", "--lr", "1e-3", "--warmup", "2",
                           "--log-every", "1", "-o", str(run))
    records = train_records(run)
    assert len(records) == 8 and records[-1]["loss"] < records[0]["loss"]
    assert records[0]["logit_bias"] == pytest.approx(-10, abs=0.01) and records[0]["logit_scale"] == pytest.approx(10, abs=0.1)
    assert json.loads((run / "config.json").read_text())["train"]["loss"] == "sigmoid"
    assert config_from_json(safetensors_metadata(checkpoint)[METADATA_KEY]).logit_bias
    model, _ = clipcli.load(checkpoint, device="cpu")
    assert model.score_kind == "sigmoid"
    assert model.logit_bias.item() == pytest.approx(records[-1]["logit_bias"], abs=1e-6)

    # --resume goes on with the run's loss without being told; another loss is refused.
    result = runner.invoke(app, ["train", "--train-data", str(pairs), "--resume", "--loss", "contrastive",
                                 "--epochs", "5", "--batch-size", "16", "-o", str(run)])
    assert result.exit_code == 2 and "--loss 'contrastive' cannot train" in result.stderr, (result.stderr, (run / "config.json").read_text())
    train_cli("--train-data", str(pairs), "--resume", "--epochs", "5", "--batch-size", "16", "--log-every", "1", "-o", str(run))
    assert [r["step"] for r in train_records(run)] == list(range(1, 11)) and "logit_bias" in train_records(run)[-1]


def test_a_clip_checkpoint_fine_tuned_with_the_sigmoid_loss_gains_a_logit_bias(tiny_vit_checkpoint, pairs, tmp_path, one_thread):
    import clipcli
    from clipcli.checkpoint import read_state_dict

    result = runner.invoke(app, ["train", "--workers", "0", "--device", "cpu", "--train-data", str(pairs),
                                 "--init", str(tiny_vit_checkpoint), "--loss", "sigmoid", "--lock-image", "--epochs", "1",
                                 "--batch-size", "16", "--lr", "1e-3", "--warmup", "1", "--log-every", "1",
                                 "-o", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.stderr
    assert "has no logit bias: the sigmoid loss adds one at -10 and restarts its scale at 10" in result.stderr
    before = read_state_dict(tiny_vit_checkpoint, dtype=torch.float32)
    model, _ = clipcli.load(result.stdout.strip(), device="cpu")
    after = model.state_dict()
    assert set(after) == set(before) - {"input_resolution", "context_length", "vocab_size"} | {"logit_bias"}
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("visual."))
    assert not torch.equal(before["text_projection"], after["text_projection"])
    assert -10 < after["logit_bias"].item() < -9.9  # trained, though the image side is locked
    assert train_records(tmp_path / "ft")[0]["logit_scale"] == pytest.approx(10, abs=0.1)


def test_towers_freeze_by_parameter_name_for_either_family():
    """CLIP's text side is everything but ``visual.``; SigLIP's is ``text.``; the temperature
    and bias train whichever tower is frozen."""

    class Named(torch.nn.Module):
        def __init__(self, names):
            super().__init__()
            for name in names:
                owner = self
                *path, leaf = name.split(".")
                for part in path:
                    if not hasattr(owner, part):
                        owner.add_module(part, torch.nn.Module())
                    owner = getattr(owner, part)
                owner.register_parameter(leaf, torch.nn.Parameter(torch.zeros(2)))

    siglip = ["visual.trunk.patch_embed.proj.weight", "visual.trunk.attn_pool.latent", "text.token_embedding.weight",
              "text.transformer.resblocks.0.attn.in_proj_weight", "text.text_projection.weight", "logit_scale", "logit_bias"]
    clip = ["visual.conv1.weight", "token_embedding.weight", "transformer.resblocks.0.attn.in_proj_weight",
            "text_projection", "logit_scale", "logit_bias"]
    for names in (siglip, clip):
        for freeze in ("image", "text"):
            model = Named(names)
            apply_freeze(model, freeze)
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            image_side = {n for n in names if n.startswith("visual.")}
            text_side = set(names) - image_side - set(FROZEN_NEVER)
            assert trained == (text_side if freeze == "image" else image_side) | set(FROZEN_NEVER), (names, freeze)


@pytest.mark.parametrize("args, message", [
    (["--arch", "siglip-tiny", "--loss", "contrastive"],
     "--loss 'contrastive' cannot train preset siglip-tiny: it has a logit bias"),
    (["--arch", "siglip-tiny", "--image-encoder", "mixer"], "--image-encoder mixer is not a SigLIP image encoder"),
    (["--arch", "siglip-tiny", "--text-encoder", "mixer"], "--text-encoder mixer is not a SigLIP text encoder"),
    (["--arch", "siglip-tiny", "--embed-dim", "32"], "--embed-dim 32 differs from the vision width 64"),
])
def test_refusals_are_one_line(pairs, tmp_path, args, message):
    result = runner.invoke(app, ["train", "--train-data", str(pairs), "--batch-size", "8", *args, "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_model_with_a_logit_bias_is_refused_the_contrastive_loss(pairs, tmp_path):
    from clipcli.models.config import METADATA_KEY

    path = tmp_path / "bias.safetensors"
    model = create_model(CLIPConfig(**TINY, logit_bias=True))
    save_checkpoint(model, path, {METADATA_KEY: model.config})
    result = runner.invoke(app, ["train", "--train-data", str(pairs), "--init", str(path), "--loss", "contrastive",
                                 "--batch-size", "8", "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: --loss 'contrastive' cannot train {path}: it has a logit bias")
    # A contrastive run resumed with the sigmoid loss is refused too (its optimiser has no bias).
    train_cli("--train-data", str(pairs), "--vision-layers", "1", "--text-layers", "1", "--epochs", "1",
              "--batch-size", "16", "-o", str(tmp_path / "clip"))
    result = runner.invoke(app, ["train", "--train-data", str(pairs), "--resume", "--loss", "sigmoid", "--epochs", "2",
                                 "--batch-size", "16", "-o", str(tmp_path / "clip")])
    assert result.exit_code == 2
    assert "--loss 'sigmoid': the run in" in result.stderr and "trains with the contrastive loss" in result.stderr


# ----------------------------------------------------------------------------- SigLIP models


def test_siglip_presets_train_with_the_sigmoid_loss_and_fine_tune_with_a_locked_image_tower(pairs, tmp_path, one_thread):
    """A siglip-tiny from scratch (the sigmoid loss by default), then fine-tuned from its
    checkpoint with the image tower locked: ``visual.`` weights stay, ``text.`` ones move."""
    pytest.importorskip("clipcli.models.siglip")
    pytest.importorskip("clipcli.text.tokenizers")  # loading gives every model its tokenizer
    from safetensors.torch import load_file

    import clipcli

    scratch = tmp_path / "scratch"
    checkpoint = train_cli("--train-data", str(pairs), "--arch", "siglip-tiny", "--epochs", "2", "--batch-size", "16",
                           "--lr", "1e-3", "--warmup", "2", "--log-every", "1", "-o", str(scratch))
    config = json.loads((scratch / "config.json").read_text())
    assert config["train"]["loss"] == "sigmoid" and config["model"]["family"] == "siglip"
    records = train_records(scratch)
    assert records[-1]["loss"] < records[0]["loss"] and "logit_bias" in records[-1]
    model, _ = clipcli.load(checkpoint, device="cpu")
    assert model.config.family == "siglip" and model.score_kind == "sigmoid"

    tuned = train_cli("--train-data", str(pairs), "--init", checkpoint, "--lock-image", "--epochs", "1",
                      "--batch-size", "16", "--lr", "1e-3", "--warmup", "1", "-o", str(tmp_path / "tuned"))
    before, after = load_file(checkpoint), load_file(tuned)
    assert before.keys() == after.keys() and any(k.startswith("text.") for k in after)
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("visual."))
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("text."))
    assert not torch.equal(before["logit_bias"], after["logit_bias"])


def _tiny_piece_tokenizer(path: Path) -> Path:
    """A Unigram ``tokenizer.json`` of the shapes captions' words (T5's layout: ``</s>`` after
    the ids, ``<pad>`` 0), written with the ``tokenizers`` package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = "a red green blue yellow circle square triangle photo of small big on noisy background".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -2.0) for w in words]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(path))
    return path


def test_a_siglip_with_its_own_tokenizer_fine_tunes_and_keeps_the_tokenizer_beside_its_checkpoint(pairs, tmp_path, one_thread):
    """Captions go through the model's own SentencePiece vocabulary (CLIP's BPE ids, up to
    49407, would not even fit its 48-id embedding), and the run folder gets its tokenizer
    files, so the fine-tuned checkpoint loads with them."""
    pytest.importorskip("clipcli.models.siglip")
    pytest.importorskip("clipcli.text.tokenizers")
    from dataclasses import replace

    import clipcli
    from clipcli.models.config import METADATA_KEY
    from clipcli.train.model import model_config

    base = tmp_path / "base"
    base.mkdir()
    _tiny_piece_tokenizer(base / "tokenizer.json")
    config = replace(model_config("siglip-tiny", {"vision_layers": 1, "transformer_layers": 1}, None, None),
                     tokenizer="sentencepiece", text_clean="canonicalize", vocab_size=48, context_length=16)
    model = create_model(config)
    save_checkpoint(model, base / "model.safetensors", {METADATA_KEY: config})

    run = tmp_path / "run"
    checkpoint = train_cli("--train-data", str(pairs), "--init", str(base / "model.safetensors"), "--epochs", "1",
                           "--batch-size", "16", "--lr", "1e-3", "--warmup", "1", "--log-every", "1", "-o", str(run))
    assert (run / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert json.loads((run / "config.json").read_text())["train"]["loss"] == "sigmoid"
    tuned, _ = clipcli.load(checkpoint, device="cpu")
    assert tuned.config.tokenizer == "sentencepiece"
    ids, _ = tuned.tokenizer.encode_texts(["a photo of a small red circle."], context_length=16)
    assert ids[0, :8].tolist() == [3, 11, 12, 3, 13, 4, 8, 1] and ids[0, 8:].eq(0).all()  # "▁a ▁photo ... </s>", <pad>
