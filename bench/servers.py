"""Driver side: start a server under test in its own process and watch it.

A :class:`ServerProcess` is ``python -m pipeswitch.bench.serve`` (Pipeswitch) or
``python -m pipeswitch.bench.reference`` (plain Pipecat), started with the emulators'
URLs; its Piper child is found with psutil. :class:`ProcessSampler` measures
CPU (from cumulative CPU times, so nothing is missed between samples), main
thread CPU and RSS of the server, its Piper child and any other process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import aiohttp
import psutil
from loguru import logger

from pipeswitch.bench.stats import cpu_percent, summarize

ServerKind = Literal["pipeswitch", "reference"]
REPO_ROOT = Path(__file__).resolve().parent.parent
_MODULES: dict[ServerKind, str] = {
    "pipeswitch": "pipeswitch.bench.serve",
    "reference": "pipeswitch.bench.reference",
}


@dataclass
class ServerInfo:
    """What the server's ready line said."""

    kind: ServerKind
    port: int
    stats_port: int
    pid: int
    piper_url: str
    vad_stop_secs: float
    policy_wait_secs: float
    # ``--workers N``: the worker processes (``pid`` is then their parent's).
    worker_pids: list[int] = field(default_factory=list)


class ServerProcess:
    """One server under test (see the module docstring)."""

    def __init__(
        self,
        kind: ServerKind,
        emulator_urls: dict[str, Any],
        *,
        dialect: str = "json-stream",
        log_level: str = "WARNING",
        log_path: Path | None = None,
        event_loop: str = "auto",
        start_timeout_s: float = 90.0,
        experiments: list[str] | None = None,
        workers: int = 1,
    ) -> None:
        self.kind = kind
        self.workers = workers
        self.emulator_urls = emulator_urls
        self.dialect = dialect
        self.log_level = log_level
        self.log_path = log_path
        self.event_loop = event_loop
        self.start_timeout_s = start_timeout_s
        self.experiments = list(experiments or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: ServerInfo | None = None
        self._log: IO[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def url_base(self) -> str:
        """``ws://127.0.0.1:P`` of the call endpoint."""
        assert self.info is not None
        return f"ws://127.0.0.1:{self.info.port}"

    def _stats(self, path: str) -> str:
        assert self.info is not None
        return f"http://127.0.0.1:{self.info.stats_port}{path}"

    async def start(self) -> ServerInfo:
        """Spawn and wait for the ready line."""
        urls = {k: self.emulator_urls[k] for k in ("deepgram_url", "groq_base_url")}
        cmd = [
            sys.executable,
            "-m",
            _MODULES[self.kind],
            "--emulators",
            json.dumps(urls),
            "--log-level",
            self.log_level,
        ]
        if self.kind == "pipeswitch":
            cmd += ["--dialect", self.dialect]
            for name in self.experiments:
                cmd += ["--experiment", name]
            if self.workers > 1:
                cmd += ["--workers", str(self.workers)]
        cmd += ["--loop", self.event_loop]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log is not None else subprocess.DEVNULL,
            cwd=str(REPO_ROOT),
            env=env,
        )
        try:
            line = await asyncio.wait_for(self._ready_line(), self.start_timeout_s)
        except (TimeoutError, RuntimeError):
            await self.stop()
            raise RuntimeError(
                f"{self.kind} server did not start; see {self.log_path or 'its stderr'}"
            ) from None
        data = json.loads(line)
        self.info = ServerInfo(
            kind=self.kind,
            port=int(data["port"]),
            stats_port=int(data["stats_port"]),
            pid=int(data["pid"]),
            piper_url=str(data.get("piper_url", "")),
            vad_stop_secs=float(data.get("vad_stop_secs", 0.2)),
            policy_wait_secs=float(data.get("policy_wait_secs", 0.0)),
            worker_pids=[int(p) for p in data.get("worker_pids", [])],
        )
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self.info

    async def _ready_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        stdout = self.proc.stdout
        while True:
            raw = await asyncio.to_thread(stdout.readline)
            if not raw:
                raise RuntimeError("server exited before it was ready")
            text = raw.decode(errors="replace").strip()
            if text.startswith("{") and '"ready"' in text:
                return text

    async def get(self, path: str) -> dict[str, Any]:
        """GET a probe endpoint (``/bench/calls`` or ``/bench/health``)."""
        assert self._http is not None
        async with self._http.get(self._stats(path)) as resp:
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json()
            return data

    async def reset(self) -> None:
        """Start a new measurement window in the server's probe."""
        assert self._http is not None
        async with self._http.post(self._stats("/bench/reset")) as resp:
            resp.raise_for_status()

    def processes(self) -> dict[str, psutil.Process]:
        """``server`` and, when found, ``piper`` (its TTS child).

        With ``--workers N`` the ``server`` is all of them together (parent and workers,
        as one :class:`ProcessGroup`), and each worker is also ``worker0``, ``worker1``…
        """
        assert self.info is not None
        out: dict[str, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            server = psutil.Process(self.info.pid)
            out["server"] = server
            if self.info.worker_pids:
                workers = [psutil.Process(pid) for pid in self.info.worker_pids]
                out["server"] = ProcessGroup([server, *workers])
                for i, w in enumerate(workers):
                    out[f"worker{i}"] = w
            for child in server.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "piper_server" in " ".join(child.cmdline()):
                        out["piper"] = child
        return out

    async def stop(self) -> None:
        """SIGTERM (stdin closed too), then SIGKILL after 10 s."""
        if self._http is not None:
            await self._http.close()
            self._http = None
        proc = self.proc
        if proc is not None and proc.poll() is None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                logger.warning("{} server ignored SIGTERM; killing", self.kind)
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None


# -- CPU / memory sampling -----------------------------------------------------------------


@dataclass
class _Times:
    user: float
    system: float


@dataclass
class _Thread:
    id: int
    user_time: float
    system_time: float


@dataclass
class _Memory:
    rss: int


class ProcessGroup(psutil.Process):
    """Several processes sampled as one (a ``--workers N`` server): sums of their figures.

    Only what :class:`ProcessSampler` reads: CPU times, the main threads' CPU (each
    process's main thread is an event loop), RSS and thread count.
    """

    def __init__(self, procs: list[psutil.Process]) -> None:
        super().__init__(procs[0].pid)  # the group is known by its first member (the parent)
        self.members = procs
        self._group_pid = procs[0].pid

    def cpu_times(self) -> Any:
        ts = [p.cpu_times() for p in self.members]
        return _Times(sum(t.user for t in ts), sum(t.system for t in ts))

    def threads(self) -> Any:
        user = system = 0.0
        for p in self.members:
            for th in p.threads():
                if th.id == p.pid:
                    user += th.user_time
                    system += th.system_time
        return [_Thread(self._group_pid, user, system)]

    def memory_info(self) -> Any:
        return _Memory(sum(p.memory_info().rss for p in self.members))

    def num_threads(self) -> int:
        return sum(p.num_threads() for p in self.members)


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (not idle, iowait or VM steal)."""
    t = psutil.cpu_times()
    return float(
        sum(t)
        - t.idle
        - getattr(t, "iowait", 0.0)
        - getattr(t, "steal", 0.0)
        - getattr(t, "guest", 0.0)  # already counted in user
        - getattr(t, "guest_nice", 0.0)
    )


def machine_steal_s() -> float:
    """CPU seconds the hypervisor gave to someone else while this VM wanted to run."""
    return float(getattr(psutil.cpu_times(), "steal", 0.0))


async def machine_load_pct(window_s: float = 2.0) -> float:
    """Busy % of one core (200 = both cores) over ``window_s``, whoever is busy."""
    b0, t0 = machine_busy_s(), time.monotonic()
    await asyncio.sleep(window_s)
    return 100.0 * (machine_busy_s() - b0) / (time.monotonic() - t0)


QUIET_WAIT_ENV = "PIPESWITCH_BENCH_QUIET_WAIT_S"


async def wait_for_quiet_machine(
    threshold_pct: float = 20.0, max_wait_s: float = 90.0, window_s: float = 2.0
) -> float:
    """Wait (bounded) until the machine is nearly idle; returns the last load seen.

    This machine may be shared with other work; starting a measurement while
    something else is busy would charge its CPU to the server under test.
    ``PIPESWITCH_BENCH_QUIET_WAIT_S`` caps the wait (0: measure the load once and go
    on; the smoke tests check the bench's plumbing, not its figures).
    """
    cap = os.environ.get(QUIET_WAIT_ENV)
    if cap is not None:
        max_wait_s = min(max_wait_s, max(0.0, float(cap)))
    t0 = time.monotonic()
    load = await machine_load_pct(window_s)
    if load > threshold_pct:
        logger.info("machine busy ({:.0f} % of a core): waiting up to {:.0f} s", load, max_wait_s)
    while load > threshold_pct and time.monotonic() < t0 + max_wait_s:
        load = await machine_load_pct(window_s)
    if time.monotonic() - t0 > 2 * window_s:
        logger.info("waited {:.0f} s for the machine ({:.0f} % now)", time.monotonic() - t0, load)
    return load


# The machine-speed reference: a fixed pure-Python loop (the server's work is mostly the
# interpreter's). Measured 0.19-0.25 s on the same VM within one hour (1 Dec 2026): a
# shared VM's speed drifts by a third, so capacity figures are read with it.
SPEED_LOOP = 10**7


def machine_speed_s(repeats: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds the reference loop takes on one core now (the best of ``repeats``; lower is
    faster). Call it on a quiet machine: it measures what a core gives, not what is free."""
    best = math.inf
    for _ in range(repeats):
        t = clock()
        sum(range(SPEED_LOOP))
        best = min(best, clock() - t)
    return round(best, 3)


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def _main_thread_cpu_s(p: psutil.Process) -> float | None:
    with contextlib.suppress(psutil.Error):
        for th in p.threads():
            if th.id == p.pid:
                return float(th.user_time + th.system_time)
    return None


def _main_thread_wait_s(p: psutil.Process) -> float | None:
    """Seconds the main thread(s) spent runnable but waiting for a CPU (the kernel's
    run-queue wait, ``/proc/<pid>/task/<pid>/schedstat``); None where not readable."""
    total = 0.0
    for member in getattr(p, "members", None) or [p]:
        try:
            with open(f"/proc/{member.pid}/task/{member.pid}/schedstat") as f:
                total += int(f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return None
    return total


@dataclass
class ProcWindow:
    """CPU and memory of one process over a measurement window.

    ``main_thread_wait_pct``: of the window's wall time, how long the main thread (the
    event loop; summed over a group's members) was ready to run and waited for a CPU:
    loop stalls that are the machine's, not the code's.
    """

    cpu_pct: float | None = None
    main_thread_cpu_pct: float | None = None
    main_thread_wait_pct: float | None = None
    rss_mb_mean: float | None = None
    rss_mb_max: float | None = None
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class _Track:
    proc: psutil.Process
    t0: float
    cpu0: float
    main0: float | None
    wait0: float | None = None
    rss: list[float] = field(default_factory=list)


class ProcessSampler:
    """Samples named processes once a second between :meth:`begin` and :meth:`end`."""

    def __init__(self, procs: dict[str, psutil.Process], interval_s: float = 1.0) -> None:
        self.procs = procs
        self.interval_s = interval_s
        self._tracks: dict[str, _Track] = {}
        self._task: asyncio.Task[None] | None = None
        self._machine0 = (0.0, 0.0)
        self._steal0 = 0.0

    def begin(self) -> None:
        """Open the window (cumulative CPU times are read now and at :meth:`end`)."""
        now = time.monotonic()
        self._tracks = {}
        self._machine0 = (now, machine_busy_s())
        self._steal0 = machine_steal_s()
        for name, p in self.procs.items():
            with contextlib.suppress(psutil.Error):
                self._tracks[name] = _Track(
                    p, now, _cpu_s(p), _main_thread_cpu_s(p), _main_thread_wait_s(p)
                )
        self._sample()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def _sample(self) -> None:
        for tr in self._tracks.values():
            with contextlib.suppress(psutil.Error):
                tr.rss.append(tr.proc.memory_info().rss / 1e6)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._sample()

    async def end(self) -> dict[str, ProcWindow]:
        """Close the window; per process CPU % (of one core), main-thread CPU %, RSS."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._sample()
        now = time.monotonic()
        out: dict[str, ProcWindow] = {}
        for name, tr in self._tracks.items():
            w = ProcWindow()
            with contextlib.suppress(psutil.Error):
                wall = now - tr.t0
                w.cpu_pct = cpu_percent(tr.cpu0, _cpu_s(tr.proc), wall)
                main1 = _main_thread_cpu_s(tr.proc)
                if tr.main0 is not None and main1 is not None:
                    w.main_thread_cpu_pct = cpu_percent(tr.main0, main1, wall)
                wait1 = _main_thread_wait_s(tr.proc)
                if tr.wait0 is not None and wait1 is not None:
                    w.main_thread_wait_pct = cpu_percent(tr.wait0, wait1, wall)
                w.threads = tr.proc.num_threads()
            s = summarize(tr.rss)
            w.rss_mb_mean, w.rss_mb_max = s.mean, s.max
            out[name] = w
        # The whole machine, and what none of the sampled processes account for.
        t0, b0 = self._machine0
        machine = ProcWindow(cpu_pct=cpu_percent(b0, machine_busy_s(), now - t0))
        ours = sum(w.cpu_pct or 0.0 for w in out.values())
        other = ProcWindow(
            cpu_pct=None if machine.cpu_pct is None else max(0.0, machine.cpu_pct - ours)
        )
        out["machine"] = machine
        out["other"] = other
        out["steal"] = ProcWindow(cpu_pct=cpu_percent(self._steal0, machine_steal_s(), now - t0))
        return out
