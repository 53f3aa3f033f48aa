"""Run the provider emulators in-process, in a child process, or from the CLI.

In-process (tests)::

    async with run_emulators(EmulatorConfig()) as emu:
        stt = DeepgramSTTService(api_key="emulated", base_url=emu.deepgram_url)
        llm = GroqLLMService(api_key="emulated", base_url=emu.groq_base_url, ...)
        ...
        emu.openai.requests[-1].messages   # what the LLM was sent

In a child process (the bench: ~100 emulated streams must not share the media
server's event loop, or the emulators' own work would show up as server
latency)::

    with start_emulator_process(EmulatorConfig(seed=1)) as proc:
        proc.deepgram_url, proc.groq_base_url
        proc.llm_requests()   # the request log, fetched over HTTP

Standalone: ``python -m pipeswitch.bench.emulators --port-base 9100`` (Deepgram on 9100,
OpenAI/Groq on 9101).

Each emulator listens on its own port; ``0`` picks a free one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from aiohttp import web

from pipeswitch.bench.emulators.deepgram import DeepgramEmulator, DeepgramFaults, DeepgramSettings
from pipeswitch.bench.emulators.elevenlabs_convai import (
    CONVAI_RESPONSE,
    ConvAIFaults,
    ConvAISettings,
    ElevenLabsConvAIEmulator,
)
from pipeswitch.bench.emulators.gemini_live import (
    GEMINI_LIVE_TTFA,
    GeminiFaults,
    GeminiLiveEmulator,
    serve_gemini,
)
from pipeswitch.bench.emulators.latency import DEEPGRAM_TTFS, GROQ_TTFT, LatencyModel
from pipeswitch.bench.emulators.openai_chat import ChatFaults, ChatScript, OpenAIChatEmulator
from pipeswitch.bench.emulators.openai_realtime import (
    OPENAI_REALTIME_TTFA,
    OpenAIRealtimeEmulator,
    RealtimeFaults,
    piper_speech,
    tone_speech,
)
from pipeswitch.bench.emulators.scripts import resolve_llm_script, resolve_stt_script
from pipeswitch.bench.emulators.tls import make_test_ca

SttScriptSpec = str | Sequence[str] | Callable[[int], str]
LlmScriptSpec = str | Mapping[str, Any] | ChatScript


@dataclass
class EmulatorConfig:
    """Everything that shapes the emulators' behaviour.

    Scripts are a registry name (see :mod:`bench.emulators.scripts`), an import
    path ``"pkg.mod:attr"``, literal lines / a keyword table, or (in-process
    only) a callable. ``p95 <= median`` makes a latency constant.
    """

    host: str = "127.0.0.1"
    deepgram_port: int = 0
    openai_port: int = 0
    seed: int | None = 0
    deepgram_ttfs_median_ms: float = DEEPGRAM_TTFS.median_ms
    deepgram_ttfs_p95_ms: float = DEEPGRAM_TTFS.p95_ms
    llm_ttft_median_ms: float = GROQ_TTFT.median_ms
    llm_ttft_p95_ms: float = GROQ_TTFT.p95_ms
    llm_tokens_per_s: float = 500.0
    stt_script: SttScriptSpec = "generic"
    llm_script: LlmScriptSpec = "default"
    api_key: str | None = None
    deepgram: DeepgramSettings = field(default_factory=DeepgramSettings)
    deepgram_faults: DeepgramFaults = field(default_factory=DeepgramFaults)
    llm_faults: ChatFaults = field(default_factory=ChatFaults)
    # ElevenLabs Agents (ConvAI) emulator: caller lines from the STT script.
    elevenlabs_port: int = 0
    convai: ConvAISettings = field(default_factory=ConvAISettings)
    convai_faults: ConvAIFaults = field(default_factory=ConvAIFaults)
    convai_response_median_ms: float = CONVAI_RESPONSE.median_ms
    convai_response_p95_ms: float = CONVAI_RESPONSE.p95_ms
    # OpenAI Realtime (ws) and Gemini Live (wss, test CA under tls_dir; "" = a temp dir)
    # emulators: replies from ``s2s_script``, caller lines from the STT script, reply
    # audio from a Piper server at ``s2s_speech_url`` (or voice-like tones without one).
    realtime_port: int = 0
    gemini_port: int = 0
    tls_dir: str = ""
    s2s_script: LlmScriptSpec = "default"
    s2s_speech_url: str = ""
    realtime_ttfa_median_ms: float = OPENAI_REALTIME_TTFA.median_ms
    realtime_ttfa_p95_ms: float = OPENAI_REALTIME_TTFA.p95_ms
    gemini_ttfa_median_ms: float = GEMINI_LIVE_TTFA.median_ms
    gemini_ttfa_p95_ms: float = GEMINI_LIVE_TTFA.p95_ms
    gemini_session_limit_s: float | None = None
    realtime_faults: RealtimeFaults = field(default_factory=RealtimeFaults)
    gemini_faults: GeminiFaults = field(default_factory=GeminiFaults)

    def to_json(self) -> str:
        """Serialise for a child process; callables can't cross, so they raise."""
        for name in ("stt_script", "llm_script", "s2s_script"):
            value = getattr(self, name)
            if callable(value) and not isinstance(value, str | Mapping):
                raise TypeError(
                    f"{name} is a callable; a child process needs a name or 'module:attr'"
                )
        data = dataclasses.asdict(self)
        if isinstance(self.stt_script, tuple):
            data["stt_script"] = list(self.stt_script)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> EmulatorConfig:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["deepgram"] = DeepgramSettings(**data.get("deepgram", {}))
        data["deepgram_faults"] = DeepgramFaults(**data.get("deepgram_faults", {}))
        data["llm_faults"] = ChatFaults(**data.get("llm_faults", {}))
        data["convai"] = ConvAISettings(**data.get("convai", {}))
        data["convai_faults"] = ConvAIFaults(**data.get("convai_faults", {}))
        data["realtime_faults"] = RealtimeFaults(**data.get("realtime_faults", {}))
        data["gemini_faults"] = GeminiFaults(**data.get("gemini_faults", {}))
        return cls(**data)

    def build(self) -> tuple[DeepgramEmulator, OpenAIChatEmulator]:
        """Create (not start) the emulator objects."""
        llm_seed = None if self.seed is None else self.seed + 1
        deepgram = DeepgramEmulator(
            ttfs=LatencyModel(self.deepgram_ttfs_median_ms, self.deepgram_ttfs_p95_ms, self.seed),
            script=resolve_stt_script(self.stt_script),
            settings=dataclasses.replace(
                self.deepgram, api_key=self.deepgram.api_key or self.api_key
            ),
            faults=dataclasses.replace(self.deepgram_faults),
        )
        openai = OpenAIChatEmulator(
            ttft=LatencyModel(self.llm_ttft_median_ms, self.llm_ttft_p95_ms, llm_seed),
            tokens_per_s=self.llm_tokens_per_s,
            script=resolve_llm_script(self.llm_script),
            faults=dataclasses.replace(self.llm_faults),
            api_key=self.api_key,
        )
        return deepgram, openai

    def build_convai(self) -> ElevenLabsConvAIEmulator:
        """Create (not start) the ElevenLabs Agents emulator."""
        seed = None if self.seed is None else self.seed + 2
        return ElevenLabsConvAIEmulator(
            settings=dataclasses.replace(self.convai, api_key=self.convai.api_key or self.api_key),
            faults=dataclasses.replace(self.convai_faults),
            response_latency=LatencyModel(
                self.convai_response_median_ms, self.convai_response_p95_ms, seed
            ),
            user_lines=resolve_stt_script(self.stt_script),
        )

    def build_s2s(self) -> tuple[OpenAIRealtimeEmulator, GeminiLiveEmulator]:
        """Create (not start) the OpenAI Realtime and Gemini Live emulators."""
        seed = None if self.seed is None else self.seed + 3
        speech = piper_speech(self.s2s_speech_url) if self.s2s_speech_url else tone_speech
        script = resolve_llm_script(self.s2s_script)
        lines = resolve_stt_script(self.stt_script)
        realtime = OpenAIRealtimeEmulator(
            ttfa=LatencyModel(self.realtime_ttfa_median_ms, self.realtime_ttfa_p95_ms, seed),
            script=script,
            transcripts=lines,
            speech=speech,
            faults=dataclasses.replace(self.realtime_faults),
            api_key=self.api_key,
        )
        gemini = GeminiLiveEmulator(
            ttfa=LatencyModel(
                self.gemini_ttfa_median_ms,
                self.gemini_ttfa_p95_ms,
                None if seed is None else seed + 1,
            ),
            script=script,
            transcripts=lines,
            speech=speech,
            faults=dataclasses.replace(self.gemini_faults),
            api_key=self.api_key,
            session_limit_s=self.gemini_session_limit_s,
        )
        return realtime, gemini


@dataclass
class RunningEmulators:
    """Started emulators: their objects (for logs and faults) and their URLs."""

    host: str
    deepgram: DeepgramEmulator
    openai: OpenAIChatEmulator
    deepgram_port: int
    openai_port: int
    convai: ElevenLabsConvAIEmulator | None = None
    elevenlabs_port: int = 0
    realtime: OpenAIRealtimeEmulator | None = None
    realtime_port: int = 0
    gemini: GeminiLiveEmulator | None = None
    gemini_port: int = 0
    gemini_ca_file: str = ""

    @property
    def openai_realtime_url(self) -> str:
        """``base_url`` for ``OpenAIRealtimeLLMService``."""
        return f"ws://{self.host}:{self.realtime_port}/v1/realtime"

    @property
    def gemini_url(self) -> str:
        """``http_options.base_url`` for ``GeminiLiveLLMService`` (TLS; trust ``gemini_ca_file``)."""
        return f"https://{self.host}:{self.gemini_port}"

    @property
    def elevenlabs_url(self) -> str:
        """``base_url`` for ``ElevenLabsAgentService`` (it appends ``/v1/convai/...``)."""
        return f"ws://{self.host}:{self.elevenlabs_port}"

    @property
    def deepgram_url(self) -> str:
        """``base_url`` for ``DeepgramSTTService`` (the SDK appends ``/v1/listen``)."""
        return f"ws://{self.host}:{self.deepgram_port}"

    @property
    def groq_base_url(self) -> str:
        """``base_url`` for ``GroqLLMService``."""
        return f"http://{self.host}:{self.openai_port}/openai/v1"

    @property
    def openai_base_url(self) -> str:
        """``base_url`` for ``OpenAILLMService``."""
        return f"http://{self.host}:{self.openai_port}/v1"

    def urls(self) -> dict[str, Any]:
        """The URLs and ports as one JSON-ready dict."""
        return {
            "deepgram_url": self.deepgram_url,
            "groq_base_url": self.groq_base_url,
            "openai_base_url": self.openai_base_url,
            "deepgram_port": self.deepgram_port,
            "openai_port": self.openai_port,
            "elevenlabs_url": self.elevenlabs_url,
            "elevenlabs_port": self.elevenlabs_port,
            "openai_realtime_url": self.openai_realtime_url,
            "realtime_port": self.realtime_port,
            "gemini_url": self.gemini_url,
            "gemini_port": self.gemini_port,
            "gemini_ca_file": self.gemini_ca_file,
        }


async def _serve(
    add_routes: Callable[[web.Application], None],
    host: str,
    port: int,
    on_shutdown: Callable[[], Any] | None = None,
) -> tuple[web.AppRunner, int]:
    app = web.Application()
    add_routes(app)
    if on_shutdown is not None:

        async def _shutdown(_app: web.Application) -> None:
            await on_shutdown()

        app.on_shutdown.append(_shutdown)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, int(bound)


@contextlib.asynccontextmanager
async def run_emulators(config: EmulatorConfig | None = None) -> AsyncIterator[RunningEmulators]:
    """Start every emulator on this event loop; stop them on exit."""
    cfg = config or EmulatorConfig()
    deepgram, openai = cfg.build()
    runners: list[web.AppRunner] = []
    own_tls_dir: str | None = None
    try:
        dg_runner, dg_port = await _serve(
            deepgram.add_routes, cfg.host, cfg.deepgram_port, deepgram.close_all
        )
        runners.append(dg_runner)
        oa_runner, oa_port = await _serve(openai.add_routes, cfg.host, cfg.openai_port)
        runners.append(oa_runner)
        convai = cfg.build_convai()
        el_runner, el_port = await _serve(
            convai.add_routes, cfg.host, cfg.elevenlabs_port, convai.close_all
        )
        runners.append(el_runner)
        realtime, gemini = cfg.build_s2s()
        rt_runner, rt_port = await _serve(
            realtime.add_routes, cfg.host, cfg.realtime_port, realtime.close_all
        )
        runners.append(rt_runner)
        tls_dir = cfg.tls_dir
        if not tls_dir:
            tls_dir = own_tls_dir = tempfile.mkdtemp(prefix="pipeswitch-tls-")
        ca = make_test_ca(tls_dir, hosts=(cfg.host, "localhost"))
        gm_runner, gm_port = await serve_gemini(
            gemini, ca.server_context(), cfg.host, cfg.gemini_port
        )
        runners.append(gm_runner)
        yield RunningEmulators(
            cfg.host,
            deepgram,
            openai,
            dg_port,
            oa_port,
            convai,
            el_port,
            realtime,
            rt_port,
            gemini,
            gm_port,
            str(ca.ca_file),
        )
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        if own_tls_dir is not None:  # the throwaway CA's keys go with the emulators
            shutil.rmtree(own_tls_dir, ignore_errors=True)


# -- child process ------------------------------------------------------------


class EmulatorProcess:
    """Handle on emulators running in a child process (see :func:`start_emulator_process`)."""

    def __init__(self, proc: subprocess.Popen[bytes], info: dict[str, Any]) -> None:
        """Wrap a started child and the URLs it reported."""
        self.proc = proc
        self.info = info
        self.deepgram_url: str = info["deepgram_url"]
        self.groq_base_url: str = info["groq_base_url"]
        self.openai_base_url: str = info["openai_base_url"]
        self.deepgram_port: int = info["deepgram_port"]
        self.openai_port: int = info["openai_port"]
        self.elevenlabs_url: str = info.get("elevenlabs_url", "")
        self.openai_realtime_url: str = info.get("openai_realtime_url", "")
        self.gemini_url: str = info.get("gemini_url", "")
        self.gemini_ca_file: str = info.get("gemini_ca_file", "")
        self._host: str = info["host"]

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.proc.pid

    def _admin(self, port: int, path: str, payload: dict[str, Any] | None = None) -> Any:
        url = f"http://{self._host}:{port}/_emulator/{path}"
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def llm_requests(self) -> list[dict[str, Any]]:
        """The chat emulator's request log (``ChatRequestRecord`` dicts)."""
        return list(self._admin(self.openai_port, "requests")["requests"])

    def stt_streams(self) -> list[dict[str, Any]]:
        """The Deepgram emulator's stream records (``StreamRecord`` dicts)."""
        return list(self._admin(self.deepgram_port, "streams")["streams"])

    def set_llm_faults(self, faults: ChatFaults) -> None:
        """Replace the chat emulator's faults."""
        self._admin(self.openai_port, "faults", dataclasses.asdict(faults))

    def set_stt_faults(self, faults: DeepgramFaults) -> None:
        """Replace the Deepgram emulator's faults."""
        self._admin(self.deepgram_port, "faults", dataclasses.asdict(faults))

    def reset(self) -> None:
        """Clear both logs and all faults."""
        self._admin(self.openai_port, "reset", {})
        self._admin(self.deepgram_port, "reset", {})

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the child (SIGTERM, then SIGKILL after ``timeout``); returns its exit code."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            # EOF on stdin is the child's cue to stop: let it. A SIGTERM sent right after
            # could land while it leaves its loop, whose handler is gone by then (-15).
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(min(timeout, 2.0))
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> EmulatorProcess:
        """Use as a context manager that stops the child on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the child."""
        self.stop()


def start_emulator_process(
    config: EmulatorConfig | None = None,
    *,
    startup_timeout: float = 30.0,
    stderr: int | IO[Any] | None = None,
    python: str | None = None,
    use_uvloop: bool = False,
) -> EmulatorProcess:
    """Start the emulators in a child process and wait until they listen.

    The child prints one JSON line with its URLs and ports on stdout once bound,
    and exits when its stdin closes, so it does not outlive a crashed parent.
    This call blocks (up to ~1 s normally); from async code wrap it in
    ``asyncio.to_thread``.
    """
    cfg = config or EmulatorConfig()
    cmd = [
        python or sys.executable,
        "-m",
        "pipeswitch.bench.emulators",
        "--config-json",
        cfg.to_json(),
        "--json",
        "--exit-on-stdin-eof",
    ]
    if use_uvloop:
        cmd.append("--uvloop")
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=repo_root
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + startup_timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"emulator process did not start (exit code {proc.returncode})")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            continue
        text = line.decode(errors="replace").strip()
        if text.startswith("{"):
            return EmulatorProcess(proc, json.loads(text))


# -- CLI ----------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeswitch.bench.emulators",
        description="Run the Deepgram and OpenAI/Groq emulators.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--port-base",
        type=int,
        default=None,
        help="Deepgram on PORT_BASE, OpenAI/Groq on PORT_BASE+1 (default: free ports)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stt-ttfs-median-ms", type=float, default=DEEPGRAM_TTFS.median_ms)
    p.add_argument("--stt-ttfs-p95-ms", type=float, default=DEEPGRAM_TTFS.p95_ms)
    p.add_argument("--llm-ttft-median-ms", type=float, default=GROQ_TTFT.median_ms)
    p.add_argument("--llm-ttft-p95-ms", type=float, default=GROQ_TTFT.p95_ms)
    p.add_argument("--llm-tokens-per-s", type=float, default=500.0)
    p.add_argument("--stt-script", default="generic", help="name or module:attr")
    p.add_argument("--llm-script", default="default", help="name or module:attr")
    p.add_argument("--api-key", default=None, help="require this key (default: any)")
    p.add_argument(
        "--config-json", default=None, help="full EmulatorConfig as JSON (overrides flags)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON line with the URLs")
    p.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--uvloop", action="store_true", help="use uvloop if installed")
    return p.parse_args(argv)


def _config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    if args.config_json:
        return EmulatorConfig.from_json(args.config_json)
    base = args.port_base
    return EmulatorConfig(
        host=args.host,
        deepgram_port=base if base is not None else 0,
        openai_port=base + 1 if base is not None else 0,
        seed=args.seed,
        deepgram_ttfs_median_ms=args.stt_ttfs_median_ms,
        deepgram_ttfs_p95_ms=args.stt_ttfs_p95_ms,
        llm_ttft_median_ms=args.llm_ttft_median_ms,
        llm_ttft_p95_ms=args.llm_ttft_p95_ms,
        llm_tokens_per_s=args.llm_tokens_per_s,
        stt_script=args.stt_script,
        llm_script=args.llm_script,
        api_key=args.api_key,
    )


async def _amain(cfg: EmulatorConfig, as_json: bool, exit_on_eof: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if exit_on_eof:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def _watch_stdin() -> None:
            while await reader.read(4096):
                pass
            stop.set()

        watcher = asyncio.create_task(_watch_stdin())
    async with run_emulators(cfg) as emu:
        info = {
            **emu.urls(),
            "host": cfg.host,
            "pid": os.getpid(),
            # "uvloop" or "asyncio": what the bench records as the emulators' loop.
            "event_loop": type(loop).__module__.split(".")[0],
        }
        if as_json:
            print(json.dumps(info), flush=True)
        else:
            print(f"Deepgram STT : {emu.deepgram_url}   (DeepgramSTTService(base_url=...))")
            print(f"Groq LLM     : {emu.groq_base_url}   (GroqLLMService(base_url=...))")
            print(f"OpenAI LLM   : {emu.openai_base_url}   (OpenAILLMService(base_url=...))")
            print("Ctrl-C to stop.", flush=True)
        await stop.wait()
    if exit_on_eof:
        watcher.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point (``python -m pipeswitch.bench.emulators``)."""
    args = _parse_args(argv)
    cfg = _config_from_args(args)
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            print("uvloop not installed; using asyncio", file=sys.stderr)
    # A runner with a loop factory: no global policy is installed (uvloop.install() is
    # deprecated, and would leak into anything else this process runs).
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_amain(cfg, args.json, args.exit_on_stdin_eof))
