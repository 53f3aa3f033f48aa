"""Tenants with fallback providers: the call moves to the second one mid-call.

A fallback LLM: Groq down (refused, 5xx, stalled), OpenAI answers.

Through the real emulators and the real, unmodified Pipecat services: the chat emulator
serves both providers and faults only Groq's model, as when one provider is down and
the other is not. The caller's turn is asked again on the fallback at once (not at the
watchdog's retry), no apology is spoken, and the call stays on the fallback.

A fallback Deepgram endpoint: the first refuses from the call's start; the STT moves to
the second and the caller's first question is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator

from pipeswitch.bench.emulators.openai_chat import ChatFaults
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import ProviderSettings, Tenant
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.services import DEFAULT_FALLBACK_MODELS
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet

DEAD_AIR_S = 2.0
PRIMARY = ProviderSettings().llm_model
BACKUP = DEFAULT_FALLBACK_MODELS["openai"]


def _lines(log_lines: list[str], uuid: str, text: str) -> list[str]:
    return [line for line in log_lines if uuid in line and text in line]


async def _two_turns(served: Served, url: str, uuid: str, log_lines: list[str]) -> list[str]:
    """Ask twice with Groq faulted; returns the models the LLM requests went to."""
    chat = served.emu.openai
    speech = await served.speech(QUESTION, 8000)
    stream = await open_call(url, 8000, "json-stream")
    try:
        await wait_bot_quiet(stream, quiet_s=1.0)
        n = len(chat.requests)
        end, heard = await ask(stream, speech, 8000, timeout_s=8.0)
        assert heard is not None and heard - end <= DEAD_AIR_S, "dead air with Groq down"
        await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=10.0)
        assert any(r.model == BACKUP and r.reply_text for r in chat.requests[n:]), (
            "the fallback LLM never answered"
        )
        # The next turn goes straight to the fallback: the call stays on it.
        m = len(chat.requests)
        _, again = await ask(stream, speech, 8000, timeout_s=8.0)
        assert again is not None
        await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=10.0)
        assert [r.model for r in chat.requests[m:]] == [BACKUP]
        assert stream.close_record.server_close_at is None, "the call was dropped"
    finally:
        await stream.hangup()
    assert _lines(log_lines, uuid, "LLM failed over to the fallback")
    assert not _lines(log_lines, uuid, "apologising"), "apologised though the fallback answered"
    return [r.model for r in chat.requests[n:]]


async def test_groq_5xx_fails_over_to_openai_within_the_turn(
    served: Served, log_lines: list[str]
) -> None:
    uuid = "llm-fo-5xx"
    served.emu.openai.set_faults(ChatFaults(status=500, should_retry=False, model=PRIMARY))
    try:
        models = await _two_turns(
            served, served.url(domain="llm-fallback.test", uuid=uuid), uuid, log_lines
        )
    finally:
        served.emu.openai.set_faults(ChatFaults())
    assert models[0] == PRIMARY and BACKUP in models


async def test_groq_stall_fails_over_at_the_retry(served: Served, log_lines: list[str]) -> None:
    uuid = "llm-fo-stall"
    served.emu.openai.set_faults(ChatFaults(first_token_delay_s=60.0, model=PRIMARY))
    try:
        # A stall reports nothing: the holding phrase plays, the retry goes to OpenAI.
        await _two_turns(
            served,
            served.url(domain="llm-fallback.test", uuid=uuid),
            uuid,
            log_lines,
        )
    finally:
        served.emu.openai.set_faults(ChatFaults())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _second_server(
    served: Served, providers: ProviderSettings, **endpoints: str
) -> AsyncIterator[Pipeswitch]:
    """A server of its own with some endpoints changed (a provider that refuses)."""
    ep = dataclasses.replace(served.app.endpoints, **endpoints)  # type: ignore[arg-type]
    settings = Settings(host="127.0.0.1", port=0, providers="emulated", idle_timeout_secs=30)
    app = Pipeswitch(
        settings,
        loader=StaticTenantLoader([Tenant(name="default", providers=providers)], default="default"),
        default_tenant="default",
        endpoints=ep,
    )
    await app.start()
    try:
        yield app
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(app.stop(drain_secs=1.0), 10)


def _call_url(app: Pipeswitch, uuid: str) -> str:
    return f"ws://127.0.0.1:{app.port}/fs/{uuid}?rate=8000&mix=mono&domain=default"


async def test_groq_refused_fails_over_to_openai(served: Served, log_lines: list[str]) -> None:
    uuid = "llm-fo-refused"
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    async with _second_server(
        served, ProviderSettings(llm_fallback="openai"), groq_base_url=dead
    ) as app:
        models = await _two_turns(served, _call_url(app, uuid), uuid, log_lines)
    # Refused requests never reach the emulator: only OpenAI's are recorded.
    assert set(models) == {BACKUP}


async def test_deepgram_refused_moves_to_the_fallback_endpoint(
    served: Served, log_lines: list[str]
) -> None:
    uuid = "stt-fo-refused"
    second = served.app.endpoints.deepgram_url
    chat = served.emu.openai
    speech = await served.speech(QUESTION, 8000)
    async with _second_server(
        served,
        ProviderSettings(stt_fallback_url=second),
        deepgram_url=f"ws://127.0.0.1:{_closed_port()}",
    ) as app:
        stream = await open_call(_call_url(app, uuid), 8000, "json-stream")
        try:
            await wait_bot_quiet(stream, quiet_s=1.0)
            n = len(chat.requests)
            end, heard = await ask(stream, speech, 8000, timeout_s=8.0)
            assert heard is not None and heard - end <= DEAD_AIR_S, "dead air, Deepgram down"
            await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=10.0)
            # The caller's words reached the LLM: the second endpoint transcribed them.
            users = [m for r in chat.requests[n:] for m in r.messages if m.get("role") == "user"]
            assert users, "the caller's question never reached the LLM"
            assert stream.close_record.server_close_at is None, "the call was dropped"
        finally:
            await stream.hangup()
    assert _lines(log_lines, uuid, "moved to the fallback endpoint")
