"""What a run reports as it goes: ``metrics.jsonl`` always, TensorBoard when asked for.

``metrics.jsonl`` holds one JSON object per record, as the training loop writes them: ``"kind":
"train"`` every few steps, ``"kind": "eval"`` after an evaluation, each with its global ``step``.
With ``report_to=["tensorboard"]`` the numbers of each record also go to TensorBoard event files
in ``OUT/tensorboard/`` (``tensorboard --logdir OUT/tensorboard``), at the record's step:

- a key holding a ``/`` keeps its name (``val/image_to_text_R@1``, ``zeroshot/top1``);
- any other number is put under the record's kind (``train/loss``, ``train/lr``,
  ``train/grad_norm``, ``train/logit_scale``, ``train/samples_per_second``, ``eval/skipped_images``);
- ``kind``, ``epoch`` and ``step`` are where a record stands, not scalars; strings and booleans
  are left out.

Resuming from a checkpoint at step S replays the steps after S, so :meth:`Reporter.resume_at`
first drops the records past S from ``metrics.jsonl`` (and a line a killed run left half written)
and tells TensorBoard to hide its events past S (``SummaryWriter``'s ``purge_step``). The loop
should therefore write a step's records before it saves that step's checkpoint.

Only rank 0 reports (``enabled``); the other ranks' reporters do nothing. TensorBoard is an
optional package: :func:`check_report_to` refuses it before training starts when it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
from pathlib import Path
from typing import Sequence

from ..errors import InputError

REPORT_TARGETS = ("tensorboard",)
METRICS, TENSORBOARD = "metrics.jsonl", "tensorboard"
_PLACE = ("kind", "epoch", "step")  # where a record stands, not what it measured


def check_report_to(values: str | Sequence[str] | None) -> list[str]:
    """The report targets named by ``values`` (names, or one comma-separated string; ``none``
    or nothing: none), each once. An unknown name, or TensorBoard without its package installed,
    is an :class:`InputError`."""
    if isinstance(values, str):
        values = [values]
    names = [name.strip().lower() for value in values or () for name in value.split(",") if name.strip()]
    targets = list(dict.fromkeys(name for name in names if name != "none"))
    for name in targets:
        if name not in REPORT_TARGETS:
            raise InputError(f"{name!r} is not a report target; choose from {', '.join(REPORT_TARGETS)} (or none)",
                             option="report_to")
    if "tensorboard" in targets and importlib.util.find_spec("tensorboard") is None:
        raise InputError("tensorboard: reporting to TensorBoard needs its package: pip install tensorboard",
                         option="report_to")
    return targets


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of one record, by tag (see the module docstring)."""
    kind = record.get("kind", "train")
    found = {}
    for key, value in record.items():
        if key in _PLACE or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        found[key if "/" in key else f"{kind}/{key}"] = float(value)
    return found


def _kept(line: str, step: int) -> bool:
    """Whether a ``metrics.jsonl`` line stays when a run resumes at ``step``."""
    try:
        record = json.loads(line)
    except ValueError:
        return False  # half written by a killed run
    at = record.get("step") if isinstance(record, dict) else None
    return not (isinstance(at, numbers.Real) and at > step)


class Reporter:
    """``metrics.jsonl`` in ``out``, and the TensorBoard events of ``report_to`` (see the module
    docstring); nothing at all when not ``enabled`` (every rank but rank 0)."""

    def __init__(self, out: Path, enabled: bool, report_to: Sequence[str] = ()):
        self.out, self.enabled = Path(out), enabled
        self.path = self.out / METRICS
        self.targets = check_report_to(report_to) if enabled else []
        self._writer = None  # a SummaryWriter, opened at the first record: resume_at must come first
        self._purge_step: int | None = None

    def resume_at(self, step: int) -> None:
        """Continuing a run from a checkpoint at ``step``: drop ``metrics.jsonl`` records with a
        step past ``step`` (a resumed older checkpoint replays them), and have TensorBoard hide
        its events past ``step``."""
        if not self.enabled:
            return
        from ..fsutil import atomic_path, write_error

        try:
            lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else None
        except OSError as error:
            raise InputError(f"cannot read {self.path}: {error.strerror or error}") from None
        if lines is not None:
            kept = [line for line in lines if line.strip() and _kept(line, step)]
            with atomic_path(self.path, overwrite=True) as temp:
                try:
                    temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
                except OSError as error:
                    raise write_error(error, self.path) from None
        self._close_writer()  # reopened at the next record, purging what came after ``step``
        self._purge_step = step + 1

    def write(self, record: dict) -> None:
        """One record: a JSON line in ``metrics.jsonl`` and, with TensorBoard, its scalars at
        ``record["step"]`` (a record without a step goes to ``metrics.jsonl`` only)."""
        if not self.enabled:
            return
        from ..fsutil import write_error

        try:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
        except OSError as error:
            raise write_error(error, self.path) from None
        step = record.get("step")
        if "tensorboard" in self.targets and isinstance(step, int) and not isinstance(step, bool):
            writer = self._tensorboard()
            for tag, value in scalars(record).items():
                writer.add_scalar(tag, value, global_step=step)
            writer.flush()  # a killed run keeps what it reported

    def close(self) -> None:
        self._close_writer()

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / TENSORBOARD), purge_step=self._purge_step)
            self._purge_step = None  # purged once, when the writer opens
        return self._writer

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
