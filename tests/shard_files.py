"""WebDataset shards for the tests: a tar file of ``(member name, bytes)`` in the order given
(a stream reader sees them in that order, so a test can write ungrouped or damaged shards too)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path
