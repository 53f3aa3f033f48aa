"""The call controller in-process: server + sessions + a provider-free builder, fake Piper.

Everything runs in this event loop: an aiohttp ``CallServer`` with the real
``CallSessions``, a fake Piper route serving the greeting, and a tenant whose
pipeline is a Python builder with no providers (``tests.pipelines.builders``).
The test is FreeSWITCH, speaking DTMF relays over the socket.
"""

from __future__ import annotations

import asyncio
import io
import json
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from loguru import logger

from pipeswitch.config.loaders import StaticTenantLoader, TenantResolver
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.compose import CallPipeline
from pipeswitch.pipelines.services import ProviderEndpoints
from pipeswitch.pipelines.session import CallRecord, CallSessions
from pipeswitch.transports.server import CallServer
from tests.pipelines.builders import DigitBot

pytestmark = pytest.mark.asyncio(loop_scope="session")

GREETING = "Hello, this is the digit bot."
DIGIT_BOT = "python:tests.pipelines.builders:build_digit_bot"


def tone_wav(rate: int, secs: float) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x20" * int(rate * secs))
    return buf.getvalue()


@dataclass
class Rig:
    http: aiohttp.ClientSession
    server: TestServer
    sessions: CallSessions
    piper_requests: list[dict[str, object]]
    finished: dict[str, tuple[CallRecord, CallPipeline]] = field(default_factory=dict)

    def url(self, uuid: str, **q: str) -> str:
        qs = "&".join(f"{k}={v}" for k, v in {"domain": "digits.test", **q}.items())
        return str(self.server.make_url(f"/fs/{uuid}?{qs}"))

    async def wait_finished(self, uuid: str) -> tuple[CallRecord, CallPipeline]:
        for _ in range(500):
            if uuid in self.finished:
                return self.finished[uuid]
            await asyncio.sleep(0.01)
        raise AssertionError(f"call {uuid} did not finish")


@pytest_asyncio.fixture(loop_scope="session")
async def rig() -> AsyncIterator[Rig]:
    requests: list[dict[str, object]] = []

    async def piper(request: web.Request) -> web.Response:
        body = await request.json()
        requests.append(body)
        return web.Response(body=tone_wav(int(request.query.get("rate", "8000")), 1.0))

    piper_app = web.Application()
    piper_app.router.add_post("/", piper)
    piper_server = TestServer(piper_app)
    await piper_server.start_server()

    http = aiohttp.ClientSession()
    settings = Settings(host="127.0.0.1", port=0, idle_timeout_secs=30)
    endpoints = ProviderEndpoints(mode="emulated", piper_url=str(piper_server.make_url("/")))
    sessions = CallSessions(settings, endpoints, http)
    tenant = Tenant(name="digits.test", pipeline=DIGIT_BOT, first_message=GREETING)
    loader = StaticTenantLoader([tenant])
    server = TestServer(CallServer(settings, TenantResolver(loader), sessions).app())
    await server.start_server()
    rig = Rig(http, server, sessions, requests)

    async def finished(rec: CallRecord, cp: CallPipeline) -> None:
        rig.finished[rec.call.call_uuid] = (rec, cp)

    sessions.finished_hooks.append(finished)
    try:
        yield rig
    finally:
        await server.close()
        await piper_server.close()
        await http.close()


async def _audio_count(ws: aiohttp.ClientWebSocketResponse, secs: float) -> int:
    """Receive for ``secs``; count audio messages (JSON streamAudio)."""
    n = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + secs
    while (left := end - loop.time()) > 0:
        try:
            msg = await asyncio.wait_for(ws.receive(), left)
        except TimeoutError:
            break
        if msg.type is aiohttp.WSMsgType.TEXT and '"streamAudio"' in msg.data:
            n += 1
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            break
    return n


async def test_greeting_fast_path_plays_and_enters_the_context(rig: Rig) -> None:
    async with rig.http.ws_connect(rig.url("sess-greet")) as ws:
        # 1 s of greeting at 20 ms per message, all of it before the call ends.
        assert await _audio_count(ws, 1.4) >= 45
    record, cp = await rig.wait_finished("sess-greet")
    assert rig.piper_requests[-1]["text"] == GREETING
    assert record.end_reason.startswith("caller closed")
    assert {"role": "assistant", "content": GREETING} in record.messages


async def test_barge_in_during_the_greeting_keeps_only_the_heard_words(rig: Rig) -> None:
    async with rig.http.ws_connect(rig.url("sess-cut")) as ws:
        assert await _audio_count(ws, 0.5) > 10  # about half the greeting has played
        await ws.send_str(json.dumps({"event": "dtmf", "digit": "9"}))
        await _audio_count(ws, 0.3)
    record, _ = await rig.wait_finished("sess-cut")
    said = [m["content"] for m in record.messages if m.get("role") == "assistant"]
    assert len(said) == 1
    heard = said[0]
    assert heard and heard != GREETING and GREETING.startswith(heard)
    # The record says where the cut was, for the call's transcript.
    (cut,) = record.interruptions
    assert cut["sentence"] == GREETING and cut["heard"] == heard
    assert record.messages[cut["index"]]["content"] == heard


async def test_a_pipeline_sentence_is_played_after_the_greeting(rig: Rig) -> None:
    async with rig.http.ws_connect(rig.url("sess-one")) as ws:
        await _audio_count(ws, 1.2)  # the greeting
        await ws.send_str(json.dumps({"event": "dtmf", "digit": "1"}))
        assert await _audio_count(ws, 1.0) >= 25  # 0.6 s sentence
    record, cp = await rig.wait_finished("sess-one")
    assert cp.context is not None
    said = [m["content"] for m in record.messages if m.get("role") == "assistant"]
    assert said[0] == GREETING


async def test_caller_hangup_ends_the_call_and_leaves_no_task(rig: Rig) -> None:
    before = {t.get_name() for t in asyncio.all_tasks()}
    async with rig.http.ws_connect(rig.url("sess-hangup")) as ws:
        await _audio_count(ws, 0.2)
    record, _ = await rig.wait_finished("sess-hangup")
    assert record.ended_at is not None and "sess-hangup" not in rig.sessions.active
    await asyncio.sleep(0.2)
    left = {t.get_name() for t in asyncio.all_tasks()} - before
    assert not [name for name in left if "sess-hangup" in name]


async def test_a_task_a_processor_left_running_is_cancelled_when_the_call_ends(
    rig: Rig,
) -> None:
    """Pipecat only warns about tasks left after a pipeline ends; one left running (a
    provider reconnect that raced the hang-up) would hold the call in memory for good."""
    log_lines: list[str] = []
    sink = logger.add(log_lines.append, level="WARNING", format="{extra} {message}")
    try:
        await _stray_call(rig, log_lines)
    finally:
        logger.remove(sink)


async def _stray_call(rig: Rig, log_lines: list[str]) -> None:
    async with rig.http.ws_connect(rig.url("sess-stray")) as ws:
        await ws.send_str(json.dumps({"event": "dtmf", "digit": "7"}))
        await _audio_count(ws, 0.3)
    _, cp = await rig.wait_finished("sess-stray")
    bot = cp.parts["bot"]
    assert isinstance(bot, DigitBot)
    stray = bot.stray
    assert stray is not None
    await asyncio.sleep(0.05)
    assert stray.cancelled()
    assert stray not in asyncio.all_tasks()
    assert any(
        "sess-stray" in line and "left 1 task(s) running" in line and "stray-reconnect-loop" in line
        for line in log_lines
    )


def test_transcript_turns_mark_the_cut_turn() -> None:
    from pipeswitch.pipelines.tenancy import transcript_turns

    messages = [
        {"role": "system", "content": "You are a receptionist."},
        {"role": "user", "content": "Are you open on Sunday?"},
        {"role": "assistant", "content": "We are closed on Sundays. We open"},
        {"role": "user", "content": "Thanks, bye."},
    ]
    cut = {"index": 2, "sentence": "We open on Monday at nine.", "heard": "We open"}
    turns = transcript_turns(messages, [0.42], [cut])
    bot = turns[1]
    assert bot["interrupted"] is True
    assert bot["heard_text"] == "We are closed on Sundays. We open"
    assert bot["text"] == "We are closed on Sundays. We open on Monday at nine."
    assert bot["latency_ms"] == 420.0
    assert "interrupted" not in turns[0] and "interrupted" not in turns[2]


async def test_the_next_calls_greeting_comes_from_memory(rig: Rig) -> None:
    for uuid in ("sess-greet-a", "sess-greet-b"):
        async with rig.http.ws_connect(rig.url(uuid)) as ws:
            assert await _audio_count(ws, 0.5) >= 15  # the greeting is playing
        await rig.wait_finished(uuid)
    # Piper was asked once; the second call played the copy this process kept.
    assert [r["text"] for r in rig.piper_requests] == [GREETING]
