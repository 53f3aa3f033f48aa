"""ElevenLabs Agents pipeline end to end: FreeSWITCH emulator -> Pipeswitch -> ConvAI emulator.

The ConvAI emulator speaks the agent WebSocket protocol (server VAD, transcripts,
real Piper speech, pings, tool calls, faults); the call is placed by the
FreeSWITCH emulator exactly as mod_audio_stream would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from pipeswitch.bench.emulators.elevenlabs_convai import (
    ConvAIFaults,
    ConvAIReply,
    ConvAISettings,
    ConversationRecord,
    ElevenLabsConvAIEmulator,
    serve_convai,
)
from pipeswitch.bench.emulators.latency import LatencyModel
from pipeswitch.bench.emulators.openai_chat import ToolCall
from pipeswitch.bench.emulators.runner import EmulatorConfig, RunningEmulators, run_emulators
from pipeswitch.bench.emulators.scripts import LONG_REPLY
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import ProviderSettings, Tenant, ToolSettings
from pipeswitch.pipelines import elevenlabs_agent  # noqa: F401  (registers the builder)
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.emulated import endpoints_for
from tests.conftest import trim_silence
from tests.e2e.helpers import (
    ask,
    is_speech_like,
    open_call,
    wait_bot_quiet,
    wait_for_bot_audio,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

AGENT = "agent_pipeswitch_test"
QUESTION = "What are your opening hours on Saturday?"
BARGE_IN = "Sorry, can you hold on a second?"
SCRIPT: dict[str, ConvAIReply] = {
    "hours": "We are open nine to five on Saturday.",
    "long": LONG_REPLY,
    "tool": ToolCall(name="business_hours", arguments={}),
}


def _tenant(name: str, greeting: str | None = None, **providers: object) -> Tenant:
    return Tenant(
        name=name,
        pipeline="elevenlabs-agent",
        playback="json-stream",
        first_message=greeting,
        providers=ProviderSettings(elevenlabs_agent_id=AGENT, **providers),  # type: ignore[arg-type]
        tools=ToolSettings(enabled=["business_hours"], business_hours={"mon": ["00:00-23:59"]}),
    )


def tenants() -> StaticTenantLoader:
    return StaticTenantLoader(
        [
            Tenant(name="default"),
            _tenant("el.test"),
            _tenant("el-ulaw.test", elevenlabs_output_format="ulaw_8000"),
            _tenant("el-signed.test", elevenlabs_signed_url=True),
            _tenant("el-greet.test", greeting="Riverside Dental, how can I help?"),
        ],
        default="default",
    )


@dataclass
class ElServed:
    app: Pipeswitch
    emu: RunningEmulators
    convai: ElevenLabsConvAIEmulator
    http: aiohttp.ClientSession
    finished: dict[str, Any]

    def url(self, domain: str, rate: int, uuid: str) -> str:
        return f"ws://127.0.0.1:{self.app.port}/fs/{uuid}?rate={rate}&mix=mono&domain={domain}"

    async def speech(self, text: str, rate: int) -> bytes:
        key = (text, rate)
        if key not in _cache:
            async with self.http.post(
                self.app.endpoints.piper_for_rate(rate), json={"text": text, "voice": "joe"}
            ) as r:
                r.raise_for_status()
                wav = await r.read()
            at = wav.find(b"data", 12)
            _cache[key] = trim_silence(wav[at + 8 :])
        return _cache[key]


_cache: dict[tuple[str, int], bytes] = {}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def el() -> AsyncIterator[ElServed]:
    convai = ElevenLabsConvAIEmulator(
        settings=ConvAISettings(
            agent_ids=[AGENT], api_key="emulated", first_message=None, ping_interval_s=0.5
        ),
        response_latency=LatencyModel.constant(300),
        user_lines=lambda turn: "Tell me your opening hours.",
        script=SCRIPT,
    )
    runner, port = await serve_convai(convai)
    try:
        async with run_emulators(EmulatorConfig(seed=1)) as emu:
            endpoints = dataclasses.replace(
                endpoints_for(emu),
                elevenlabs_url=f"ws://127.0.0.1:{port}",
                elevenlabs_api_key="emulated",
            )
            settings = Settings(
                host="127.0.0.1", port=0, providers="emulated", idle_timeout_secs=30
            )
            app = Pipeswitch(
                settings, loader=tenants(), default_tenant="default", endpoints=endpoints
            )
            await app.start()
            convai.piper_url = app.endpoints.piper_url
            for reply in SCRIPT.values():  # synthesized once, not inside a test's timeout
                if isinstance(reply, str):
                    await convai.speech(reply, 16000)
            async with aiohttp.ClientSession() as http:
                served = ElServed(app, emu, convai, http, {})

                async def _finished(record: Any, cp: Any) -> None:
                    served.finished[record.call.call_uuid] = cp

                assert app.sessions is not None
                app.sessions.finished_hooks.append(_finished)
                try:
                    yield served
                finally:
                    await app.stop(drain_secs=2.0)
    finally:
        await runner.cleanup()


async def _conversation(el: ElServed, n_before: int, timeout: float = 5.0) -> ConversationRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(el.convai.conversations) > n_before and el.convai.conversations[-1].init:
            return el.convai.conversations[-1]
        await asyncio.sleep(0.02)
    raise AssertionError("the agent conversation was never opened")


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_call_reaches_the_agent_and_hears_its_speech(el: ElServed, rate: int) -> None:
    el.convai.user_lines = lambda turn: "Tell me your opening hours."
    n = len(el.convai.conversations)
    stream = await open_call(el.url("el.test", rate, f"el-call-{rate}"), rate, "json-stream")
    try:
        conv = await _conversation(el, n)
        assert conv.auth == "xi-api-key"
        override = conv.init["conversation_config_override"] if conv.init else {}
        assert "receptionist" in override["agent"]["prompt"]["prompt"]
        end, answer = await ask(stream, await el.speech(QUESTION, rate), rate, timeout_s=6.0)
        assert answer is not None, "no agent audio reached the caller"
        await wait_bot_quiet(stream, quiet_s=0.5, timeout_s=8.0)
        pcm, _ = stream.received_audio()
        assert is_speech_like(pcm, rate)
        # The agent heard the caller (resampled once to its 16 kHz input) and answered.
        assert conv.audio_in_s > 1.0
        assert [t.text for t in conv.user_turns if t.text] == ["Tell me your opening hours."]
        assert conv.agent_turns[-1].text == SCRIPT["hours"]
        # Keepalive: every ping got its pong, by event_id.
        answered = [p for p in conv.pings_sent[:-1] if p in conv.pongs]
        assert conv.pings_sent and answered == conv.pings_sent[:-1]
        # Wire turn latency stays the emulator's 300 ms plus local overhead.
        assert answer - end < 1.5 + 0.4  # server VAD 400 ms + 300 ms + playout, loaded CI
    finally:
        await stream.hangup()


async def test_greeting_is_ours_and_the_agent_knows_it(el: ElServed) -> None:
    rate = 8000
    n = len(el.convai.conversations)
    stream = await open_call(el.url("el-greet.test", rate, "el-greet"), rate, "json-stream")
    try:
        conv = await _conversation(el, n)
        # Played from Piper's cache by Pipeswitch at once; the agent must not greet again.
        first = await wait_for_bot_audio(stream, 0.0, 3.0)
        assert first is not None
        assert conv.override("agent", "first_message") == ""
        assert "Riverside Dental, how can I help?" in conv.override("agent", "prompt", "prompt")
        await wait_bot_quiet(stream, quiet_s=0.5, timeout_s=6.0)
        assert not conv.agent_turns, "the agent spoke first as well"
    finally:
        await stream.hangup()


async def test_mulaw_output_is_decoded(el: ElServed) -> None:
    rate = 8000
    n = len(el.convai.conversations)
    el.convai.settings = dataclasses.replace(el.convai.settings, output_format="ulaw_8000")
    stream = await open_call(el.url("el-ulaw.test", rate, "el-ulaw"), rate, "json-stream")
    try:
        await _conversation(el, n)
        _, answer = await ask(stream, await el.speech(QUESTION, rate), rate, timeout_s=6.0)
        assert answer is not None
        await wait_bot_quiet(stream, quiet_s=0.5, timeout_s=8.0)
        assert is_speech_like(stream.received_audio()[0], rate)
    finally:
        el.convai.settings = dataclasses.replace(el.convai.settings, output_format="pcm_16000")
        await stream.hangup()


async def test_barge_in_stops_bot_and_agent_is_told_what_was_heard(el: ElServed) -> None:
    rate = 8000
    el.convai.user_lines = lambda turn: "Tell me the long story." if turn == 0 else "Hold on."
    n = len(el.convai.conversations)
    stream = await open_call(el.url("el.test", rate, "el-barge"), rate, "json-stream")
    try:
        conv = await _conversation(el, n)
        _, answer = await ask(stream, await el.speech(QUESTION, rate), rate, timeout_s=6.0)
        assert answer is not None
        await asyncio.sleep(1.5)  # the long reply is playing
        stream.queue_caller_audio(await el.speech(BARGE_IN, rate))
        onset = None
        while onset is None:
            await asyncio.sleep(0.01)
            onset = next((f.t for f in stream.sent_frames if f.voiced and f.t > answer + 1.0), None)
        stream.queue_caller_silence(0.6)
        await asyncio.sleep(2.0)
        _, rx = stream.received_audio()
        times = [a.t for a in rx if a.non_silent and a.t > onset - 0.5]
        stop = next(
            (t for t, nxt in zip(times, times[1:], strict=False) if nxt - t > 0.2), times[-1]
        )
        assert stop - onset < 0.3, f"bot audio still arriving {stop - onset:.3f}s after barge-in"
        # ConvAI has no truncate: the agent is told, as a contextual update, what was heard.
        long_turn = next(t for t in conv.agent_turns if t.text == LONG_REPLY)
        assert long_turn.interrupted_at is not None
        assert conv.contextual_updates, "the agent was not told what the caller heard"
        heard = conv.contextual_updates[-1].split('"')[1]
        assert heard and LONG_REPLY.startswith(heard) and len(heard) < len(LONG_REPLY)
    finally:
        await stream.hangup()


async def test_client_tool_call_runs_the_receptionist_tool(el: ElServed) -> None:
    rate = 8000
    el.convai.user_lines = lambda turn: "Use the tool please."
    n = len(el.convai.conversations)
    stream = await open_call(el.url("el-signed.test", rate, "el-tool"), rate, "json-stream")
    try:
        conv = await _conversation(el, n)
        assert conv.auth == "signed_url"
        _, answer = await ask(stream, await el.speech(QUESTION, rate), rate, timeout_s=8.0)
        assert answer is not None
        assert conv.tool_results, "no client_tool_result came back"
        result = conv.tool_results[0]
        assert result["is_error"] is False
        assert "open" in str(result["result"]).lower()
        assert conv.agent_turns[-1].text.startswith("Here is what I found")
    finally:
        await stream.hangup()


async def _finished_call(el: ElServed, uuid: str) -> Any:
    for _ in range(200):
        if uuid in el.finished:
            return el.finished.pop(uuid)
        await asyncio.sleep(0.02)
    raise AssertionError(f"call {uuid} never finished")


async def test_refused_agent_falls_back_to_the_cascade(el: ElServed) -> None:
    rate = 8000
    el.convai.set_faults(ConvAIFaults(reject_status=503, connections=1))
    chat = el.emu.openai
    n_requests = len(chat.requests)
    stream = await open_call(el.url("el.test", rate, "el-refused"), rate, "json-stream")
    try:
        end, answer = await ask(stream, await el.speech(QUESTION, rate), rate, timeout_s=8.0)
        assert answer is not None, "the cascade did not answer after the refusal"
        assert len(chat.requests) > n_requests, "the cascade's LLM was never asked"
    finally:
        el.convai.set_faults(ConvAIFaults())
        await stream.hangup()
    cp = await _finished_call(el, "el-refused")
    fb = cp.parts["llm"].fallback
    assert fb is not None and fb.fell_back
    assert "HTTP 503" in fb.events[0].reason
    assert fb.events[0].switch_secs is not None and fb.events[0].switch_secs < 1.0


async def test_mid_call_drop_carries_the_conversation_to_the_cascade(el: ElServed) -> None:
    rate = 8000
    el.convai.user_lines = lambda turn: "Tell me your opening hours."
    chat = el.emu.openai
    n_requests = len(chat.requests)
    n = len(el.convai.conversations)
    stream = await open_call(el.url("el.test", rate, "el-drop"), rate, "json-stream")
    try:
        conv = await _conversation(el, n)
        _, answer = await ask(stream, await el.speech(QUESTION, rate), rate, timeout_s=6.0)
        assert answer is not None
        await wait_bot_quiet(stream, quiet_s=0.6, timeout_s=8.0)
        assert conv.agent_turns[-1].text == SCRIPT["hours"]
        # The provider vanishes mid-call (TCP reset): the cascade apologises and takes over.
        assert el.convai.drop_live() == 1
        await asyncio.sleep(1.5)
        _, answer2 = await ask(stream, await el.speech(QUESTION, rate), rate, timeout_s=8.0)
        assert answer2 is not None, "no answer after the provider dropped"
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and len(chat.requests) <= n_requests:
            await asyncio.sleep(0.05)
    finally:
        await stream.hangup()
    cp = await _finished_call(el, "el-drop")
    fb = cp.parts["llm"].fallback
    assert fb.fell_back and fb.events[0].apologized
    assert fb.events[0].messages_carried >= 2
    # The cascade's LLM saw the conversation held with the agent before the drop.
    msgs = chat.requests[-1].messages
    texts = [str(m.get("content", "")) for m in msgs]
    assert "Tell me your opening hours." in texts
    assert any(SCRIPT["hours"] in t for t in texts)


__all__ = ["web"]
