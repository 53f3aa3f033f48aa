"""One playout clock per worker process for every call's bot audio.

Each call used to pace its own bot audio: a task woke up every 20 ms (a timer, a future,
a task step) to send one wire frame. With a hundred calls that is five thousand wake-ups a
second on the loop that also reads every caller's audio. Here a call hands its encoded
frames to its :class:`PlayoutLane` and waits once per chunk (100 ms); one task per process
wakes when the earliest lane is due and sends, in one pass, every frame of every lane that
is due by then.

Sending stays exact: a lane's frame is due when the far end has no more than the dialect's
playout lead queued (as before, ``1 ms`` early at most). A lane whose socket is not
draining (the peer stopped reading) is skipped and retried a frame later, so one stuck
peer never holds up another call's audio; its writer then times out as before.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable

# Frames may leave this much before they are due (the far end's buffer has that slack).
EARLY_SECS = 1e-3
# A socket holding more than this unsent is not draining: skip the lane this round.
BACKLOG_BYTES = 16 * 1024
# How long a lane that could not send waits before it is tried again.
RETRY_SECS = 0.02


class PlayoutLane:
    """One call's encoded bot audio waiting for its time on the wire.

    The owner (the call's output transport) gives it ``send`` (one wire message;
    False when the peer is gone), ``on_sent`` (called as each frame leaves with its
    seconds and how long the far end had been dry, negative when it was not: where
    playback facts and underruns are counted), ``lead_secs`` and ``backlog`` (bytes
    the socket has not sent yet; absent: never blocks).
    """

    __slots__ = (
        "_drained",
        "_frames",
        "_pacer",
        "_scheduled",
        "backlog",
        "lead_secs",
        "on_sent",
        "play_until",
        "send",
    )

    def __init__(
        self,
        send: Callable[[str | bytes], Awaitable[bool]],
        on_sent: Callable[[float, float], None],
        lead_secs: float,
        backlog: Callable[[], int] | None = None,
    ) -> None:
        self.send = send
        self.on_sent = on_sent
        self.lead_secs = lead_secs
        self.backlog = backlog
        # Wall-clock time at which the far end finishes playing what has been sent.
        self.play_until = 0.0
        self._frames: deque[tuple[str | bytes, float]] = deque()
        self._drained: asyncio.Future[bool] | None = None
        self._scheduled = False
        self._pacer: PlayoutPacer | None = None

    @property
    def pending_secs(self) -> float:
        """Audio handed over but not sent yet."""
        return sum(secs for _, secs in self._frames)

    def due_at(self) -> float:
        """When the next frame may leave: the far end then holds no more than the lead
        (with it, lead plus one frame), as the per-call pacing did."""
        return self.play_until - self.lead_secs

    async def play(self, frames: list[tuple[str | bytes, float]]) -> bool:
        """Queue encoded frames; return once all have been sent (True) or dropped (False).

        What is due at once leaves at once, from here (a reply's first frame does not
        wait for the pacer's next round); the rest leaves on the pacer's clock.
        """
        self._frames.extend(frames)
        if not await self.pump(time.monotonic()):
            return False
        if not self._frames:
            return True
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()
        self._schedule()
        return await self._drained

    def clear(self) -> None:
        """Drop what has not been sent (barge-in, call ending); a waiting writer gets False."""
        self._frames.clear()
        self._resolve(False)

    async def pump(self, now: float) -> bool:
        """Send every frame that is due by ``now``; False when the peer is gone."""
        frames = self._frames
        while frames:
            if self.play_until - self.lead_secs > now + EARLY_SECS:
                return True
            if self.backlog is not None and self.backlog() > BACKLOG_BYTES:
                return True  # not draining: the pacer retries later
            payload, secs = frames.popleft()
            if not await self.send(payload):
                self.clear()
                return False
            gap = now - self.play_until
            self.play_until = max(self.play_until, now) + secs
            self.on_sent(secs, gap)
        self._resolve(True)
        return True

    def _resolve(self, ok: bool) -> None:
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            waiter.set_result(ok)

    def _schedule(self) -> None:
        if self._scheduled or not self._frames:
            return
        pacer = self._pacer
        if pacer is None:
            pacer = self._pacer = PlayoutPacer.for_running_loop()
        self._scheduled = True
        pacer.schedule(self, self.due_at())


class PlayoutPacer:
    """The process's playout clock: one task, woken when the earliest lane is due."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PlayoutPacer] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, PlayoutLane]] = []
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._wake_at = float("inf")
        # Rounds run (one per wake-up): the bench reads them.
        self.rounds = 0

    @classmethod
    def for_running_loop(cls) -> PlayoutPacer:
        """The pacer of the running loop (one per worker process in practice)."""
        loop = asyncio.get_running_loop()
        pacer = cls._by_loop.get(loop)
        if pacer is None:
            pacer = cls._by_loop[loop] = cls(loop)
        return pacer

    def schedule(self, lane: PlayoutLane, due: float) -> None:
        """Run ``lane`` once ``due`` has come."""
        heapq.heappush(self._heap, (due, next(self._seq), lane))
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._run(), name="playout-pacer")
        elif due < self._wake_at:
            self._arm(due)

    def _arm(self, due: float) -> None:
        """(Re)set the wake-up to ``due`` (monotonic seconds)."""
        if self._wake is None or self._wake.done():
            return
        if self._timer is not None:
            self._timer.cancel()
        self._wake_at = due
        delay = due - time.monotonic()
        if delay <= 0:
            self._timer = None
            self._wake.set_result(None)
        else:
            self._timer = self._loop.call_later(delay, self._ring)

    def _ring(self) -> None:
        self._timer = None
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _run(self) -> None:
        heap = self._heap
        while heap:
            now = time.monotonic()
            due = heap[0][0]
            if due > now + EARLY_SECS:
                self._wake = self._loop.create_future()
                self._wake_at = float("inf")
                self._arm(due)
                try:
                    await self._wake
                finally:
                    self._wake = None
                    self._wake_at = float("inf")
                    if self._timer is not None:
                        self._timer.cancel()
                        self._timer = None
                continue
            self.rounds += 1
            ready: list[PlayoutLane] = []
            limit = now + EARLY_SECS
            while heap and heap[0][0] <= limit:
                ready.append(heapq.heappop(heap)[2])
            for lane in ready:
                lane._scheduled = False
                try:
                    await lane.pump(now)
                except Exception:  # one call's broken socket must not stop the clock
                    lane.clear()
                    continue
                if lane._frames:
                    lane._scheduled = True
                    due = lane.due_at()
                    if due <= now + EARLY_SECS:  # could not send (not draining): retry later
                        due = now + RETRY_SECS
                    heapq.heappush(heap, (due, next(self._seq), lane))
