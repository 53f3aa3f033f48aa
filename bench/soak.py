"""``pipeswitch bench soak``: many emulated calls on one server process, for a long time.

Is the server's memory flat over time, or does every call leave something behind?
The driver starts the provider emulators and one Pipeswitch server in their own
processes (so the client's memory is not the server's), places ``--calls`` calls one
after another through the FreeSWITCH emulator (greeting, ``--turns`` questions, hang-up),
and after each call samples the server: RSS, asyncio tasks, threads, file descriptors,
live Python objects, and the call's turn latency. With ``--concurrency K`` there are K
slots, each placing calls one after another, the server is also sampled every
``--interval`` seconds, and every ``--idle-every`` minutes the slots pause until the
server is idle (no call up, garbage collected) so that RSS is compared like for like.
With ``--tracemalloc`` the server
traces allocations from the end of warm-up and reports, at the end, which source lines
and object types grew (a debug endpoint of this bench-only server entry, never of the
product). Results: ``soak.json``, ``soak.csv`` and ``soak.png`` in ``--out``.

The server entry is ``python -m pipeswitch.bench.soak serve --emulators JSON``; it keeps
no per-call records (the latency bench's probe does, which would look like a leak).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gc
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from loguru import logger

REPO_ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What are your opening hours on Saturday?"
IDLE_WAIT_S = 300.0  # longest wait for the server's calls to end at an idle point


# -- server side (child process) -----------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _type_counts() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


def _describe(o: Any) -> str:
    """A short name for one object in a cycle: its type, or a function's qualified name."""
    fn = getattr(o, "__func__", o)
    name = getattr(fn, "__qualname__", None)
    if callable(o) and isinstance(name, str):
        return f"{type(o).__name__}:{getattr(fn, '__module__', '?')}.{name}"
    return f"{type(o).__module__}.{type(o).__qualname__}"


def _cycle_summary(objs: list[Any], top: int = 400) -> list[dict[str, Any]]:
    """The strongly connected components among ``objs`` (the cycles themselves, not what
    merely hangs off them), largest first, each as its type counts."""
    index = {id(o): i for i, o in enumerate(objs)}
    edges = [[index[id(r)] for r in gc.get_referents(o) if id(r) in index] for o in objs]
    n = len(objs)
    order = [-1] * n
    low = [0] * n
    on_stack = [False] * n
    stack: list[int] = []
    comps: list[list[int]] = []
    counter = 0
    for root in range(n):
        if order[root] != -1:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                order[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            if i < len(edges[v]):
                work.append((v, i + 1))
                w = edges[v][i]
                if order[w] == -1:
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], order[w])
                continue
            if low[v] == order[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    comps.sort(key=len, reverse=True)
    return [
        {
            "size": len(c),
            "types": Counter(type(objs[i]).__qualname__ for i in c).most_common(25),
            "members": sorted(
                {
                    _describe(objs[i])
                    for i in c
                    if type(objs[i]).__module__ != "builtins" or callable(objs[i])
                }
            )[:80],
        }
        for c in comps[:top]
    ]


class SoakDebug:
    """Loopback debug endpoints of the soak server: process facts and allocation diffs."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.baseline: tracemalloc.Snapshot | None = None
        self.baseline_types: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        api = web.Application()
        api.router.add_get("/soak/stats", self._stats)
        api.router.add_post("/soak/baseline", self._baseline)
        api.router.add_get("/soak/diff", self._diff)
        api.router.add_post("/soak/trim", self._trim)
        api.router.add_get("/soak/tasks", self._tasks)
        api.router.add_post("/soak/cycles", self._cycles_arm)
        api.router.add_get("/soak/cycles", self._cycles)
        self._runner = web.AppRunner(api, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _stats(self, _: web.Request) -> web.Response:
        server = self.app.server
        return web.json_response(
            {
                "rss": _rss(),
                "tasks": len(asyncio.all_tasks()),
                "threads": threading.active_count(),
                "fds": len(os.listdir("/proc/self/fd")),
                "objects": len(gc.get_objects()),
                "calls_active": server.stats.calls_active if server else -1,
                "calls_total": server.stats.calls_total if server else -1,
                "traced_bytes": tracemalloc.get_traced_memory()[0]
                if tracemalloc.is_tracing()
                else None,
            }
        )

    async def _tasks(self, _: web.Request) -> web.Response:
        """Every live asyncio task with where it waits: at an idle point anything beyond the
        server's own handful is a call that did not finish tearing down."""
        me = asyncio.current_task()
        tasks = []
        for task in asyncio.all_tasks():
            if task is me:
                continue
            frames = task.get_stack(limit=None)
            tasks.append(
                {
                    "name": task.get_name(),
                    "coro": getattr(task.get_coro(), "__qualname__", repr(task.get_coro())),
                    "stack": [
                        f"{f.f_code.co_filename.rsplit('site-packages/', 1)[-1]}:"
                        f"{f.f_lineno} {f.f_code.co_name}"
                        for f in frames
                    ],
                }
            )
        return web.json_response({"count": len(tasks), "tasks": tasks})

    async def _cycles_arm(self, _: web.Request) -> web.Response:
        """From now on keep what the collector finds unreachable (``DEBUG_SAVEALL``)."""
        gc.collect()
        gc.garbage.clear()
        gc.set_debug(gc.DEBUG_SAVEALL)
        return web.json_response({"ok": True})

    async def _cycles(self, _: web.Request) -> web.Response:
        """What ended calls left in reference cycles since ``POST /soak/cycles``: objects
        only a full collection frees (and a full collection's pause grows with)."""
        gc.collect()
        found = Counter(type(o).__qualname__ for o in gc.garbage)
        by_module = Counter(getattr(type(o), "__module__", "?") for o in gc.garbage)
        total = len(gc.garbage)
        sccs = _cycle_summary(gc.garbage)
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()
        return web.json_response(
            {
                "objects": total,
                "types": found.most_common(60),
                "modules": by_module.most_common(40),
                "cycles": sccs,
            }
        )

    async def _trim(self, _: web.Request) -> web.Response:
        """``malloc_trim(0)``: how much of the RSS is memory glibc holds free (thread arenas
        fragmented by calls' buffers) rather than live data."""
        import ctypes

        gc.collect()
        before = _rss()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return web.json_response({"before": before, "after": _rss()})

    async def _baseline(self, request: web.Request) -> web.Response:
        gc.collect()
        if request.query.get("tracemalloc") == "1":
            if not tracemalloc.is_tracing():
                tracemalloc.start(12)
            self.baseline = tracemalloc.take_snapshot()
        self.baseline_types = _type_counts()
        return web.json_response({"ok": True})

    async def _diff(self, _: web.Request) -> web.Response:
        gc.collect()
        types = _type_counts()
        grown = sorted(
            ((n - self.baseline_types.get(t, 0), t, n) for t, n in types.items()),
            reverse=True,
        )[:30]
        out: dict[str, Any] = {
            "types": [{"type": t, "grew": d, "now": n} for d, t, n in grown if d > 0]
        }
        if self.baseline is not None and tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            stats = snap.compare_to(self.baseline, "traceback")[:15]
            out["tracemalloc"] = [
                {
                    "size_diff": s.size_diff,
                    "count_diff": s.count_diff,
                    "traceback": [f"{fr.filename}:{fr.lineno}" for fr in s.traceback][-6:],
                }
                for s in stats
            ]
            by_line = snap.compare_to(self.baseline, "lineno")[:25]
            out["lines"] = [
                {
                    "where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
                    "size_diff": s.size_diff,
                    "count_diff": s.count_diff,
                }
                for s in by_line
            ]
        return web.json_response(out)


async def _serve_child(args: argparse.Namespace) -> None:
    from pipeswitch.bench.probe import wait_for_stop_signal
    from pipeswitch.config.loaders import StaticTenantLoader
    from pipeswitch.config.logging import configure_logging
    from pipeswitch.config.settings import Settings
    from pipeswitch.config.tenants import Tenant
    from pipeswitch.pipelines.app import Pipeswitch
    from pipeswitch.pipelines.emulated import endpoints_for

    configure_logging(args.log_level)
    urls = json.loads(args.emulators)
    settings = Settings(host="127.0.0.1", port=0, providers="emulated", log_level=args.log_level)
    tenant = Tenant(name="default", playback=args.dialect)
    loader = StaticTenantLoader([tenant], default="default")
    app = Pipeswitch(
        settings,
        loader=loader,
        default_tenant="default",
        endpoints=endpoints_for(argparse.Namespace(**urls)),
    )
    await app.start()
    debug = SoakDebug(app)
    debug_port = await debug.start()
    ready = {
        "ready": True,
        "port": app.port,
        "debug_port": debug_port,
        "pid": os.getpid(),
        "piper_url": app.endpoints.piper_url,
    }
    print(json.dumps(ready), flush=True)
    try:
        await wait_for_stop_signal()
    finally:
        await debug.stop()
        await app.stop(drain_secs=0.0)


# -- driver side -----------------------------------------------------------------------------


@dataclass
class CallSample:
    """One call and the server's state right after it ended."""

    n: int
    seconds: float
    latencies_ms: list[float]
    error: str
    rss_mb: float
    tasks: int
    threads: int
    fds: int
    objects: int
    at_s: float
    active: int = 0


@dataclass
class Tick:
    """The server's state at a point in time (every ``--interval`` s, or at an idle point)."""

    at_s: float
    calls_done: int
    active: int
    rss_mb: float
    tasks: int
    threads: int
    fds: int
    objects: int
    idle: bool = False
    rss_trimmed_mb: float | None = None  # after malloc_trim(0) (--trim-at-idle)


@dataclass
class SoakResult:
    calls: int
    concurrency: int = 1
    samples: list[CallSample] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    diff: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def add_soak_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``pipeswitch bench soak``."""
    p.add_argument("--calls", type=int, default=200, help="calls in all (0: until --minutes)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="slots placing calls one after another (1: the sequential soak)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        help="the emulated switch's upgrade timeout (default libwsc's 1 s; more on a loaded box)",
    )
    p.add_argument(
        "--trim-at-idle",
        action="store_true",
        help="at idle points also malloc_trim(0) and record the RSS after it",
    )
    p.add_argument("--interval", type=float, default=10.0, help="seconds between timed samples")
    p.add_argument(
        "--idle-every",
        type=float,
        default=10.0,
        help="minutes between idle points (slots pause until no call is up; concurrency > 1)",
    )
    p.add_argument("--turns", type=int, default=1, help="questions per call")
    p.add_argument(
        "--hangup-after",
        type=float,
        default=None,
        help="the caller hangs up this many seconds into the last answer (default: after it)",
    )
    p.add_argument("--warmup", type=int, default=20, help="calls before the baseline")
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this long (0: never)")
    p.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace allocations in the server after warm-up (slower, RSS inflated)",
    )
    p.add_argument(
        "--cycles",
        action="store_true",
        help="after warm-up keep what the collector finds unreachable, and report what the "
        "calls left in reference cycles (objects per call, the cycles themselves; RSS inflated)",
    )
    p.add_argument("--dialect", default="json-stream", choices=["json-stream", "binary", "file"])
    p.add_argument("--log-level", default="WARNING", help="the server's log level")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--no-plot", action="store_true")


async def _start_server(
    emulators: dict[str, Any], args: argparse.Namespace, log: Path
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    cmd = [
        sys.executable,
        "-m",
        "pipeswitch.bench.soak",
        "serve",
        "--emulators",
        json.dumps({k: emulators[k] for k in ("deepgram_url", "groq_base_url")}),
        "--log-level",
        args.log_level,
        "--dialect",
        args.dialect,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("ab"), env=env
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        raw = await asyncio.to_thread(proc.stdout.readline)
        if not raw:
            break
        text = raw.decode(errors="replace").strip()
        if text.startswith("{") and '"ready"' in text:
            return proc, json.loads(text)
    proc.kill()
    raise RuntimeError(f"soak server did not start; see {log}")


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _trim(pcm: bytes, peak: int = 300) -> bytes:
    a = np.frombuffer(pcm, dtype="<i2")
    idx = np.flatnonzero(np.abs(a) > peak)
    return pcm if not len(idx) else a[idx[0] : idx[-1] + 1].tobytes()


async def _quiet(stream: Any, quiet_s: float = 0.5, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = stream.last_bot_audio_at()
        if last is not None and time.monotonic() - last > quiet_s:
            return
        await asyncio.sleep(0.05)


async def one_call(
    base: str,
    n: int,
    speech: bytes,
    turns: int,
    dialect: str,
    connect_timeout_s: float | None = None,
    hangup_after_s: float | None = None,
) -> tuple[list[float], str]:
    """Greeting, ``turns`` questions, hang-up; the turn latencies seen on the wire (ms).

    ``hangup_after_s``: the caller hangs up that far into the last answer, while the bot
    still talks (a teardown with playback, a TTS stream and an LLM reply in flight)."""
    from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig

    playback = {"json-stream": "voxcom", "binary": "cloudfieldcz", "file": "community"}[dialect]
    stream = FakeSwitchStream(
        StreamConfig(
            url=f"{base}/fs/soak-{n}?domain=default&rate=8000&mix=mono",
            rate=8000,
            playback=playback,  # type: ignore[arg-type]
            connect_timeout_s=connect_timeout_s,
        )
    )
    latencies: list[float] = []
    error = ""
    await stream.start()
    try:
        if not await stream.wait_connected(max(5.0, (connect_timeout_s or 0) + 1.0)):
            return latencies, "not connected"
        await _quiet(stream)
        for _ in range(turns):
            stream.queue_caller_audio(speech)
            stream.queue_caller_silence(0.3)
            await stream.wait_caller_drained(timeout_s=len(speech) / 16000 + 3.0)
            end = stream.last_voiced_sent_at()
            answer = None
            deadline = time.monotonic() + 8.0
            while end is not None and answer is None and time.monotonic() < deadline:
                answer = stream.first_bot_audio_received_after(end)
                await asyncio.sleep(0.02)
            if end is None or answer is None:
                error = "no answer"
                break
            latencies.append((answer - end) * 1000.0)
            if hangup_after_s is not None and len(latencies) == turns:
                await asyncio.sleep(hangup_after_s)
                break
            await _quiet(stream)
    finally:
        await stream.hangup()
    return latencies, error


async def _stats(http: aiohttp.ClientSession, debug: str) -> dict[str, Any]:
    async with http.get(f"{debug}/soak/stats") as r:
        r.raise_for_status()
        stats: dict[str, Any] = await r.json()
        return stats


async def _idle_stats(
    http: aiohttp.ClientSession, debug: str, wait_s: float = 5.0
) -> dict[str, Any]:
    """The server's state once no call is up (the server collects garbage when it goes idle)."""
    stats = await _stats(http, debug)
    deadline = time.monotonic() + wait_s
    while stats["calls_active"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        stats = await _stats(http, debug)
    return stats


def _tick(stats: dict[str, Any], at_s: float, done: int, idle: bool = False) -> Tick:
    return Tick(
        at_s=round(at_s, 1),
        calls_done=done,
        active=stats["calls_active"],
        rss_mb=round(stats["rss"] / 2**20, 1),
        tasks=stats["tasks"],
        threads=stats["threads"],
        fds=stats["fds"],
        objects=stats["objects"],
        idle=idle,
    )


def _sample(
    n: int, secs: float, lat: list[float], err: str, stats: dict[str, Any], at_s: float
) -> CallSample:
    return CallSample(
        n=n,
        seconds=round(secs, 2),
        latencies_ms=[round(x, 1) for x in lat],
        error=err,
        rss_mb=round(stats["rss"] / 2**20, 1),
        tasks=stats["tasks"],
        threads=stats["threads"],
        fds=stats["fds"],
        objects=stats["objects"],
        at_s=round(at_s, 1),
        active=stats["calls_active"],
    )


def _log_sample(s: CallSample) -> None:
    if s.n == 1 or s.n % 10 == 0 or s.error:
        logger.info(
            "call {}: {} rss={} MB tasks={} threads={} fds={} objects={} active={} {}",
            s.n,
            [f"{x:.0f}" for x in s.latencies_ms],
            s.rss_mb,
            s.tasks,
            s.threads,
            s.fds,
            s.objects,
            s.active,
            s.error,
        )


async def _placed_call(
    base: str, n: int, speech: bytes, args: argparse.Namespace
) -> tuple[list[float], str, float]:
    t0 = time.monotonic()
    try:
        lat, err = await one_call(
            base,
            n,
            speech,
            args.turns,
            args.dialect,
            args.connect_timeout,
            hangup_after_s=args.hangup_after,
        )
    except Exception as exc:  # a broken call is a data point, not the end
        lat, err = [], f"{type(exc).__name__}: {exc}"
    return lat, err, time.monotonic() - t0


async def _run_sequential(
    http: aiohttp.ClientSession,
    base: str,
    debug: str,
    speech: bytes,
    args: argparse.Namespace,
    result: SoakResult,
    out: Path,
    t_start: float,
) -> None:
    calls = args.calls or 10**9
    for n in range(1, calls + 1):
        if args.minutes and time.monotonic() - t_start > args.minutes * 60:
            result.notes.append(f"stopped after {args.minutes} minutes at call {n - 1}")
            break
        if n == args.warmup + 1:
            await _baseline(http, debug, args)
        lat, err, secs = await _placed_call(base, n, speech, args)
        stats = await _idle_stats(http, debug)  # the server finishes the call's teardown
        s = _sample(n, secs, lat, err, stats, time.monotonic() - t_start)
        result.samples.append(s)
        _log_sample(s)
        if n % 25 == 0:
            _write(out, result, args)


async def _baseline(http: aiohttp.ClientSession, debug: str, args: argparse.Namespace) -> None:
    q = "?tracemalloc=1" if args.tracemalloc else ""
    async with http.post(f"{debug}/soak/baseline{q}") as r:
        r.raise_for_status()
    if args.cycles:
        async with http.post(f"{debug}/soak/cycles") as r:
            r.raise_for_status()


async def _run_concurrent(
    http: aiohttp.ClientSession,
    base: str,
    debug: str,
    speech: bytes,
    args: argparse.Namespace,
    result: SoakResult,
    out: Path,
    t_start: float,
) -> None:
    """K slots placing calls back to back; timed samples; idle points after warm-up and
    every ``--idle-every`` minutes (the slots wait at a gate while the server drains)."""
    calls = args.calls or 10**9
    placed = 0
    done = 0
    in_flight = 0
    gate = asyncio.Event()
    gate.set()
    drained = asyncio.Condition()
    stop = False
    next_idle = float("inf")

    def over() -> bool:
        return placed >= calls or bool(
            args.minutes and time.monotonic() - t_start > args.minutes * 60
        )

    async def idle_point(baseline: bool) -> None:
        nonlocal next_idle
        gate.clear()
        async with drained:
            await drained.wait_for(lambda: in_flight == 0)
        # On a loaded box the server's calls end well after their callers hang up: wait.
        stats = await _idle_stats(http, debug, IDLE_WAIT_S)
        if baseline:
            await _baseline(http, debug, args)
            stats = await _stats(http, debug)
        t = _tick(stats, time.monotonic() - t_start, done, idle=True)
        if args.trim_at_idle:
            async with http.post(f"{debug}/soak/trim") as r:
                t.rss_trimmed_mb = round((await r.json())["after"] / 2**20, 1)
        result.ticks.append(t)
        logger.info(
            "idle point after {} calls: rss={} MB tasks={} threads={} fds={} objects={}",
            done,
            t.rss_mb,
            t.tasks,
            t.threads,
            t.fds,
            t.objects,
        )
        next_idle = time.monotonic() + args.idle_every * 60 if args.idle_every > 0 else float("inf")
        _write(out, result, args)
        gate.set()

    async def slot() -> None:
        nonlocal placed, done, in_flight
        while not stop:
            await gate.wait()
            if over():
                return
            placed += 1
            n = placed
            in_flight += 1
            try:
                lat, err, secs = await _placed_call(base, n, speech, args)
            finally:
                in_flight -= 1
                async with drained:
                    drained.notify_all()
            done += 1
            mine = done  # ``done`` moves on while this slot awaits the server
            stats = await _stats(http, debug)
            s = _sample(n, secs, lat, err, stats, time.monotonic() - t_start)
            result.samples.append(s)
            _log_sample(s)
            if err:  # no connect storm when the box is too loaded to upgrade in time
                await asyncio.sleep(1.0)
            at_idle = mine == args.warmup or (mine > args.warmup and time.monotonic() > next_idle)
            if at_idle and gate.is_set():  # one idle point at a time
                await idle_point(baseline=mine == args.warmup)

    async def sampler() -> None:
        while not stop:
            await asyncio.sleep(args.interval)
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                stats = await _stats(http, debug)
                result.ticks.append(_tick(stats, time.monotonic() - t_start, done))
            if len(result.ticks) % 30 == 0:
                _write(out, result, args)

    sampling = asyncio.create_task(sampler())
    try:
        await asyncio.gather(*(slot() for _ in range(args.concurrency)))
    finally:
        stop = True
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
    if args.minutes and time.monotonic() - t_start > args.minutes * 60:
        result.notes.append(f"stopped after {args.minutes} minutes with {done} calls")
    stats = await _idle_stats(http, debug, IDLE_WAIT_S)
    result.ticks.append(_tick(stats, time.monotonic() - t_start, done, idle=True))


async def run_soak(args: argparse.Namespace) -> int:
    """Run the soak; exit status 0 when every call was answered."""
    from pipeswitch.bench.emulators.runner import EmulatorConfig, start_emulator_process

    out: Path = args.out or REPO_ROOT / "bench" / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    emu = await asyncio.to_thread(
        start_emulator_process, EmulatorConfig(llm_script="office", stt_script="office", seed=1)
    )
    proc: subprocess.Popen[bytes] | None = None
    result = SoakResult(calls=args.calls, concurrency=args.concurrency)
    t_start = time.monotonic()
    try:
        proc, ready = await _start_server(emu.info, args, out / "server.log")
        base = f"ws://127.0.0.1:{ready['port']}"
        debug = f"http://127.0.0.1:{ready['debug_port']}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with http.post(
                f"{ready['piper_url'].split('?')[0]}?rate=8000", json={"text": QUESTION}
            ) as r:
                r.raise_for_status()
                speech = _trim((await r.read())[44:])
            run = _run_concurrent if args.concurrency > 1 else _run_sequential
            await run(http, base, debug, speech, args, result, out, t_start)
            if len(result.samples) > args.warmup:
                async with http.get(f"{debug}/soak/diff") as r:
                    result.diff = await r.json()
            async with http.get(f"{debug}/soak/tasks") as r:
                (out / "tasks.json").write_text(json.dumps(await r.json(), indent=1))
            if args.cycles and len(result.samples) > args.warmup:
                async with http.get(f"{debug}/soak/cycles") as r:
                    cycles = await r.json()
                (out / "cycles.json").write_text(json.dumps(cycles, indent=1))
                per_call = cycles["objects"] / (len(result.samples) - args.warmup)
                result.notes.append(
                    f"left in reference cycles: {per_call:.0f} objects per call after warm-up "
                    f"({len(cycles['cycles'])} cycles; cycles.json lists them)"
                )
    finally:
        if proc is not None:
            await asyncio.to_thread(_stop_server, proc)
        await asyncio.to_thread(emu.stop)
    _write(out, result, args)
    print(summary(result, args.warmup))
    for note in result.notes:
        print(note)
    print(f"results in {out}")
    return 0 if all(not s.error for s in result.samples) else 1


def _p50(xs: list[float]) -> str:
    return f"{np.median(xs):.0f}" if xs else "-"


def summary(result: SoakResult, warmup: int) -> str:
    """A few lines: growth after warm-up, per 100 calls, and latency early vs late."""
    s = sorted(result.samples, key=lambda x: x.at_s)
    if not s:
        return "no calls"
    lines = [
        f"{len(s)} calls ({result.concurrency} at a time), "
        f"{sum(1 for x in s if x.error)} with errors"
    ]
    idle = [t for t in result.ticks if t.idle]
    if len(idle) >= 2:
        first_t, last_t = idle[0], idle[-1]
        lines.append(
            f"idle points after warm-up (call {first_t.calls_done} -> {last_t.calls_done}, "
            f"{(last_t.at_s - first_t.at_s) / 60:.0f} min): RSS {first_t.rss_mb} -> "
            f"{last_t.rss_mb} MB ({last_t.rss_mb - first_t.rss_mb:+.1f} MB), tasks {first_t.tasks} "
            f"-> {last_t.tasks}, threads {first_t.threads} -> {last_t.threads}, fds {first_t.fds} "
            f"-> {last_t.fds}, objects {first_t.objects} -> {last_t.objects}; all idle RSS: "
            + ", ".join(f"{t.rss_mb}" for t in idle)
        )
        trimmed = [t for t in idle if t.rss_trimmed_mb is not None]
        if trimmed:
            lines.append(
                "idle RSS after malloc_trim(0): "
                + ", ".join(f"{t.rss_mb} -> {t.rss_trimmed_mb}" for t in trimmed)
            )
    if result.ticks:
        peak = max(result.ticks, key=lambda t: t.rss_mb)
        lines.append(
            f"timed samples: {len(result.ticks)}, peak RSS {peak.rss_mb} MB at "
            f"{peak.at_s / 60:.1f} min ({peak.active} calls up), fds max "
            f"{max(t.fds for t in result.ticks)}, threads max "
            f"{max(t.threads for t in result.ticks)}, tasks max {max(t.tasks for t in result.ticks)}"
        )
    after = [x for x in s if x.n > warmup] or s[-1:]
    first, last = after[0], after[-1]
    calls = max(1, len(after) - 1)
    if result.concurrency <= 1:  # with calls up, a per-call sample is not like for like
        lines.append(
            f"after warm-up (call {first.n} -> {last.n}): RSS {first.rss_mb} -> {last.rss_mb} MB "
            f"({(last.rss_mb - first.rss_mb) / calls * 100:+.2f} MB/100 calls), tasks {first.tasks} -> "
            f"{last.tasks}, threads {first.threads} -> {last.threads}, fds {first.fds} -> {last.fds}, "
            f"objects {first.objects} -> {last.objects}"
        )
    lat = [x.latencies_ms[0] for x in after if x.latencies_ms]
    if len(lat) >= 20:
        k = max(1, len(lat) // 10)
        lines.append(
            f"turn latency p50 first 10 % {_p50(lat[:k])} ms, last 10 % {_p50(lat[-k:])} ms "
            f"(first quarter {_p50(lat[: len(lat) // 4])}, last quarter "
            f"{_p50(lat[-(len(lat) // 4) :])})"
        )
    secs = [x.seconds for x in s]
    lines.append(f"call duration p50 {np.median(secs):.1f} s")
    return "\n".join(lines)


def _write(out: Path, result: SoakResult, args: argparse.Namespace) -> None:
    (out / "soak.json").write_text(
        json.dumps(
            {
                "calls": result.calls,
                "concurrency": result.concurrency,
                "samples": [asdict(s) for s in result.samples],
                "ticks": [asdict(t) for t in result.ticks],
                "diff": result.diff,
                "notes": result.notes,
                "summary": summary(result, args.warmup),
            },
            indent=1,
        )
    )
    with (out / "soak.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "call",
                "at_s",
                "active",
                "rss_mb",
                "tasks",
                "threads",
                "fds",
                "objects",
                "latency_ms",
                "error",
            ]
        )
        for s in result.samples:
            w.writerow(
                [
                    s.n,
                    s.at_s,
                    s.active,
                    s.rss_mb,
                    s.tasks,
                    s.threads,
                    s.fds,
                    s.objects,
                    s.latencies_ms[0] if s.latencies_ms else "",
                    s.error,
                ]
            )
    if not args.no_plot and result.samples:
        plot(result, out / "soak.png", args.warmup)


def plot(result: SoakResult, path: Path, warmup: int) -> None:
    """Sequential: RSS, tasks, threads, fds, objects and latency against the call number.
    Concurrent: RSS, fds, threads, tasks and latency over time (timed samples, idle points
    marked) and over calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.samples
    n = [x.n for x in s]
    if result.concurrency <= 1:
        panels = [
            ("RSS (MB)", [x.rss_mb for x in s]),
            ("asyncio tasks", [x.tasks for x in s]),
            ("threads", [x.threads for x in s]),
            ("file descriptors", [x.fds for x in s]),
            ("live Python objects", [x.objects for x in s]),
            (
                "turn latency (ms, wire)",
                [x.latencies_ms[0] if x.latencies_ms else np.nan for x in s],
            ),
        ]
        fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
        for ax, (title, ys) in zip(axes.flat, panels, strict=True):
            ax.plot(n, ys, lw=1)
            ax.axvline(warmup, color="grey", ls=":", lw=1)
            ax.set_title(title)
            ax.set_xlabel("call #")
            ax.grid(alpha=0.3)
        fig.suptitle(
            f"pipeswitch bench soak: {len(s)} sequential emulated calls, one server process"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return
    ticks = result.ticks
    idle = [t for t in ticks if t.idle]
    tm = [t.at_s / 60 for t in ticks]
    done = sorted(s, key=lambda x: x.at_s)
    lat_t = [x.at_s / 60 for x in done if x.latencies_ms]
    lat = [x.latencies_ms[0] for x in done if x.latencies_ms]
    keys = [
        ("RSS (MB)", "rss_mb"),
        ("file descriptors", "fds"),
        ("threads", "threads"),
        ("asyncio tasks", "tasks"),
    ]
    fig, axes = plt.subplots(2, 5, figsize=(20, 7.5))
    for i, (title, key) in enumerate(keys):
        ax = axes[0][i]
        ax.plot(tm, [getattr(t, key) for t in ticks], lw=0.8)
        ax.plot(
            [t.at_s / 60 for t in idle],
            [getattr(t, key) for t in idle],
            "o",
            ms=4,
            color="C3",
            label="idle points",
        )
        ax.set_title(f"{title} over time")
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
        ax = axes[1][i]
        ax.plot(n, [getattr(x, key) for x in s], ".", ms=2)
        ax.axvline(warmup, color="grey", ls=":", lw=1)
        ax.set_title(f"{title} after each call")
        ax.set_xlabel("call #")
        ax.grid(alpha=0.3)
    trimmed = [t for t in idle if t.rss_trimmed_mb is not None]
    if trimmed:
        axes[0][0].plot(
            [t.at_s / 60 for t in trimmed],
            [t.rss_trimmed_mb for t in trimmed],
            "s",
            ms=4,
            color="C2",
        )
    axes[0][0].legend(
        ["timed samples", "idle points", "idle, after malloc_trim(0)"][: 3 if trimmed else 2],
        fontsize=8,
    )
    axes[0][4].plot(lat_t, lat, ".", ms=2)
    axes[0][4].set_title("turn latency (ms, wire) over time")
    axes[0][4].set_xlabel("minutes")
    axes[0][4].grid(alpha=0.3)
    axes[1][4].plot(
        [x.n for x in s if x.latencies_ms],
        [x.latencies_ms[0] for x in s if x.latencies_ms],
        ".",
        ms=2,
    )
    axes[1][4].set_title("turn latency (ms, wire) by call")
    axes[1][4].set_xlabel("call #")
    axes[1][4].grid(alpha=0.3)
    minutes = ticks[-1].at_s / 60 if ticks else 0.0
    fig.suptitle(
        f"pipeswitch bench soak: {len(s)} emulated calls, {result.concurrency} at a time, "
        f"{minutes:.0f} min, one server process"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_compare(runs: dict[str, Path], path: Path) -> None:
    """RSS, live objects and descriptors of several soak runs (``soak.json``) on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, file in runs.items():
        samples = json.loads(file.read_text())["samples"]
        n = [x["n"] for x in samples]
        for ax, key in zip(axes, ("rss_mb", "objects", "fds"), strict=True):
            ax.plot(n, [x[key] for x in samples], lw=1.2, label=f"{name} ({len(n)} calls)")
    for ax, title in zip(
        axes, ("RSS (MB)", "live Python objects", "file descriptors"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("call #")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("pipeswitch bench soak: sequential emulated calls on one server process")
    fig.tight_layout()
    fig.savefig(path, dpi=85)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeswitch.bench.soak serve --emulators JSON`` (the server under soak), or
    ``compare NAME=soak.json ... --out soak.png`` (several runs on one plot)."""
    p = argparse.ArgumentParser(prog="python -m pipeswitch.bench.soak")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--emulators", required=True)
    s.add_argument("--log-level", default="WARNING")
    s.add_argument("--dialect", default="json-stream")
    c = sub.add_parser("compare")
    c.add_argument("runs", nargs="+", help="NAME=path/to/soak.json")
    c.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "compare":
        plot_compare({r.rsplit("=", 1)[0]: Path(r.rsplit("=", 1)[1]) for r in args.runs}, args.out)
        return
    asyncio.run(_serve_child(args))


if __name__ == "__main__":
    main()
