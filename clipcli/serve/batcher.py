"""One model thread for many requests: those that arrive together run as one model call.

A request hands its inputs to :meth:`Batcher.embed` and awaits the result; the model thread
takes the oldest job, waits up to ``window`` seconds for more jobs of the same kind (until
``max_items`` inputs), runs them as one call of ``run(kind, inputs)`` and hands each job its
own slice of the results. So eight clients asking for one image each cost one batch of eight,
not eight batches of one; a request alone (no other under way) does not wait at all. Other work that must not
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
        self._stopping = False
        self.batches = 0  # model calls made, and the inputs they held (for /health and tests)
        self.batched_inputs = 0
        self.pending = 0  # jobs submitted and not answered yet

    def start(self) -> None:
        with self._lock:
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name="clipcli-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish those queued so far, then end the model thread."""
        with self._lock:
            thread, self._stopping = self._thread, True
            if thread is not None:
                self._jobs.put(_STOP)
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            self._thread = None

    async def embed(self, kind: Hashable, inputs: Sequence[Any]) -> list:
        """``run(kind, inputs)``'s results for these inputs, batched with other jobs of ``kind``."""
        if not inputs:
            return []
        return await self._submit(kind, inputs, None)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the model thread, between batches."""
        return await self._submit(None, (), functools.partial(fn, *args))

    async def _submit(self, kind, inputs, call) -> Any:
        loop = asyncio.get_running_loop()
        size = max(1, len(inputs))
        job = _Job(kind, inputs, loop.create_future(), loop, call)
        with self._lock:  # queued under the lock: never behind the stop marker
            if self._thread is None or self._stopping:
                raise Busy("the model is not running")
            if self._waiting + size > self.max_queue and self._waiting:
                raise Busy(f"{self._waiting} inputs are waiting for the model")
            self._waiting += size
            self.pending += 1
            self._jobs.put(job)
        try:
            return await job.future
        finally:
            with self._lock:
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
            if job.future.cancelled():  # its request is gone
                continue
            if job.call is not None:
                self._settle([job], job.call)
                continue
            batch, count = [job], len(job.inputs)
            # A window only when other requests are under way: a lone one never waits for company
            deadline = time.monotonic() + (self.window if self.pending > 1 else 0.0)
            while count < self.max_items:
                try:
                    more = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is _STOP or more.kind != job.kind or count + len(more.inputs) > self.max_items:
                    held = more
                    break
                self._take(more)
                if not more.future.cancelled():
                    batch.append(more)
                    count += len(more.inputs)
            if not self._settle(batch, self._batch_of(job.kind, batch)) and len(batch) > 1:
                for member in batch:  # one job's input broke the batch: the others are answered alone
                    self._settle([member], self._batch_of(member.kind, [member]))
            self.batches += 1
            self.batched_inputs += count

    def _batch_of(self, kind: Hashable, batch: list[_Job]) -> Callable[[], list]:
        """The model call for ``batch``, checked to give one result per input."""
        inputs = [x for member in batch for x in member.inputs]

        def work() -> list:
            results = list(self._run(kind, inputs))
            if len(results) != len(inputs):
                raise RuntimeError(f"the model gave {len(results)} results for {len(inputs)} inputs")
            return results

        return work

    @staticmethod
    def _settle(batch: list[_Job], work: Callable[[], Any]) -> bool:
        """Run ``work`` and hand each job its part of the answer; whether it ran. A failure
        alone in its batch goes to its request; the model thread never ends on one."""
        try:
            result = work()
        except Exception as error:  # noqa: BLE001 (the request is answered with it; the thread goes on)
            if len(batch) == 1:
                _answer(batch[0], _fail, error)
            return False
        if batch[0].call is not None:
            _answer(batch[0], _succeed, result)
            return True
        start = 0
        for job in batch:
            _answer(job, _succeed, result[start : start + len(job.inputs)])
            start += len(job.inputs)
        return True


def _answer(job: _Job, settle: Callable, value: Any) -> None:
    try:
        job.loop.call_soon_threadsafe(settle, job.future, value)
    except RuntimeError:  # its event loop has closed: nobody is waiting
        pass


def _succeed(future: asyncio.Future, value: Any) -> None:
    if not future.done():  # a client that went away cancelled it
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
