"""``pipeswitch bench faults``: what a caller hears when a provider fails mid-call.

For each of STT (Deepgram emulator), LLM (OpenAI-chat emulator, as Groq) and TTS (the
real Piper server behind a fault-injecting proxy), and each fault (refuse, drop
mid-stream, stall, 5xx, slow first byte, malformed payload), one emulated call: the
greeting plays, the fault is armed, the caller asks a question, then the fault is
cleared and the caller asks again. Measured on the wire, as FreeSWITCH would see it:

* ``dead_air_s``: end of the caller's speech to the first bot audio (an answer or an
  apology), capped at the watch window;
* ``dropped``: the server closed the call;
* ``next_turn``: the question after the fault was answered (the call recovered);
* ``reply_whole``: each sentence of the faulted turn's reply that went to the proxied
  TTS reached the wire whole and once (Piper's own bytes for it, fetched again
  directly): not cut short by a drop, nothing repeated by its recovery.

A fault counts as recovered when the call was not dropped, the caller heard something
within 2 s, and the next turn was answered. ``--out`` gets ``faults.json`` and
``faults.md`` (the matrix).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from loguru import logger

from pipeswitch.pipelines.piper_client import wav_pcm

REPO_ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What are your opening hours on Saturday?"
SERVICES = ("stt", "llm", "tts")
KINDS = ("refuse", "drop", "stall", "5xx", "slow_first_byte", "malformed")
DEAD_AIR_LIMIT_S = 2.0


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TtsFaultProxy:
    """HTTP proxy in front of Piper that injects TTS faults once armed."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.kind: str | None = None
        self.armed = False
        # "drop": how many responses to cut (None: every one while armed) and how many were.
        self.drop_limit: int | None = None
        self.drops = 0
        # (monotonic time, text) of each TTS request, to check what the caller heard.
        self.texts: list[tuple[float, str]] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.port = 0

    async def start(self, port: int = 0) -> str:
        """Listen (again, on ``port`` when the TTS endpoint comes back after a refuse)."""
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._http = aiohttp.ClientSession()
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._http is not None
        kind = self.kind if self.armed else None
        body = await request.read()
        with contextlib.suppress(ValueError, AttributeError):
            self.texts.append((time.monotonic(), str(json.loads(body).get("text", ""))))
        if kind == "5xx":
            return web.json_response({"error": "emulated TTS failure"}, status=500)
        if kind == "stall":
            await asyncio.sleep(60)
        if kind == "slow_first_byte":
            await asyncio.sleep(1.5)
        if kind == "malformed":
            return web.Response(body=os.urandom(30) + b"not a wav", content_type="audio/wav")
        if kind == "drop" and self.drop_limit is not None and self.drops >= self.drop_limit:
            kind = None
        async with self._http.request(
            request.method,
            f"{self.upstream}{request.rel_url}",
            data=body,
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
        ) as up:
            resp = web.StreamResponse(status=up.status)
            for k in ("Content-Type",):
                if k in up.headers:
                    resp.headers[k] = up.headers[k]
            await resp.prepare(request)
            sent = 0
            async for chunk in up.content.iter_chunked(4096):
                if kind == "drop" and sent > 8000:
                    assert request.transport is not None
                    self.drops += 1
                    request.transport.abort()
                    return resp
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
            return resp


@dataclass
class FaultResult:
    service: str
    kind: str
    dead_air_s: float | None
    heard: bool
    dropped: bool
    next_turn: bool
    next_turn_latency_s: float | None
    recovered: bool
    note: str = ""
    # The faulted turn itself was answered (a completed LLM reply, no apology), not only
    # held or apologised for; and which fallbacks the call moved to (llm, stt).
    answered: bool = False
    failed_over: str = ""
    # Every sentence of the faulted turn's reply that went to the (proxied) TTS reached
    # the wire whole and once (Piper's own bytes for it); None when none went there.
    reply_whole: bool | None = None


def _trim(pcm: bytes, peak: int = 300) -> bytes:
    a = np.frombuffer(pcm, dtype="<i2")
    idx = np.flatnonzero(np.abs(a) > peak)
    return pcm if not len(idx) else a[idx[0] : idx[-1] + 1].tobytes()


async def _reply_whole(
    stream: Any, proxy: TtsFaultProxy, since: float, http: aiohttp.ClientSession
) -> bool | None:
    """Whether each sentence sent to the TTS since ``since`` was heard whole and once: its
    PCM from Piper directly (the server's cache: the bytes it sent) is in the wire audio."""
    texts = list(dict.fromkeys(t for at, t in proxy.texts if at >= since and t))
    if not texts:
        return None
    audio, chunks = stream.received_audio()
    pos = 0
    for c in chunks:
        if c.t >= since:
            break
        pos += c.nbytes
    heard = audio[pos:]
    for text in texts:
        async with http.post(
            f"{proxy.upstream}/tts?rate=8000", json={"text": text, "voice": "joe"}
        ) as r:
            r.raise_for_status()
            pcm = wav_pcm(await r.read())[0]
        if heard.count(pcm) != 1:
            return False
    return True


async def _quiet(stream: Any, quiet_s: float = 0.5, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = stream.last_bot_audio_at()
        if last is not None and time.monotonic() - last > quiet_s:
            return
        await asyncio.sleep(0.05)


async def _ask(stream: Any, speech: bytes, window_s: float) -> tuple[float | None, float]:
    """Speak; (seconds to the first bot audio or None, end of speech)."""
    stream.queue_caller_audio(speech)
    stream.queue_caller_silence(0.3)
    await stream.wait_caller_drained(timeout_s=len(speech) / 16000 + 3.0)
    end = stream.last_voiced_sent_at() or time.monotonic()
    deadline = end + window_s
    while time.monotonic() < deadline:
        t = stream.first_bot_audio_received_after(end)
        if t is not None:
            return t - end, end
        if stream.close_record.server_close_at is not None:
            break
        await asyncio.sleep(0.02)
    return None, end


Arm = Callable[[], Awaitable[None]]


async def run_case(
    service: str,
    kind: str,
    *,
    emu: Any,
    proxy: TtsFaultProxy,
    base_ep: Any,
    speech: bytes,
    window_s: float,
    fallbacks: bool = True,
    piper_direct: str = "",
) -> FaultResult:
    """One call with one fault; a fresh server so endpoint faults (refuse) are per case.

    With ``fallbacks`` the tenant has a second provider for each service, as the README
    advises: OpenAI behind Groq (the chat emulator faults only Groq's model), a second
    Deepgram endpoint (the emulator, when the first refuses) and Piper without the
    faulting proxy.
    """
    from pipeswitch.bench.emulators.deepgram import DeepgramFaults
    from pipeswitch.bench.emulators.openai_chat import ChatFaults
    from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig
    from pipeswitch.config.loaders import StaticTenantLoader
    from pipeswitch.config.settings import Settings
    from pipeswitch.config.tenants import ProviderSettings, Tenant
    from pipeswitch.pipelines.app import Pipeswitch

    ep = base_ep
    primary = ProviderSettings().llm_model if fallbacks else None
    # With fallbacks the faults hit the primary only: Groq's model, Deepgram's plain path
    # (the second endpoint is the emulator's "eu" region).
    region = "" if fallbacks else None
    dg, chat = emu.deepgram, emu.openai
    dg.set_faults(DeepgramFaults())
    chat.set_faults(ChatFaults())
    proxy.armed, proxy.kind = False, None

    async def arm() -> None:
        if service == "stt":
            f = {
                "drop": DeepgramFaults(drop_after_s=0.5, connections=1, region=region),
                "stall": DeepgramFaults(stall=True, connections=1, region=region),
                "5xx": DeepgramFaults(reject_status=500, region=region),
                "slow_first_byte": DeepgramFaults(final_delay_s=1.5, connections=1, region=region),
                "malformed": DeepgramFaults(malformed=True, connections=1, region=region),
            }.get(kind)
            if f is not None:
                dg.set_faults(f)
        elif service == "llm":
            f2 = {
                # Every request of the faulted turn fails (a turn may be split in two).
                "drop": ChatFaults(drop_after_tokens=2, model=primary),
                "stall": ChatFaults(first_token_delay_s=60.0, model=primary),
                "5xx": ChatFaults(status=500, should_retry=False, model=primary),
                "slow_first_byte": ChatFaults(first_token_delay_s=1.5, model=primary),
                "malformed": ChatFaults(malformed=True, model=primary),
            }.get(kind)
            if f2 is not None:
                chat.set_faults(f2)
        else:
            proxy.kind, proxy.armed = kind, True

    async def disarm() -> None:
        chat.set_faults(ChatFaults())
        proxy.armed = False
        if service == "stt" and kind == "5xx":
            dg.set_faults(DeepgramFaults())

    # STT faults act when the stream connects (call start); others once the greeting is over.
    if kind == "refuse":
        dead = f"http://127.0.0.1:{closed_port()}"
        if service == "stt":
            ep = replace(ep, deepgram_url=dead.replace("http", "ws"))
        elif service == "llm" and fallbacks:
            ep = replace(ep, groq_base_url=f"{dead}/v1")  # Groq is down, OpenAI is not
        elif service == "llm":
            ep = replace(ep, groq_base_url=f"{dead}/v1", openai_base_url=f"{dead}/v1")
    elif service == "stt":
        await arm()
    settings = Settings(host="127.0.0.1", port=0, providers="emulated", idle_timeout_secs=30)
    providers = ProviderSettings()
    if fallbacks:
        providers = ProviderSettings(
            llm_fallback="openai",
            stt_fallback_url=f"{base_ep.deepgram_url.rstrip('/')}/eu",
            tts_fallback_url=piper_direct or None,
        )
    tenant = Tenant(name="default", providers=providers)
    app = Pipeswitch(
        settings,
        loader=StaticTenantLoader([tenant], default="default"),
        default_tenant="default",
        endpoints=ep,
    )
    await app.start()
    watchdogs: list[Any] = []

    async def keep(rec: Any, cp: Any) -> None:
        w = getattr(cp.parts.get("watchdog"), "watchdog", None)
        if w is not None:
            watchdogs.append(w)

    assert app.sessions is not None
    app.sessions.finished_hooks.append(keep)
    answered = False
    stream = FakeSwitchStream(
        StreamConfig(
            url=f"ws://127.0.0.1:{app.port}/fs/fault-{service}-{kind}?domain=default&rate=8000",
            rate=8000,
            playback="voxcom",
        )
    )
    note = ""
    whole: bool | None = None
    http = aiohttp.ClientSession()
    try:
        await stream.start()
        if not await stream.wait_connected(5.0):
            return FaultResult(service, kind, None, False, True, False, None, False, "no connect")
        await _quiet(stream, quiet_s=1.0)
        if service == "tts" and kind == "refuse":
            proxy.kind, proxy.armed = "refuse", False
            await proxy.stop()  # the TTS endpoint vanishes: connections refused
        elif service != "stt":
            await arm()
        n_chat = len(chat.requests)
        dead_air, end = await _ask(stream, speech, window_s)
        dropped = stream.close_record.server_close_at is not None
        await _quiet(stream, quiet_s=1.5, timeout_s=window_s)
        answered = any(r.outcome == "completed" and r.reply_text for r in chat.requests[n_chat:])
        proxy.armed = False  # the direct Piper fetches below do not pass the proxy anyway
        whole = await _reply_whole(stream, proxy, end, http)
        if service == "tts" and kind == "refuse":
            await proxy.start(proxy.port)
        await disarm()
        next_lat: float | None = None
        if not dropped:
            next_lat, _ = await _ask(stream, speech, window_s)
            dropped = stream.close_record.server_close_at is not None
            await _quiet(stream, timeout_s=5.0)
    except Exception as exc:
        note = f"{type(exc).__name__}: {exc}"
        dead_air, next_lat, dropped = None, None, True
    finally:
        with contextlib.suppress(Exception):
            await stream.hangup()
        await http.close()
        await app.stop(drain_secs=1.0)
        await disarm()
        dg.set_faults(DeepgramFaults())
    heard = dead_air is not None
    moved = []
    for w in watchdogs[:1]:
        if w.apologies:
            answered = False  # the caller was asked to repeat: the turn itself was lost
        if w.llm_failovers:
            moved.append("llm")
        if w.stt_failovers:
            moved.append("stt")
    recovered = (
        heard
        and dead_air is not None
        and dead_air <= DEAD_AIR_LIMIT_S
        and not dropped
        and next_lat is not None
    )
    return FaultResult(
        service,
        kind,
        None if dead_air is None else round(dead_air, 2),
        heard,
        dropped,
        next_lat is not None,
        None if next_lat is None else round(next_lat, 2),
        recovered,
        note,
        answered=answered,
        failed_over=",".join(moved),
        reply_whole=whole,
    )


def add_fault_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``pipeswitch bench faults``."""
    p.add_argument("--services", default=",".join(SERVICES), help="stt,llm,tts")
    p.add_argument("--kinds", default=",".join(KINDS), help=",".join(KINDS))
    p.add_argument("--window", type=float, default=8.0, help="seconds to wait for bot audio")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument(
        "--no-fallbacks",
        action="store_true",
        help="the tenant has no second provider (LLM, Deepgram endpoint, Piper)",
    )
    p.add_argument(
        "--no-recovery",
        action="store_true",
        help="measure without the apology on provider errors (the behaviour before it)",
    )


async def run_faults(args: argparse.Namespace) -> int:
    """Run the matrix; exit 0 (the matrix is a measurement, not a gate)."""
    from pipeswitch.bench.emulators.runner import EmulatorConfig, run_emulators
    from pipeswitch.pipelines.emulated import endpoints_for
    from pipeswitch.pipelines.local.supervisor import LocalModelServers

    out: Path = args.out or REPO_ROOT / "bench" / "results" / time.strftime("faults-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results: list[FaultResult] = []
    if args.no_recovery:
        import pipeswitch.pipelines.session as session

        session.install_apology = lambda *a, **k: None
    from pipeswitch.config.tenants import Tenant

    greeting = Tenant(name="default").first_message
    from pipeswitch.processors.turn_watchdog import RECOVERY_PHRASES

    # What the server warms at start-up: the greeting and the recovery phrases.
    warm = [greeting, *RECOVERY_PHRASES] if greeting else list(RECOVERY_PHRASES)
    models = LocalModelServers(piper=True, whisper=False, llm=False, piper_warm=warm)
    await models.start()
    proxy = TtsFaultProxy(models.piper_base)
    proxy_url = await proxy.start()
    try:
        cfg = EmulatorConfig(llm_script="office", stt_script="office", seed=1)
        async with run_emulators(cfg) as emu, aiohttp.ClientSession() as http:
            async with http.post(
                f"{models.piper_url(8000)}", json={"text": QUESTION, "voice": "joe"}
            ) as r:
                r.raise_for_status()
                speech = _trim((await r.read())[44:])
            base_ep = replace(endpoints_for(emu), piper_url=f"{proxy_url}/tts")
            for service in args.services.split(","):
                for kind in args.kinds.split(","):
                    res = await run_case(
                        service,
                        kind,
                        emu=emu,
                        proxy=proxy,
                        base_ep=base_ep,
                        speech=speech,
                        window_s=args.window,
                        fallbacks=not args.no_fallbacks,
                        piper_direct=models.piper_url(None),
                    )
                    logger.info("fault {}", res)
                    results.append(res)
    finally:
        await proxy.stop()
        await models.stop()
    (out / "faults.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    md = matrix_markdown(results)
    (out / "faults.md").write_text(md)
    print(md)
    print(f"results in {out}")
    return 0


def matrix_markdown(results: list[FaultResult]) -> str:
    """The fault matrix: one row per fault, with the recovery rate at the end."""
    lines = [
        "| service | fault | heard after (s) | dropped | faulted turn answered | "
        "reply heard whole | failed over | next turn (s) | recovered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        heard = "-" if r.reply_whole is None else "yes" if r.reply_whole else "no"
        lines.append(
            f"| {r.service} | {r.kind} | {'-' if r.dead_air_s is None else r.dead_air_s} | "
            f"{'yes' if r.dropped else 'no'} | {'yes' if r.answered else 'no'} | {heard} | "
            f"{r.failed_over or '-'} | "
            f"{'-' if r.next_turn_latency_s is None else r.next_turn_latency_s} | "
            f"{'yes' if r.recovered else 'no'}{' (' + r.note + ')' if r.note else ''} |"
        )
    ok = sum(r.recovered for r in results)
    answered = sum(r.answered for r in results)
    checked = [r for r in results if r.reply_whole is not None]
    whole = sum(bool(r.reply_whole) for r in checked)
    n = max(1, len(results))
    lines.append("")
    lines.append(
        f"recovered {ok}/{len(results)} ({100 * ok / n:.0f} %); recovered = not dropped, "
        f"bot audio within {DEAD_AIR_LIMIT_S:.0f} s of the end of speech, next turn "
        f"answered. The faulted turn itself answered (an LLM reply, no apology): "
        f"{answered}/{len(results)} ({100 * answered / n:.0f} %). Its reply heard whole and "
        f"once (each sentence's Piper audio on the wire), where it went through the faulted "
        f"TTS: {whole}/{len(checked)}"
    )
    return "\n".join(lines) + "\n"
