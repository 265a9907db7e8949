"""The batching queue (service.http.batching) with plain Python batch functions, no ONNX; and the two
classes built on it or beside it: ServedModel's batching and lifecycle with a stand-in model, and the
worker's Explainers cache.

Nothing here depends on the machine's speed: items are queued before the batching task runs (asyncio
runs ready callbacks in order), a batch that must stay open is held by a gate, and waits that could
end by timing are set far longer than any test runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from service.http.batching import BatchQueue, BatchQueueClosedError

LONG_MS = 600_000.0  # "wait for more" that never ends by itself within a test


class Recorder:
    """A batch function that remembers each batch and answers each item with ``item * 10``."""

    def __init__(self, fail_on: object = None) -> None:
        self.batches: list[list[Any]] = []
        self.fail_on = fail_on

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on!r}")
        return [item * 10 for item in items]

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


class Gate(Recorder):
    """A Recorder whose first batch waits, in its thread, until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, items: list[Any]) -> list[Any]:
        if not self.entered.is_set():
            self.entered.set()
            assert self.opened.wait(60), "the test never opened the gate"
        return super().__call__(items)


async def _submit_all(queue: BatchQueue[Any, Any], items: Sequence[Any]) -> list[Any]:
    """Submit concurrently: gather starts every submit before the batching task first runs."""
    return await asyncio.gather(*(queue.submit(item) for item in items), return_exceptions=True)


def test_items_submitted_together_go_in_one_batch() -> None:
    fn = Recorder()
    seen: list[int] = []
    queue = BatchQueue(fn, max_batch_size=8, wait_ms=LONG_MS, on_batch=lambda size, seconds: seen.append(size))
    assert queue.task is None  # built outside any event loop: the task starts at the first submit

    answers = asyncio.run(_submit_all(queue, range(8)))
    assert answers == [i * 10 for i in range(8)]  # each caller gets its own row
    assert fn.sizes == [8] and seen == [8]


def test_a_batch_waits_for_more_until_it_is_full() -> None:
    fn = Recorder()
    queue = BatchQueue(fn, max_batch_size=6, wait_ms=LONG_MS)

    async def scenario() -> list[Any]:
        early = asyncio.gather(*(queue.submit(i) for i in range(4)))
        await asyncio.sleep(0)  # the four are queued; the batching task takes them before 4 and 5 come
        late = await _submit_all(queue, [4, 5])
        return [*await early, *late]

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40, 50]
    assert fn.sizes == [6]


def test_max_batch_size_is_respected() -> None:
    fn = Recorder()
    queue = BatchQueue(fn, max_batch_size=4, wait_ms=0)
    answers = asyncio.run(_submit_all(queue, range(10)))
    assert answers == [i * 10 for i in range(10)]
    assert fn.sizes == [4, 4, 2] and fn.batches[0] == [0, 1, 2, 3]  # in order of arrival


def test_an_exception_reaches_every_waiting_caller_and_the_loop_goes_on() -> None:
    fn = Recorder(fail_on=2)
    queue = BatchQueue(fn, max_batch_size=8, wait_ms=0)

    async def scenario() -> tuple[list[Any], list[Any]]:
        return await _submit_all(queue, range(4)), await _submit_all(queue, [5, 6])

    failed, after = asyncio.run(scenario())
    assert all(isinstance(a, ValueError) and "bad item 2" in str(a) for a in failed), failed
    assert after == [50, 60] and fn.sizes == [4, 2]


def test_a_batch_function_that_returns_the_wrong_number_of_rows_fails_every_caller() -> None:
    queue = BatchQueue(lambda items: items[:-1], max_batch_size=8, wait_ms=0)
    answers = asyncio.run(_submit_all(queue, range(3)))
    assert all(isinstance(a, RuntimeError) and "2 results for 3 items" in str(a) for a in answers), answers


def test_a_cancelled_callers_item_is_skipped() -> None:
    fn = Gate()
    queue = BatchQueue(fn, max_batch_size=8, wait_ms=0)

    async def scenario() -> tuple[Any, Any, Any]:
        first = asyncio.ensure_future(queue.submit("a"))
        await asyncio.to_thread(fn.entered.wait, 60)  # batch ["a"] is running: what follows queues behind
        gone, kept = asyncio.ensure_future(queue.submit("b")), asyncio.ensure_future(queue.submit("c"))
        await asyncio.sleep(0)  # both are queued (each submit ran up to its await)
        gone.cancel()
        fn.opened.set()
        return await asyncio.gather(first, gone, kept, return_exceptions=True)

    a, b, c = asyncio.run(scenario())
    assert a == "a" * 10 and isinstance(b, asyncio.CancelledError) and c == "c" * 10
    assert fn.batches == [["a"], ["c"]]  # "b" never reached the batch function


def test_close_ends_the_loop_after_the_queued_items_are_answered() -> None:
    fn = Recorder()
    queue = BatchQueue(fn, max_batch_size=2, wait_ms=LONG_MS)

    async def scenario() -> list[Any]:
        async def close() -> None:
            queue.close()  # runs after the five submits queued their items, before the task gathers

        answers = await asyncio.gather(*(queue.submit(i) for i in range(5)), close())
        assert queue.task is not None
        await queue.task  # it ends by itself: no waiting out LONG_MS for a sixth item
        with pytest.raises(BatchQueueClosedError):
            await queue.submit(9)
        return answers[:5]

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40]
    assert fn.sizes == [2, 2, 1] and queue.closed


def test_close_while_a_batch_waits_for_more_runs_that_batch() -> None:
    fn = Recorder()
    queue = BatchQueue(fn, max_batch_size=8, wait_ms=LONG_MS)

    async def scenario() -> list[Any]:
        waiting = asyncio.gather(*(queue.submit(i) for i in range(3)))
        for _ in range(2):  # let the three queue up and the batching task take them and wait for more
            await asyncio.sleep(0)
        queue.close()  # the batch runs now, not LONG_MS later
        return await waiting

    assert asyncio.run(scenario()) == [0, 10, 20] and fn.sizes == [3]


def test_close_before_any_submit_starts_nothing() -> None:
    queue = BatchQueue(Recorder())
    queue.close()
    queue.close()  # idempotent
    with pytest.raises(BatchQueueClosedError):
        asyncio.run(queue.submit(1))
    assert queue.task is None


def test_max_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchQueue(Recorder(), max_batch_size=0)


# --- ServedModel on the queue, with a stand-in for OnnxModel ------------------------------------------------


class FakeModel:
    """What ServedModel uses of an OnnxModel: logits = the input's sum per row, features = the input."""

    def __init__(self) -> None:
        self.session: object | None = object()
        self.manifest = SimpleNamespace(temperature=1.0)
        self.key, self.provider, self.load_seconds = "fake:1", "CPUExecutionProvider", 0.0
        self.calls: list[tuple[tuple[str, ...], int]] = []

    def logits(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append((("logits",), len(batch)))
        return _sums(batch)

    def run(self, names: Sequence[str], batch: np.ndarray) -> list[np.ndarray]:
        self.calls.append((tuple(names), len(batch)))
        return [_sums(batch), batch * 2][: len(names)]


def _sums(batch: np.ndarray) -> np.ndarray:
    return np.stack([batch.sum(axis=1), -batch.sum(axis=1)], axis=1)


def test_served_model_runs_one_call_per_batch_with_every_output_asked_for() -> None:
    from service.http.served import ServedModel

    model, sizes = FakeModel(), []
    served = ServedModel(model, max_batch_size=3, batch_wait_ms=LONG_MS,  # type: ignore[arg-type]
                         on_batch=lambda who, size, _seconds: sizes.append((who.key, size)))
    x = np.array([1.0, 2.0], np.float32)

    async def scenario() -> list[Any]:
        return await asyncio.gather(served.infer(x), served.infer_outputs(x, ("features",)), served.infer(x))

    logits, (logits2, features), logits3 = asyncio.run(scenario())
    assert sizes == [("fake:1", 3)] and model.calls == [(("logits", "features"), 3)]  # one call, both outputs
    assert np.allclose(logits, [3, -3]) and np.allclose(logits2, logits) and np.allclose(features, x * 2)
    assert np.array_equal(logits3, logits)  # infer: the logits; answers are made by service.answer


def test_retirement_waits_for_the_last_lease_then_stops_the_task_and_drops_the_session() -> None:
    from service.http.served import ModelRetiredError, ServedModel

    model = FakeModel()
    served = ServedModel(model, max_batch_size=4, batch_wait_ms=0)  # type: ignore[arg-type]
    x = np.ones(2, np.float32)

    async def scenario() -> None:
        with served.lease() as held:
            await held.infer(x)
            served.retire()
            assert not served.closed  # the request in flight keeps its session ...
            await held.infer(x)
            with pytest.raises(ModelRetiredError), served.lease():
                pass  # ... but no new request gets the model
        assert served.closed and model.session is None  # ... and the session went with the last lease
        assert served._task is not None
        await served._task  # the batching task ended by itself
        with pytest.raises(ModelRetiredError):
            await served.infer(x)

    asyncio.run(scenario())


# --- the worker's explainers ------------------------------------------------------------------------------


def test_explainers_build_once_per_served_model_and_forget_the_retired(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cam import ExplainError
    from service.http import explainers
    from service.http.served import ServedModel

    built: list[object] = []

    def fake_explainer(model: Any) -> object:
        if getattr(model, "broken", False):
            raise ExplainError("no head file")
        built.append(model)
        return SimpleNamespace(model=model)

    monkeypatch.setattr(explainers, "Explainer", fake_explainer)
    cache = explainers.Explainers()
    served = ServedModel(FakeModel())  # type: ignore[arg-type]
    rolled_back = ServedModel(FakeModel())  # type: ignore[arg-type] # the same key, a new model object
    broken = ServedModel(FakeModel())  # type: ignore[arg-type]
    broken.model.key, broken.model.broken = "broken:1", True  # type: ignore[attr-defined]

    async def scenario() -> None:
        first, second = await asyncio.gather(cache.get(served), cache.get(served))
        assert first is second and built == [served.model]  # concurrent first requests share one build
        assert (await cache.get(rolled_back)).model is rolled_back.model
        cache.forget([served])  # not the entry it holds: rolled_back's stays
        assert (await cache.get(rolled_back)).model is rolled_back.model and len(built) == 2
        cache.forget([rolled_back])
        await cache.get(rolled_back)
        assert len(built) == 3  # built again after forget
        for _ in range(2):  # a failed build is not kept: each request tries again
            with pytest.raises(ExplainError, match="no head file"):
                await cache.get(broken)

    asyncio.run(scenario())
