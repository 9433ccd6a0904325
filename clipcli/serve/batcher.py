"""One model thread for many requests: those that arrive together run as one model call.

A request hands its inputs to :meth:`Batcher.embed` and awaits the result; the model thread
takes the oldest job, waits up to ``window`` seconds for more jobs of the same kind (until
``max_items`` inputs), runs them as one call of ``run(kind, inputs)`` and hands each job its
own slice of the results. So eight clients asking for one image each cost one batch of eight,
not eight batches of one; a lone request waits only the window. Other work that must not
run beside the model (a search, building a label classifier) goes through :meth:`call` and
runs on the same thread, in turn.

The queue is bounded: past ``max_queue`` waiting inputs a new job is refused at once with
:class:`Busy` (the server answers 503 with Retry-After) rather than queued without end. The
event loop never runs the model: a slow model call delays answers, never the server.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence


class Busy(Exception):
    """The queue is full: try again shortly."""


@dataclass
class _Job:
    kind: Hashable  # jobs of one kind batch together; None: a call, run alone
    inputs: Sequence[Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    call: Callable[[], Any] | None = None
    queued: float = field(default_factory=time.monotonic)


_STOP = object()


class Batcher:
    """See the module docstring. ``run(kind, inputs)`` returns one result per input, in order."""

    def __init__(self, run: Callable[[Hashable, list], Sequence[Any]], *, window: float = 0.004,
                 max_items: int = 32, max_queue: int = 1024):
        self._run = run
        self.window = window
        self.max_items = max_items
        self.max_queue = max_queue
        self._jobs: queue.Queue = queue.Queue()
        self._waiting = 0  # inputs queued, not yet taken by the model thread
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches = 0  # model calls made, and the inputs they held (for /health and tests)
        self.batched_inputs = 0
        self.pending = 0  # jobs submitted and not answered yet

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="clipcli-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs queued so far, then end the model thread."""
        if self._thread is not None:
            self._jobs.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    async def embed(self, kind: Hashable, inputs: Sequence[Any]) -> list:
        """``run(kind, inputs)``'s results for these inputs, batched with other jobs of ``kind``."""
        if not inputs:
            return []
        return await self._submit(kind, inputs, None)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the model thread, between batches."""
        return await self._submit(None, (), lambda: fn(*args))

    async def _submit(self, kind, inputs, call) -> Any:
        loop = asyncio.get_running_loop()
        size = max(1, len(inputs))
        with self._lock:
            if self._thread is None:
                raise Busy("the model is not running")
            if self._waiting + size > self.max_queue and self._waiting:
                raise Busy(f"{self._waiting} inputs are waiting for the model")
            self._waiting += size
        job = _Job(kind, inputs, loop.create_future(), loop, call)
        self.pending += 1
        try:
            self._jobs.put(job)
            return await job.future
        finally:
            self.pending -= 1

    def _take(self, job: _Job) -> None:
        with self._lock:
            self._waiting -= max(1, len(job.inputs))

    def _serve(self) -> None:
        held: _Job | None = None  # a job of another kind, taken while collecting: it goes next
        while True:
            job = held if held is not None else self._jobs.get()
            held = None
            if job is _STOP:
                return
            self._take(job)
            if job.call is not None:
                self._settle([job], job.call)
                continue
            batch, count = [job], len(job.inputs)
            deadline = time.monotonic() + self.window
            while count < self.max_items:
                try:
                    more = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is _STOP or more.kind != job.kind or count + len(more.inputs) > self.max_items:
                    held = more
                    break
                self._take(more)
                batch.append(more)
                count += len(more.inputs)
            inputs = [x for member in batch for x in member.inputs]
            self._settle(batch, functools.partial(self._run, job.kind, inputs))
            self.batches += 1
            self.batched_inputs += count

    @staticmethod
    def _settle(batch: list[_Job], work: Callable[[], Any]) -> None:
        """Run ``work`` and hand each job its part of the answer (or the error)."""
        try:
            result = work()
        except BaseException as error:  # the request gets it; the model thread goes on
            for job in batch:
                job.loop.call_soon_threadsafe(_fail, job.future, error)
            return
        if batch[0].call is not None:
            batch[0].loop.call_soon_threadsafe(_succeed, batch[0].future, result)
            return
        result, start = list(result), 0
        for job in batch:
            part = result[start : start + len(job.inputs)]
            start += len(job.inputs)
            job.loop.call_soon_threadsafe(_succeed, job.future, part)


def _succeed(future: asyncio.Future, value: Any) -> None:
    if not future.done():  # a client that went away cancelled it
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
