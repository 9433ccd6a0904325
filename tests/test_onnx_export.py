"""`clipcli convert MODEL NAME.onnx`: both towers as ONNX graphs, run under onnxruntime.

Tiny random models (CLIP ViT and ResNet, a CLIP read out at a chosen end token, Mixer towers,
SigLIP) are exported through the library and the CLI, run at batch 1 and 3 (one graph, a dynamic
batch) and compared with clipcli's own ``encode_image``/``encode_text`` to 1e-4 (measured: below
3e-7). onnxruntime is test-only; without it (or without onnx) these tests skip.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from foreign import randomize
from tiny_hub_repos import tiny_unigram_tokenizer
from typer.testing import CliRunner

import clipcli
from clipcli.cli import app
from clipcli.models import onnx_export
from clipcli.models.config import METADATA_KEY, CLIPConfig, config_to_json
from clipcli.models.factory import create_model
from clipcli.models.onnx_export import OnnxFiles, export_onnx

TOLERANCE = 1e-4
runner = CliRunner()

CLIP_VIT = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                      context_length=77, vocab_size=1000, transformer_width=64, transformer_heads=2,
                      transformer_layers=2)
SIGLIP = CLIPConfig(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                    context_length=16, vocab_size=1000, transformer_width=64, transformer_heads=2,
                    transformer_layers=2, activation="gelu_tanh", family="siglip", text_pool="last",
                    logit_bias=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                    interpolation="bilinear", resize_mode="squash")
CONFIGS = {
    "clip-vit": CLIP_VIT,
    "clip-resnet": replace(CLIP_VIT, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=32,
                           vision_patch_size=None),
    "clip-eos-gelu": replace(CLIP_VIT, text_pool="eos", eos_id=2, activation="gelu"),  # MetaCLIP 2's readout
    "clip-mixer": replace(CLIP_VIT, vision_mixer=True, text_mixer=True),
    "siglip": SIGLIP,
}


@pytest.fixture
def ort():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


def tiny_model(config: CLIPConfig, seed: int = 0) -> torch.nn.Module:
    model = randomize(create_model(config, initialize=False), seed)
    if model.logit_bias is not None:
        with torch.no_grad():
            model.logit_bias.fill_(-3.0)
    return model


def save_clipcli_file(model: torch.nn.Module, path: Path) -> Path:
    """``model`` as the safetensors file ``clipcli convert`` writes (its config in the metadata)."""
    from clipcli.checkpoint import write_safetensors

    write_safetensors(model.state_dict(), path, {"format": "pt", METADATA_KEY: config_to_json(model.config)})
    return path


def inputs(config: CLIPConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images, and token ids ending at a different position in each row (0-padded after it)."""
    generator = torch.Generator().manual_seed(seed)
    size = config.image_resolution
    images = torch.randn(batch, 3, size, size, generator=generator)
    ids = torch.randint(3, config.vocab_size - 1, (batch, config.context_length), generator=generator)
    for row in range(batch):
        end = 3 + 4 * row
        ids[row, end] = config.vocab_size - 1 if config.text_pool == "argmax" else (config.eos_id or 0)
        ids[row, end + 1:] = 0
    return images, ids


def run_graphs(ort, files: OnnxFiles, images: torch.Tensor, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    visual = ort.InferenceSession(str(files.visual), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(files.text), providers=["CPUExecutionProvider"])
    return (visual.run(["image_embeds"], {"pixels": images.numpy()})[0],
            text.run(["text_embeds"], {"input_ids": ids.numpy()})[0])


def assert_parity(ort, model, files: OnnxFiles, batches=(1, 3)) -> None:
    for batch in batches:
        images, ids = inputs(model.config, batch, seed=batch)
        with torch.no_grad():
            expected_image = model.encode_image(images, normalize=True).numpy()
            expected_text = model.encode_text(ids, normalize=True).numpy()
        image_embeds, text_embeds = run_graphs(ort, files, images, ids)
        assert image_embeds.shape == (batch, model.config.embed_dim) and text_embeds.shape == expected_text.shape
        assert np.abs(image_embeds - expected_image).max() < TOLERANCE
        assert np.abs(text_embeds - expected_text).max() < TOLERANCE
        assert np.allclose(np.linalg.norm(text_embeds, axis=-1), 1, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_kind_of_tower_matches_clipcli_at_batch_1_and_3(ort, name, tmp_path):
    model = tiny_model(CONFIGS[name])
    (tmp_path / "out").mkdir()
    written = export_onnx(model, tmp_path / "out" / f"{name}.onnx")
    files = OnnxFiles.of(tmp_path / "out" / f"{name}.onnx")
    assert written == [files.visual, files.text, files.sidecar]
    assert sorted(p.name for p in files.visual.parent.iterdir()) == sorted(p.name for p in written)  # no temporary
    assert_parity(ort, model, files)


def test_only_the_batch_axis_is_dynamic(ort, tmp_path):
    import onnx

    export_onnx(tiny_model(CLIP_VIT), tmp_path / "m.onnx")
    files = OnnxFiles.of(tmp_path / "m.onnx")

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    visual, text = onnx.load(str(files.visual)), onnx.load(str(files.text))
    assert dims(visual.graph.input[0]) == ["batch", 3, 32, 32] and dims(visual.graph.output[0]) == ["batch", 32]
    assert dims(text.graph.input[0]) == ["batch", 77] and dims(text.graph.output[0]) == ["batch", 32]
    assert text.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert {o.version for o in visual.opset_import if o.domain in ("", "ai.onnx")} == {onnx_export.OPSET}


def test_cli_writes_the_three_files_and_a_sidecar_that_describes_them(ort, tiny_vit_checkpoint, tmp_path):
    dst = tmp_path / "vit.onnx"
    result = runner.invoke(app, ["convert", str(tiny_vit_checkpoint), str(dst)])
    assert result.exit_code == 0, result.stderr
    files = OnnxFiles.of(dst)
    assert result.stdout.splitlines() == [str(files.visual), str(files.text), str(files.sidecar)]
    assert result.stderr.splitlines()[-1].startswith(
        f"exported {tiny_vit_checkpoint} -> vit.visual.onnx, vit.text.onnx, vit.json (opset {onnx_export.OPSET}, "
        "float32, ")
    assert not dst.exists()
    model, _ = clipcli.load(tiny_vit_checkpoint, device="cpu", dtype=torch.float32)
    assert_parity(ort, model, files)
    # Real tokens: each row's end token at another position.
    ids = clipcli.tokenize(["a cat", "a photo of a dog on a skateboard", "x"])
    with torch.no_grad():
        expected = model.encode_text(ids, normalize=True).numpy()
    assert np.abs(run_graphs(ort, files, torch.zeros(1, 3, 32, 32), ids)[1] - expected).max() < TOLERANCE

    sidecar = json.loads(files.sidecar.read_text())
    assert sidecar["image"] == {"file": "vit.visual.onnx", "input": "pixels", "output": "image_embeds", "size": 32,
                                "mean": list(model.config.image_mean), "std": list(model.config.image_std),
                                "interpolation": "bicubic", "resize_mode": "shortest"}
    assert sidecar["text"]["file"] == "vit.text.onnx" and sidecar["text"]["context_length"] == 77
    assert sidecar["text"]["tokenizer"] == "clip" and sidecar["text"]["readout"] == "argmax"
    assert sidecar["normalized"] is True and sidecar["score"] == "softmax" and sidecar["logit_bias"] is None
    assert math.isclose(sidecar["logit_scale"], model.logit_scale.exp().item(), rel_tol=1e-6)
    assert sidecar["opset"] == onnx_export.OPSET and sidecar["source"] == str(tiny_vit_checkpoint)


def test_a_siglip_exports_with_its_sigmoid_scores(ort, tmp_path):
    model = tiny_model(SIGLIP, seed=3)
    source = save_clipcli_file(model, tmp_path / "siglip.safetensors")
    result = runner.invoke(app, ["convert", str(source), str(tmp_path / "siglip.onnx"), "--dtype", "float32", "-q"])
    assert result.exit_code == 0 and result.stderr == ""
    files = OnnxFiles.of(tmp_path / "siglip.onnx")
    loaded, _ = clipcli.load(source, device="cpu")
    assert_parity(ort, loaded, files)

    sidecar = json.loads(files.sidecar.read_text())
    assert sidecar["score"] == "sigmoid" and sidecar["family"] == "siglip" and sidecar["text"]["readout"] == "last"
    assert sidecar["logit_bias"] == pytest.approx(-3.0)
    assert sidecar["image"]["mean"] == [0.5, 0.5, 0.5] and sidecar["image"]["resize_mode"] == "squash"
    # What a runtime does with the sidecar gives the model's own probabilities.
    images, ids = inputs(SIGLIP, 2)
    image_embeds, text_embeds = run_graphs(ort, files, images, ids)
    logits = sidecar["logit_scale"] * image_embeds @ text_embeds.T + sidecar["logit_bias"]
    with torch.no_grad():
        expected = loaded(images, ids)[0].sigmoid().numpy()
    assert np.abs(1 / (1 + np.exp(-logits)) - expected).max() < TOLERANCE


def test_a_model_with_its_own_tokenizer_gets_it_beside_the_graphs(ort, tmp_path):
    pytest.importorskip("tokenizers")
    config = replace(SIGLIP, tokenizer="sentencepiece", text_clean="canonicalize")
    source = tmp_path / "src"
    source.mkdir()
    save_clipcli_file(tiny_model(config, seed=4), source / "siglip.safetensors")
    tiny_unigram_tokenizer(source)
    result = runner.invoke(app, ["convert", str(source / "siglip.safetensors"), str(tmp_path / "out" / "s.onnx")])
    assert result.exit_code == 0, result.stderr
    assert "its tokenizer beside it (tokenizer.json, tokenizer_config.json)" in result.stderr
    sidecar = json.loads((tmp_path / "out" / "s.json").read_text())
    assert sidecar["text"]["tokenizer"] == "sentencepiece"
    assert sidecar["text"]["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    for name in sidecar["text"]["tokenizer_files"]:
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes()
    # The model's own tokens, read out by the graph as the model reads them.
    model, _ = clipcli.load(source / "siglip.safetensors", device="cpu")
    ids = clipcli.tokenize(["A cat!", "a"], model=model)
    assert ids[0, :3].tolist() == [30, 31, 1]
    with torch.no_grad():
        expected = model.encode_text(ids, normalize=True).numpy()
    _, text_embeds = run_graphs(ort, OnnxFiles.of(tmp_path / "out" / "s.onnx"), torch.zeros(1, 3, 32, 32), ids)
    assert np.abs(text_embeds - expected).max() < TOLERANCE


def test_a_tower_past_the_size_limit_keeps_its_weights_in_one_data_file(ort, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    model = tiny_model(CLIP_VIT)
    folder = tmp_path / "out"
    folder.mkdir()
    written = export_onnx(model, folder / "big.onnx")
    assert [p.name for p in written] == ["big.visual.onnx", "big.visual.onnx.data", "big.text.onnx",
                                         "big.text.onnx.data", "big.json"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in written)
    assert (folder / "big.visual.onnx").stat().st_size < (folder / "big.visual.onnx.data").stat().st_size
    assert_parity(ort, model, OnnxFiles.of(folder / "big.onnx"), batches=(3,))


# --------------------------------------------------------------------------- refusals

def invoke(*args) -> "object":
    return runner.invoke(app, ["convert", *map(str, args)])


def test_without_the_onnx_package_the_extra_is_named_and_nothing_is_loaded(tiny_vit_checkpoint, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    monkeypatch.setattr("clipcli.loading.load", lambda *a, **k: pytest.fail("the model was loaded"))
    result = invoke(tiny_vit_checkpoint, tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert result.stderr == 'error: writing ONNX needs the onnx package: pip install "clipcli[onnx]"\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


@pytest.mark.parametrize("dtype", ["float16", "bf16"])
def test_an_onnx_export_is_float32_only(tiny_vit_checkpoint, tmp_path, dtype):
    result = invoke(tiny_vit_checkpoint, tmp_path / "m.onnx", "--dtype", dtype)
    canonical = "bfloat16" if dtype == "bf16" else dtype
    assert result.exit_code == 2
    assert result.stderr == f"error: --dtype '{canonical}': an ONNX export is float32 only\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_existing_files_are_kept_unless_overwrite(ort, tiny_vit_checkpoint, tmp_path):
    sidecar = tmp_path / "m.json"
    sidecar.write_text("keep me")
    result = invoke(tiny_vit_checkpoint, tmp_path / "m.onnx")
    assert result.exit_code == 2 and result.stderr == f"error: {sidecar} already exists; pass --overwrite to replace it\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "m.json"] and sidecar.read_text() == "keep me"
    assert invoke(tiny_vit_checkpoint, tmp_path / "m.onnx", "--overwrite").exit_code == 0
    assert json.loads(sidecar.read_text())["format"] == "clipcli-onnx"


def test_other_suffixes_are_refused(tiny_vit_checkpoint, tmp_path):
    result = invoke(tiny_vit_checkpoint, tmp_path / "m.pt")
    assert result.exit_code == 2 and "m.pt must end in .safetensors or .onnx" in result.stderr


def test_a_model_with_one_tower_is_refused(ort, tmp_path):
    from clipcli.errors import InputError

    model = tiny_model(CLIP_VIT)
    model.drop_tower("text")
    with pytest.raises(InputError, match="needs both towers"):
        export_onnx(model, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_an_operator_the_exporter_cannot_write_is_one_line_and_leaves_nothing(ort, tmp_path, monkeypatch):
    from clipcli.errors import OutputError

    def refuse(*args, **kwargs):
        raise torch.onnx.errors.UnsupportedOperatorError("aten::fancy", 17, "")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(OutputError, match=r"^cannot export the image tower to ONNX: .*aten::fancy"):
        export_onnx(tiny_model(CLIP_VIT), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
