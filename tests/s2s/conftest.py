"""One Pipeswitch server with speech-to-speech tenants, against wire-level emulators.

The OpenAI Realtime and Gemini Live emulators speak the providers' real protocols
to Pipecat's unmodified services; the Deepgram/Groq emulators back the cascade the
calls fall back to; Piper is real (the greeting, the fallback's voice, and the
emulators' reply audio).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from pipeswitch.bench.emulators.gemini_live import GeminiFaults, GeminiLiveEmulator, serve_gemini
from pipeswitch.bench.emulators.latency import LatencyModel
from pipeswitch.bench.emulators.openai_realtime import (
    OpenAIRealtimeEmulator,
    RealtimeFaults,
    piper_speech,
    serve_realtime,
)
from pipeswitch.bench.emulators.runner import EmulatorConfig, RunningEmulators, run_emulators
from pipeswitch.bench.emulators.scripts import resolve_llm_script
from pipeswitch.bench.emulators.tls import make_test_ca
from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import ProviderSettings, Tenant, ToolSettings
from pipeswitch.pipelines import gemini_live, openai_realtime  # noqa: F401  (registers builders)
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.emulated import EMULATED_KEY, endpoints_for
from pipeswitch.pipelines.piper_client import wav_pcm
from tests.conftest import trim_silence
from tests.e2e.helpers import ask, wait_bot_quiet

QUESTION = "What are your opening hours on Saturday?"
BARGE_IN = "Sorry, can you hold on a second?"


def s2s_tenants() -> StaticTenantLoader:
    """Speech-to-speech tenants per provider, turn detection and dialect."""
    tenants = [Tenant(name="default")]
    for dialect in ("json-stream", "binary"):
        tenants.append(
            Tenant(
                name=f"rt-{dialect}.test",
                pipeline="openai-realtime",
                playback=dialect,
                providers=ProviderSettings(realtime_silence_ms=300),
            )
        )
    tenants.append(
        Tenant(
            name="rt-tools.test",
            pipeline="openai-realtime",
            playback="binary",
            providers=ProviderSettings(realtime_silence_ms=300),
            tools=ToolSettings(
                enabled=["business_hours"],
                business_hours={d: ["09:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")},
            ),
        )
    )
    tenants.append(
        Tenant(
            name="rt-stall.test",
            pipeline="openai-realtime",
            playback="binary",
            providers=ProviderSettings(realtime_silence_ms=300, s2s_reply_timeout_secs=2.0),
        )
    )
    tenants.append(
        Tenant(
            name="rt-local.test",
            pipeline="openai-realtime",
            playback="binary",
            providers=ProviderSettings(turn_detection="local"),
        )
    )
    turn_modes: tuple[tuple[str, Literal["server", "local"]], ...] = (
        ("gm-binary", "server"),
        ("gm-local", "local"),
    )
    for name, turns in turn_modes:
        tenants.append(
            Tenant(
                name=f"{name}.test",
                pipeline="gemini-live",
                playback="binary",
                providers=ProviderSettings(realtime_silence_ms=300, turn_detection=turns),
            )
        )
    tenants.append(
        Tenant(
            name="gm-tools.test",
            pipeline="gemini-live",
            playback="binary",
            providers=ProviderSettings(realtime_silence_ms=300),
            tools=ToolSettings(
                enabled=["business_hours"],
                business_hours={d: ["09:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")},
            ),
        )
    )
    return StaticTenantLoader(tenants, default="default")


@dataclass
class S2SServed:
    """The running server, the emulators, and speech to say."""

    app: Pipeswitch
    emu: RunningEmulators
    realtime: OpenAIRealtimeEmulator
    gemini: GeminiLiveEmulator
    http: aiohttp.ClientSession

    def url(self, domain: str, rate: int = 8000, uuid: str = "call") -> str:
        return f"ws://127.0.0.1:{self.app.port}/fs/{uuid}?rate={rate}&mix=mono&domain={domain}"

    async def speech(self, text: str, rate: int) -> bytes:
        key = (text, rate)
        if key not in _cache:
            url = self.app.endpoints.piper_for_rate(rate)
            async with self.http.post(url, json={"text": text, "voice": "joe"}) as r:
                r.raise_for_status()
                _cache[key] = trim_silence(wav_pcm(await r.read())[0])
        return _cache[key]


_cache: dict[tuple[str, int], bytes] = {}


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def s2s(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[S2SServed]:
    cfg = EmulatorConfig(llm_script="office", stt_script="office", seed=1)
    realtime = OpenAIRealtimeEmulator(
        ttfa=LatencyModel.constant(300),
        script=resolve_llm_script("office"),
        transcripts=("What are your opening hours on Saturday?",),
    )
    rt_runner, rt_port = await serve_realtime(realtime)
    ca = make_test_ca(tmp_path_factory.mktemp("tls"))
    gemini = GeminiLiveEmulator(
        ttfa=LatencyModel.constant(300),
        script=resolve_llm_script("office"),
        transcripts=("What are your opening hours on Saturday?",),
    )
    gm_runner, gm_port = await serve_gemini(gemini, ca.server_context())
    try:
        async with run_emulators(cfg) as emu:
            endpoints = dataclasses.replace(
                endpoints_for(emu),
                openai_realtime_url=f"ws://127.0.0.1:{rt_port}/v1/realtime",
                openai_api_key=EMULATED_KEY,
                gemini_url=f"https://127.0.0.1:{gm_port}",
                gemini_ca_file=str(ca.ca_file),
                google_api_key=EMULATED_KEY,
            )
            settings = Settings(
                host="127.0.0.1", port=0, providers="emulated", idle_timeout_secs=30
            )
            app = Pipeswitch(
                settings, loader=s2s_tenants(), default_tenant="default", endpoints=endpoints
            )
            await app.start()
            async with aiohttp.ClientSession() as http:
                realtime.speech = piper_speech(app.endpoints.piper_url, session=http)
                gemini.speech = realtime.speech
                try:
                    yield S2SServed(app, emu, realtime, gemini, http)
                finally:
                    await app.stop(drain_secs=2.0)
                    await asyncio.sleep(0)
    finally:
        await gm_runner.cleanup()
        await rt_runner.cleanup()


def reset_faults(s: S2SServed) -> None:
    """Back to healthy providers."""
    s.realtime.set_faults(RealtimeFaults())
    s.gemini.set_faults(GeminiFaults())


__all__ = ["BARGE_IN", "QUESTION", "S2SServed", "reset_faults", "s2s", "web"]


async def answer_then_barge_in(
    stream: FakeSwitchStream,
    question: bytes,
    interrupt: bytes,
    rate: int,
    *,
    heard_s: float,
    silence_s: float = 0.6,
) -> float:
    """After the greeting, ask; let ``heard_s`` of the answer play, then talk over it
    (and fall silent). Returns when the answer was first heard."""
    await wait_bot_quiet(stream, timeout_s=10.0)
    _, answer = await ask(stream, question, rate, timeout_s=8.0)
    assert answer is not None
    await asyncio.sleep(heard_s)
    stream.queue_caller_audio(interrupt)
    stream.queue_caller_silence(silence_s)
    return answer
