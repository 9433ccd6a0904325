"""Which training source a ``--train-data`` value names: WebDataset shards
(:class:`~clipcli.train.shards.ShardSource`) or image-caption pairs from a table or a folder
(:class:`~clipcli.train.data.PairSource`). Both give ``steps_per_epoch``, ``samples_per_epoch``,
``dropped_per_epoch``, ``notes`` and ``batches(epoch, start)``.
"""

from __future__ import annotations

from typing import Callable

from ..errors import InputError
from .data import CaptionTokenizer, PairSource, read_pairs
from .shards import ShardSource

CSV_CAPTION_KEY, SHARD_CAPTION_KEY = "title", "txt"  # the caption's column / a shard member's extension


def open_source(train_data: str, *, img_key: str, caption_key: str | None, transform: Callable,
                tokenize: CaptionTokenizer | None, context_length: int, batch_size: int, rank: int,
                world_size: int, seed: int, workers: int, num_samples: int | None = None, resampled: bool = False,
                drop_last: bool = True):
    """The training source ``train_data`` names: :class:`~clipcli.train.shards.ShardSource` for
    WebDataset shards (``shards/{00000..00099}.tar``, ``::`` between several patterns), else a
    :class:`PairSource` over :func:`read_pairs`. ``caption_key`` is the caption column of a table,
    or the caption member's extension in shards (the table's default, ``title``, or None means
    ``txt`` there). ``num_samples`` and ``resampled`` are for shards only; shards always fill
    every batch (``drop_last`` does not apply: a stream has no last batch)."""
    from ..webdataset import is_shards

    if is_shards([train_data]):
        key = SHARD_CAPTION_KEY if caption_key in (None, CSV_CAPTION_KEY) else caption_key
        return ShardSource(train_data, transform, tokenize, context_length, batch_size, rank, world_size, seed,
                           workers, num_samples=num_samples, resampled=resampled, caption_key=key)
    if num_samples is not None:
        raise InputError(f"{num_samples}: a number of samples per epoch is for WebDataset shards; "
                         f"{train_data} is read whole each epoch", option="train_num_samples")
    if resampled:
        raise InputError(f"resampling is for WebDataset shards; {train_data} is shuffled and read whole each epoch",
                         option="dataset_resampled")
    pairs = read_pairs(train_data, img_key, caption_key or CSV_CAPTION_KEY)
    if len(pairs) < batch_size:
        raise InputError(f"{batch_size} is more than the {len(pairs)} pairs in {train_data}", option="batch_size")
    return PairSource(pairs, transform, tokenize, context_length, batch_size, rank, world_size, seed, workers,
                      drop_last=drop_last)
