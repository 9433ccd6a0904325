"""The training step: accumulation over micro-batches equals one step on the whole batch,
gradient checkpointing changes no gradient, and under two gloo processes (with the local loss
and with accumulation) the step equals one process's.

Tolerances, float32: 1e-6 on every gradient and every parameter after a clipped AdamW step,
and relatively on the loss and the gradient norm (the sigmoid loss is ~180). Measured: one
process, gradients below 4e-8 and parameters below 1e-7; two processes, gradients below 1.2e-7,
parameters below 1.3e-7, loss and norm within 1.5e-7 relatively. Checkpointing recomputes the
same operations (measured difference 0).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from clipcli.train.loss import PairModel
from clipcli.train.model import model_config, new_model
from clipcli.train.step import train_step

CPU = torch.device("cpu")
ARCHS = {  # arch, loss, context length, CLIP's BPE readout (an end token) or SigLIP's (the last position)
    "clip": ("tiny", "contrastive"),
    "siglip": ("siglip-tiny", "sigmoid"),
}


def tiny(arch: str = "tiny", image_encoder: str | None = None, text_encoder: str | None = None, **overrides):
    torch.manual_seed(0)
    return new_model(model_config(arch, overrides, image_encoder, text_encoder)).train()


def batch(model, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images and token ids the model reads: CLIP's end token (the largest id)
    somewhere in each row, zeros after it; SigLIP's rows fill the context."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    images = torch.randn(n, 3, config.image_resolution, config.image_resolution, generator=generator)
    texts = torch.randint(1, 49000, (n, config.context_length), generator=generator)
    if config.text_pool == "argmax":
        texts[:, 8:] = 0
        texts[torch.arange(n), torch.randint(3, 8, (n,), generator=generator)] = 49407
    return images, texts


def step(model, micro_batches, loss: str, grad_clip: float = 1.0, **options) -> dict:
    """One train_step in one process; the loss, gradient norm, gradients and parameters after it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    value, norm = train_step(PairModel(model), model, micro_batches, loss=loss, precision="fp32", device=CPU,
                             world_size=1, optimizer=optimizer, scaler=scaler, grad_clip=grad_clip, **options)
    return {"loss": value, "norm": norm, "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
            "params": {k: p.detach().clone() for k, p in model.named_parameters()}}


def assert_same_step(got: dict, expected: dict, atol: float = 1e-6) -> None:
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert got["norm"] == pytest.approx(expected["norm"], rel=1e-6)
    for kind in ("grads", "params"):
        assert got[kind].keys() == expected[kind].keys()
        worst = max((got[kind][k] - expected[kind][k]).abs().max().item() for k in got[kind])
        assert worst < atol, (kind, worst)


def split(images: torch.Tensor, texts: torch.Tensor, rows: list[int]) -> list[tuple]:
    """The batch cut into micro-batches of ``rows`` rows, in one process (sizes: ``[rows]``)."""
    out, start = [], 0
    for n in rows:
        out.append((images[start : start + n], texts[start : start + n], [n]))
        start += n
    return out


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_accumulated_micro_batches_take_the_step_of_the_whole_batch(family, one_thread):
    """K = 2 and 3 micro-batches (uneven ones too): the same loss, gradients (the temperature's
    and bias's counted once, not K times) and parameters after AdamW as one step on the 12 rows."""
    arch, loss = ARCHS[family]
    images, texts = batch(tiny(arch), 12)
    whole = step(tiny(arch), [(images, texts, [12])], loss)
    for rows in ([6, 6], [4, 4, 4], [5, 7]):
        assert_same_step(step(tiny(arch), split(images, texts, rows), loss), whole)
    # A human check, unclipped: the temperature's gradient is the whole batch's, not K = 3 times it.
    ratio = (step(tiny(arch), split(images, texts, [4, 4, 4]), loss, grad_clip=0)["grads"]["logit_scale"]
             / step(tiny(arch), [(images, texts, [12])], loss, grad_clip=0)["grads"]["logit_scale"])
    assert ratio.item() == pytest.approx(1, abs=1e-3)


def test_one_micro_batch_is_the_plain_step_and_a_single_forward(one_thread):
    """K = 1 runs each tower once (no cached pass); empty micro-batches are left out; the local
    loss in one process is the loss."""
    model = tiny()
    calls = []
    model.visual.register_forward_hook(lambda *_: calls.append(1))
    images, texts = batch(model, 8)
    plain = step(model, [(images, texts, [8])], "contrastive")
    assert len(calls) == 1
    empty = (images[:0], texts[:0], [0])
    assert_same_step(step(tiny(), [empty, (images, texts, [8]), empty], "contrastive", local_loss=True), plain)
    with pytest.raises(ValueError, match="every micro-batch is empty"):
        step(tiny(), [empty], "contrastive")


def test_accumulation_moves_batchnorm_statistics_once_per_micro_batch(one_thread):
    """A ResNet's cached pass puts BatchNorm's running statistics back: after K = 2 they are
    those of two forward passes (one per micro-batch), as K plain steps would leave them."""
    model = tiny(vision_patch_size=None, vision_layers=(1, 1, 1, 1), vision_width=16)
    images, texts = batch(model, 8)
    reference = tiny(vision_patch_size=None, vision_layers=(1, 1, 1, 1), vision_width=16)
    with torch.no_grad():
        reference.visual(images[:4]), reference.visual(images[4:])
    step(model, split(images, texts, [4, 4]), "contrastive")
    for (name, ours), theirs in zip(model.visual.named_buffers(), reference.visual.buffers()):
        assert torch.allclose(ours.float(), theirs.float(), rtol=0, atol=1e-6), name


def test_a_loss_that_is_not_finite_stops_before_any_gradient(one_thread):
    from clipcli.errors import ClipcliError

    model = tiny()
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    images, texts = batch(model, 8)
    for micro_batches in ([(images, texts, [8])], split(images, texts, [4, 4])):
        with pytest.raises(ClipcliError, match="the loss became nan at step 7"):
            step(model, micro_batches, "contrastive", step=7)
        assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- gradient checkpointing


CHECKPOINTED = {  # the model and the first block (ResNet: stage) of each tower's block loop
    "vit": (lambda: tiny(), lambda m: [m.visual.transformer.resblocks[0], m.transformer.resblocks[0]]),
    "resnet": (lambda: tiny(vision_patch_size=None, vision_layers=(1, 1, 1, 1), vision_width=16),
               lambda m: [m.visual.layer1, m.transformer.resblocks[0]]),
    "siglip": (lambda: tiny("siglip-tiny"), lambda m: [m.visual.trunk.blocks[0], m.text.transformer.resblocks[0]]),
    "mixer": (lambda: tiny(image_encoder="mixer", text_encoder="mixer"),
              lambda m: [m.visual.transformer.resblocks[0], m.transformer.resblocks[0]]),
}


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_gradient_checkpointing_recomputes_blocks_and_changes_no_gradient(name, one_thread):
    """Each tower's blocks run again in the backward pass; gradients, the step and BatchNorm's
    running statistics are those without; inference (no gradients, or eval mode) runs once."""
    build, first_blocks = CHECKPOINTED[name]
    loss = "sigmoid" if name == "siglip" else "contrastive"
    plain, recomputed = build(), build()
    recomputed.set_grad_checkpointing()
    runs = {"plain": [0, 0], "recomputed": [0, 0]}  # calls of the image tower's and the text tower's first block
    for key, model in (("plain", plain), ("recomputed", recomputed)):
        for tower, block in enumerate(first_blocks(model)):
            block.register_forward_pre_hook(lambda *_, key=key, tower=tower: runs[key].__setitem__(tower, runs[key][tower] + 1))
    images, texts = batch(plain, 8)
    expected = step(plain, [(images, texts, [8])], loss)
    assert_same_step(step(recomputed, [(images, texts, [8])], loss), expected)
    assert runs == {"plain": [1, 1], "recomputed": [2, 2]}
    # Two models' kernels on two sets of buffers: equal to 1e-6, as assert_same_step compares (the
    # same bits on one CPU here, but a kernel may take another path for another alignment elsewhere).
    for (key, ours), theirs in zip(recomputed.named_buffers(), plain.buffers()):
        assert torch.allclose(ours.float(), theirs.float(), rtol=0, atol=1e-6), key
    runs.update(plain=[0, 0], recomputed=[0, 0])
    with torch.no_grad():
        assert torch.allclose(recomputed.encode_image(images), plain.encode_image(images), rtol=0, atol=1e-6)
    assert torch.allclose(recomputed.eval().encode_text(texts), plain.eval().encode_text(texts), rtol=0, atol=1e-6)
    assert runs == {"plain": [1, 1], "recomputed": [1, 1]}
    recomputed.set_grad_checkpointing(False)
    assert not any(getattr(module, "grad_checkpointing", False) for module in recomputed.modules())


# ----------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# family, local_loss, each micro-batch's rows on rank 0 and rank 1
RANK_CASES = [
    ("clip", True, [[5, 7]]),  # the local loss, uneven shares
    ("clip", False, [[3, 5], [4, 4]]),  # accumulation with the gathered global loss
    ("clip", True, [[0, 6], [4, 2]]),  # both, and a rank whose micro-batch is empty
    ("siglip", False, [[3, 5], [4, 4]]),  # accumulation round the ring
]


def _rank_rows(case: list[list[int]], rank: int) -> list[tuple[int, int, list[int]]]:
    """Where each of this rank's micro-batches lies in the global batch (micro-batch-major)."""
    out, start = [], 0
    for sizes in case:
        out.append((start + sum(sizes[:rank]), sizes[rank], sizes))
        start += sum(sizes)
    return out


def _rank_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = []
    for family, local_loss, case in RANK_CASES:
        arch, loss = ARCHS[family]
        model = tiny(arch)
        images, texts = batch(model, sum(map(sum, case)))
        micro_batches = [(images[s : s + n], texts[s : s + n], sizes) for s, n, sizes in _rank_rows(case, rank)]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.2)
        network = DistributedDataParallel(PairModel(model))
        value, norm = train_step(network, model, micro_batches, loss=loss, precision="fp32", device=CPU, world_size=2,
                                 optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
                                 grad_clip=1.0, local_loss=local_loss)
        results.append({"loss": value, "norm": norm, "grads": {k: p.grad for k, p in model.named_parameters()},
                        "params": {k: p.detach() for k, p in model.named_parameters()}})
    torch.save(results, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two processes: about 10 s
def test_two_gloo_processes_with_local_loss_and_accumulation_equal_one_process(tmp_path, one_thread):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(Path(tmp_path) / f"{rank}.pt", weights_only=True) for rank in range(2)]
    for i, (family, _, case) in enumerate(RANK_CASES):
        arch, loss = ARCHS[family]
        images, texts = batch(tiny(arch), sum(map(sum, case)))
        one = step(tiny(arch), [(images, texts, [len(images)])], loss)
        for rank in range(2):
            assert_same_step(ranks[rank][i], one)
