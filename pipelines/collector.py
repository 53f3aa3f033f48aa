"""The cyclic garbage collector while calls are up: on a clock, not on allocations.

CPython collects its young generation after every ~700 net allocations and the middle
one every tenth time. Measured under load (``bench capacity``, 50 calls on one process,
1 Dec 2026): ~10 young and ~1 middle collection a second found almost nothing (0 objects
in 306 young runs, ~12 per middle run: all that is young is live call state, frames in
flight and the turn's objects), yet each traversed it all: middle runs took up to 22 ms
of CPU and the loop stood still meanwhile. json-stream's playout lead is 20 ms, so each
was heard as a gap on every call whose bot was talking; at 100 calls on two workers they
were most of the underruns.

So while calls are up automatic collection is off, and a full collection runs every
:data:`COLLECT_INTERVAL_SECS` (what ended calls and errors left in cycles: a few objects
a second at 50 calls), early when the process grew :data:`GROWTH_LIMIT` objects since the
last one (a burst of new calls, a leak), and when the last call ends (the server's
finished-call hook); when idle, automatic collection is on again.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

from loguru import logger

from pipeswitch.transports import metrics

# How often cycles are collected while calls are up.
COLLECT_INTERVAL_SECS = 60.0
# How often the policy looks (start/stop of busy periods, whether a collection is due).
CHECK_SECS = 1.0
# Net tracked objects allocated since the last collection that make one due at once.
GROWTH_LIMIT = 200_000
# Automatic collection is paused while calls are up (bench experiment ``gc-automatic``).
PAUSE_AUTOMATIC = True
# A collection longer than this is logged (json-stream's playout lead).
SLOW_SECS = 0.02


def collect(why: str, calls: int) -> int:
    """One full collection, timed into the GC pause histogram; objects freed."""
    began = time.perf_counter()
    freed = gc.collect()
    pause = time.perf_counter() - began
    metrics.GC_PAUSE.observe(pause)
    if pause > SLOW_SECS:
        logger.warning(
            "full GC ({}) took {:.0f} ms ({} objects freed, {} calls up)",
            why,
            pause * 1000,
            freed,
            calls,
        )
    return freed


class CallTimeCollector:
    """Pauses automatic collection while ``calls()`` is non-zero and collects on a clock.

    :meth:`check` is the whole policy (called every :data:`CHECK_SECS` by :meth:`start`'s
    task); automatic collection is turned back on only if this object turned it off, so
    a process (or a test) that runs with it off keeps it off.
    """

    def __init__(self, calls: Callable[[], int], clock: Callable[[], float] = time.monotonic):
        self._calls = calls
        self._clock = clock
        self._paused = False  # automatic collection is off because of us
        self._last = clock()
        self._task: asyncio.Task[None] | None = None
        self.collections = 0

    @property
    def paused(self) -> bool:
        """Whether automatic collection is off because calls are up."""
        return self._paused

    def check(self) -> bool:
        """Apply the policy now; True if a collection ran."""
        calls = self._calls()
        now = self._clock()
        if not calls:
            if self._paused:
                self._paused = False
                gc.enable()
            self._last = now  # the idle collection is the finished-call hook's
            return False
        if PAUSE_AUTOMATIC and gc.isenabled():
            gc.disable()
            self._paused = True
            self._last = now
        due = now - self._last >= COLLECT_INTERVAL_SECS or gc.get_count()[0] >= GROWTH_LIMIT
        if not due:
            return False
        collect("periodic", calls)
        self.collections += 1
        self._last = self._clock()
        return True

    def collected(self) -> None:
        """Someone else just ran a full collection (the idle one): restart the clock."""
        self._last = self._clock()

    def start(self) -> None:
        """Run :meth:`check` every :data:`CHECK_SECS` on the running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="call-time-collector")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECS)
            try:
                self.check()
            except Exception as exc:  # never let the policy end the process's calls
                logger.warning("garbage collection policy failed: {}", exc)

    async def stop(self) -> None:
        """Stop the clock; automatic collection is on again if it was paused here."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._paused:
            self._paused = False
            gc.enable()
