"""The model thread of `clipcli serve` (clipcli/serve/batcher.py) with a fake model: requests
that arrive together share a call, each gets its own slice, a bad input fails only its own
request, the queue is bounded, and stopping refuses new work but finishes what was queued."""

from __future__ import annotations

import asyncio
import threading

import pytest

from clipcli.serve.batcher import Batcher, Busy


class Model:
    """Doubles numbers; an input "bad" breaks the whole call, as a bug would."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[tuple] = []
        self.threads: set[str] = set()
        self.gate = gate

    def __call__(self, kind, inputs):
        if self.gate is not None:
            self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        self.calls.append((kind, list(inputs)))
        if "bad" in inputs:
            raise ValueError("a bad input")
        return [x * 2 for x in inputs]


def run(coroutine):
    return asyncio.run(coroutine)


def test_requests_that_arrive_together_share_one_call_and_get_their_own_slices():
    model = Model()
    batcher = Batcher(model, window=0.05, max_items=100)
    batcher.start()

    async def go():
        return await asyncio.gather(*(batcher.embed("n", [i, i + 100]) for i in range(8)))

    answers = run(go())
    batcher.stop()
    assert answers == [[2 * i, 2 * (i + 100)] for i in range(8)]
    assert len(model.calls) < 8 and sum(len(c[1]) for c in model.calls) == 16
    assert model.threads == {"clipcli-model"}
    assert (batcher.batches, batcher.batched_inputs) == (len(model.calls), 16)


def test_kinds_never_mix_and_a_job_of_another_kind_is_not_lost():
    model = Model()
    batcher = Batcher(model, window=0.05, max_items=100)
    batcher.start()

    async def go():
        return await asyncio.gather(batcher.embed("a", [1]), batcher.embed("b", [2]), batcher.embed("a", [3]))

    assert run(go()) == [[2], [4], [6]]
    batcher.stop()
    assert all(len({kind}) == 1 for kind, _ in model.calls)
    assert sorted(x for _, inputs in model.calls for x in inputs) == [1, 2, 3]


def test_a_job_larger_than_a_batch_runs_alone_and_batches_stay_within_max_items():
    model = Model()
    batcher = Batcher(model, window=0.05, max_items=4)
    batcher.start()

    async def go():
        return await asyncio.gather(batcher.embed("n", list(range(10))), batcher.embed("n", [1, 2, 3]),
                                    batcher.embed("n", [4, 5]))

    big, *small = run(go())
    batcher.stop()
    assert big == [2 * x for x in range(10)] and small == [[2, 4, 6], [8, 10]]
    assert all(len(inputs) <= 4 for _, inputs in model.calls if inputs != list(range(10)))


def test_a_bad_input_fails_only_its_own_request():
    model = Model()
    batcher = Batcher(model, window=0.05, max_items=100)
    batcher.start()

    async def go():
        return await asyncio.gather(batcher.embed("n", [1]), batcher.embed("n", ["bad"]), batcher.embed("n", [3]),
                                    return_exceptions=True)

    first, broken, third = run(go())
    batcher.stop()
    assert first == [2] and third == [6]
    assert isinstance(broken, ValueError)
    assert run(_after(batcher)) == "stopped"


async def _after(batcher):
    try:
        await batcher.embed("n", [1])
    except Busy:
        return "stopped"
    return "answered"


def test_a_full_queue_refuses_at_once_and_stopping_finishes_what_was_queued():
    gate = threading.Event()
    model = Model(gate)
    batcher = Batcher(model, window=0.0, max_items=2, max_queue=4)
    batcher.start()

    async def go():
        first = asyncio.ensure_future(batcher.embed("n", [1, 2]))  # taken by the model, held at the gate
        while not model.calls and batcher._waiting:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.embed("n", [i])) for i in (3, 4, 5, 6)]
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            await batcher.embed("n", [7])
        gate.set()
        return await first, await asyncio.gather(*queued)

    first, queued = run(go())
    assert first == [2, 4] and queued == [[6], [8], [10], [12]]
    batcher.stop()
    assert run(_after(batcher)) == "stopped"


def test_calls_run_on_the_model_thread_one_at_a_time():
    seen = []
    batcher = Batcher(Model(), window=0.0)
    batcher.start()

    def work(x):
        seen.append((threading.current_thread().name, x))
        return x + 1

    async def go():
        return await asyncio.gather(*(batcher.call(work, i) for i in range(5)))

    assert run(go()) == [1, 2, 3, 4, 5]
    batcher.stop()
    assert {name for name, _ in seen} == {"clipcli-model"}
