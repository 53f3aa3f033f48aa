"""Deadline-ordered synthesis slots: the call that needs audio soonest goes first."""

from __future__ import annotations

import asyncio

from pipeswitch.pipelines.local.scheduling import BURST_GAP_SECS, DeadlineSlots


def test_deadlines_follow_produced_audio() -> None:
    s = DeadlineSlots()
    assert s.deadline("a", now=10.0) == 10.0  # nothing playing: due now
    s.produced("a", 2.0, now=10.0)
    assert s.deadline("a", now=10.1) == 12.0  # due when its audio runs out
    s.produced("a", 1.5, now=10.2)
    assert s.deadline("a", now=10.3) == 13.5
    # Long after the audio ran out, a new bot turn is due immediately.
    assert s.deadline("a", now=13.5 + BURST_GAP_SECS + 0.1) == 13.5 + BURST_GAP_SECS + 0.1


async def test_urgent_first_sentence_overtakes_queued_later_sentences() -> None:
    s = DeadlineSlots(capacity=1)
    order: list[str] = []
    await s.acquire(0.0)  # a synthesis is running

    async def want(name: str, deadline: float) -> None:
        await s.acquire(deadline)
        order.append(name)
        s.release()

    later = [asyncio.create_task(want(f"B{i}", 100.0 + i)) for i in range(3)]
    await asyncio.sleep(0)
    urgent = asyncio.create_task(want("A-first", 50.0))
    await asyncio.sleep(0)
    s.release()
    await asyncio.gather(*later, urgent)
    assert order == ["A-first", "B0", "B1", "B2"]


async def test_cancelled_waiter_does_not_leak_the_slot() -> None:
    s = DeadlineSlots(capacity=1)
    await s.acquire(0.0)
    t = asyncio.create_task(s.acquire(1.0))
    await asyncio.sleep(0)
    t.cancel()
    s.release()
    await asyncio.sleep(0)
    await asyncio.wait_for(s.acquire(2.0), 1.0)  # the slot is free again
