"""Zero-shot classification math with fake tensors, checked against open_clip's classifier builder."""

from __future__ import annotations

import pytest
import torch

from clipcli import zeroshot
from clipcli.errors import InputError


def test_template_sets_are_the_papers():
    imagenet = zeroshot.load_templates("imagenet")
    subset = zeroshot.load_templates("imagenet7")
    assert len(imagenet) == 80 and len(set(imagenet)) == 80
    assert subset == ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                      "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
    assert set(subset) <= set(imagenet)
    assert imagenet[0] == "a bad photo of a {}." and imagenet[-1] == "a tattoo of the {}."


def test_template_sets_match_open_clip():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    assert zeroshot.load_templates("imagenet") == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert zeroshot.load_templates("imagenet7") == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]


def test_template_files(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("# mine\na sketch of a {}.\n\nthe {}, in colour\n")
    assert zeroshot.load_templates(str(path)) == ["a sketch of a {}.", "the {}, in colour"]
    path.write_text("no placeholder here\n")
    with pytest.raises(InputError, match="exactly one {}"):
        zeroshot.load_templates(str(path))
    with pytest.raises(InputError, match="no such file"):
        zeroshot.load_templates(str(tmp_path / "nope.txt"))


def test_prompts_are_label_major():
    assert zeroshot.prompts(["cat", "dog"], ["a {}.", "the {}!"]) == ["a cat.", "the cat!", "a dog.", "the dog!"]
    assert zeroshot.prompts(["{weird}"], ["a {}."]) == ["a {weird}."]


def test_build_classifier_normalises_averages_normalises():
    torch.manual_seed(0)
    embeddings = torch.randn(3 * 4, 8) * torch.rand(3 * 4, 1) * 10  # 3 labels x 4 templates, uneven norms
    classifier = zeroshot.build_classifier(embeddings, num_templates=4)
    assert classifier.shape == (3, 8)
    for label in range(3):
        rows = embeddings[label * 4 : (label + 1) * 4]
        mean = (rows / rows.norm(dim=-1, keepdim=True)).mean(0)
        torch.testing.assert_close(classifier[label], mean / mean.norm())
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(3))


def test_build_classifier_matches_open_clip():
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    torch.manual_seed(1)
    vocabulary = {}

    def tokenizer(texts):
        return torch.tensor([[vocabulary.setdefault(t, len(vocabulary))] for t in texts])

    table = torch.randn(100, 16) * 3

    class Fake:
        def encode_text(self, tokens, normalize=False):
            out = table[tokens[:, 0]]
            return out / out.norm(dim=-1, keepdim=True) if normalize else out

    labels, templates = ["cat", "dog", "car"], zeroshot.load_templates("imagenet7")
    reference = build_zero_shot_classifier(Fake(), tokenizer, labels, templates, device="cpu")  # (D, L)
    ours = zeroshot.build_classifier(Fake().encode_text(tokenizer(zeroshot.prompts(labels, templates))), len(templates))
    torch.testing.assert_close(ours, reference.T)


def test_probabilities_are_softmax_of_scaled_cosine():
    torch.manual_seed(2)
    images = torch.randn(5, 8)
    classifier = zeroshot.normalize(torch.randn(3, 8))
    logit_scale = torch.tensor(4.6052)  # ln(100), as in released CLIP
    probs = zeroshot.probabilities(images, classifier, logit_scale)
    cosine = zeroshot.normalize(images) @ classifier.T
    torch.testing.assert_close(probs, (100.0 * cosine).softmax(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))


def test_top_k():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert zeroshot.top_k(probs, ["a", "b", "c"], 2) == [
        [("b", pytest.approx(0.7)), ("c", pytest.approx(0.2))],
        [("a", pytest.approx(0.5)), ("c", pytest.approx(0.3))],
    ]
    assert len(zeroshot.top_k(probs, ["a", "b", "c"], 10)[0]) == 3


def test_a_human_readable_check():
    """A cat photo embedding close to 'cat' gets 'cat' first."""
    cat, dog = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    classifier = torch.stack([cat, dog])
    image = torch.tensor([[0.9, 0.3]])
    top = zeroshot.top_k(zeroshot.probabilities(image, classifier, torch.tensor(4.6052)), ["cat", "dog"], 1)
    assert top[0][0][0] == "cat"
