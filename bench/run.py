"""One measured session: emulators + one server under test + the load, then the records.

Shared by the latency and capacity benches. Each session starts a fresh
emulator process (same seed, so ours and the reference draw the same injected
latencies in the same order) and a fresh server process, runs a
:class:`bench.loadgen.LoadSpec` against it while sampling CPU and memory, then
collects the server's observer records and the emulators' injection logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psutil
from loguru import logger

from pipeswitch.bench.caller_speech import CallerAudio
from pipeswitch.bench.emulators.runner import (
    EmulatorConfig,
    EmulatorProcess,
    start_emulator_process,
)
from pipeswitch.bench.loadgen import (
    CallSpec,
    LoadResult,
    LoadSpec,
    TurnCallback,
    result_from_json,
    run_load,
)
from pipeswitch.bench.scenario import REPLY_SCRIPTS, STT_SCRIPT
from pipeswitch.bench.servers import (
    ProcessSampler,
    ProcWindow,
    ServerInfo,
    ServerKind,
    ServerProcess,
    machine_speed_s,
    wait_for_quiet_machine,
)
from pipeswitch.config.settings import EventLoopKind
from pipeswitch.pipelines.event_loop import resolve as resolve_loop

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ProviderProfile:
    """Injected provider latencies (median / p95, ms) and the reply script."""

    stt_ttfs_ms: tuple[float, float] = (247.0, 298.0)
    llm_ttft_ms: tuple[float, float] = (98.0, 217.0)
    tokens_per_s: float = 500.0
    replies: str = "unique"
    seed: int = 1

    def emulator_config(self) -> EmulatorConfig:
        return EmulatorConfig(
            seed=self.seed,
            deepgram_ttfs_median_ms=self.stt_ttfs_ms[0],
            deepgram_ttfs_p95_ms=self.stt_ttfs_ms[1],
            llm_ttft_median_ms=self.llm_ttft_ms[0],
            llm_ttft_p95_ms=self.llm_ttft_ms[1],
            llm_tokens_per_s=self.tokens_per_s,
            stt_script=STT_SCRIPT,
            llm_script=REPLY_SCRIPTS[self.replies],
        )


@dataclass
class SessionOptions:
    """How to run the server under test."""

    dialect: str = "json-stream"
    log_level: str = "WARNING"
    event_loop: str = "auto"
    # The load generator's and the emulators' own loop (the bench process runs on it).
    bench_loop: EventLoopKind = "auto"
    loadgen_procs: int = 1
    idle_window_s: float = 2.0
    log_dir: Path | None = None
    # One unmeasured call first: process start-up costs (first LLM client, first Piper
    # synthesis, lazy imports) are not per-call costs a long-running server pays.
    warmup: bool = True
    experiments: list[str] = field(default_factory=list)  # bench.experiments (Pipeswitch only)
    workers: int = 1  # Pipeswitch only: N processes on one port, as `serve --workers N`


# Piper server counters a session reports (deltas over the loaded window and the tail).
PIPER_COUNTERS = (
    "requests",
    "cache_hits",
    "cache_misses",
    "coalesced",
    "rejected_queue_full",
    "sentences",
    "errors",
)


async def _piper_metrics(piper_url: str) -> dict[str, Any]:
    """The Piper server's ``/metrics`` ({} when the server has none or it cannot be read)."""
    if not piper_url:
        return {}
    parts = urlsplit(piper_url)
    url = f"{parts.scheme}://{parts.netloc}/metrics"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(url) as resp,
        ):
            data: dict[str, Any] = await resp.json()
            return data
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        logger.warning("piper metrics unavailable at {}: {}", url, exc)
        return {}


@dataclass
class SessionResult:
    """Raw material for the analysis of one session."""

    server: ServerInfo
    load: LoadResult
    server_calls: dict[str, Any]
    server_health: dict[str, Any]
    stt_streams: list[dict[str, Any]]
    llm_requests: list[dict[str, Any]]
    idle: dict[str, ProcWindow]
    loaded: dict[str, ProcWindow]
    spec: LoadSpec
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


LoadBuilder = Callable[[str, float], LoadSpec]  # (url_base, t0) -> spec
# Started as a task once the load is scheduled (e.g. attach a profiler); its result
# lands in SessionResult.extra["on_load"].
OnLoad = Callable[[ServerProcess, LoadSpec], Coroutine[Any, Any, Any]]
# Absolute (begin, end) of the CPU/RSS window; end None = when the load finishes.
WindowFn = Callable[[LoadSpec], tuple[float, float | None]]


async def _sample_window(
    sampler: ProcessSampler, begin: float, end: float | None, load_done: asyncio.Event
) -> dict[str, ProcWindow]:
    await asyncio.sleep(max(0.0, begin - time.monotonic()))
    sampler.begin()
    if end is None:
        await load_done.wait()
    else:
        await asyncio.sleep(max(0.0, end - time.monotonic()))
    return await sampler.end()


async def _run_split(
    load: LoadSpec,
    audio: CallerAudio,
    procs: int,
    on_turn: TurnCallback | None,
    loop: EventLoopKind = "auto",
) -> LoadResult:
    """Run ``load`` across ``procs`` processes (this one plus workers, on ``loop``)."""
    shares = [load.calls[i::procs] for i in range(procs)]
    tmp = Path(tempfile.mkdtemp(prefix="pipeswitch-loadgen-"))
    workers: list[tuple[subprocess.Popen[bytes], Path]] = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    for i, share in enumerate(shares[1:], start=1):
        spec = LoadSpec(**{**load.__dict__, "calls": share, "probe_every_s": None})
        sp, op = tmp / f"spec-{i}.json", tmp / f"out-{i}.json"
        sp.write_text(spec.to_json())
        p = subprocess.Popen(
            [sys.executable, "-m", "pipeswitch.bench.loadgen", str(sp), str(op), loop],
            cwd=REPO_ROOT,
            env=env,
        )
        workers.append((p, op))
    mine = LoadSpec(**{**load.__dict__, "calls": shares[0]})
    result = await run_load(mine, audio, on_turn)
    for p, op in workers:
        rc = await asyncio.to_thread(p.wait)
        if rc != 0 or not op.exists():
            logger.warning("load worker exited with {}", rc)
            continue
        other = result_from_json(op.read_text())
        result.calls.extend(other.calls)
        result.probes.extend(other.probes)
        result.lag_spikes.extend(other.lag_spikes)
        if other.cpu_pct is not None:
            result.cpu_pct = (result.cpu_pct or 0.0) + other.cpu_pct
        result.loop_lag_ms = {"main": result.loop_lag_ms, "workers": other.loop_lag_ms}
    return result


async def _warm_up(server: ServerProcess, audio: CallerAudio) -> None:
    spec = LoadSpec(
        server.url_base,
        audio.rate,
        server.dialect,
        [CallSpec(uuid="warmup-0", start_s=0.0, turns=1, seed=0, warmup=True)],
        t0=time.monotonic() + 0.1,
    )
    result = await run_load(spec, audio)
    if not result.calls or result.calls[0].error or not result.calls[0].turns:
        logger.warning("warm-up call did not complete: {}", result.calls[:1])


async def run_session(
    kind: ServerKind,
    build_load: LoadBuilder,
    window: WindowFn,
    audio: CallerAudio,
    providers: ProviderProfile,
    opts: SessionOptions,
    *,
    on_turn: TurnCallback | None = None,
    log_name: str = "",
    start_delay_s: float = 0.5,
    on_load: OnLoad | None = None,
) -> SessionResult:
    """Emulators + server + load, measured; everything stopped afterwards."""
    quiet = await wait_for_quiet_machine()
    speed_s = await asyncio.to_thread(machine_speed_s)
    emu: EmulatorProcess = await asyncio.to_thread(
        start_emulator_process,
        providers.emulator_config(),
        use_uvloop=resolve_loop(opts.bench_loop) == "uvloop",
    )
    log_path = None
    if opts.log_dir is not None:
        log_path = opts.log_dir / f"server-{log_name or kind}.log"
    server = ServerProcess(
        kind,
        emu.info,
        dialect=opts.dialect,
        log_level=opts.log_level,
        log_path=log_path,
        event_loop=opts.event_loop,
        experiments=opts.experiments,
        workers=opts.workers if kind == "pipeswitch" else 1,
    )
    notes: list[str] = []
    if quiet > 20.0:
        notes.append(f"the machine was busy ({quiet:.0f} % of a core) when this session started")
    try:
        info = await server.start()
        procs = server.processes()
        with contextlib.suppress(psutil.Error):
            procs["emulators"] = psutil.Process(emu.pid)
        procs["loadgen"] = psutil.Process()
        if opts.warmup:
            await _warm_up(server, audio)
            await asyncio.to_thread(emu.reset)
            await asyncio.sleep(2.0)  # Piper finishes the warm-up reply's last sentences
        # Idle: the server with no calls (the per-call figures are relative to this).
        idle_sampler = ProcessSampler(procs)
        idle_sampler.begin()
        await asyncio.sleep(opts.idle_window_s)
        idle = await idle_sampler.end()
        await server.reset()
        piper_before = await _piper_metrics(info.piper_url)
        delay = start_delay_s + (3.0 if opts.loadgen_procs > 1 else 0.0)
        load = build_load(server.url_base, time.monotonic() + delay)
        begin, end = window(load)
        hook: asyncio.Task[Any] | None = (
            asyncio.create_task(on_load(server, load)) if on_load is not None else None
        )
        load_done = asyncio.Event()
        sampler_task = asyncio.create_task(
            _sample_window(ProcessSampler(procs), begin, end, load_done)
        )
        if opts.loadgen_procs > 1:
            notes.append(f"load generator split across {opts.loadgen_procs} processes")
            result = await _run_split(load, audio, opts.loadgen_procs, on_turn, opts.bench_loop)
        else:
            result = await run_load(load, audio, on_turn)
        load_done.set()
        loaded = await sampler_task
        extra: dict[str, Any] = {}
        if hook is not None:
            extra["on_load"] = await hook
        await asyncio.sleep(0.5)  # let the server finish the calls' records
        calls = await server.get("/bench/calls")
        health = await server.get("/bench/health")
        piper_after = await _piper_metrics(info.piper_url)
        if piper_before and piper_after:
            extra["piper"] = {
                k: piper_after[k] - piper_before.get(k, 0)
                for k in PIPER_COUNTERS
                if isinstance(piper_after.get(k), int)
            }
        streams = await asyncio.to_thread(emu.stt_streams)
        requests = await asyncio.to_thread(emu.llm_requests)
    finally:
        await server.stop()
        await asyncio.to_thread(emu.stop)
    return SessionResult(
        server=info,
        load=result,
        server_calls=calls,
        server_health=health,
        stt_streams=streams,
        llm_requests=requests,
        idle=idle,
        loaded=loaded,
        spec=load,
        notes=notes,
        extra={**extra, "machine_speed_s": speed_s},
    )
