"""MetaCLIP 2 ("worldwide"): CLIP's towers with their own tokenizer's vocabulary, the text read
out at the first end token. transformers ``MetaClip2Model`` and open_clip's worldwide configs
into ours, with parity to 1e-4 and malformed configs."""

from __future__ import annotations

import json

import pytest
import torch
from foreign import features, randomize
from foreign_siglip import metaclip_2_model

from clipcli.errors import CheckpointError
from clipcli.models import convert
from clipcli.models.factory import build_model

TOLERANCE = 1e-4
CONTEXT = 24


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _ids(eos_id: int, vocab: int) -> torch.Tensor:
    """Rows with the end token at different places, a second one after it (the readout is at the
    first), and padding ids after it; no other position holds ``eos_id``."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (4, CONTEXT), generator=generator)
    ids[ids == eos_id] = (eos_id + 1) % vocab
    for row, (first, second) in enumerate([(3, 9), (10, 11), (CONTEXT - 1, None), (0, 20)]):
        ids[row, first] = eos_id
        if second is not None:
            ids[row, second] = eos_id
    return ids


def _config_json(model, tmp_path) -> dict:
    model.save_pretrained(str(tmp_path / "m"))
    return json.loads((tmp_path / "m" / "config.json").read_text())


@pytest.mark.parametrize("hidden_act, eos_id", [("gelu", 2), ("quick_gelu", 5)])
def test_metaclip_2_matches_transformers(tmp_path, hidden_act, eos_id):
    reference = metaclip_2_model(seed=11, eos_token_id=eos_id, hidden_act=hidden_act)
    hints = convert.config_from_transformers(_config_json(reference, tmp_path), "tiny")
    assert hints == {"activation": hidden_act, "vision_head_width": 32, "transformer_heads": 2,
                     "tokenizer": "sentencepiece", "text_clean": "whitespace", "text_pool": "eos", "eos_id": eos_id}
    model = build_model(convert.state_dict_from_transformers(reference.state_dict()), hints, source="tiny").eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids = _ids(eos_id, 1000)
    with torch.no_grad():
        image_diff = _max_diff(model.encode_image(images), features(reference.get_image_features(pixel_values=images)))
        text_diff = _max_diff(model.encode_text(ids), features(reference.get_text_features(input_ids=ids)))
        logit_diff = _max_diff(model(images, ids)[0], reference(input_ids=ids, pixel_values=images).logits_per_image)
    print(f"\nMetaCLIP 2 ({hidden_act}) max |clipcli - transformers|: image {image_diff:.2e}, text {text_diff:.2e}, "
          f"logits {logit_diff:.2e}")
    assert max(image_diff, text_diff) <= TOLERANCE and logit_diff <= TOLERANCE * 10
    assert model.config.vocab_size == 1000 and model.score_kind == "softmax"


def test_the_readout_is_at_the_first_end_token(tmp_path):
    """A second end token, or anything after the first, changes nothing."""
    reference = metaclip_2_model(seed=2)
    hints = convert.config_from_transformers(_config_json(reference, tmp_path), "tiny")
    model = build_model(convert.state_dict_from_transformers(reference.state_dict()), hints).eval()
    ids = _ids(2, 1000)
    changed = ids.clone()
    changed[0, 4:] = 2  # after row 0's first end token at 3
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids)[0], model.encode_text(changed)[0])


def test_metaclip_2_config_fields(tmp_path):
    config = _config_json(metaclip_2_model(), tmp_path)
    mt5 = json.loads(json.dumps(config))
    mt5["text_config"].update(vocab_size=250100, eos_token_id=1)  # the mT5 tokenizer's models
    assert convert.config_from_transformers(mt5, "m")["text_clean"] == "canonicalize"
    assert convert.config_from_transformers(mt5, "m")["eos_id"] == 1
    config["text_config"].update(eos_token_id=None, vocab_size=901629)  # MetaClip2TextConfig's default: 49407
    assert convert.config_from_transformers(config, "m")["eos_id"] == 49407
    config["text_config"]["vocab_size"] = 1000  # a default outside the vocabulary is named, not read past
    with pytest.raises(CheckpointError, match="eos_token_id is 49407, outside the vocabulary"):
        convert.config_from_transformers(config, "m")


@pytest.mark.parametrize("eos, words", [(1000, "text_config.eos_token_id is 1000, outside the vocabulary of 1000"),
                                        (-1, "text_config.eos_token_id is -1, not a whole number"),
                                        ("2", 'text_config.eos_token_id is "2"')])
def test_malformed_eos_token_id_names_the_file_and_field(tmp_path, eos, words):
    config = _config_json(metaclip_2_model(), tmp_path)
    config["text_config"]["eos_token_id"] = eos
    with pytest.raises(CheckpointError) as error:
        convert.config_from_transformers(config, "m")
    assert "\n" not in str(error.value) and str(error.value).startswith("m: config.json") and words in str(error.value)


def test_open_clip_worldwide_matches_open_clip():
    """open_clip's worldwide layout: a plain CLIP whose config names a hub tokenizer and an
    ``eos`` readout (its tokenizer is not needed to compare the towers)."""
    from open_clip.model import CLIP

    model_cfg = dict(embed_dim=40,
                     vision_cfg=dict(image_size=32, layers=2, width=96, head_width=32, patch_size=8),
                     text_cfg=dict(hf_tokenizer_name="facebook/xlm-v-base", pool_type="eos", eos_id=2,
                                   context_length=CONTEXT, vocab_size=1000, width=64, heads=2, layers=2))
    reference = randomize(CLIP(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["text_cfg"]), seed=5)
    hints = convert.config_from_open_clip({"model_cfg": model_cfg, "preprocess_cfg": {}}, "tiny")
    assert hints["text_pool"] == "eos" and hints["eos_id"] == 2 and hints["text_clean"] == "whitespace"
    assert convert.open_clip_tokenizer_repo({"model_cfg": model_cfg}) == "facebook/xlm-v-base"
    model = build_model(dict(reference.state_dict()), hints, source="tiny").eval()
    images, ids = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), _ids(2, 1000)
    with torch.no_grad():
        image_diff = _max_diff(model.encode_image(images), reference.encode_image(images))
        text_diff = _max_diff(model.encode_text(ids), reference.encode_text(ids))
    print(f"\ntiny open_clip worldwide max |clipcli - open_clip|: image {image_diff:.2e}, text {text_diff:.2e}")
    assert max(image_diff, text_diff) <= TOLERANCE


def test_a_row_without_its_end_token_is_read_at_the_first_position():
    """open_clip's text_global_pool("eos") and transformers' MetaClip2 both take argmax over
    ``ids == eos``: the first position when a row has no end token (a cut row always keeps it)."""
    from clipcli.models.clip import readout

    ids = torch.tensor([[0, 5, 2, 1, 2], [0, 5, 6, 7, 8]])
    assert readout(ids, "eos", 2).tolist() == [2, 0]
