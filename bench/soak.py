"""``pipeswitch bench soak``: many sequential emulated calls on one server process.

Is the server's memory flat over time, or does every call leave something behind?
The driver starts the provider emulators and one Pipeswitch server in their own
processes (so the client's memory is not the server's), places ``--calls`` calls one
after another through the FreeSWITCH emulator (greeting, ``--turns`` questions, hang-up),
and after each call samples the server: RSS, asyncio tasks, threads, file descriptors,
live Python objects, and the call's turn latency. With ``--tracemalloc`` the server
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


# -- server side (child process) -----------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _type_counts() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


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


@dataclass
class SoakResult:
    calls: int
    samples: list[CallSample] = field(default_factory=list)
    diff: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def add_soak_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``pipeswitch bench soak``."""
    p.add_argument("--calls", type=int, default=200, help="sequential calls")
    p.add_argument("--turns", type=int, default=1, help="questions per call")
    p.add_argument("--warmup", type=int, default=20, help="calls before the baseline")
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this long (0: never)")
    p.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace allocations in the server after warm-up (slower, RSS inflated)",
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
    base: str, n: int, speech: bytes, turns: int, dialect: str
) -> tuple[list[float], str]:
    """Greeting, ``turns`` questions, hang-up; the turn latencies seen on the wire (ms)."""
    from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig

    playback = {"json-stream": "voxcom", "binary": "cloudfieldcz", "file": "community"}[dialect]
    stream = FakeSwitchStream(
        StreamConfig(
            url=f"{base}/fs/soak-{n}?domain=default&rate=8000&mix=mono",
            rate=8000,
            playback=playback,  # type: ignore[arg-type]
        )
    )
    latencies: list[float] = []
    error = ""
    await stream.start()
    try:
        if not await stream.wait_connected(5.0):
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
            await _quiet(stream)
    finally:
        await stream.hangup()
    return latencies, error


async def run_soak(args: argparse.Namespace) -> int:
    """Run the soak; exit status 0 when every call was answered."""
    from pipeswitch.bench.emulators.runner import EmulatorConfig, start_emulator_process

    out: Path = args.out or REPO_ROOT / "bench" / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    emu = await asyncio.to_thread(
        start_emulator_process, EmulatorConfig(llm_script="office", stt_script="office", seed=1)
    )
    proc: subprocess.Popen[bytes] | None = None
    result = SoakResult(calls=args.calls)
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
            for n in range(1, args.calls + 1):
                if args.minutes and time.monotonic() - t_start > args.minutes * 60:
                    result.notes.append(f"stopped after {args.minutes} minutes at call {n - 1}")
                    break
                if n == args.warmup + 1:
                    q = "?tracemalloc=1" if args.tracemalloc else ""
                    async with http.post(f"{debug}/soak/baseline{q}") as r:
                        r.raise_for_status()
                t0 = time.monotonic()
                try:
                    lat, err = await one_call(base, n, speech, args.turns, args.dialect)
                except Exception as exc:  # a broken call is a data point, not the end
                    lat, err = [], f"{type(exc).__name__}: {exc}"
                secs = time.monotonic() - t0
                stats: dict[str, Any] = {}
                for _ in range(100):  # the server finishes the call's teardown
                    async with http.get(f"{debug}/soak/stats") as r:
                        stats = await r.json()
                    if stats["calls_active"] == 0:
                        break
                    await asyncio.sleep(0.05)
                s = CallSample(
                    n=n,
                    seconds=round(secs, 2),
                    latencies_ms=[round(x, 1) for x in lat],
                    error=err,
                    rss_mb=round(stats["rss"] / 2**20, 1),
                    tasks=stats["tasks"],
                    threads=stats["threads"],
                    fds=stats["fds"],
                    objects=stats["objects"],
                    at_s=round(time.monotonic() - t_start, 1),
                )
                result.samples.append(s)
                if n == 1 or n % 10 == 0 or err:
                    logger.info(
                        "call {}: {} rss={} MB tasks={} threads={} fds={} objects={} {}",
                        n,
                        [f"{x:.0f}" for x in s.latencies_ms],
                        s.rss_mb,
                        s.tasks,
                        s.threads,
                        s.fds,
                        s.objects,
                        err,
                    )
                if n % 25 == 0:
                    _write(out, result, args)
            if len(result.samples) > args.warmup:
                async with http.get(f"{debug}/soak/diff") as r:
                    result.diff = await r.json()
    finally:
        if proc is not None:
            await asyncio.to_thread(_stop_server, proc)
        await asyncio.to_thread(emu.stop)
    _write(out, result, args)
    print(summary(result, args.warmup))
    print(f"results in {out}")
    return 0 if all(not s.error for s in result.samples) else 1


def summary(result: SoakResult, warmup: int) -> str:
    """A few lines: growth after warm-up, per 100 calls, and latency early vs late."""
    s = result.samples
    if not s:
        return "no calls"
    lines = [f"{len(s)} calls, {sum(1 for x in s if x.error)} with errors"]
    after = s[min(warmup, len(s) - 1) :]
    first, last = after[0], after[-1]
    calls = max(1, last.n - first.n)
    lines.append(
        f"after warm-up (call {first.n} -> {last.n}): RSS {first.rss_mb} -> {last.rss_mb} MB "
        f"({(last.rss_mb - first.rss_mb) / calls * 100:+.2f} MB/100 calls), tasks {first.tasks} -> "
        f"{last.tasks}, threads {first.threads} -> {last.threads}, fds {first.fds} -> {last.fds}, "
        f"objects {first.objects} -> {last.objects}"
    )
    lat = [x.latencies_ms[0] for x in after if x.latencies_ms]
    if len(lat) >= 20:
        k = len(lat) // 4
        lines.append(
            f"turn latency p50 first quarter {np.median(lat[:k]):.0f} ms, "
            f"last quarter {np.median(lat[-k:]):.0f} ms"
        )
    return "\n".join(lines)


def _write(out: Path, result: SoakResult, args: argparse.Namespace) -> None:
    (out / "soak.json").write_text(
        json.dumps(
            {
                "calls": result.calls,
                "samples": [asdict(s) for s in result.samples],
                "diff": result.diff,
                "notes": result.notes,
                "summary": summary(result, args.warmup),
            },
            indent=1,
        )
    )
    with (out / "soak.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["call", "rss_mb", "tasks", "threads", "fds", "objects", "latency_ms", "error"])
        for s in result.samples:
            w.writerow(
                [
                    s.n,
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
    """RSS, tasks, threads, fds, live objects and latency against the call number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.samples
    n = [x.n for x in s]
    panels = [
        ("RSS (MB)", [x.rss_mb for x in s]),
        ("asyncio tasks", [x.tasks for x in s]),
        ("threads", [x.threads for x in s]),
        ("file descriptors", [x.fds for x in s]),
        ("live Python objects", [x.objects for x in s]),
        ("turn latency (ms, wire)", [x.latencies_ms[0] if x.latencies_ms else np.nan for x in s]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (title, ys) in zip(axes.flat, panels, strict=True):
        ax.plot(n, ys, lw=1)
        ax.axvline(warmup, color="grey", ls=":", lw=1)
        ax.set_title(title)
        ax.set_xlabel("call #")
        ax.grid(alpha=0.3)
    fig.suptitle(f"pipeswitch bench soak: {len(s)} sequential emulated calls, one server process")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
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
