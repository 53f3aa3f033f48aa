"""Turn-based fallback end to end: recorded caller turns POSTed as WAV, replies as WAV
plus the action headers the FreeSWITCH Lua script reads; the real STT/LLM/TTS services
(emulated Deepgram/Groq, real Piper), one conversation across the turns of a call.
"""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web

from pipeswitch.bench.emulators.openai_chat import ChatReply, ToolCall, keyword_script
from pipeswitch.config.loaders import StaticTenantLoader, TenantResolver
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.turn_based import TurnEndpoint, TurnEngine, http_authorizer
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import is_speech_like

pytestmark = pytest.mark.asyncio(loop_scope="session")

RECEPTION = Tenant.model_validate(
    {
        "name": "reception.test",
        "first_message": "Riverside Dental, how can I help?",
        "tools": {
            "enabled": ["transfer_call", "end_call", "take_message"],
            "transfer_targets": {"sales": {"destination": "2001", "description": "sales"}},
        },
    }
)


@dataclass
class Rig:
    base: str
    engine: TurnEngine


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rig(served: Served) -> AsyncIterator[Rig]:
    resolver = TenantResolver(
        StaticTenantLoader([Tenant(name="default"), RECEPTION], default="default"),
        default="default",
    )
    engine = TurnEngine(resolver, served.app.endpoints, served.http, ttl_secs=60)
    app = web.Application(client_max_size=16 * 1024 * 1024)
    TurnEndpoint(engine).add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Rig(f"http://127.0.0.1:{runner.addresses[0][1]}", engine)
    finally:
        await runner.cleanup()


def wav(pcm: bytes, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def unwav(data: bytes) -> tuple[bytes, int]:
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.readframes(w.getnframes()), w.getframerate()


@dataclass
class Turn:
    status: int
    headers: dict[str, str]
    pcm: bytes
    rate: int
    secs: float


async def post_turn(
    served: Served, rig: Rig, uuid: str, domain: str, rate: int, body: bytes = b""
) -> Turn:
    t0 = time.monotonic()
    async with served.http.post(
        f"{rig.base}/turn/{uuid}?domain={domain}&rate={rate}",
        data=body,
        headers={"Content-Type": "audio/wav"},
    ) as r:
        data = await r.read()
        secs = time.monotonic() - t0
        if r.content_type != "audio/wav":
            return Turn(r.status, dict(r.headers), b"", 0, secs)
        pcm, got_rate = unwav(data)
        return Turn(r.status, dict(r.headers), pcm, got_rate, secs)


class Scripts:
    """Swap the session emulators' scripts for one test."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.saved: tuple[Any, Any] | None = None

    def set(self, heard: str, reply: Callable[[list[dict[str, Any]]], ChatReply]) -> None:
        emu = self.served.emu
        if self.saved is None:
            self.saved = (emu.deepgram.script, emu.openai.script)
        emu.deepgram.script = [heard]
        emu.openai.script = reply

    def restore(self) -> None:
        if self.saved is not None:
            self.served.emu.deepgram.script, self.served.emu.openai.script = self.saved


@pytest.fixture
def scripts(served: Served) -> Iterator[Scripts]:
    s = Scripts(served)
    yield s
    s.restore()


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_greeting_then_a_turn_with_context(served: Served, rig: Rig, rate: int) -> None:
    uuid = f"turn-{rate}"
    greet = await post_turn(served, rig, uuid, "default", rate)
    assert greet.status == 200 and greet.rate == rate
    assert greet.headers["X-Pipeswitch-Action"] == "continue"
    assert unquote(greet.headers["X-Pipeswitch-Text"]).startswith("Hello, thanks for calling")
    assert is_speech_like(greet.pcm, rate)

    speech = await served.speech(QUESTION, rate)
    before = len(served.emu.openai.requests)
    turn = await post_turn(served, rig, uuid, "default", rate, wav(speech, rate))
    assert turn.status == 200, turn.headers
    assert turn.rate == rate and is_speech_like(turn.pcm, rate)
    heard = unquote(turn.headers["X-Pipeswitch-Heard"])
    text = unquote(turn.headers["X-Pipeswitch-Text"])
    assert heard and text
    assert turn.headers["X-Pipeswitch-Action"] == "continue"
    # One LLM request, carrying the greeting and the caller's words.
    req = served.emu.openai.requests[before]
    roles = [m["role"] for m in req.messages]
    assert roles[-2:] == ["assistant", "user"] and req.messages[-1]["content"] == heard
    print(
        f"\nturn-based {rate} Hz: request -> reply {1000 * turn.secs:.0f} ms "
        f"({len(speech) / (2 * rate):.1f} s recording, {len(turn.pcm) / (2 * rate):.1f} s reply)"
    )

    # A second turn sees the first turn's exchange.
    turn2 = await post_turn(served, rig, uuid, "default", rate, wav(speech, rate))
    assert turn2.status == 200
    req2 = served.emu.openai.requests[-1]
    assert [m["content"] for m in req2.messages if m["role"] == "user"] == [heard, heard]
    async with served.http.delete(f"{rig.base}/turn/{uuid}") as r:
        assert (await r.json())["turns"] == 3
    assert uuid not in rig.engine.calls


async def test_transfer_becomes_the_reply_action(
    served: Served, rig: Rig, scripts: Scripts
) -> None:
    scripts.set(
        "Can you put me through to sales please?",
        keyword_script({"sales": ToolCall("transfer_call", {"target": "sales"})}),
    )
    uuid = "turn-transfer"
    await post_turn(served, rig, uuid, "reception.test", 8000)
    speech = await served.speech("Put me through to sales.", 8000)
    turn = await post_turn(served, rig, uuid, "reception.test", 8000, wav(speech, 8000))
    assert turn.status == 200
    assert turn.headers["X-Pipeswitch-Action"] == "transfer"
    assert turn.headers["X-Pipeswitch-Transfer-To"] == "2001"
    assert turn.headers["X-Pipeswitch-Context"] == "reception.test"
    # The announcement is the reply's audio.
    assert "transferring you to sales" in unquote(turn.headers["X-Pipeswitch-Text"])
    assert is_speech_like(turn.pcm, 8000)


async def test_end_call_and_message(served: Served, rig: Rig, scripts: Scripts) -> None:
    def reply(messages: list[dict[str, Any]]) -> ChatReply:
        if messages[-1]["role"] == "tool":
            return ToolCall("end_call", {"goodbye": "Thanks, goodbye!"})
        return ToolCall("take_message", {"name": "Jana", "number": "601123456", "reason": "a bill"})

    scripts.set("Please tell them Jana called about a bill.", reply)
    uuid = "turn-message"
    speech = await served.speech("Please take a message.", 8000)
    turn = await post_turn(served, rig, uuid, "reception.test", 8000, wav(speech, 8000))
    assert turn.headers["X-Pipeswitch-Action"] == "hangup"
    assert "goodbye" in unquote(turn.headers["X-Pipeswitch-Text"])
    async with served.http.delete(f"{rig.base}/turn/{uuid}") as r:
        kept = await r.json()
    assert kept["messages"][0]["name"] == "Jana" and kept["hangup_requested"]


async def test_bad_requests_say_fall_back(served: Served, rig: Rig) -> None:
    bad = await post_turn(served, rig, "turn-bad", "default", 8000, b"RIFF....not a wav")
    assert bad.status == 400
    async with served.http.post(f"{rig.base}/turn/x?domain=nobody.example&rate=8000") as r:
        assert r.status == 404 and (await r.json())["action"] == "fallback"
    # A stereo 16-bit WAV at 16 kHz is taken (left channel, resampled to the call rate).
    stereo = np.zeros(16000, dtype="<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(stereo)
    ok = await post_turn(served, rig, "turn-stereo", "default", 8000, buf.getvalue())
    assert ok.status == 200 and ok.rate == 8000


async def test_the_server_mounts_the_turn_endpoint(served: Served) -> None:
    url = f"http://127.0.0.1:{served.app.port}/turn/turn-mounted?domain=default&rate=8000"
    async with served.http.post(url) as r:
        assert r.status == 200 and r.content_type == "audio/wav"
        assert r.headers["X-Pipeswitch-Action"] == "continue"
    async with served.http.delete(url) as r:
        assert (await r.json())["known"] is True


async def test_turns_follow_the_stream_access_rule(served: Served, rig: Rig) -> None:
    strict = TurnEndpoint(rig.engine, http_authorizer(Settings(accept_unsigned="never")))
    app = web.Application()
    strict.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/turn/turn-auth?domain=default"
        async with served.http.post(url) as r:
            assert r.status == 403 and (await r.json())["action"] == "fallback"
        async with served.http.post(url + "&sig=00&exp=1") as r:  # presented and wrong
            assert r.status == 403
    finally:
        await runner.cleanup()
    assert "turn-auth" not in rig.engine.calls


async def test_a_call_is_forgotten_after_its_ttl(served: Served, rig: Rig) -> None:
    engine = TurnEngine(rig.engine.resolver, served.app.endpoints, served.http, ttl_secs=0.2)
    await engine.turn("ttl-a", "default", 8000, b"", 8000)
    assert "ttl-a" in engine.calls
    await asyncio.sleep(0.3)
    await engine.turn("ttl-b", "default", 8000, b"", 8000)  # any turn sweeps expired calls
    assert "ttl-a" not in engine.calls and "ttl-b" in engine.calls
