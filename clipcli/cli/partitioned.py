"""`clipcli encode INPUTS -o OUTDIR/`: partitioned encoding for many processes (torchrun,
SLURM, a shell loop), thin over :mod:`clipcli.partitions`."""

from __future__ import annotations

from typing import Optional

import typer

from ..errors import InputError


def encode_partitioned(inputs: list[str], output: str, loaded_model, run, *, normalize: bool, partition_size: int,
                       rank: Optional[int], world: Optional[int], quiet: bool) -> None:
    """Encode this process's partitions and report on stderr, each line prefixed with the
    rank when there are several; exits 0 when only some images failed (torchrun ends every
    rank when one exits non-zero), non-zero only for errors that stop the run."""
    from ..items import expand_inputs
    from ..output import Reporter
    from ..partitions import encode_partitions, share

    part = share(rank, world)
    items = expand_inputs(inputs)
    mine = sum(len(items[i:i + partition_size]) for i in range(0, len(items), partition_size)
               if part.takes(i // partition_size))
    prefix = f"[rank {part.rank}/{part.world}] " if part.world > 1 else ""
    with Reporter(mine, "images", quiet, prefix=prefix, bar=part.rank == 0) as report:
        outcome = encode_partitions(loaded_model(), items, output, partition_size=partition_size, part=part,
                                    normalize=normalize, run=run, on_result=report.done)
        report.summary("encoded")
        report.message(f"partitions: {outcome['done']} written, {outcome['skipped']} already done, "
                       f"of {outcome['partitions']} in {output}")
        if outcome["summary"] is not None:
            counts = ", ".join(f"{v} {k}" for k, v in outcome["summary"].items() if k not in ("partitions", "total"))
            report.message(f"all {outcome['partitions']} partitions are done: {outcome['summary']['total']} images "
                           f"({counts}); _summary.json written")
    raise typer.Exit(0)


def check_options(text: Optional[str], resume: bool) -> None:
    if text:
        raise InputError("a folder output (-o DIR/) takes images; write captions to a .npy file")
    if resume:
        raise InputError("a folder output resumes by itself: rerun the same command (finished partitions are skipped)")
