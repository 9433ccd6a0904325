"""How an error is worded for people: the one line the CLI prints and the HTTP server answers.

The library's errors name the parameter at fault and the key of a remedy
(:class:`~clipcli.errors.ClipcliError`'s ``option`` and ``fix``); this spells them the way
the commands take them (``--min-prob``, ``--overwrite``). The server's query parameters
and form fields have the commands' names, so one wording serves both.
"""

from __future__ import annotations

from .errors import ClipcliError

# The ``fix`` of a library error or of a failed item's reason, as the flags that apply it.
FIXES = {
    "overwrite": "pass --overwrite to replace it",
    "resume": "pass --resume to continue it or --overwrite to start again",
    "restart": "pass --overwrite to discard it and start again",
    "fp32": "try --precision fp32",
    "cpu": "use --device cpu",
    "one_cpu": "use --device cpu (and --threads N)",
    "memory": "try --device cpu or a smaller model",
    "lr": "lower --lr or use --precision fp32/bf16",
    "keys": "choose them with --img-key and --caption-key",
    "truncate": "shorten it, or leave out --no-truncate to cut it",
    "max_pixels": "raise --max-pixels to allow it",
    "decode_timeout": "raise --decode-timeout to wait longer",
    "video_interval": "give a larger --video-interval",
    "allow_truncated": "pass --allow-truncated to score what can be decoded",
    "allow_private": "pass --allow-private to fetch from it",
    "arch": "the commands take it as --arch NAME",
    "threshold": "use --threshold S with a cosine instead",
    "warmup": "give a shorter --warmup or more --epochs",
    "accumulate": "lower --accum-freq or --batch-size",
}


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _with_fix(text: str, fix: str | None) -> str:
    return f"{text}; {FIXES[fix]}" if fix in FIXES else text


def error_text(error: ClipcliError) -> str:
    """The one line the CLI prints for ``error``: the option at fault as its flag, and the
    flag that fixes it."""
    text = error.message
    if error.option:
        text = f"{flag(error.option)} {text}"
    return _with_fix(text, error.fix)


def hinted(reason: str) -> str:
    """A failed item's reason (:class:`~clipcli.errors.Reason`) with the flag that may fix it."""
    return _with_fix(reason, getattr(reason, "fix", None))
