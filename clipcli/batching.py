"""Running a model over many inputs: batched, ordered, one result per input, never stopping.

:func:`embed_images` decodes images on a pool of worker threads, a bounded number of items
ahead of the model, so decoding overlaps inference; it collects a batch of decoded images,
runs the model once under ``torch.inference_mode()``, and yields one :class:`Embedding` per
input *in input order*, errors included. A :class:`~clipcli.preprocess.Preprocess` is split:
workers hand over ``uint8`` pixels (a quarter of the bytes) and each batch is normalised
where the model runs. On a GPU decoding is the bottleneck (BENCHMARKS.md: beside an H200,
ViT-B/32 runs 23,000 images/s on the GPU, the pipeline about 1,000 on 16 threads). A batch
that runs out of memory is split in halves and retried; a row that is not finite becomes an
error.
:func:`embed_texts` does the same for captions, in batches of similar length.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

from .errors import ItemError, Reason
from .http import FetchOptions
from .images import DecodeOptions, pillow_limits, read_image, to_rgb
from .items import Item
from .text.tokenizers import tokenizer_of  # which tokenizer a model uses: answered there

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from PIL import Image

THUMBNAIL_SIZE = 160


class Runnable(Protocol):
    """What batching needs of a loaded model (:class:`clipcli.pipeline.LoadedModel` is one;
    tests pass fakes): the model, its image transform, where and how it computes, and a way
    to load a tower it was loaded without."""

    model: Any
    preprocess: Callable | None
    device: "torch.device"
    dtype: "torch.dtype"

    @property
    def input_resolution(self) -> int | None: ...

    def ensure(self, tower: str) -> None: ...


@dataclass
class Embedding:
    """One input's result: a float32 embedding, or the reason there is none."""

    name: str
    embedding: "np.ndarray | None" = None
    error: str | None = None
    truncated: bool = False
    thumbnail: "Image.Image | None" = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(error, oom):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def run_batches(encode: Callable, inputs: "torch.Tensor", normalize: bool) -> list["np.ndarray | str"]:
    """``encode(inputs)`` as float32 rows (unit length if ``normalize``), or a reason per row.

    Out of memory splits the batch in halves and retries; a single input that still does
    not fit, or a row with NaN/inf, gets a reason instead of an embedding.
    """
    import torch

    try:
        with torch.inference_mode():
            output = encode(inputs).float()
            if normalize:
                output = output / output.norm(dim=-1, keepdim=True)
            finite = torch.isfinite(output).all(dim=-1)
            rows = output.cpu().numpy()
    except Exception as error:  # noqa: BLE001 - only out-of-memory is handled; others re-raised below
        if not _is_out_of_memory(error):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(inputs) == 1:
            return [Reason("out of memory in the model, even alone", fix="memory")]
        half = len(inputs) // 2
        return run_batches(encode, inputs[:half], normalize) + run_batches(encode, inputs[half:], normalize)
    reason = Reason("non-finite embedding (NaN or inf)", fix="fp32")
    return [row if good else reason for row, good in zip(rows, finite.tolist())]


def _thumbnail(image: "Image.Image") -> "Image.Image":
    thumb = to_rgb(image)  # an exact decode keeps the file's mode (P, RGBA, I;16): shown on white
    thumb = image.copy() if thumb is image else thumb
    thumb.thumbnail((THUMBNAIL_SIZE * 2, THUMBNAIL_SIZE * 2))
    return thumb


def prepare_image(item: Item, preprocess: Callable, decode: DecodeOptions, fetch: FetchOptions,
                  keep_thumbnail: bool = False):
    """Decode and preprocess one item in a worker: ``(pixels, thumbnail, None)`` or ``(None, None, reason)``.
    ``preprocess`` and ``decode`` come from :func:`image_step`."""
    try:
        image = read_image(item, decode, fetch)
        tensor = preprocess(image)
        return tensor, (_thumbnail(image) if keep_thumbnail else None), None
    except ItemError as error:
        return None, None, error.reason
    except Exception as error:  # noqa: BLE001 - one bad input must never end the run
        return None, None, f"cannot prepare image ({type(error).__name__}): {error}"


def image_step(loaded: Runnable, decode: DecodeOptions) -> tuple[Callable, DecodeOptions]:
    """What a worker runs on a decoded image for ``loaded`` (its uint8 pixels, when the
    preprocessing is split: normalised per batch by :func:`image_encoder`) and the decoding
    options (a JPEG decoded at reduced size down to twice the model's side, unless exact)."""
    from .preprocess import Preprocess

    if not decode.exact and decode.draft_size is None and loaded.input_resolution:
        decode = replace(decode, draft_size=2 * loaded.input_resolution)
    split = isinstance(loaded.preprocess, Preprocess)
    return (loaded.preprocess.pixels if split else loaded.preprocess), decode


def image_encoder(loaded: Runnable) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """The model on a stacked batch from :func:`prepare_image`: ``(B, r, r, 3)`` uint8 pixels,
    or ``(B, 3, r, r)`` from another transform."""
    from .preprocess import Preprocess

    split = isinstance(loaded.preprocess, Preprocess)
    on_gpu = loaded.device.type == "cuda"

    def encode(x):
        if on_gpu:  # page-locked memory: a DMA copy, without a staging copy
            x = x.pin_memory().to(loaded.device, non_blocking=True)
        if split:
            x = loaded.preprocess.normalize(x.to(loaded.device))
        return loaded.model.encode_image(x.to(device=loaded.device, dtype=loaded.dtype))

    return encode


def encode_prepared(loaded: Runnable, rows: list, normalize: bool = True) -> list["np.ndarray | str"]:
    """The image embeddings of rows from :func:`prepare_image` (one model call per
    ``run_batches``), or a reason per row."""
    loaded.ensure("image")
    return run_batches(image_encoder(loaded), _stack(rows), normalize) if rows else []


def default_workers(device: "torch.device") -> int:
    """Decode threads: 4 beside a CPU model (the model is the bottleneck there); on a GPU,
    where decoding is, one per core up to 16."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(16, cores) if device.type == "cuda" else min(4, cores)


def default_batch_size(device: "torch.device") -> int:
    """32 images per model call on a CPU; 256 on a GPU (measured beside an H200: a whole
    ``clipcli encode`` of 3,072 photos with ViT-B/32 ran at 286 images/s with 32, 464 with 256)."""
    return 256 if device.type == "cuda" else 32


def sizes_for(device: "torch.device", batch_size: int | None, workers: int | None) -> tuple[int, int]:
    """``(batch_size, workers)`` with the device's defaults in place of None."""
    return (default_batch_size(device) if batch_size is None else batch_size,
            default_workers(device) if workers is None else workers)


class DaemonPool:
    """Worker threads that never hold up the end of the process: an interrupted run exits at
    once even while a worker waits on a stalled URL (``ThreadPoolExecutor``'s threads are
    joined at interpreter exit, for as long as their network timeouts last)."""

    def __init__(self, workers: int):
        import queue
        import threading

        self._tasks: "queue.SimpleQueue" = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"clipcli-decode-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
                    future.set_exception(error)

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future

    def abandon(self) -> None:
        """One worker is stuck (a decoder that never returns cannot be stopped): another takes its
        place, and the pool no longer waits for them all when it shuts down."""
        import threading

        thread = threading.Thread(target=self._work, name=f"clipcli-decode-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        self._abandoned = True
        thread.start()

    def shutdown(self, wait: bool, grace: float = 1.0) -> None:
        """Stop the workers; without ``wait`` (or with a stuck one), give those still busy
        ``grace`` seconds (a decode ends in milliseconds; a stalled URL is left behind)."""
        import time

        wait = wait and not getattr(self, "_abandoned", False)
        for _ in self._threads:
            self._tasks.put(None)
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(None if wait else max(0.0, deadline - time.monotonic()))


# Undecoded bytes held ahead of the model (a WebDataset member is read whole, up to 64 MiB):
# past this, no more items are read until the model catches up.
MAX_PENDING_BYTES = 256 << 20


def embed_images(
    loaded: Runnable,
    items: Sequence[Item],
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    normalize: bool = True,
    decode: DecodeOptions = DecodeOptions(),
    fetch: FetchOptions = FetchOptions(),
    thumbnails: bool = False,
) -> Iterator[Embedding]:
    """One :class:`Embedding` per item, in order, as soon as its batch is done.

    Up to ``2 * batch_size + workers`` items (and :data:`MAX_PENDING_BYTES` of their bytes) are
    decoded ahead of the model on ``workers`` threads (None: :func:`default_workers`; 0: decode in this thread); ``batch_size`` None is
    :func:`default_batch_size`. Items that fail carry a reason and no embedding; so does an item
    whose worker gives no result within ``decode.timeout`` seconds of being waited for (its
    thread is left behind and replaced; with no workers there is no timeout).
    """
    loaded.ensure("image")
    step, decode = image_step(loaded, decode)
    batch_size, workers = sizes_for(loaded.device, batch_size, workers)
    encode = image_encoder(loaded)

    lookahead = 2 * batch_size + workers
    pool = DaemonPool(workers) if workers > 0 else None
    pending: deque[tuple[Item, Future | None]] = deque()
    source = iter(items)
    held = [0]  # bytes of the pending items' data (WebDataset members): bounded, not only their count

    def refill() -> None:
        while len(pending) < lookahead and (not pending or held[0] < MAX_PENDING_BYTES):
            item = next(source, None)
            if item is None:
                return
            held[0] += len(item.data or b"")
            pending.append((item, pool.submit(prepare_image, item, step, decode, fetch, thumbnails) if pool else None))

    def flush(window: list) -> Iterator[Embedding]:
        decoded = [entry for entry in window if entry[1] is not None]
        if decoded:
            rows = run_batches(encode, _stack([tensor for _, tensor, _, _ in decoded]), normalize)
            for entry, row in zip(decoded, rows):
                entry[3] = row if isinstance(row, str) else None
                entry[1] = None if isinstance(row, str) else row
        for name, row, thumb, error in window:
            yield Embedding(name, row, error, thumbnail=thumb if error is None else None)

    finished = False
    try:
        with pillow_limits(decode):
            refill()
            window: list[list] = []  # [name, pixels -> row, thumbnail, error], in input order
            in_batch = 0
            while pending:
                item, future = pending.popleft()
                held[0] -= len(item.data or b"")
                if future is None:
                    tensor, thumb, error = prepare_image(item, step, decode, fetch, thumbnails)
                else:
                    tensor, thumb, error = _result(future, pool, decode.timeout)
                refill()
                window.append([item.name, tensor, thumb, error])  # the name only: bytes go as soon as decoded
                in_batch += tensor is not None
                if in_batch >= batch_size:
                    yield from flush(window)
                    window, in_batch = [], 0
            yield from flush(window)
        finished = True
    finally:
        if pool is not None:  # interrupted or abandoned: the workers are not waited for
            for _, future in pending:
                if future is not None:
                    future.cancel()
            pool.shutdown(wait=finished)


def _result(future: Future, pool: DaemonPool, timeout: float | None) -> tuple:
    """A worker's ``(pixels, thumbnail, reason)``, or a reason when it takes over ``timeout`` seconds."""
    from concurrent.futures import TimeoutError as Late

    try:
        return future.result(timeout=timeout)
    except Late:
        if future.done():  # it finished as the wait ended
            return future.result()
        if not future.cancel():  # running: stuck in a decoder
            pool.abandon()
        return None, None, Reason(f"decoding took over {timeout:g} s; left behind (a stuck decoder or file "
                                  "system)", fix="decode_timeout")


def _stack(rows: list) -> "torch.Tensor":
    """One batch tensor from the workers' rows (numpy pixels or tensors)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack(rows)) if isinstance(rows[0], np.ndarray) else torch.stack(rows)


def embed_texts(
    loaded: Runnable,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    normalize: bool = True,
    truncate: bool = True,
) -> list[Embedding]:
    """One :class:`Embedding` per text, in order. A text longer than the context is cut
    (``truncated=True``) or, without ``truncate``, reported as an error."""
    loaded.ensure("text")
    tokens, cut = tokenizer_of(loaded.model).encode_texts(list(texts), context_length=loaded.model.context_length,
                                                          truncate=True)
    results = [Embedding(text, truncated=flag) for text, flag in zip(texts, cut)]
    if not truncate:
        for result in results:
            if result.truncated:
                result.error = Reason(f"longer than the model's {loaded.model.context_length}-token context",
                                      fix="truncate")
    # Batches of texts of similar length: a causal tower runs each batch only to its longest
    # text (exact: rows are independent); results go back to input order by index. A row's
    # length is where its padding (a run of its last id) starts.
    length = (tokens != tokens[:, -1:]).sum(dim=-1).tolist()
    todo = sorted((i for i, result in enumerate(results) if result.ok), key=length.__getitem__)
    model = loaded.model
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        rows = run_batches(lambda t: model.encode_text(t.to(loaded.device)), tokens[chunk], normalize)
        for i, row in zip(chunk, rows):
            if isinstance(row, str):
                results[i].error = row
            else:
                results[i].embedding = row
    return results
