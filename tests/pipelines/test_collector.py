"""The call-time garbage collection policy (pipelines/collector.py), on a fake clock."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

import pipeswitch.pipelines.collector as collector
from pipeswitch.pipelines.collector import CallTimeCollector
from pipeswitch.transports import metrics


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def gc_state() -> Iterator[None]:
    """Whatever a test does to automatic collection, the next test starts with it on."""
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        else:
            gc.disable()


def full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


def test_idle_leaves_automatic_collection_alone() -> None:
    clock = Clock()
    c = CallTimeCollector(lambda: 0, clock)
    clock.t += 3600
    assert c.check() is False
    assert gc.isenabled() and not c.paused and c.collections == 0


def test_calls_up_pause_automatic_collection_and_collect_on_the_clock() -> None:
    calls = [0]
    clock = Clock()
    c = CallTimeCollector(lambda: calls[0], clock)
    calls[0] = 3
    assert c.check() is False  # the clock starts when the first call is seen
    assert c.paused and not gc.isenabled()
    clock.t += collector.COLLECT_INTERVAL_SECS - 1
    assert c.check() is False
    before, pauses = full_collections(), metrics.GC_PAUSE._sum.get()
    clock.t += 1
    assert c.check() is True
    assert full_collections() == before + 1 and c.collections == 1
    assert metrics.GC_PAUSE._sum.get() > pauses
    assert not gc.isenabled(), "a collection does not turn automatic collection back on"
    clock.t += collector.COLLECT_INTERVAL_SECS / 2
    assert c.check() is False, "the clock restarts at each collection"
    calls[0] = 0
    assert c.check() is False
    assert gc.isenabled() and not c.paused


def test_growth_makes_a_collection_due_early(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    c = CallTimeCollector(lambda: 1, clock)
    c.check()
    assert c.paused
    monkeypatch.setattr(collector, "GROWTH_LIMIT", 1000)
    keep = [[i] for i in range(2000)]  # 2000 tracked objects, none freed
    assert gc.get_count()[0] >= 1000
    assert c.check() is True
    assert gc.get_count()[0] < 1000
    del keep


def test_the_idle_collection_restarts_the_clock() -> None:
    clock = Clock()
    c = CallTimeCollector(lambda: 1, clock)
    c.check()
    clock.t += collector.COLLECT_INTERVAL_SECS - 1
    c.collect_now("idle")
    clock.t += 2
    assert c.check() is False


def test_automatic_collection_someone_else_turned_off_stays_off() -> None:
    """A process (a test) running without automatic collection: calls ending must not
    turn it on, and the periodic collections still run."""
    gc.disable()
    calls = [2]
    clock = Clock()
    c = CallTimeCollector(lambda: calls[0], clock)
    c.check()
    assert not c.paused
    clock.t += collector.COLLECT_INTERVAL_SECS
    assert c.check() is True
    calls[0] = 0
    c.check()
    assert not gc.isenabled()


def test_the_automatic_experiment_keeps_collection_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collector, "PAUSE_AUTOMATIC", False)
    c = CallTimeCollector(lambda: 5, Clock())
    c.check()
    assert gc.isenabled() and not c.paused


async def test_the_task_applies_the_policy_and_stop_restores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(collector, "CHECK_SECS", 0.01)
    calls = [1]
    c = CallTimeCollector(lambda: calls[0])
    c.start()
    for _ in range(100):
        if c.paused:
            break
        await asyncio.sleep(0.01)
    assert c.paused and not gc.isenabled()
    await c.stop()
    assert gc.isenabled() and not c.paused


async def test_a_failing_check_does_not_end_the_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collector, "CHECK_SECS", 0.01)
    seen: list[int] = []

    def calls() -> int:
        seen.append(1)
        if len(seen) == 1:
            raise RuntimeError("sessions gone")
        return 0

    c = CallTimeCollector(calls)
    c.start()
    for _ in range(100):
        if len(seen) >= 3:
            break
        await asyncio.sleep(0.01)
    await c.stop()
    assert len(seen) >= 3


def test_ended_calls_make_a_collection_due(monkeypatch: pytest.MonkeyPatch) -> None:
    """A never-idle server with short calls: their leftovers are collected every so many
    ended calls, long before the clock would."""
    monkeypatch.setattr(collector, "COLLECT_EVERY_CALLS", 3)
    clock = Clock()
    c = CallTimeCollector(lambda: 4, clock)
    c.check()
    c.call_ended()
    c.call_ended()
    assert c.check() is False
    c.call_ended()
    before = full_collections()
    assert c.check() is True and full_collections() == before + 1
    c.call_ended()
    assert c.check() is False, "the count restarts at each collection"
    c.collect_now("idle")
    c.call_ended()
    c.call_ended()
    assert c.check() is False, "the idle collection restarts the count too"
