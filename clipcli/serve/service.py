"""The warm model behind ``clipcli serve``: loaded once, asked many times, by the commands' own code.

:class:`Service` holds the model, the index's path, the decoding threads and the batching
model thread (:mod:`.batcher`). Each question is answered with the pieces its command runs:
texts by :func:`clipcli.batching.embed_texts`; images by
:func:`~clipcli.batching.prepare_image` and :func:`~clipcli.batching.encode_prepared`, the two
halves of ``embed_images`` (decoding here happens as requests arrive, while the model runs
earlier ones); labels by :func:`clipcli.pipeline.label_classifier` and
:func:`~clipcli.pipeline.label_records`; searches by :func:`clipcli.search.combine` and
:func:`~clipcli.search.rank`, the two halves of ``search``. So the answers are the commands'
records. Nothing here knows HTTP (:mod:`.app` does); errors are the library's own
(:mod:`clipcli.errors`), :class:`Loading` or :class:`~.batcher.Busy`.

The index is opened read-only for each question, on the thread that asks it: a search
sees what ``clipcli index`` committed last, and its vector cache is rebuilt when the
model's generation moved (:mod:`clipcli.vectors`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

from ..batching import DaemonPool
from ..display import display
from ..errors import ClipcliError, InputError
from ..images import pillow_limits
from ..items import Item
from ..tasks import RunOptions
from .batcher import Batcher, Busy

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import LoadedModel
    from ..search import Term


class Loading(ClipcliError):
    """The model is still loading (or failed to): try again shortly."""


@dataclass(frozen=True)
class Settings:
    """What ``clipcli serve`` was started with: the model as ``load_model`` takes it, the
    index (None: no search), how images are fed to the model, and the batching."""

    model: str
    db: str | None = None
    load: dict = field(default_factory=dict)  # load_model's keyword arguments: device, precision, threads, ...
    run: RunOptions = field(default_factory=RunOptions)
    window: float = 0.004  # seconds the model thread waits for more requests to batch with
    max_queue: int = 1024  # inputs waiting for the model before new requests get 503


class Service:
    """See the module docstring. :meth:`start` loads the model on a thread of its own."""

    def __init__(self, settings: Settings, loader: Callable[..., "LoadedModel"] | None = None):
        self.settings = settings
        self.status = "loading"  # "ok" once loaded, "error" if loading failed
        self.error: ClipcliError | None = None
        self.loaded: "LoadedModel | None" = None
        self._loader = loader
        self._ready = threading.Event()
        self.started = False
        self._decoders: "DaemonPool | None" = None
        self._admitted = 0  # images taken in (decoding, queued or in the model), against max_queue
        self._admission = threading.Lock()
        self._pillow = contextlib.ExitStack()
        self._count: tuple | None = None  # ((model id, generation), when, indexed images): /health's
        self._classifiers: dict[tuple, Any] = {}  # (labels, templates) -> classifier: one per label set in use
        self.batcher = Batcher(self._run_batch, window=settings.window, max_items=self._max_items(),
                               max_queue=settings.max_queue)

    def _max_items(self) -> int:
        return self.settings.run.batch_size or 32

    # ----------------------------------------------------------------------- life

    def start(self, on_loaded: Callable[["Service"], None] | None = None) -> threading.Thread:
        """Load the model (and warm the index's vector cache) on a thread; then the batcher
        starts and :attr:`status` is ``"ok"`` (or ``"error"``, with :attr:`error`)."""
        if self.started:
            raise RuntimeError("the service was started already")
        self.started = True
        thread = threading.Thread(target=self._load, args=(on_loaded,), name="clipcli-load", daemon=True)
        thread.start()
        return thread

    def _load(self, on_loaded) -> None:
        from ..pipeline import load_model

        try:
            # Packed weights from the start, made by a warm-up run before the first request: every
            # answer then comes from the same kernels, none pays for the packing.
            load = {"pack_after": 0, **self.settings.load}
            loaded = (self._loader or load_model)(self.settings.model, **load)
            loaded.warm_up()
            self.loaded = loaded
            self.settings = replace(self.settings, run=self.settings.run.for_device(loaded.device))
            self.batcher.max_items = self._max_items()
            self._decoders = DaemonPool(self.settings.run.workers or 1)
            self._pillow.enter_context(pillow_limits(self.settings.run.decode))  # process-wide: set once
            if self.settings.db is not None:
                self._warm_vectors()
            self.batcher.start()
            self.status = "ok"
        except ClipcliError as error:
            self.error, self.status = error, "error"
        except Exception as error:  # noqa: BLE001 (a bug or a broken file: said, not a traceback per request)
            self.error, self.status = ClipcliError(f"loading {self.settings.model} failed: {error}"), "error"
        finally:
            self._ready.set()
            if on_loaded is not None:
                on_loaded(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Whether loading ended (well or not) within ``timeout`` seconds."""
        return self._ready.wait(timeout)

    def stop(self) -> None:
        self.batcher.stop(timeout=30)
        if self._decoders is not None:  # a decode ends in milliseconds; a stalled URL is left behind
            self._decoders.shutdown(wait=False)
        self._pillow.close()

    def ready(self) -> "LoadedModel":
        """The loaded model, or :class:`Loading` while it is not there."""
        if self.status == "ok":
            return self.loaded
        if self.status == "error":
            raise Loading(f"the model could not be loaded: {self.error}")
        raise Loading(f"the model {self.settings.model} is loading")

    def open_index(self):
        """The index, opened read-only (a new connection: SQLite's are per thread)."""
        from ..errors import NoVectorsError
        from ..index import Index

        if self.settings.db is None:
            raise NoVectorsError("this server has no index: start it with --db INDEX to search")
        return Index(self.settings.db, readonly=True)

    def _warm_vectors(self) -> None:
        from ..vectors import load_matrix

        with self.open_index() as index:
            model = index.model_id(identity=self.loaded.identity)
            if model is not None:
                with index.guard():
                    load_matrix(index, model)

    # ----------------------------------------------------------------------- model calls

    def _run_batch(self, kind: Hashable, inputs: list) -> list:
        from ..batching import embed_texts, encode_prepared

        what, normalize, truncate = kind
        if what == "text":
            return embed_texts(self.loaded, inputs, batch_size=self.settings.run.batch_size, normalize=normalize,
                               truncate=truncate)
        return encode_prepared(self.loaded, inputs, normalize)

    async def embed_texts(self, texts: Sequence[str], *, normalize: bool = True, truncate: bool = True) -> list:
        """One :class:`~clipcli.batching.Embedding` per text, as ``clipcli encode --text``."""
        self.ready()
        return await self.batcher.embed(("text", normalize, truncate), list(texts))

    async def embed_images(self, items: Sequence[Item], *, normalize: bool = True) -> list:
        """One :class:`~clipcli.batching.Embedding` per image, as ``clipcli encode``: decoded by
        :func:`~clipcli.batching.prepare_image` on the decoding threads as they arrive, while the
        model runs earlier ones, then encoded by :func:`~clipcli.batching.encode_prepared`
        batched with other requests' images. Refused with :class:`Busy` before any decoding
        when ``max_queue`` images are in already."""
        import asyncio

        from ..batching import Embedding, image_step, prepare_image

        loaded = self.ready()
        step, decode = image_step(loaded, self.settings.run.decode)
        with self._admit(len(items)):
            prepared = await asyncio.gather(*(asyncio.wrap_future(self._decoders.submit(
                prepare_image, item, step, decode, self.settings.run.fetch)) for item in items))
            rows = iter(await self.batcher.embed(("pixels", normalize, True),
                                                 [pixels for pixels, _, _ in prepared if pixels is not None]))
        results = []
        for item, (pixels, _, error) in zip(items, prepared):
            row = next(rows) if pixels is not None else error
            results.append(Embedding(item.name, None, row) if isinstance(row, str) else Embedding(item.name, row))
        return results

    @contextlib.contextmanager
    def _admit(self, count: int):
        with self._admission:
            if self._admitted and self._admitted + count > self.settings.max_queue:
                raise Busy(f"{self._admitted} images are being decoded or wait for the model")
            self._admitted += count
        try:
            yield
        finally:
            with self._admission:
                self._admitted -= count

    async def classify(self, items: Sequence[Item], labels: Sequence[str], templates: Sequence[str], *,
                       top_k: int = 5, min_prob: float | None = None) -> list[dict]:
        """``clipcli classify``'s records for ``items``."""
        from ..pipeline import label_records
        from ..zeroshot import check_probability

        check_probability(min_prob)
        loaded = self.ready()
        classifier = await self.batcher.call(self._classifier, tuple(labels), tuple(templates))
        results = await self.embed_images(items)
        return list(label_records(loaded, results, classifier, labels, top_k=top_k, min_prob=min_prob))

    def _classifier(self, labels: tuple[str, ...], templates: tuple[str, ...]):
        from ..pipeline import label_classifier

        key = (labels, templates)
        if key not in self._classifiers:
            if len(self._classifiers) >= 64:  # bounded: a client cycling label sets must not grow memory
                self._classifiers.pop(next(iter(self._classifiers)))
            self._classifiers[key] = label_classifier(self.loaded, labels, templates, use_cache=False)  # not on disk: label sets come from anyone
        return self._classifiers[key]

    async def search(self, terms: Sequence["Term"], *, top_k: int = 10, offset: int = 0,
                     threshold: float | None = None, min_prob: float | None = None,
                     under: Sequence[str] = (), after: float | None = None, before: float | None = None,
                     sort: str = "score") -> tuple[list[dict], list[str]]:
        """``clipcli search --format json``'s records, ranks ``offset + 1`` to ``offset + top_k``,
        and the id of each result's file (for :meth:`indexed_file`). The terms are embedded
        like the command's (query images decoded off the model thread, as any request's images),
        summed by :func:`clipcli.search.combine` and ranked by :func:`~clipcli.search.rank`."""
        from ..search import check_min_prob, check_sort, check_threshold, image_item, scaled

        loaded = self.ready()
        check_sort(sort)
        check_threshold(threshold)
        check_min_prob(loaded, min_prob)
        if offset < 0:
            raise InputError(f"{offset}: give 0 or more", option="offset")
        for place in under:  # the server's working folder is nobody's business
            if not os.path.isabs(place):
                raise InputError(f"in={display(place)[:80]}: give an absolute path")
        terms = scaled(terms)
        texts = [t for t in terms if not t.is_image]
        images = [t for t in terms if t.is_image]
        pictures = await self.embed_images([image_item(t) for t in images]) if images else []
        # The texts, the sum and the ranking in one turn of the model thread: torch run from a
        # second thread starts a second OpenMP team, and two teams on the same cores slowed
        # every answer by a fifth (measured)
        return await self.batcher.call(self._rank, texts, images, pictures, top_k, offset, threshold, min_prob,
                                       tuple(under), (after, before), sort)

    def _rank(self, texts, images, pictures, top_k, offset, threshold, min_prob, under, taken,
              sort) -> tuple[list[dict], list[str]]:
        from ..batching import embed_texts
        from ..errors import NoVectorsError
        from ..search import combine, ordered, rank, record, score_kind
        from .files import file_ids

        words = embed_texts(self.loaded, [t.text for t in texts]) if texts else []
        query = combine(texts + images, words + pictures, self.loaded.embed_dim, self.loaded.name)
        with self.open_index() as index:
            try:
                hits = rank(index, self.loaded, query, top_k=offset + top_k, threshold=threshold, min_prob=min_prob,
                            under=under, after=taken[0], before=taken[1])
            except NoVectorsError as error:
                raise NoVectorsError(f"{error.message}; index with it first: clipcli index FOLDER --model "
                                     f"{self.settings.model}") from None
            hits = ordered(hits, sort)[offset:]  # pages continue one order: the best offset + k, then sorted
            ids = file_ids(index, [hit.path for hit in hits])
        kind = score_kind(self.loaded.model)
        return [record(hit, kind) for hit in hits], ids

    # ----------------------------------------------------------------------- what is served

    def health(self) -> dict:
        """``{"status", "model", "score", "images"}``: images is the count of indexed files
        with a vector of this model (None without an index or before the model is loaded)."""
        from ..search import score_kind

        out: dict[str, Any] = {"status": self.status, "model": self.settings.model}
        if self.status == "error":
            out["error"] = str(self.error)
        if self.status != "ok":
            return out
        out["score"] = score_kind(self.loaded.model)
        out["images"] = self._image_count() if self.settings.db is not None else None
        out["batches"] = {"calls": self.batcher.batches, "inputs": self.batcher.batched_inputs,
                          "pending": self.batcher.pending}
        return out

    def _image_count(self) -> int:
        """A join over every file (35 ms at 100,000): counted again when the model's vectors
        changed (its generation) or after 10 s (a file moved or removed keeps the vectors)."""
        import time

        with self.open_index() as index:
            model = index.model_id(identity=self.loaded.identity)
            if model is None:
                return 0
            with index.guard():
                generation = index.db.execute("SELECT generation FROM models WHERE id = ?", (model,)).fetchone()[0]
                cached = self._count
                if cached and cached[0] == (model, generation) and time.monotonic() - cached[1] < 10:
                    return cached[2]
                count = index.db.execute(
                    "SELECT count(*) FROM files f JOIN vectors v ON v.sha256 = f.sha256 AND v.model_id = ?",
                    (model,)).fetchone()[0]
        self._count = ((model, generation), time.monotonic(), count)
        return count

    def indexed_file(self, file_id: str) -> str:
        """The real path of the indexed file ``file_id`` names (see :func:`.files.resolve_id`)."""
        from .files import resolve_id

        with self.open_index() as index:
            return resolve_id(index, file_id)

