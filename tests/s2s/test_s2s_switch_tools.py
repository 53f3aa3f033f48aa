"""The switch tools (transfer, end_call, send_dtmf) on speech-to-speech calls, per provider.

Unmodified Pipecat services (and the ElevenLabs agent service) against the wire
emulators, which script the function call; the FreeSWITCH emulator's event socket
records the ``uuid_transfer`` / ``uuid_kill`` / ``uuid_send_dtmf`` and when it got
them, and its media stream records when the caller heard each frame. "Announce then
act": the provider says the announcement, and the switch acts only once the caller
has heard all of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from pipeswitch.bench.emulators.elevenlabs_convai import (
    ConvAISettings,
    ElevenLabsConvAIEmulator,
    serve_convai,
    voiced_standin,
)
from pipeswitch.bench.emulators.latency import LatencyModel
from pipeswitch.bench.emulators.openai_chat import ChatReply, ToolCall
from pipeswitch.bench.fakeswitch.esl import Channel, FakeSwitchEsl, recommended_variables
from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import ProviderSettings, Tenant, ToolSettings
from pipeswitch.pipelines import elevenlabs_agent  # noqa: F401  (registers the builder)
from pipeswitch.pipelines.app import Pipeswitch
from tests.e2e.helpers import PLAYBACK_FOR_DIALECT, wait_bot_quiet
from tests.s2s.conftest import QUESTION, S2SServed

pytestmark = pytest.mark.asyncio(loop_scope="session")

AGENT = "agent_switch_tools"
SWITCH_TOOLS = ["transfer_call", "end_call", "send_dtmf"]
ANNOUNCE = "Transferring you to the sales team now."
GOODBYE = "Thanks for calling, goodbye."


def _tools() -> ToolSettings:
    return ToolSettings.model_validate(
        {
            "enabled": [*SWITCH_TOOLS, "business_hours"],
            "transfer_targets": {"sales": {"destination": "2001", "kind": "ring_group"}},
            # Long: the test answers (CHANNEL_BRIDGE) itself; no "nobody answered" speech.
            "transfer_ring_secs": 30,
            "business_hours": {"mon": ["09:00-17:00"]},
        }
    )


def _tenants() -> StaticTenantLoader:
    p = {"realtime_silence_ms": 300}
    return StaticTenantLoader(
        [
            Tenant(name="default"),
            Tenant(
                name="rt-sw.test",
                pipeline="openai-realtime",
                playback="binary",
                providers=ProviderSettings(**p),  # type: ignore[arg-type]
                tools=_tools(),
            ),
            Tenant(
                name="gm-sw.test",
                pipeline="gemini-live",
                playback="binary",
                providers=ProviderSettings(**p),  # type: ignore[arg-type]
                tools=_tools(),
            ),
            Tenant(
                name="el-sw.test",
                pipeline="elevenlabs-agent",
                playback="binary",
                providers=ProviderSettings(elevenlabs_agent_id=AGENT),
                tools=_tools(),
            ),
        ],
        default="default",
    )


@dataclass
class SwitchServed:
    app: Pipeswitch
    fs: FakeSwitchEsl
    s2s: S2SServed
    convai: ElevenLabsConvAIEmulator

    async def call(self, uuid: str, domain: str) -> tuple[Channel, FakeSwitchStream]:
        url = f"ws://127.0.0.1:{self.app.port}/fs/{uuid}?domain={domain}&rate=8000&mix=mono"
        build = PLAYBACK_FOR_DIALECT["binary"]
        ch = await self.fs.start_call(
            url,
            call_uuid=uuid,
            build=build,  # type: ignore[arg-type]
            variables=recommended_variables(build),  # type: ignore[arg-type]
        )
        assert ch.stream is not None and await ch.stream.wait_connected(3.0)
        return ch, ch.stream

    def command_at(self, uuid: str, verb: str) -> float | None:
        return next(
            (c.t for c in self.fs.commands if verb in c.command and uuid in c.command), None
        )


async def _agent_voice(text: str, rate: int) -> bytes:
    """The agent's reply voice: 1.5 s of speech-like sound whatever the text (the
    emulator reads the tool's whole JSON result out; Piper would take seconds)."""
    return voiced_standin("x" * 21, rate)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sw(s2s: S2SServed) -> AsyncIterator[SwitchServed]:
    convai = ElevenLabsConvAIEmulator(
        settings=ConvAISettings(agent_ids=[AGENT], api_key="emulated", first_message=None),
        response_latency=LatencyModel.constant(300),
        user_lines=lambda turn: "Use the tool please.",
        script={"tool": ToolCall("transfer_call", {"target": "sales"})},
        synthesize=_agent_voice,
    )
    runner, port = await serve_convai(convai)
    fs = FakeSwitchEsl(password="pbx-secret")
    await fs.start()
    settings = Settings(
        host="127.0.0.1",
        port=0,
        providers="emulated",
        idle_timeout_secs=30,
        esl_enabled=True,
        esl_port=fs.port,
        esl_password="pbx-secret",  # type: ignore[arg-type]
    )
    endpoints = dataclasses.replace(
        s2s.app.endpoints, elevenlabs_url=f"ws://127.0.0.1:{port}", elevenlabs_api_key="emulated"
    )
    app = Pipeswitch(settings, loader=_tenants(), default_tenant="default", endpoints=endpoints)
    await app.start()
    assert app.esl is not None and await app.esl.wait_connected(3.0)
    try:
        yield SwitchServed(app, fs, s2s, convai)
    finally:
        await app.stop(drain_secs=1.0)
        await fs.stop()
        await runner.cleanup()


def _tool_then(call: ToolCall, after: str) -> Callable[[list[dict[str, Any]]], ChatReply]:
    """The model calls ``call`` on the caller's turn and says ``after`` to its result."""
    return lambda m: after if m and m[-1].get("role") == "tool" else call


async def _until(pred: Callable[[], object], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return False


async def _caller_asks(sw: SwitchServed, stream: FakeSwitchStream) -> float:
    await wait_bot_quiet(stream, timeout_s=10.0)  # the greeting
    pcm = await sw.s2s.speech(QUESTION, 8000)
    stream.queue_caller_audio(pcm)
    stream.queue_caller_silence(0.3)
    await stream.wait_caller_drained(timeout_s=len(pcm) / 16000 + 3)
    end = stream.last_voiced_sent_at()
    assert end is not None
    return end


def _heard_between(stream: FakeSwitchStream, t0: float, t1: float) -> list[float]:
    _, frames = stream.played_audio()
    return [t for t, voiced in frames if voiced and t0 < t <= t1]


def _assert_announced_then_acted(
    stream: FakeSwitchStream, asked_at: float, acted_at: float, min_secs: float
) -> None:
    """The caller heard the announcement, all of it before the switch acted."""
    heard = _heard_between(stream, asked_at, acted_at)
    assert len(heard) * 0.02 >= min_secs, f"announcement not heard ({len(heard) * 0.02:.2f}s)"
    later = _heard_between(stream, acted_at, time.monotonic() + 1)
    assert not later, f"{len(later)} announcement frames played after the switch acted"


async def _transfer_answered(sw: SwitchServed, ch: Channel, uuid: str, domain: str) -> float:
    """The transfer went out (into the tenant's context); the target answers."""
    assert await _until(lambda: ch.transfers, 45.0), "no uuid_transfer"
    assert ch.transfers == [("2001", "XML", domain)]
    acted = sw.command_at(uuid, "uuid_transfer")
    assert acted is not None
    sw.fs.fire("CHANNEL_BRIDGE", {"Unique-ID": uuid, "Other-Leg-Unique-ID": "b-leg"})
    assert await _until(lambda: sw.command_at(uuid, "uuid_audio_stream") is not None, 5.0)
    return acted


async def test_openai_realtime_transfer_after_the_announcement(sw: SwitchServed) -> None:
    rt = sw.s2s.realtime
    saved = rt.script
    rt.script = _tool_then(ToolCall("transfer_call", {"target": "sales"}), ANNOUNCE)
    uuid = "rt-sw-transfer"
    try:
        n = len(rt.sessions)
        ch, stream = await sw.call(uuid, "rt-sw.test")
        asked = await _caller_asks(sw, stream)
        acted = await _transfer_answered(sw, ch, uuid, "rt-sw.test")
        await asyncio.sleep(0.5)
        _assert_announced_then_acted(stream, asked, acted, min_secs=1.0)
        sess = rt.sessions[n]
        # The same definitions as the cascade's: the switch tools are declared too.
        names = [t["name"] for t in sess.session_updates[0].get("tools") or []]
        assert names == [*SWITCH_TOOLS, "business_hours"]
        # The model was told to say the announcement, and said it.
        assert sess.responses[1].text == ANNOUNCE
    finally:
        rt.script = saved
        await sw.fs.hangup(uuid)


async def test_openai_realtime_send_dtmf(sw: SwitchServed) -> None:
    rt = sw.s2s.realtime
    saved = rt.script
    rt.script = _tool_then(ToolCall("send_dtmf", {"digits": "12#"}), "Done.")
    uuid = "rt-sw-dtmf"
    try:
        ch, stream = await sw.call(uuid, "rt-sw.test")
        await _caller_asks(sw, stream)
        assert await _until(lambda: ch.dtmf_sent, 15.0), "no uuid_send_dtmf"
        assert ch.dtmf_sent == ["12#"]
    finally:
        rt.script = saved
        await sw.fs.hangup(uuid)


async def test_gemini_live_end_call_drains_the_goodbye_then_kills(sw: SwitchServed) -> None:
    gm = sw.s2s.gemini
    saved = gm.script
    gm.script = _tool_then(ToolCall("end_call", {"goodbye": GOODBYE}), GOODBYE)
    uuid = "gm-sw-end"
    try:
        ch, stream = await sw.call(uuid, "gm-sw.test")
        asked = await _caller_asks(sw, stream)
        assert await _until(lambda: sw.command_at(uuid, "uuid_kill") is not None, 20.0)
        kill = sw.command_at(uuid, "uuid_kill")
        assert kill is not None
        _assert_announced_then_acted(stream, asked, kill, min_secs=0.8)
        assert await _until(lambda: ch.state == "CS_DESTROY", 5.0)
    finally:
        gm.script = saved
        if (left := sw.fs.channels.get(uuid)) and left.up:
            await sw.fs.hangup(uuid)


async def test_gemini_live_transfer_after_the_announcement(sw: SwitchServed) -> None:
    gm = sw.s2s.gemini
    saved = gm.script
    gm.script = _tool_then(ToolCall("transfer_call", {"target": "sales"}), ANNOUNCE)
    uuid = "gm-sw-transfer"
    try:
        ch, stream = await sw.call(uuid, "gm-sw.test")
        asked = await _caller_asks(sw, stream)
        acted = await _transfer_answered(sw, ch, uuid, "gm-sw.test")
        await asyncio.sleep(0.5)
        _assert_announced_then_acted(stream, asked, acted, min_secs=1.0)
    finally:
        gm.script = saved
        await sw.fs.hangup(uuid)


async def test_elevenlabs_agent_transfer_after_the_announcement(sw: SwitchServed) -> None:
    uuid = "el-sw-transfer"
    n = len(sw.convai.conversations)
    ch, stream = await sw.call(uuid, "el-sw.test")
    try:
        asked = await _caller_asks(sw, stream)
        acted = await _transfer_answered(sw, ch, uuid, "el-sw.test")
        await asyncio.sleep(0.5)
        _assert_announced_then_acted(stream, asked, acted, min_secs=1.0)
        conv = sw.convai.conversations[n]
        assert conv.tool_results and conv.tool_results[0]["is_error"] is False
        assert "transferring" in str(conv.tool_results[0]["result"])
    finally:
        await sw.fs.hangup(uuid)
