"""The cyclic garbage collector while calls are up: only when it costs nobody's audio.

Measured under load (``bench capacity``, 1 Dec 2026, 50 calls a process): CPython's
automatic collection ran ~10 young and ~1 middle collection a second and they found
almost nothing (0 objects in 306 young runs, ~12 per middle run), because what is young
is live call state: frames in flight, the turn's objects. Yet each traversed it all:
middle runs took up to 22 ms of CPU, and the loop stood still meanwhile. A full
collection traverses every live call: a Pipecat call is ~3,700 objects (processors with
their queues, tasks, events and event handlers, the latency observer's per-turn records),
so 186 k objects and 135 ms of CPU at 50 calls two minutes in, and the default thresholds
ran one about every 50 s (150-235 ms pauses at 100 calls on two workers). json-stream's
playout lead is 20 ms: every pause longer than that is a gap on every call whose bot is
talking.

Finished calls are taken apart (pipelines/dismantle.py) and go by reference counting;
what each leaves in cycles is small (~20 objects; in a never-idle soak, 5 calls at a
time, ~30 KB of RSS per ended call until collected). So while calls are up automatic
collection is off, and a full collection runs when the last call ends (the server's
finished-call hook), after every :data:`COLLECT_EVERY_CALLS` ended calls and every
:data:`COLLECT_INTERVAL_SECS` of uninterrupted calls (a server that is never idle), and
early when the process grew :data:`GROWTH_LIMIT` objects since the last one (a leak
somewhere, or a burst far beyond normal); when idle, automatic collection is on again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable

from loguru import logger

from pipeswitch.transports import metrics

# How often cycles are collected while calls are up (the process never idle): one pause
# an hour (~0.1-0.3 s at 50-100 calls) against a few MB of cycles kept meanwhile.
COLLECT_INTERVAL_SECS = 3600.0
# How often the policy looks (start/stop of busy periods, whether a collection is due).
CHECK_SECS = 1.0
# Ended calls between two full collections while others run (~8 MB of cycles kept).
COLLECT_EVERY_CALLS = 256
# Net tracked objects allocated since the last collection that make one due at once
# (a call is ~3,700: this is far beyond any normal ramp of calls).
GROWTH_LIMIT = 1_000_000
# Automatic collection is paused while calls are up (bench experiment ``gc-automatic``).
PAUSE_AUTOMATIC = True
# A collection longer than this is logged (json-stream's playout lead).
SLOW_SECS = 0.02


def collect(why: str, calls: int) -> int:
    """One full collection, timed into the GC pause histogram; objects freed.

    Logged when it held the loop longer than :data:`SLOW_SECS`, and always when it ran
    because the process grew (``why == "growth"``: worth a look).
    """
    began = time.perf_counter()
    freed = gc.collect()
    pause = time.perf_counter() - began
    metrics.GC_PAUSE.observe(pause)
    if pause > SLOW_SECS or why == "growth":
        logger.log(
            "WARNING" if why == "growth" else "INFO",
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
        self._ended = 0  # calls ended since the last full collection
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
        if gc.get_count()[0] >= GROWTH_LIMIT:
            why = "growth"
        elif self._ended >= COLLECT_EVERY_CALLS:
            why = "ended calls"
        elif now - self._last >= COLLECT_INTERVAL_SECS:
            why = "interval"
        else:
            return False
        self.collect_now(why)
        return True

    def call_ended(self) -> None:
        """A call ended while others are up: its leftovers count towards a collection."""
        self._ended += 1

    def collect_now(self, why: str) -> int:
        """A full collection now (``why``: for the log); the clock and counts restart."""
        freed = collect(why, self._calls())
        self.collections += 1
        self._last = self._clock()
        self._ended = 0
        return freed

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
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._paused:
            self._paused = False
            gc.enable()
