"""Start, watch and stop the local inference servers, each in its own process.

Usage::

    async with LocalModelServers() as servers:          # Piper + Whisper + LLM
        tts = PiperHttpTTSService(base_url=servers.piper_url(8000), aiohttp_session=session)
        stt = OpenAISTTService(base_url=servers.whisper_base_url, api_key=servers.api_key,
                               settings=OpenAISTTService.Settings(model="tiny.en"))
        llm = OpenAILLMService(base_url=servers.llm_base_url, api_key=servers.api_key,
                               settings=OpenAILLMService.Settings(model="qwen2.5-coder-0.5b"))

    async with LocalModelServers.piper_only() as servers:  # cloud cascade: TTS only
        ...

Children are ``sys.executable -m pipeswitch.pipelines.local.<server>``; each prints one JSON ready line
(``{"ready": true, "port": N}``) once it listens on 127.0.0.1. Nothing is restarted
automatically: a dead child shows up in :meth:`LocalModelServers.health` /
:meth:`LocalModelServers.dead`. The per-run API key is passed to children through the
environment (not argv, which ``ps`` shows).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from loguru import logger

from pipeswitch.pipelines.local import models
from pipeswitch.pipelines.local._common import API_KEY_ENV

HOST = "127.0.0.1"
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
)
STDERR_TAIL_LINES = 60
# llama.cpp threads: 1 by default, for the prompt and for the reply's tokens. Its
# threads meet at a barrier after every op, so when other work takes a core a
# descheduled thread stalls the rest (at load average ~20: first clause 2.9-6.5 s on 1
# thread, 18.7-58.5 s on 2). `pipeswitch demo --turns 5`, interleaved on the shared
# 2-core box at load average 3-6, two runs each: p50 0.89 / 0.93 s with 1 thread,
# 1.83 / 2.20 s with the prompt on 2 threads, 3.68 / 5.15 s with both on 2 (LLM first
# token 0.25-0.83 s vs 0.25-3.2 s). Generating a token is memory-bound: 1 thread made
# 40 tokens/s, 2 threads 37-45 with a p10 of 3-28. Only the prompt (the caller's words,
# ~20 tokens) gains from a second thread on an idle box: 0.15 s instead of 0.24 s.
# $PIPESWITCH_LOCAL_LLM_THREADS sets the prompt threads (2 on a box with a core to
# spare), $PIPESWITCH_LOCAL_LLM_GEN_THREADS the generation threads (at most as many).
LLM_THREADS_ENV = "PIPESWITCH_LOCAL_LLM_THREADS"
DEFAULT_LLM_THREADS = 1
LLM_GEN_THREADS_ENV = "PIPESWITCH_LOCAL_LLM_GEN_THREADS"
DEFAULT_LLM_GEN_THREADS = 1


class LocalServerError(RuntimeError):
    """A local model server failed to start or is not running."""


@dataclass
class ChildServer:
    """One spawned server process."""

    name: str
    module: str
    args: list[str]
    threads: int
    proc: asyncio.subprocess.Process | None = None
    port: int | None = None
    start_seconds: float | None = None
    # Times the supervisor brought this server back after it died.
    restarts: int = 0
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def base(self) -> str:
        if self.port is None:
            raise LocalServerError(f"{self.name} server is not started")
        return f"http://{HOST}:{self.port}"

    def tail(self) -> str:
        return "\n".join(self.stderr_tail) or "(no stderr output)"


def child_env(threads: int, api_key: str | None) -> dict[str, str]:
    """Environment for a child: offline flags, pinned thread counts, the API key."""
    env = dict(os.environ)
    models.set_offline_env(env)
    for var in THREAD_ENV_VARS:
        env[var] = "false" if var == "TOKENIZERS_PARALLELISM" else str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault(models.CACHE_DIR_ENV, str(models.cache_dir()))
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key
    # Make `-m pipeswitch.pipelines.local.*` importable even when Pipeswitch isn't installed.
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    return env


class LocalModelServers:
    """Spawns and supervises the Piper, Whisper and LLM servers.

    Args:
        piper / whisper / llm: which servers to start.
        piper_voice: ``"joe"`` or a path to a Piper ``.onnx`` voice.
        piper_threads: ONNX intra-op threads for Piper (1 keeps concurrent calls from
            thrashing 2 cores).
        piper_warm: phrases to pre-synthesize (and pin in the cache) at start-up, at
            each of ``piper_warm_rates`` (a greeting must be ready at the call's rate).
        whisper_threads / llm_threads: CPU threads per server (``llm_threads``, the
            LLM's prompt threads, None: ``$PIPESWITCH_LOCAL_LLM_THREADS``, else 1; see
            ``LLM_THREADS_ENV``).
        llm_gen_threads: the LLM's threads for generating tokens (None:
            ``$PIPESWITCH_LOCAL_LLM_GEN_THREADS``, else 1), at most ``llm_threads``.
        whisper_compute_type: CTranslate2 compute type (``int8`` or ``float32``).
        llm_parallel: llama.cpp slots (concurrent conversations).
        llm_ctx: context size in tokens *per slot*.
        llm_mode: ``"front"`` (our aiohttp front over xllamacpp's in-process server API:
            bounded queue, ``/warm``, JSON metrics) or ``"native"`` (xllamacpp's own
            llama.cpp HTTP server, API-key locked).
        api_key: bearer key for Whisper/LLM; generated per run when ``None``.
        start_timeout: seconds to wait for each ready line.
        extra_args: extra CLI args per server name (``"piper"``, ``"whisper"``, ``"llm"``).
    """

    def __init__(
        self,
        *,
        piper: bool = True,
        whisper: bool = True,
        llm: bool = True,
        piper_voice: str = "joe",
        piper_threads: int = 1,
        piper_warm: list[str] | None = None,
        piper_warm_rates: tuple[int, ...] = (8000,),
        whisper_threads: int = 2,
        whisper_compute_type: str = "int8",
        llm_threads: int | None = None,
        llm_gen_threads: int | None = None,
        llm_parallel: int = 2,
        llm_ctx: int = 2048,
        llm_mode: str = "front",
        api_key: str | None = None,
        start_timeout: float = 120.0,
        stop_timeout: float = 5.0,
        extra_args: dict[str, list[str]] | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.api_key = api_key or secrets.token_urlsafe(32)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        extra = extra_args or {}
        common = ["--host", HOST, "--port", "0", "--watch-parent", "--log-level", log_level]
        self._children: dict[str, ChildServer] = {}
        if piper:
            args = [*common, "--voice", piper_voice, "--threads", str(piper_threads)]
            for text in piper_warm or []:
                args += ["--warm", text]
            if piper_warm:
                for rate in piper_warm_rates:
                    args += ["--warm-rate", str(rate)]
            self._children["piper"] = ChildServer(
                "piper",
                "pipeswitch.pipelines.local.piper_server",
                args + extra.get("piper", []),
                piper_threads,
            )
        if whisper:
            args = [
                *common,
                "--threads",
                str(whisper_threads),
                "--compute-type",
                whisper_compute_type,
            ]
            self._children["whisper"] = ChildServer(
                "whisper",
                "pipeswitch.pipelines.local.whisper_server",
                args + extra.get("whisper", []),
                whisper_threads,
            )
        if llm:
            if llm_threads is None:
                llm_threads = max(1, int(os.environ.get(LLM_THREADS_ENV) or DEFAULT_LLM_THREADS))
            if llm_gen_threads is None:
                llm_gen_threads = int(
                    os.environ.get(LLM_GEN_THREADS_ENV) or DEFAULT_LLM_GEN_THREADS
                )
            llm_gen_threads = max(1, min(llm_gen_threads, llm_threads))
            args = [
                *common,
                "--threads",
                str(llm_gen_threads),
                "--batch-threads",
                str(llm_threads),
                "--parallel",
                str(llm_parallel),
                "--ctx-size",
                str(llm_ctx),
                "--mode",
                llm_mode,
            ]
            self._children["llm"] = ChildServer(
                "llm",
                "pipeswitch.pipelines.local.llm_server",
                args + extra.get("llm", []),
                llm_threads,
            )
        if not self._children:
            raise ValueError("nothing to start")
        self._started = False
        self._stopping = False

    @classmethod
    def piper_only(cls, **kwargs: Any) -> LocalModelServers:
        """Only the Piper TTS server (what the cloud cascade needs)."""
        return cls(piper=True, whisper=False, llm=False, **kwargs)

    # ------------------------------------------------------------------ URLs
    def _child(self, name: str) -> ChildServer:
        child = self._children.get(name)
        if child is None:
            raise LocalServerError(f"{name} server was not requested")
        return child

    def piper_url(self, rate: int | None = 8000) -> str:
        """URL for ``PiperHttpTTSService(base_url=...)``; ``rate`` makes the server resample."""
        base = f"{self._child('piper').base}/tts"
        return f"{base}?rate={rate}" if rate else base

    @property
    def piper_base(self) -> str:
        """``http://127.0.0.1:P`` of the Piper server (``/warm``, ``/metrics``, ``/health``)."""
        return self._child("piper").base

    @property
    def whisper_base_url(self) -> str:
        """OpenAI-style base URL (``.../v1``) for ``OpenAISTTService``."""
        return f"{self._child('whisper').base}/v1"

    @property
    def llm_base_url(self) -> str:
        """OpenAI-style base URL (``.../v1``) for ``OpenAILLMService``."""
        return f"{self._child('llm').base}/v1"

    @property
    def children(self) -> dict[str, ChildServer]:
        return dict(self._children)

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> LocalModelServers:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every requested server concurrently; on any failure stop them all."""
        if self._started:
            return
        self._started = True
        results = await asyncio.gather(
            *(self._spawn(c) for c in self._children.values()), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            for err in errors[1:]:
                logger.error(f"also failed: {err}")
            raise errors[0]

    async def _spawn(self, child: ChildServer) -> None:
        t0 = time.monotonic()
        env = child_env(child.threads, self.api_key if child.name != "piper" else None)
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            child.module,
            *child.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        assert child.proc.stderr is not None and child.proc.stdout is not None
        child._tasks.append(asyncio.create_task(self._pump_stderr(child, child.proc.stderr)))
        try:
            port = await asyncio.wait_for(
                self._read_ready(child, child.proc.stdout), timeout=self.start_timeout
            )
        except TimeoutError:
            raise LocalServerError(
                f"{child.name} server (pid {child.pid}) not ready after {self.start_timeout:.0f}s; "
                f"stderr tail:\n{child.tail()}"
            ) from None
        child.port = port
        child.start_seconds = time.monotonic() - t0
        child._tasks.append(asyncio.create_task(self._drain(child.proc.stdout)))
        logger.info(
            f"{child.name} server ready on {HOST}:{port} (pid {child.pid}, "
            f"{child.start_seconds:.2f}s)"
        )
        child._tasks.append(asyncio.create_task(self._watch(child)))

    async def _watch(self, child: ChildServer) -> None:
        """Bring a server that died back, on the same port (calls keep their URLs).

        Calls in progress see errors from that provider meanwhile and degrade (an
        apology, a retry); new turns work again once it is back. Backoff doubles from
        0.5 s to 30 s so a server that keeps crashing does not spin.
        """
        assert child.proc is not None
        rc = await child.proc.wait()
        if self._stopping:
            return
        logger.error(
            f"{child.name} server (pid {child.pid}) exited with code {rc}; restarting on "
            f"port {child.port}; stderr tail:\n{child.tail()}"
        )
        delay = 0.5
        while not self._stopping:
            child.restarts += 1
            await asyncio.sleep(delay)
            if self._stopping:
                return
            if "--port" in child.args and child.port is not None:
                child.args[child.args.index("--port") + 1] = str(child.port)
            child._tasks = [
                t for t in child._tasks if not t.done() and t is not asyncio.current_task()
            ]
            try:
                await self._spawn(child)
                logger.info(f"{child.name} server is back (restart {child.restarts})")
                return
            except (LocalServerError, OSError) as exc:
                logger.error(f"{child.name} server restart failed: {exc}")
                delay = min(30.0, delay * 2)

    async def _read_ready(self, child: ChildServer, stdout: asyncio.StreamReader) -> int:
        while True:
            line = await stdout.readline()
            if not line:
                assert child.proc is not None
                rc = await child.proc.wait()
                await asyncio.sleep(0.05)  # let the stderr pump catch the last lines
                raise LocalServerError(
                    f"{child.name} server exited with code {rc} before it was ready; "
                    f"stderr tail:\n{child.tail()}"
                )
            text = line.decode(errors="replace").strip()
            with contextlib.suppress(ValueError):
                msg = json.loads(text)
                if isinstance(msg, dict) and msg.get("ready") and isinstance(msg.get("port"), int):
                    return int(msg["port"])
            logger.debug(f"[{child.name}] stdout: {text}")

    @staticmethod
    async def _pump_stderr(child: ChildServer, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            child.stderr_tail.append(text)
            if any(tag in text for tag in ("ERROR", "Traceback", "CRITICAL", "Error:")):
                logger.warning(f"[{child.name}] {text}")
            else:
                logger.debug(f"[{child.name}] {text}")

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.read(4096):
            pass

    async def stop(self) -> None:
        """SIGTERM every child, wait ``stop_timeout``, then SIGKILL what is left."""
        self._stopping = True
        procs = [c for c in self._children.values() if c.proc is not None]
        for c in procs:
            assert c.proc is not None
            if c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)
        for c in procs:
            assert c.proc is not None
            try:
                await asyncio.wait_for(c.proc.wait(), timeout=self.stop_timeout)
            except TimeoutError:
                logger.warning(f"{c.name} server (pid {c.pid}) ignored SIGTERM; killing")
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
                await c.proc.wait()
            if c.proc.stdin is not None:
                c.proc.stdin.close()
            for task in c._tasks:
                task.cancel()
            for task in c._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            c._tasks.clear()
        self._started = False
        self._stopping = False

    # ------------------------------------------------------------------ warm-up
    async def _post_json(self, url: str, payload: Any, *, auth: bool) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if auth else {}
        timeout = aiohttp.ClientTimeout(total=120)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, json=payload, headers=headers) as resp,
        ):
            if resp.status != 200:
                raise LocalServerError(f"POST {url} -> {resp.status}: {await resp.text()}")
            result: dict[str, Any] = await resp.json()
            return result

    async def warm_piper(self, texts: list[str], rate: int | None = 8000) -> dict[str, Any]:
        """Pre-synthesize and pin fixed phrases (greetings, "one moment please")."""
        return await self._post_json(
            f"{self.piper_base}/warm", {"texts": texts, "rate": rate}, auth=False
        )

    async def warm_llm(self, system_prompt: str) -> dict[str, Any]:
        """Prefill the LLM prompt cache with a tenant's system prompt (call start).

        Front mode uses ``POST /warm``; native mode sends the equivalent documented request
        (a ``max_tokens=1`` chat completion with only the system message).
        """
        base = self._child("llm").base
        if "native" in self._child("llm").args:
            payload = {
                "model": "local",
                "messages": [{"role": "system", "content": system_prompt}],
                "max_tokens": 1,
                "cache_prompt": True,
            }
            return await self._post_json(f"{base}/v1/chat/completions", payload, auth=True)
        return await self._post_json(f"{base}/warm", {"system_prompt": system_prompt}, auth=True)

    # ------------------------------------------------------------------ health
    def dead(self) -> list[str]:
        """Names of started servers whose process has exited."""
        return [n for n, c in self._children.items() if c.proc is not None and not c.alive]

    async def health(self, http_timeout: float = 2.0) -> dict[str, dict[str, Any]]:
        """Process liveness plus each server's ``GET /health`` (no restarts)."""
        out: dict[str, dict[str, Any]] = {}
        client_timeout = aiohttp.ClientTimeout(total=http_timeout)
        async with aiohttp.ClientSession(timeout=client_timeout) as session:
            for name, c in self._children.items():
                info: dict[str, Any] = {
                    "pid": c.pid,
                    "port": c.port,
                    "alive": c.alive,
                    "returncode": c.proc.returncode if c.proc else None,
                    "start_seconds": c.start_seconds,
                }
                if c.alive and c.port is not None:
                    try:
                        async with session.get(f"{c.base}/health") as resp:
                            info["http_status"] = resp.status
                            info["ok"] = resp.status == 200
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        info["ok"] = False
                        info["error"] = repr(exc)
                else:
                    info["ok"] = False
                    if c.proc is not None:
                        info["stderr_tail"] = c.tail()
                out[name] = info
        return out

    def require_alive(self) -> None:
        """Raise :class:`LocalServerError` naming any dead server (with its stderr tail)."""
        dead = [self._children[n] for n in self.dead()]
        if dead:
            details = "\n".join(
                f"{c.name} (rc={c.proc.returncode if c.proc else None}):\n{c.tail()}" for c in dead
            )
            names = ", ".join(c.name for c in dead)
            raise LocalServerError(f"local model server(s) died: {names}\n{details}")
