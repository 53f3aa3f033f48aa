"""Earliest-deadline-first slots for speech synthesis shared by many calls.

Piper makes one sentence at a time; with a FIFO, a call whose caller just
stopped talking waits behind other calls' later sentences, which will not be
played for seconds. Each request carries its call's id; a call's next sentence
is due when the audio already made for it finishes playing, and a call with
nothing playing is due now. The slot goes to the earliest due request.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass

# A call whose audio ran out this long ago starts a new burst (a new bot turn).
BURST_GAP_SECS = 0.5


@dataclass(slots=True)
class _CallClock:
    start: float
    produced_secs: float


class DeadlineSlots:
    """``capacity`` synthesis slots handed out in deadline order."""

    def __init__(self, capacity: int = 1) -> None:
        self._free = capacity
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._calls: dict[str, _CallClock] = {}

    @property
    def waiting(self) -> int:
        return len(self._heap)

    def deadline(self, call: str | None, now: float | None = None) -> float:
        """When ``call``'s next audio is needed (now, for an unknown or idle call)."""
        now = time.monotonic() if now is None else now
        clock = self._calls.get(call) if call else None
        if clock is None:
            return now
        due = clock.start + clock.produced_secs
        return now if due + BURST_GAP_SECS < now else due

    def produced(self, call: str | None, audio_secs: float, now: float | None = None) -> None:
        """Record audio made for ``call`` (moves its next deadline later)."""
        if not call:
            return
        now = time.monotonic() if now is None else now
        clock = self._calls.get(call)
        if clock is None or clock.start + clock.produced_secs + BURST_GAP_SECS < now:
            self._calls[call] = _CallClock(start=now, produced_secs=audio_secs)
        else:
            clock.produced_secs += audio_secs
        if len(self._calls) > 4096:  # forget calls idle for a minute
            cutoff = now - 60
            self._calls = {
                k: c for k, c in self._calls.items() if c.start + c.produced_secs > cutoff
            }

    async def acquire(self, deadline: float) -> None:
        if self._free > 0 and not self._heap:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (deadline, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted while we were being cancelled: pass it on
            raise

    def release(self) -> None:
        while self._heap:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1
