"""How a text is cleaned before a model's tokenizer sees it: ``config.text_clean``.

The cleaning is part of what a model was trained on, so it is part of its identity: SigLIP's
prompts were canonicalized, MetaCLIP 2's multilingual ones only had their whitespace tidied.
The four kinds, as open_clip's tokenizers apply them:

- ``"clip"``: the CLIP BPE's own (:func:`clipcli.text.bpe.clean_text`): repaired with ftfy, HTML
  entities unescaped twice, whitespace collapsed, lower-cased.
- ``"whitespace"``: repaired and unescaped the same way, stripped, runs of whitespace collapsed
  to one space; the case is kept (MetaCLIP 2 "worldwide": XLM-V is case-sensitive).
- ``"lower"``: ``"whitespace"``, then lower-cased.
- ``"canonicalize"``: big_vision's canonicalization for SigLIP, after the same repair:
  underscores become spaces, ASCII punctuation (``string.punctuation``) is removed,
  lower-cased, whitespace collapsed: "A_photo of a Cat!" -> "a photo of a cat".

Plain ASCII text without ``&`` or control characters is exactly what ftfy and
``html.unescape`` return unchanged, so such text skips them (they are slow).
"""

from __future__ import annotations

import html
import string
from typing import Callable

from ..errors import CheckpointError
from .bpe import clean_text as clip_clean
from .bpe import needs_repair

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def basic_clean(text: str) -> str:
    """ftfy's repairs, HTML entities unescaped twice, the ends stripped (open_clip's ``basic_clean``)."""
    if needs_repair(text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Runs of whitespace as one space, none at the ends."""
    return " ".join(text.split())


def canonicalize_text(text: str) -> str:
    """big_vision's canonical form: underscores as spaces, no ASCII punctuation, lower case, whitespace collapsed."""
    return " ".join(text.replace("_", " ").translate(_NO_PUNCTUATION).lower().split())


def siglip_canonicalize(text: str) -> str:
    """transformers' ``SiglipTokenizer.canonicalize_text``: lower case, ASCII punctuation removed
    (underscores too: big_vision's and open_clip's turn them into spaces), whitespace collapsed;
    no ftfy or HTML repairs."""
    return " ".join(text.lower().translate(_NO_PUNCTUATION).split())


def clean_canonicalize(text: str) -> str:
    return canonicalize_text(basic_clean(text))


def clean_whitespace(text: str) -> str:
    return whitespace_clean(basic_clean(text))


def clean_lower(text: str) -> str:
    return whitespace_clean(basic_clean(text)).lower()


CLEANERS: dict[str, Callable[[str], str]] = {
    "clip": clip_clean,
    "canonicalize": clean_canonicalize,
    "whitespace": clean_whitespace,
    "lower": clean_lower,
    # transformers' Siglip2Tokenizer: a Lowercase normalizer and nothing else (no ftfy, whitespace kept)
    "lowercase": lambda text: "".join(map(str.lower, text)),  # per character, as Rust's: a final Σ is σ, not ς
    # transformers' SiglipTokenizer (google/siglip-*: a bare spiece.model), which canonicalizes itself
    "siglip": siglip_canonicalize,
}


def cleaner(name: str) -> Callable[[str], str]:
    """The cleaning function for a ``config.text_clean`` value."""
    try:
        return CLEANERS[name]
    except (KeyError, TypeError):
        raise CheckpointError(f"text_clean {name!r} is not one of {', '.join(CLEANERS)}") from None
