"""``pipeswitch serve --workers N``: one event loop per core.

A single Python process saturates one core long before two are busy (the event
loop and the GIL; capacity baseline). The parent starts the shared model
processes (Piper, and Whisper/LLM on the offline default) once, then N worker
processes that each run a full server on the same port (SO_REUSEPORT: the
kernel spreads new connections across them by a hash, and a worker that got
more than its share hands new ones to the least busy: transports/handoff.py).
Workers get the model endpoints from the parent, so models are loaded once per
machine, not per worker.

Only these workers share the port: the parent first binds it without SO_REUSEPORT (which
fails against any listener), and a single ``serve`` binds without SO_REUSEPORT at all, so a
second ``serve`` on a taken port exits 2 instead of splitting calls with the first.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict

from loguru import logger

from pipeswitch.config.settings import Settings
from pipeswitch.pipelines.app import (
    endpoints_with_local,
    load_tenants,
    needs_local_models,
    start_local_models,
)
from pipeswitch.pipelines.services import ProviderEndpoints
from pipeswitch.pipelines.startup import StartupError, check_port_free
from pipeswitch.transports import metrics
from pipeswitch.transports.handoff import (
    BALANCE_ENV,
    balance_env,
    create_balance_dir,
    mark_gone,
)

ENDPOINTS_ENV = "PIPESWITCH_WORKER_ENDPOINTS"


def worker_endpoints() -> ProviderEndpoints | None:
    """The endpoints a parent handed to this worker process, if any."""
    raw = os.environ.get(ENDPOINTS_ENV)
    return ProviderEndpoints(**json.loads(raw)) if raw else None


async def serve_workers(
    settings: Settings, workers: int, endpoints: ProviderEndpoints, argv: list[str]
) -> int:
    """Run ``workers`` server processes sharing ``settings.port`` until SIGINT/SIGTERM."""
    if settings.port == 0:
        raise StartupError("--workers needs a fixed --port (each worker binds the same one)")
    # Only this serve's own workers may share the port: anyone else's listener fails us here.
    check_port_free(settings.host, settings.port)
    models = None
    ep = endpoints
    if needs_local_models(ep):
        loader, _ = load_tenants(settings)
        greetings = sorted(
            {t.first_message for t in getattr(loader, "all", list)() if t.first_message}
            | ({settings.shutdown_goodbye} if settings.shutdown_goodbye else set())
        )
        models = start_local_models(settings, greetings)
        await models.start()
        ep = endpoints_with_local(ep, models)
    # Every worker writes its Prometheus samples here; the one a scrape reaches sums them.
    prom_dir = os.environ.get(metrics.MULTIPROC_ENV) or tempfile.mkdtemp(prefix="pipeswitch-prom-")
    own_prom_dir = metrics.MULTIPROC_ENV not in os.environ
    env = {**os.environ, ENDPOINTS_ENV: json.dumps(asdict(ep)), metrics.MULTIPROC_ENV: prom_dir}
    # The workers even out their connections at accept (transports/handoff.py).
    balance_dir = create_balance_dir(workers)

    async def spawn(index: int) -> asyncio.subprocess.Process:
        # Own session: a terminal's Ctrl-C reaches the parent only, which forwards it once
        # (a worker counts a second signal as "end all calls now").
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pipeswitch.pipelines.cli",
            *argv,
            env={**env, BALANCE_ENV: balance_env(balance_dir, index, workers)},
            start_new_session=True,
        )

    procs = [await spawn(i) for i in range(workers)]
    logger.info(
        "started {} workers on port {}: pids {}", workers, settings.port, [p.pid for p in procs]
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def _on_signal() -> None:
        if stop.is_set():  # second signal: the workers end their calls now
            for p in procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGTERM)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal)

    async def reap(p: asyncio.subprocess.Process) -> int:
        rc = await p.wait()
        multiprocess_dead(p.pid, prom_dir)
        return rc

    waiters = {asyncio.ensure_future(reap(p)): p for p in procs}
    stopper = asyncio.ensure_future(stop.wait())
    # A worker that dies (OOM kill, a crash in native code) loses its own calls only:
    # FreeSWITCH sees those sockets close and can fall back; the other workers' calls go on,
    # and a new worker takes its place. A crash loop stops the whole server instead.
    exits: list[float] = []
    while not stop.is_set():
        done, _ = await asyncio.wait([stopper, *waiters], return_when=asyncio.FIRST_COMPLETED)
        dead = [waiters.pop(w) for w in done if w in waiters]
        if stop.is_set() or not dead:
            break
        now = loop.time()
        exits = [t for t in exits if now - t < 60.0] + [now] * len(dead)
        if len(exits) > 3 * workers:
            logger.error("{} worker exits in 60 s; stopping the server", len(exits))
            break
        for old in dead:
            index = procs.index(old)
            mark_gone(balance_dir, index)  # no hand-overs to it until its successor is up
            new = await spawn(index)
            procs[index] = new
            waiters[asyncio.ensure_future(reap(new))] = new
            logger.error(
                "worker {} exited (code {}); its calls were lost; started worker {}",
                old.pid,
                old.returncode,
                new.pid,
            )
    for p in procs:
        if p.returncode is None:
            p.send_signal(signal.SIGTERM)
    # Each worker drains, says goodbye and exits within the drain timeout + 2 s.
    if waiters:
        await asyncio.wait(waiters, timeout=settings.drain_timeout_secs + 5)
    for p in procs:
        if p.returncode is None:
            p.kill()
    stopper.cancel()
    if models is not None:
        await models.stop()
    if own_prom_dir:
        shutil.rmtree(prom_dir, ignore_errors=True)
    shutil.rmtree(balance_dir, ignore_errors=True)
    return 0


def multiprocess_dead(pid: int, prom_dir: str) -> None:
    """A dead worker's calls are no longer active: drop its live gauges from the scrape."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, prom_dir)
