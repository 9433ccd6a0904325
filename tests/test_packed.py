"""Blocks on oneDNN-packed weights (clipcli.models.packed): equal to the reference packages and
to the plain forward within a stated tolerance, packed only when reused, and never used where
they could be stale (changed weights, gradients, another dtype)."""

from __future__ import annotations

import pytest
import torch
from foreign import features, open_clip_model, save_open_clip
from foreign_siglip import save_transformers, siglip_model

import clipcli
from clipcli.models import packed
from clipcli.models.packed import enable_packing

pytestmark = pytest.mark.skipif(not packed.supported(), reason="this torch has no oneDNN")

TOLERANCE = 1e-5  # packed against plain and against the references: summation order, QuickGELU's scale
TEXTS = ["a photo of a cat", "", "a diagram of the moon landing, drawn in pencil " * 2]


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _images(resolution: int, count: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, resolution, resolution, generator=torch.Generator().manual_seed(count))


def _stacks(model) -> list:
    return [m.packing for m in model.modules() if getattr(m, "packing", None) is not None]


@pytest.mark.parametrize("name", ["quickgelu", "gelu-head80"])
def test_packed_open_clip_models_equal_open_clip(name, tmp_path):
    """QuickGELU (fused as a swish on scaled weights) and the exact GELU, both towers."""
    reference = open_clip_model(name, seed=3)
    model, _ = clipcli.load(save_open_clip(reference, name, tmp_path / name), device="cpu")
    assert enable_packing(model, after=0) == 2
    images, tokens = _images(model.visual.input_resolution), clipcli.tokenize(TEXTS, truncate=True)
    with torch.inference_mode():
        ours = model.encode_image(images), model.encode_text(tokens)
        theirs = reference.encode_image(images), reference.encode_text(tokens)
    assert all(stack.blocks is not None for stack in _stacks(model))  # the packed path ran
    assert _max_diff(ours[0], theirs[0]) <= TOLERANCE and _max_diff(ours[1], theirs[1]) <= TOLERANCE


def test_packed_siglip_equals_transformers(tmp_path):
    """SigLIP's timm-named blocks and GELU's tanh form, both towers (the text tower's last block
    reads one position and stays plain)."""
    reference = siglip_model(seed=4)
    model, _ = clipcli.load(save_transformers(reference, tmp_path / "siglip"), device="cpu")
    assert enable_packing(model, after=0) == 2
    images = _images(model.visual.input_resolution)
    tokens = torch.randint(1, 100, (2, model.context_length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model.encode_image(images), model.encode_text(tokens)
        theirs = features(reference.get_image_features(pixel_values=images)), \
            features(reference.get_text_features(input_ids=tokens))
    assert all(stack.blocks is not None for stack in _stacks(model))
    assert _max_diff(ours[0], theirs[0]) <= TOLERANCE and _max_diff(ours[1], theirs[1]) <= TOLERANCE


@pytest.fixture
def pair(tiny_vit_checkpoint):
    """The same model twice: plain, and packing on reuse."""
    plain, _ = clipcli.load(tiny_vit_checkpoint, device="cpu")
    model, _ = clipcli.load(tiny_vit_checkpoint, device="cpu")
    enable_packing(model)
    return plain, model


def test_packs_on_the_second_run_only(pair):
    plain, model = pair
    x = _images(plain.visual.input_resolution)
    stack = model.visual.transformer.packing
    with torch.inference_mode():
        first = model.encode_image(x)
        assert stack.blocks is None
        assert torch.equal(first, plain.encode_image(x))  # the first run is the plain forward
        second = model.encode_image(x)
        assert stack.blocks is not None
        assert _max_diff(second, first) <= TOLERANCE
        assert model.transformer.packing.blocks is None  # the text tower has not run


def test_changed_weights_are_never_served_from_stale_packs(pair):
    plain, model = pair
    x = _images(plain.visual.input_resolution)
    with torch.inference_mode():
        model.encode_image(x), model.encode_image(x)
    with torch.no_grad():
        for m in (plain, model):
            m.visual.transformer.resblocks[0].mlp.c_fc.weight.mul_(1.5)
    with torch.inference_mode():
        expected = plain.encode_image(x)
        assert _max_diff(model.encode_image(x), expected) <= TOLERANCE  # plain again: the pack is stale
        assert model.visual.transformer.packing.blocks is None
        assert _max_diff(model.encode_image(x), expected) <= TOLERANCE  # repacked from the new weights
        assert model.visual.transformer.packing.blocks is not None
    stack = model.visual.transformer
    model.load_state_dict(plain.state_dict())  # a reload, copied or assigned, is a change too
    assert not all(p.fresh(b.parts()) for p, b in zip(stack.packing.blocks, stack.resblocks))
    with torch.inference_mode():
        model.encode_image(x), model.encode_image(x)
    assert all(p.fresh(b.parts()) for p, b in zip(stack.packing.blocks, stack.resblocks))
    model.load_state_dict({k: v * 2 if k.endswith("c_fc.weight") else v for k, v in plain.state_dict().items()},
                          assign=True)
    with torch.inference_mode():
        assert stack.packing.blocks_for(stack.resblocks, x.new_zeros(1, 5, 64)) is None  # stale: plain again


def test_dtype_round_trips_fused_optimiser_steps_and_hooks_are_seen(pair):
    """``Module.to`` keeps each Parameter and swaps its storage; a fused optimiser step bumps no
    version; a hook watches the plain forward. None of them may meet stale or skipped packs."""
    plain, model = pair
    x = _images(plain.visual.input_resolution)
    stack = model.visual.transformer

    def packed_now():
        with torch.inference_mode():
            model.encode_image(x), model.encode_image(x)
        assert stack.packing.blocks is not None

    packed_now()
    model.bfloat16().float(), plain.bfloat16().float()  # the weights are rounded to bfloat16 and back
    with torch.inference_mode():
        assert torch.equal(model.encode_image(x), plain.encode_image(x))
    packed_now()
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model.encode_image(x).sum().backward()  # a training step: the packs are dropped by its forward
    optimiser.step()
    assert stack.packing.blocks is None
    plain.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert _max_diff(model.encode_image(x), plain.encode_image(x)) == 0
    packed_now()
    seen = []
    handle = stack.resblocks[1].mlp.c_fc.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.inference_mode():
        model.encode_image(x)
    handle.remove()
    assert len(seen) == 1 and stack.packing.blocks is None


def test_adopting_a_tower_keeps_the_others_packs(tiny_vit_checkpoint):
    from clipcli.pipeline import load_model

    loaded = load_model(str(tiny_vit_checkpoint), device="cpu", towers=("image",), pack_after=0)
    loaded.warm_up()
    blocks = loaded.model.visual.transformer.packing.blocks
    loaded.ensure("text")
    assert loaded.model.visual.transformer.packing.blocks is blocks and loaded.model.transformer.packing is not None


def test_replaced_layers_run_as_they_are(pair):
    """A quantized Linear is not a plain one: the stack stays plain, before or after packing."""
    plain, model = pair
    x = _images(plain.visual.input_resolution)
    with torch.inference_mode():
        model.encode_image(x), model.encode_image(x)
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode():
        quantized.encode_image(x), quantized.encode_image(x)
        assert quantized.visual.transformer.packing.blocks is None
    assert model.visual.transformer.packing.blocks is not None  # the original keeps its packs


def test_a_packed_model_copies_and_pickles_without_its_packs(pair, tmp_path):
    import copy

    plain, model = pair
    x = _images(plain.visual.input_resolution)
    with torch.inference_mode():
        model.encode_image(x), model.encode_image(x)
        twin = copy.deepcopy(model)
        assert twin.visual.transformer.packing.blocks is None and twin.visual.transformer.packing.after == 1
        assert _max_diff(twin.encode_image(x), plain.encode_image(x)) <= TOLERANCE
    torch.save(model, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    assert again.visual.transformer.packing.blocks is None


def test_gradients_and_other_dtypes_run_the_plain_forward(pair):
    plain, model = pair
    x = _images(plain.visual.input_resolution)
    with torch.inference_mode():
        model.encode_image(x), model.encode_image(x)
    out = model.encode_image(x)  # gradients on: training goes through the modules, as before
    assert out.requires_grad and torch.equal(out, plain.encode_image(x))
    out.sum().backward()
    assert model.visual.transformer.resblocks[0].mlp.c_fc.weight.grad is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # float32 packs, bfloat16 inputs
        assert _max_diff(model.encode_image(x), plain.encode_image(x)) == 0
    model.double(), plain.double()
    with torch.inference_mode():
        assert torch.equal(model.encode_image(x.double()), plain.encode_image(x.double()))


def test_bfloat16_packs_only_where_the_cpu_computes_it(pair, monkeypatch):
    plain, model = pair
    x = _images(plain.visual.input_resolution)
    with torch.inference_mode():
        exact = plain.encode_image(x, normalize=True)  # float32
    plain.bfloat16(), model.bfloat16()
    x = x.bfloat16()
    monkeypatch.setattr(packed, "native_on_cpu", lambda name: False)
    with torch.inference_mode():
        model.encode_image(x), model.encode_image(x)
    assert model.visual.transformer.packing.blocks is None
    monkeypatch.setattr(packed, "native_on_cpu", lambda name: True)
    with torch.inference_mode():
        model.encode_image(x), model.encode_image(x)
        ours, theirs = model.encode_image(x).float(), plain.encode_image(x).float()
    assert model.visual.transformer.packing.blocks is not None

    def cosine(a):  # to float32's embeddings
        return (torch.nn.functional.normalize(a, dim=-1) * exact).sum(-1).min().item()

    assert cosine(ours) >= min(0.995, cosine(theirs) - 0.002)  # bfloat16 rounds either way, alike


def test_without_onednn_nothing_is_enabled(tiny_vit_checkpoint, monkeypatch):
    model, _ = clipcli.load(tiny_vit_checkpoint, device="cpu")
    monkeypatch.setattr(packed, "_probe", lambda dtype: False)  # a build whose packed products fail
    assert enable_packing(model) == 0 and _stacks(model) == []
    monkeypatch.undo()
    with torch.backends.mkldnn.flags(enabled=False):  # switched off by the user
        assert enable_packing(model) == 0


def test_a_stack_that_fails_to_pack_stays_plain(pair, monkeypatch):
    plain, model = pair
    x = _images(plain.visual.input_resolution)

    def refuse(weight):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(packed, "_reorder", refuse)
    with torch.inference_mode():
        model.encode_image(x)
        assert torch.equal(model.encode_image(x), plain.encode_image(x))
    assert model.visual.transformer.packing.failed


def test_siglips_text_tower_packs_all_but_its_read_out_block(tmp_path):
    model, _ = clipcli.load(save_transformers(siglip_model(seed=5), tmp_path / "siglip"), device="cpu")
    enable_packing(model, after=0)
    tokens = torch.randint(1, 100, (2, model.context_length), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model.encode_text(tokens)
    stack = model.text.transformer
    assert len(stack.packing.blocks) == len(stack.resblocks) - 1


def test_commands_pack_on_reuse_bulk_writers_never_and_a_server_from_the_start(tiny_vit_checkpoint):
    from clipcli.batching import embed_texts
    from clipcli.pipeline import load_model

    loaded = load_model(str(tiny_vit_checkpoint), device="cpu", towers=("image",))
    stack = loaded.model.visual.transformer.packing
    assert stack is not None and stack.after == 1
    loaded.ensure("text")  # a tower adopted later packs too
    assert loaded.model.transformer.packing is not None
    embed_texts(loaded, ["a cat"])
    assert loaded.model.transformer.packing.blocks is None  # one run: never packed
    embed_texts(loaded, ["a cat"])
    assert loaded.model.transformer.packing.blocks is not None  # reused: packed
    loaded.disable_packing()  # what writes embeddings in bulk asks (tasks.encode, partitions, the index)
    assert loaded.model.transformer.packing is None and loaded.model.visual.transformer.packing is None
    loaded.ensure("text")
    assert loaded.model.transformer.packing is None  # and stays so
    warm = load_model(str(tiny_vit_checkpoint), device="cpu", pack_after=0)
    warm.warm_up()  # as the server does before its first request
    assert warm.model.transformer.packing.blocks is not None
    assert warm.model.visual.transformer.packing.blocks is not None
    assert load_model(str(tiny_vit_checkpoint), device="cpu", pack_after=None).model.transformer.packing is None
