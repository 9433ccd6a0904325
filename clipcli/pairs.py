"""Pairs of vectors at or above a cosine, and groups of them that never chain: the pure
computation under :mod:`clipcli.duplicates`.

:func:`similar_pairs` scores every pair by blocked matrix products over the upper triangle,
tiles of ``rows`` x ``cols``, keeping only the pairs at or above the threshold: memory is the
vectors (the index's memory-mapped cache) plus one tile plus the pairs kept, never N x N. Where
the CPU multiplies bfloat16 natively (AMX, AVX512-BF16) the tiles are multiplied in bfloat16
(a copy of the vectors, half their size) and the pairs within its rounding bound of the
threshold are scored again in float32: the same pairs and scores as float32 alone, in a
fraction of the time. :func:`star_groups` makes groups of a keeper and its neighbours.
"""

from __future__ import annotations

import functools

import numpy as np

ROWS, COLS = 1024, 2048  # one tile of cosines: 8 MB of float32 (larger tiles measured slower here)
FAST_ROWS, FAST_COLS = 2048, 4096  # in bfloat16: 16 MB (the products are short; tiles are not)


@functools.lru_cache(maxsize=1)
def bfloat16_pays() -> bool:
    """Whether this CPU multiplies bfloat16 at least twice as fast as float32 (AMX, AVX512-BF16:
    8x here), measured once per process on one tile (a few milliseconds)."""
    import time

    import torch

    timings = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.ones(512, 512, dtype=dtype), torch.ones(2048, 512, dtype=dtype)
        torch.mm(a, b.T)
        started = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b.T)
        timings.append(time.perf_counter() - started)
    return timings[1] * 2 <= timings[0]


def bfloat16_error(dim: int) -> float:
    """How far rounding to bfloat16 can move a dot product of rows of norm at most n, over n^2
    (u = 2^-8, bfloat16's 8 significant bits): (2u + u^2) for rounding both factors, summed over
    the terms (at most the product of the norms); D 2^-24 (1 + u)^2 for the float32 accumulation
    of D terms; u (1 + u) for rounding the result (a score near a cut below n^2)."""
    u = 2.0**-8
    return 2 * u + u * u + dim * 2.0**-24 * (1 + u) ** 2 + u * (1 + u)


def _exact_scores(block, other, a, b, chunk: int = 1 << 16):
    """float32 dot products of the rows ``block[a]`` and ``other[b]``, in chunks of pairs."""
    import torch

    return torch.cat([torch.einsum("kd,kd->k", block[a[s : s + chunk]], other[b[s : s + chunk]])
                      for s in range(0, len(a), chunk)]) if len(a) else torch.empty(0)


def similar_pairs(vectors: np.ndarray, threshold: float, *, rows: int | None = None, cols: int | None = None,
                  fast: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` of rows of ``vectors`` (N, D) whose dot product is at least
    ``threshold``, as ``(i, j, score)`` arrays in no set order. Tiles of ``rows`` x ``cols``
    over the upper triangle (None: :data:`ROWS` x :data:`COLS`, or :data:`FAST_ROWS` x
    :data:`FAST_COLS` in bfloat16): memory is one tile and the pairs kept; a tile whose best
    score is below the threshold costs its product and one maximum.

    ``fast`` (None: where :func:`bfloat16_pays`) multiplies the tiles in bfloat16 and scores
    again in float32 only the pairs within the rounding bound of the threshold
    (:func:`bfloat16_error`): the same pairs and float32 scores, the products 8x faster on AMX.
    (oneDNN accumulates bfloat16 products in float32, which the bound assumes.)"""
    import torch

    array = np.ascontiguousarray(vectors, dtype=np.float32)  # the cache's memory map as it is
    matrix = torch.from_numpy(array if array.flags.writeable else array.copy())
    count = len(matrix)
    fast = bfloat16_pays() if fast is None and count > ROWS else bool(fast)
    rows, cols = rows or (FAST_ROWS if fast else ROWS), cols or (FAST_COLS if fast else COLS)
    low = matrix.to(torch.bfloat16) if fast else matrix  # (N, D): 2 bytes a value more while it runs
    norms = matrix.norm(dim=1) if fast and count else torch.ones(1)
    norm = float(norms[torch.isfinite(norms)].max()) if bool(torch.isfinite(norms).any()) else 1.0  # NaN rows pair with none
    cut = threshold - (bfloat16_error(matrix.shape[1]) * norm * norm + 1e-6) if fast else threshold
    # Positive bfloat16 values order as their bits do (as int16), which a maximum reads twice as fast.
    bits = int(torch.tensor(cut, dtype=torch.bfloat16).view(torch.int16)) if fast and cut > 0 else None
    found: list[tuple] = []
    buffer = torch.empty(rows, cols, dtype=low.dtype)  # one tile's scores, reused: no allocation (and page faults) per tile
    for top in range(0, count, rows):
        block = low[top : top + rows]  # (R, D)
        for left in range(top, count, cols):  # tiles on or right of the diagonal
            other = low[left : left + cols]  # (C, D)
            full = (len(block), len(other)) == (rows, cols)
            scores = torch.mm(block, other.T, out=buffer) if full else torch.mm(block, other.T)  # (R, C)
            if (int(scores.view(torch.int16).max()) < bits) if bits is not None else float(scores.max()) < cut:
                continue
            where = torch.nonzero(scores >= cut)  # (K, 2)
            a, b = where[:, 0], where[:, 1]
            above = b + left > a + top  # the diagonal tile's lower half: each pair once
            a, b = a[above], b[above]
            if fast:
                exact = _exact_scores(matrix[top : top + rows], matrix[left : left + cols], a, b)
                keep = exact >= threshold
                a, b, exact = a[keep], b[keep], exact[keep]
            else:
                exact = scores[a, b]
            if len(a):
                found.append(((a + top).numpy(), (b + left).numpy(), exact.numpy().copy()))
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return tuple(np.concatenate(parts) for parts in zip(*found))  # type: ignore[return-value]


def star_groups(left: np.ndarray, right: np.ndarray, score: np.ndarray, threshold: float, rank: np.ndarray,
                free: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Groups of nodes at ``threshold`` over the pairs ``(left, right, score)``: ``[(keeper,
    members, similarities)]``. Nodes are seeds in ``rank`` order (lower first: the better
    keeper); a seed still ``free`` takes its free neighbours at or above ``threshold``, best
    first. ``free`` (bool, per node) is updated in place. Loops run over the pairs kept only."""
    kept = (score >= threshold) & free[left] & free[right]
    a = np.concatenate([left[kept], right[kept]])  # both directions: (2K,)
    b = np.concatenate([right[kept], left[kept]])
    s = np.concatenate([score[kept], score[kept]])
    if not len(a):
        return []
    by = np.lexsort((rank[b], -s, a))  # each node's neighbours together, most similar first
    a, b, s = a[by], b[by], s[by]
    nodes, first, counts = np.unique(a, return_index=True, return_counts=True)
    groups = []
    for at in np.argsort(rank[nodes], kind="stable"):
        seed = nodes[at]
        if not free[seed]:
            continue
        mates, similarities = b[first[at] : first[at] + counts[at]], s[first[at] : first[at] + counts[at]]
        open_ = free[mates]
        if not open_.any():
            continue
        free[seed] = False
        free[mates[open_]] = False
        groups.append((int(seed), mates[open_], similarities[open_]))
    return groups
