"""The process's playout clock: lanes with recording sends, the real loop and clock.

What must hold whatever the machine's speed: a frame never leaves before the far end
is down to the lead; what is due leaves without waiting for the clock; one round
serves every lane that is due; a lane that cannot send holds up nobody else.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeswitch.transports.pacer import EARLY_SECS, PlayoutLane, PlayoutPacer

pytestmark = pytest.mark.asyncio(loop_scope="function")

FRAME = 0.02


class Wire:
    """A lane's socket: records what left and when, and how much the far end held."""

    def __init__(self, lead: float, *, fail_after: int | None = None) -> None:
        self.sent: list[tuple[float, bytes]] = []
        self.held_before: list[float] = []  # far end's queued audio when each frame left
        self.backlog = 0
        self.fail_after = fail_after
        self.lane = PlayoutLane(self.send, self.on_sent, lead, backlog=lambda: self.backlog)
        self.dry: list[float] = []

    async def send(self, payload: str | bytes) -> bool:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            return False
        now = time.monotonic()
        self.held_before.append(max(0.0, self.lane.play_until - now))
        self.sent.append((now, bytes(payload) if isinstance(payload, bytes) else b""))
        return True

    def on_sent(self, secs: float, dry: float) -> None:
        self.dry.append(dry)


def frames(n: int, tag: int = 0) -> list[tuple[str | bytes, float]]:
    return [(bytes([tag, i]), FRAME) for i in range(n)]


async def test_what_is_due_leaves_at_once_the_rest_on_the_clock_never_early() -> None:
    wire = Wire(lead=0.02)
    t0 = time.monotonic()
    play = asyncio.ensure_future(wire.lane.play(frames(10)))
    await asyncio.sleep(0)  # play() has run up to its first wait
    # The far end was dry: the first frame and one more (the lead) left without the clock.
    assert len(wire.sent) == 2 and wire.sent[1][0] - t0 < 0.01
    assert await asyncio.wait_for(play, 2.0) is True
    assert [p[1] for _, p in wire.sent] == list(range(10))
    # Never ahead of the lead: the far end held at most the lead when a frame left.
    assert max(wire.held_before) <= 0.02 + EARLY_SECS + 1e-6
    # Real time: ten 20 ms frames with a 20 ms lead take about 160 ms to hand over.
    assert wire.sent[-1][0] - t0 >= 0.16 - 0.02
    assert wire.lane.pending_secs == 0


async def test_one_round_serves_every_lane_that_is_due() -> None:
    wires = [Wire(lead=0.02) for _ in range(8)]
    pacer = PlayoutPacer.for_running_loop()
    before = pacer.rounds
    done = await asyncio.wait_for(
        asyncio.gather(*(w.lane.play(frames(12, tag=i)) for i, w in enumerate(wires))), 3.0
    )
    assert all(done)
    assert all([p[1] for _, p in w.sent] == list(range(12)) for w in wires)
    # Eight lanes in step: the clock woke about once per frame for all of them, not 8x.
    assert pacer.rounds - before <= 12 + 4


async def test_a_peer_that_stops_reading_holds_up_only_its_own_call() -> None:
    stuck, fine = Wire(lead=0.02), Wire(lead=0.02)
    stuck.backlog = 10**6  # the kernel holds a megabyte for this peer: it is not reading
    stuck_play = asyncio.ensure_future(stuck.lane.play(frames(10)))
    assert await asyncio.wait_for(fine.lane.play(frames(10)), 2.0) is True
    assert len(fine.sent) == 10 and not stuck.sent and not stuck_play.done()
    stuck.backlog = 0  # it reads again
    assert await asyncio.wait_for(stuck_play, 2.0) is True
    assert [p[1] for _, p in stuck.sent] == list(range(10))


async def test_clear_drops_what_has_not_left_and_releases_the_writer() -> None:
    wire = Wire(lead=0.02)
    play = asyncio.ensure_future(wire.lane.play(frames(20)))
    while len(wire.sent) < 4:
        await asyncio.sleep(0.005)
    wire.lane.clear()  # barge-in
    assert await asyncio.wait_for(play, 1.0) is False
    sent = len(wire.sent)
    await asyncio.sleep(0.1)
    assert len(wire.sent) == sent < 20 and wire.lane.pending_secs == 0


async def test_a_peer_gone_ends_its_lane_not_the_clock() -> None:
    gone, fine = Wire(lead=0.02, fail_after=3), Wire(lead=0.02)
    results = await asyncio.wait_for(
        asyncio.gather(gone.lane.play(frames(10)), fine.lane.play(frames(10))), 2.0
    )
    assert results == [False, True]
    assert len(gone.sent) == 3 and gone.lane.pending_secs == 0
    assert len(fine.sent) == 10


async def test_a_lane_that_raises_is_dropped_and_the_others_play_on() -> None:
    fine = Wire(lead=0.02)

    async def broken(payload: str | bytes) -> bool:
        if broken_lane.play_until > 0:  # the first frames go inline; the clock's one raises
            raise RuntimeError("socket exploded")
        return True

    def count(secs: float, dry: float) -> None:
        return None

    broken_lane = PlayoutLane(broken, count, 0.0)
    play = asyncio.ensure_future(broken_lane.play(frames(5)))
    assert await asyncio.wait_for(fine.lane.play(frames(10)), 2.0) is True
    assert await asyncio.wait_for(play, 1.0) is False
    assert broken_lane.pending_secs == 0
