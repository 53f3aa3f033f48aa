"""Bench-only entry: Pipeswitch in its own process, pointed at running emulators.

``python -m pipeswitch.bench.serve --emulators '{"deepgram_url": …, "groq_base_url": …}'``

Starts exactly what ``pipeswitch serve --providers emulated`` starts (the same
:class:`pipelines.app.Pipeswitch`, its Piper child, the default tenant) but
uses emulators the bench already runs, so one emulator process (and its
request log) serves the whole bench run. Adds a :class:`bench.probe.BenchProbe`
on a second loopback port. Prints one JSON line on stdout once listening;
exits on SIGTERM or when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from pipeswitch.bench.probe import BenchProbe, breakdown_dict, user_texts, wait_for_stop_signal
from pipeswitch.pipelines import event_loop


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeswitch.bench.serve", description=__doc__)
    p.add_argument("--emulators", required=True, help="JSON with deepgram_url, groq_base_url")
    p.add_argument("--dialect", default="json-stream", choices=["json-stream", "binary", "file"])
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--max-calls", type=int, default=1000)
    p.add_argument("--loop", default="auto", choices=event_loop.EVENT_LOOP_KINDS)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="N server processes on one port, as `pipeswitch serve --workers N` runs them",
    )
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--experiment", action="append", default=[], help="bench.experiments patch (A/B)"
    )
    return p.parse_args(argv)


# ``turns.speculate=false,providers.stt=deepgram-flux``: tenant settings for an A/B run
# (inherited from the ``pipeswitch bench …`` command's environment).
TENANT_SET_ENV = "PIPESWITCH_BENCH_TENANT_SET"


def tenant_overrides(text: str) -> dict[str, dict[str, Any]]:
    """``section.key=value`` pairs (comma-separated) as nested tenant fields.

    Values are JSON where they parse (``false``, ``0.1``), strings otherwise.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise SystemExit(f"{TENANT_SET_ENV}: expected section.key=value, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def speculation_counts() -> dict[str, float]:
    """This process's speculative-turn counters (started, confirmed, wasted)."""
    from pipeswitch.transports.metrics import TURN_SPECULATIONS

    counts: dict[str, float] = {"started": 0.0, "confirmed": 0.0, "wasted": 0.0}
    for metric in TURN_SPECULATIONS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                outcome = sample.labels.get("outcome", "")
                counts[outcome] = counts.get(outcome, 0.0) + sample.value
    return counts


def _record_dict(rec: Any) -> dict[str, Any]:
    return {
        "call_uuid": rec.call.call_uuid,
        "tenant": rec.tenant,
        "started_at": rec.started_at,
        "ended_at": rec.ended_at,
        "turn_latencies": list(rec.turn_latencies),
        "breakdowns": [breakdown_dict(b) for b in list(rec.breakdowns)],
        "user_texts": user_texts(rec.messages),
        "end_reason": rec.end_reason,
    }


async def _amain(args: argparse.Namespace) -> None:
    from pipeswitch.bench.experiments import apply
    from pipeswitch.config.loaders import StaticTenantLoader
    from pipeswitch.config.logging import configure_logging
    from pipeswitch.config.settings import Settings
    from pipeswitch.config.tenants import DEFAULT_TENANT_NAME, Tenant
    from pipeswitch.pipelines.app import Pipeswitch
    from pipeswitch.pipelines.emulated import endpoints_for
    from pipeswitch.pipelines.session import CallRecord
    from pipeswitch.pipelines.vad import shared_batcher
    from pipeswitch.pipelines.workers import worker_endpoints

    configure_logging(args.log_level)
    experiments = apply(args.experiment)
    urls = json.loads(args.emulators)
    settings = Settings(
        host="127.0.0.1",
        port=args.port,
        providers="emulated",
        log_level=args.log_level,
        max_calls=args.max_calls,
    )
    overrides = tenant_overrides(os.environ.get(TENANT_SET_ENV, ""))
    tenant = Tenant.model_validate(
        {"name": DEFAULT_TENANT_NAME, "playback": args.dialect, **overrides}
    )
    if args.workers > 1:
        await serve_workers(args, settings, tenant, endpoints_for(argparse.Namespace(**urls)))
        return
    loader = StaticTenantLoader([tenant], default=DEFAULT_TENANT_NAME)
    # A worker gets the parent's endpoints (its Piper included) and shares the port.
    handed = worker_endpoints() if args.worker else None
    ep = handed or endpoints_for(argparse.Namespace(**urls))
    app = Pipeswitch(
        settings,
        loader=loader,
        default_tenant=DEFAULT_TENANT_NAME,
        endpoints=ep,
        port_shared=handed is not None,
    )
    await app.start()
    assert app.sessions is not None and app.server is not None
    sessions, server = app.sessions, app.server
    finished: list[CallRecord] = []

    async def _keep(rec: CallRecord, _cp: Any) -> None:
        finished.append(rec)

    sessions.finished_hooks.append(_keep)

    def calls() -> list[dict[str, Any]]:
        recs = [*finished, *list(sessions.active.values())]
        return [_record_dict(r) for r in recs]

    spec_base = speculation_counts()
    vad = shared_batcher()
    vad_base = (vad.windows, vad.skipped, vad.batches)

    def health() -> dict[str, Any]:
        st = server.stats
        now = speculation_counts()
        return {
            "calls_active": st.calls_active,
            "calls_total": st.calls_total,
            "refused": dict(st.refused),
            "upgrade_ms": list(st.upgrade_ms),
            # Since the last reset: the measured window only, not the warm-up call.
            "speculation": {k: int(v - spec_base.get(k, 0.0)) for k, v in now.items()},
            # Silero windows the model scored, and those below its quiet gate (pipelines/vad.py).
            "vad": {
                "scored": vad.windows - vad_base[0],
                "skipped": vad.skipped - vad_base[1],
                "batches": vad.batches - vad_base[2],
            },
            # --workers N: connections this worker passed to / took from its siblings.
            "handoffs": (
                {"handed_off": app.balancer.handed_off, "adopted": app.balancer.adopted}
                if app.balancer is not None
                else None
            ),
        }

    def reset() -> None:
        nonlocal spec_base, vad_base
        finished.clear()
        server.stats.upgrade_ms.clear()
        spec_base = speculation_counts()
        vad_base = (vad.windows, vad.skipped, vad.batches)

    # Calls up as the collector counts them (its idle collection runs as the last ends).
    probe = BenchProbe(calls, health, reset, active=lambda: len(sessions.active))
    stats_port = await probe.start()
    ready = {
        "ready": True,
        "kind": "pipeswitch",
        "port": app.port,
        "stats_port": stats_port,
        "pid": os.getpid(),
        "piper_url": app.endpoints.piper_url,
        "vad_stop_secs": tenant.turns.vad_stop_secs,
        "policy_wait_secs": tenant.turns.complete_wait_secs,
        "experiments": experiments,
        "tenant_overrides": overrides,
        "event_loop": event_loop.describe(),
    }
    print(json.dumps(ready), flush=True)
    try:
        await wait_for_stop_signal()
    finally:
        await probe.stop()
        await app.stop(drain_secs=0.0)


# -- serve --workers N ---------------------------------------------------------------------


async def serve_workers(args: argparse.Namespace, settings: Any, tenant: Any, ep: Any) -> None:
    """The parent of ``--workers N``: what ``pipeswitch serve --workers N`` does, probed.

    Piper starts once here; N worker processes (this module with ``--worker``) get its
    endpoints through the same environment variable ``serve --workers`` uses and bind one
    port with SO_REUSEPORT, each with its own probe. This process's probe merges theirs
    and keeps each worker's own calls, loop lag and GC under ``workers``.
    """
    import socket
    from dataclasses import asdict

    from pipeswitch.pipelines.app import endpoints_with_local, start_local_models
    from pipeswitch.pipelines.workers import ENDPOINTS_ENV
    from pipeswitch.transports import metrics
    from pipeswitch.transports.handoff import BALANCE_ENV, balance_env, create_balance_dir

    with socket.socket() as sock:  # a free port for the workers to share
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    greetings = [tenant.first_message] if tenant.first_message else []
    models = start_local_models(settings, greetings, (8000, 16000))
    await models.start()
    ep = endpoints_with_local(ep, models)
    prom_dir = tempfile.mkdtemp(prefix="pipeswitch-bench-prom-")
    env = {**os.environ, ENDPOINTS_ENV: json.dumps(asdict(ep)), metrics.MULTIPROC_ENV: prom_dir}
    argv = [
        *("--emulators", args.emulators, "--dialect", args.dialect),
        *("--log-level", args.log_level, "--max-calls", str(args.max_calls)),
        *("--port", str(port), "--worker"),
        *[x for name in args.experiment for x in ("--experiment", name)],
        *("--loop", args.loop),
    ]
    balance_dir = create_balance_dir(args.workers)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pipeswitch.bench.serve",
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**env, BALANCE_ENV: balance_env(balance_dir, i, args.workers)},
        )
        for i in range(args.workers)
    ]
    readies: list[dict[str, Any]] = []
    try:
        for proc in procs:
            assert proc.stdout is not None
            while True:
                line = (await proc.stdout.readline()).decode(errors="replace").strip()
                if not line:
                    raise SystemExit("a bench worker exited before it was ready")
                if line.startswith("{") and '"ready"' in line:
                    readies.append(json.loads(line))
                    break
        probe = _MergedProbe([int(r["stats_port"]) for r in readies])
        stats_port = await probe.start()
        ready = {
            **readies[0],
            "port": port,
            "stats_port": stats_port,
            "pid": os.getpid(),
            "workers": args.workers,
            "worker_pids": [int(r["pid"]) for r in readies],
        }
        print(json.dumps(ready), flush=True)
        try:
            await wait_for_stop_signal()
        finally:
            await probe.stop()
    finally:
        for proc in procs:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 10.0)
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        await models.stop()
        shutil.rmtree(prom_dir, ignore_errors=True)
        shutil.rmtree(balance_dir, ignore_errors=True)


def _merge_lag(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst worker's figure for each statistic (a stalled loop is one worker's)."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in (part or {}).items():
            if isinstance(v, int | float) and (out.get(k) is None or v > out[k]):
                out[k] = v
    return out


def merge_health(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``/bench/health`` for N workers: sums, worst-of, and each worker's own view."""
    refused: dict[str, int] = {}
    spec: dict[str, int] = {}
    vad: dict[str, int] = {}
    gc_ms: dict[str, dict[str, Any]] = {}
    for h in workers:
        for k, v in (h.get("refused") or {}).items():
            refused[k] = refused.get(k, 0) + int(v)
        for k, v in (h.get("speculation") or {}).items():
            spec[k] = spec.get(k, 0) + int(v)
        for k, v in (h.get("vad") or {}).items():
            vad[k] = vad.get(k, 0) + int(v)
        for gen, g in (h.get("gc_ms") or {}).items():
            m = gc_ms.setdefault(
                gen, {"count": 0, "total_ms": 0.0, "p99_ms": None, "max_ms": None, "idle_count": 0}
            )
            m["count"] += g.get("count") or 0
            m["idle_count"] += g.get("idle_count") or 0
            m["total_ms"] = round(m["total_ms"] + (g.get("total_ms") or 0.0), 1)
            for k in ("p99_ms", "max_ms"):
                if g.get(k) is not None and (m[k] is None or g[k] > m[k]):
                    m[k] = g[k]
    return {
        "pid": os.getpid(),
        "clock": {"unix": time.time(), "monotonic": time.monotonic()},
        "calls_active": sum(int(h.get("calls_active") or 0) for h in workers),
        "calls_total": sum(int(h.get("calls_total") or 0) for h in workers),
        "refused": refused,
        "upgrade_ms": [x for h in workers for x in h.get("upgrade_ms") or []],
        "loop_lag_ms": _merge_lag([h.get("loop_lag_ms") or {} for h in workers]),
        "loop_lag_spikes": sorted(x for h in workers for x in h.get("loop_lag_spikes") or []),
        "gc_ms": gc_ms,
        "gc_frozen": min((int(h.get("gc_frozen") or 0) for h in workers), default=0),
        "speculation": spec,
        "vad": vad,
        "workers": [
            {
                "pid": h.get("pid"),
                "calls_total": h.get("calls_total"),
                "calls_active": h.get("calls_active"),
                "handoffs": h.get("handoffs"),
                "loop_lag_ms": h.get("loop_lag_ms"),
                "gc_ms": h.get("gc_ms"),
            }
            for h in workers
        ],
    }


class _MergedProbe:
    """``/bench/calls``, ``/bench/health`` and ``/bench/reset`` over N workers' probes."""

    def __init__(self, ports: list[int]) -> None:
        self._ports = ports
        self._runner: Any = None
        self._http: Any = None

    async def start(self) -> int:
        import aiohttp
        from aiohttp import web

        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        app = web.Application()
        app.router.add_get("/bench/calls", self._calls)
        app.router.add_get("/bench/health", self._health)
        app.router.add_post("/bench/reset", self._reset)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _each(self, method: str, path: str) -> list[dict[str, Any]]:
        async def one(port: int) -> dict[str, Any]:
            async with self._http.request(method, f"http://127.0.0.1:{port}{path}") as r:
                r.raise_for_status()
                body: dict[str, Any] = await r.json()
                return body

        return list(await asyncio.gather(*(one(p) for p in self._ports)))

    async def _calls(self, _: Any) -> Any:
        from aiohttp import web

        parts = await self._each("GET", "/bench/calls")
        calls = [c for part in parts for c in part.get("calls") or []]
        clock = {"unix": time.time(), "monotonic": time.monotonic()}
        return web.json_response({"clock": clock, "calls": calls})

    async def _health(self, _: Any) -> Any:
        from aiohttp import web

        return web.json_response(merge_health(await self._each("GET", "/bench/health")))

    async def _reset(self, _: Any) -> Any:
        from aiohttp import web

        await self._each("POST", "/bench/reset")
        return web.json_response({"ok": True})


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = _parse(argv)
    event_loop.run(_amain(args), args.loop)  # as `pipeswitch serve --loop` runs
    sys.exit(0)


if __name__ == "__main__":
    main()
