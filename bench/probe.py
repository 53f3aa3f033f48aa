"""Bench-only instruments that run *inside* a server process under test.

Both server entries (``bench.serve`` for Pipeswitch, ``bench.reference`` for the
plain Pipecat reference) start a :class:`BenchProbe`: a tiny aiohttp site on its
own loopback port that exposes what happened in the process, so nothing in
``transports/`` or ``pipelines/`` needs a bench hook:

* ``GET /bench/calls`` - per call: the ``UserBotLatencyObserver`` breakdowns
  (pydantic dumps, unix times) and the user transcripts;
* ``GET /bench/health`` - event-loop lag and GC pause statistics since the last
  reset, the clock offset (``time.time() - time.monotonic()``), upgrade times;
* ``POST /bench/reset`` - start a new measurement window.

The probe's own cost: one 10 ms timer (loop-lag sampling) and a GC callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pipeswitch.bench.stats import summarize

CallsProvider = Callable[[], list[dict[str, Any]]]
HealthProvider = Callable[[], dict[str, Any]]

LAG_INTERVAL_S = 0.010
MAX_SAMPLES = 20000
SPIKE_S = 0.015  # lags above this are kept with their time (to explain audio gaps)


class LoopLagMonitor:
    """Samples how late a 10 ms timer fires: the event loop's scheduling lag."""

    def __init__(self, interval_s: float = LAG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.lags_s: list[float] = []
        self.spikes: list[tuple[float, float]] = []  # (monotonic when due, lag s)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin sampling on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bench-loop-lag")

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def reset(self) -> None:
        """Forget the samples so far."""
        self.lags_s = []
        self.spikes = []

    async def _run(self) -> None:
        interval = self.interval_s
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(interval)
            lag = time.monotonic() - t0 - interval
            if len(self.lags_s) < MAX_SAMPLES:
                self.lags_s.append(max(0.0, lag))
            if lag > SPIKE_S and len(self.spikes) < MAX_SAMPLES:
                self.spikes.append((t0 + interval, lag))

    def summary_ms(self) -> dict[str, Any]:
        """p50/p95/p99/max of the lag in ms."""
        return summarize(self.lags_s).scaled(1000.0).to_dict(2)


class GcMonitor:
    """Times every garbage collection (``gc.callbacks``), per generation.

    With ``active`` (calls up now), a collection that starts while no call is up (the
    server's idle collection after the last call ends, start-up) is counted apart in
    ``idle``: it pauses nobody's audio, and reporting it with the rest read as a pause
    during calls.
    """

    def __init__(self, active: Callable[[], int] | None = None) -> None:
        self._t0 = 0.0
        self._active = active
        self._busy = True
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.idle: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def install(self) -> None:
        """Register the callback."""
        gc.callbacks.append(self._cb)

    def uninstall(self) -> None:
        """Remove the callback."""
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._cb)

    def reset(self) -> None:
        """Forget the pauses so far."""
        self.pauses = {0: [], 1: [], 2: []}
        self.idle = {0: [], 1: [], 2: []}

    def _cb(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._busy = self._active is None or self._active() > 0
            self._t0 = time.perf_counter()
        else:
            gen = int(info.get("generation", 0))
            bucket = (self.pauses if self._busy else self.idle).setdefault(gen, [])
            if len(bucket) < MAX_SAMPLES:
                bucket.append(time.perf_counter() - self._t0)

    def summary_ms(self) -> dict[str, Any]:
        """Per generation: count, total, p99 and max pause in ms (while calls were up,
        with ``active``), and how many ran with no call up (``idle_count``)."""
        out: dict[str, Any] = {}
        for gen, xs in sorted(self.pauses.items()):
            s = summarize(xs).scaled(1000.0)
            out[f"gen{gen}"] = {
                "count": s.n,
                "total_ms": round(sum(xs) * 1000.0, 1),
                "p99_ms": None if s.p99 is None else round(s.p99, 2),
                "max_ms": None if s.max is None else round(s.max, 2),
                "idle_count": len(self.idle.get(gen, ())),
            }
        return out


class BenchProbe:
    """The loopback stats site of one server process (see the module docstring)."""

    def __init__(
        self,
        calls: CallsProvider,
        health: HealthProvider,
        reset: Callable[[], None],
        active: Callable[[], int] | None = None,
    ):
        self._calls = calls
        self._health = health
        self._reset_hook = reset
        self.lag = LoopLagMonitor()
        self.gc = GcMonitor(active)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start sampling and listening; returns the port."""
        self.lag.start()
        self.gc.install()
        app = web.Application()
        app.router.add_get("/bench/calls", self._get_calls)
        app.router.add_get("/bench/health", self._get_health)
        app.router.add_post("/bench/reset", self._post_reset)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop listening and sampling."""
        await self.lag.stop()
        self.gc.uninstall()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def clock(self) -> dict[str, float]:
        """Clock pair for converting the observers' unix times to monotonic."""
        return {"unix": time.time(), "monotonic": time.monotonic()}

    async def _get_calls(self, _: web.Request) -> web.Response:
        return web.json_response({"clock": self.clock(), "calls": self._calls()})

    async def _get_health(self, _: web.Request) -> web.Response:
        body = {
            "pid": os.getpid(),
            "clock": self.clock(),
            "loop_lag_ms": self.lag.summary_ms(),
            "loop_lag_spikes": [[round(t, 4), round(lag, 4)] for t, lag in self.lag.spikes],
            "gc_ms": self.gc.summary_ms(),
            "gc_frozen": gc.get_freeze_count(),
            **self._health(),
        }
        return web.json_response(body)

    async def _post_reset(self, _: web.Request) -> web.Response:
        self.lag.reset()
        self.gc.reset()
        self._reset_hook()
        return web.json_response({"ok": True})


def breakdown_dict(breakdown: Any) -> dict[str, Any]:
    """A ``LatencyBreakdown`` (pydantic) as JSON-ready data."""
    dump = getattr(breakdown, "model_dump", None)
    if dump is not None:
        data: dict[str, Any] = dump(mode="json")
        return data
    return {}


def user_texts(messages: list[Any]) -> list[str]:
    """The user turns of an LLM context, as text."""
    out: list[str] = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                out.append(content)
            elif isinstance(content, list):
                out.append(" ".join(str(p.get("text", "")) for p in content if isinstance(p, dict)))
    return out


async def wait_for_stop_signal() -> None:
    """Return on SIGTERM/SIGINT or when stdin closes (the bench driver went away)."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader()
    with contextlib.suppress(ValueError, OSError):
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def _watch() -> None:
        while await reader.read(4096):
            pass
        stop.set()

    watcher = loop.create_task(_watch())
    await stop.wait()
    watcher.cancel()
