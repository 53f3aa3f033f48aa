"""Receptionist tools through real parts: Pipecat's GroqLLMService against the chat
emulator (which streams ``tool_calls`` as the API does), the ESL client against the
FreeSWITCH ESL emulator. Each tool must issue the right ESL command with the right
arguments, in the right order relative to what the caller hears.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from pipecat.frames.frames import EndFrame, Frame, LLMMessagesAppendFrame, LLMTextFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.groq.llm import GroqLLMService
from pipecat.workers.runner import WorkerRunner

from pipeswitch.bench.emulators.latency import LatencyModel
from pipeswitch.bench.emulators.openai_chat import ChatReply, OpenAIChatEmulator, ToolCall
from pipeswitch.bench.fakeswitch.esl import FakeSwitchEsl
from pipeswitch.config.tenants import Tenant
from pipeswitch.processors.tools import RETURN_EXTENSION, ReceptionistTools, register_tools
from pipeswitch.transports.esl import EslClient

pytestmark = pytest.mark.asyncio(loop_scope="module")

TENANT = {
    "name": "pbx.example.com",
    "tools": {
        "enabled": ["transfer_call", "end_call", "send_dtmf", "take_message", "business_hours"],
        "transfer_targets": {
            "sales": {"destination": "2001", "kind": "ring_group", "description": "the sales team"},
            "support": {"destination": "5000", "kind": "queue"},
        },
        "timezone": "Europe/Prague",
        "business_hours": {"wed": ["09:00-17:00"]},
        "transfer_ring_secs": 0.5,
    },
}


@dataclass
class Rig:
    chat: OpenAIChatEmulator
    base_url: str
    esl: FakeSwitchEsl
    client: EslClient


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig() -> AsyncIterator[Rig]:
    chat = OpenAIChatEmulator(ttft=LatencyModel(0.02, 0.02), tokens_per_s=2000)
    app = web.Application()
    chat.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with FakeSwitchEsl() as esl:
        client = EslClient("127.0.0.1", esl.port, "ClueCon")
        await client.start()
        assert await client.wait_connected(3.0)
        try:
            yield Rig(chat, f"http://127.0.0.1:{port}/openai/v1", esl, client)
        finally:
            await client.close()
    await runner.cleanup()


OPEN_CALLS: list[Call] = []


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def end_open_calls() -> AsyncIterator[None]:
    """A failed test must not leave its pipeline running (the module teardown would hang)."""
    yield
    while OPEN_CALLS:
        call = OPEN_CALLS.pop()
        if call.task is not None and not call.task.done() and call.worker is not None:
            await call.worker.cancel()
            await asyncio.gather(call.task, return_exceptions=True)


class Said(FrameProcessor):
    """Collects what the LLM streamed (the text the caller would hear)."""

    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMTextFrame):
            self.text += frame.text
        await self.push_frame(frame, direction)


@dataclass
class Call:
    uuid: str
    tools: ReceptionistTools
    said: Said
    spoken: list[tuple[float, str]] = field(default_factory=list)
    worker: PipelineWorker | None = None
    task: asyncio.Task[None] | None = None


async def place_call(
    rig: Rig, script: Callable[[list[dict[str, Any]]], ChatReply], uuid: str, **tools: Any
) -> Call:
    rig.chat.script = script
    rig.chat.clear()
    rig.esl.new_channel(uuid)
    settings: dict[str, Any] = {**TENANT["tools"], **tools}  # type: ignore[dict-item]
    tenant = Tenant.model_validate({**TENANT, "tools": settings})
    llm = GroqLLMService(
        api_key="k",
        base_url=rig.base_url,
        settings=GroqLLMService.Settings(
            model="llama-3.3-70b-versatile", system_instruction="You are a receptionist."
        ),
    )
    context = LLMContext()
    pair = LLMContextAggregatorPair(context)
    said = Said()
    spoken: list[tuple[float, str]] = []

    async def speak(text: str) -> None:  # the caller hears it 0.1 s later
        await asyncio.sleep(0.1)
        spoken.append((time.monotonic(), text))

    clock = lambda: datetime(2026, 1, 14, 9, 30, tzinfo=UTC)  # noqa: E731 - Wed 10:30 Prague
    receptionist = register_tools(llm, context, rig.client, tenant, uuid, speak=speak)
    assert receptionist is not None
    receptionist.clock = clock
    worker = PipelineWorker(
        Pipeline([pair.user(), llm, said, pair.assistant()]),
        params=PipelineParams(),
        enable_rtvi=False,
        enable_turn_tracking=False,
    )
    call = Call(uuid, receptionist, said, spoken, worker)
    OPEN_CALLS.append(call)
    runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
    await runner.add_workers(worker)
    call.task = asyncio.create_task(runner.run())
    return call


async def say(call: Call, text: str) -> None:
    assert call.worker is not None
    await call.worker.queue_frame(
        LLMMessagesAppendFrame(messages=[{"role": "user", "content": text}], run_llm=True)
    )


async def hang_up(call: Call) -> None:
    assert call.worker is not None and call.task is not None
    if not call.task.done():
        await call.worker.queue_frame(EndFrame())
    await asyncio.wait_for(call.task, 5.0)


async def until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def commands(rig: Rig, uuid: str) -> list[tuple[float, str]]:
    return [(c.t, c.command) for c in rig.esl.commands if uuid in c.command]


async def test_schemas_are_the_enabled_tools(rig: Rig) -> None:
    call = await place_call(rig, lambda m: "Hello.", "tools-schema")
    await say(call, "Hi")
    await until(lambda: rig.chat.requests and rig.chat.requests[-1].outcome == "completed")
    tools = rig.chat.requests[0].body["tools"]
    names = [t["function"]["name"] for t in tools]
    assert names == ["transfer_call", "end_call", "send_dtmf", "take_message", "business_hours"]
    target = tools[0]["function"]["parameters"]["properties"]["target"]
    assert target["enum"] == ["sales", "support"]
    await hang_up(call)


async def test_transfer_announces_then_uuid_transfer_and_stops_listening(rig: Rig) -> None:
    uuid = "tools-transfer-ok"
    call = await place_call(
        rig, lambda m: ToolCall("transfer_call", {"target": "sales"}) if len(m) < 4 else "x", uuid
    )
    await say(call, "Sales please")
    ch = rig.esl.channels[uuid]
    await until(lambda: ch.transfers)
    assert ch.transfers == [("2001", "XML", "pbx.example.com")]
    # The announcement was heard before the transfer command went out.
    sent = [t for t, c in commands(rig, uuid) if "uuid_transfer" in c]
    assert (
        call.spoken and call.spoken[0][1] == "Please hold, I'm transferring you to the sales team."
    )
    assert call.spoken[0][0] <= sent[0]
    # The target answers: the switch bridges the call.
    rig.esl.fire("CHANNEL_BRIDGE", {"Unique-ID": uuid, "Other-Leg-Unique-ID": "b-leg"})
    await until(lambda: any("uuid_audio_stream" in c for _, c in commands(rig, uuid)))
    assert f"bgapi uuid_audio_stream {uuid} stop" in [c for _, c in commands(rig, uuid)]
    await until(lambda: call.tools.state.transfers[0]["outcome"] == "answered")
    await asyncio.sleep(0.2)
    assert len(rig.chat.requests) == 1  # the agent says nothing more
    await hang_up(call)


async def test_unanswered_transfer_comes_back_and_offers_a_message(rig: Rig) -> None:
    uuid = "tools-transfer-noanswer"

    def script(m: list[dict[str, Any]]) -> ChatReply:
        if m[-1]["role"] == "tool":
            return "Sorry, nobody is free. Can I take a message?"
        return ToolCall("transfer_call", {"target": "support", "announcement": "One moment."})

    call = await place_call(rig, script, uuid)
    await say(call, "I need support")
    ch = rig.esl.channels[uuid]
    await until(lambda: len(ch.transfers) == 2)  # ring time 0.5 s, then back
    assert ch.transfers == [
        ("5000", "XML", "pbx.example.com"),
        (RETURN_EXTENSION, "XML", "pbx.example.com"),
    ]
    assert [s for _, s in call.spoken] == ["One moment."]
    await until(lambda: "take a message" in call.said.text)
    tool_msg = rig.chat.requests[-1].messages[-1]
    assert tool_msg["role"] == "tool" and "no_answer" in tool_msg["content"]
    assert call.tools.state.transfers[0]["outcome"] == "no_answer"
    await hang_up(call)


async def test_taken_back_call_is_ours_again(rig: Rig) -> None:
    """After an unanswered transfer the caller is back with the agent: the shared ESL client
    must not count the call as handed over (else a bot-ended hang-up skips ``uuid_kill``)."""
    uuid = "tools-transfer-back"

    def script(m: list[dict[str, Any]]) -> ChatReply:
        if m[-1]["role"] == "tool":
            return "Sorry, nobody is free."
        return ToolCall("transfer_call", {"target": "support", "announcement": "One moment."})

    call = await place_call(rig, script, uuid)
    await say(call, "I need support")
    await until(lambda: uuid in rig.client.handed_over)  # first leg: handed over
    await until(lambda: len(rig.esl.channels[uuid].transfers) == 2)
    await until(lambda: call.tools.state.transfers and call.tools.state.transfers[0]["outcome"])
    assert call.tools.state.transfers[0]["outcome"] == "no_answer"
    assert uuid not in rig.client.handed_over
    await hang_up(call)


async def test_end_call_plays_goodbye_then_kills(rig: Rig) -> None:
    uuid = "tools-end"
    call = await place_call(rig, lambda m: ToolCall("end_call", {"goodbye": "Bye now!"}), uuid)
    await say(call, "That's all, thanks")
    await until(lambda: any("uuid_kill" in c for _, c in commands(rig, uuid)))
    kill = [(t, c) for t, c in commands(rig, uuid) if "uuid_kill" in c]
    assert kill[0][1] == f"bgapi uuid_kill {uuid} NORMAL_CLEARING"
    assert call.spoken == [(call.spoken[0][0], "Bye now!")] and call.spoken[0][0] <= kill[0][0]
    assert call.tools.state.hangup_requested
    assert call.task is not None
    await asyncio.wait_for(call.task, 5.0)  # the pipeline ended itself
    await until(lambda: rig.esl.channels[uuid].state == "CS_DESTROY")


async def test_send_dtmf_and_bad_digits(rig: Rig) -> None:
    uuid = "tools-dtmf"
    replies = iter(
        [ToolCall("send_dtmf", {"digits": "12;rm"}), ToolCall("send_dtmf", {"digits": "1w23#"})]
    )

    def script(m: list[dict[str, Any]]) -> ChatReply:
        return next(replies, "Done.")

    call = await place_call(rig, script, uuid)
    await say(call, "Press one two three hash")
    ch = rig.esl.channels[uuid]
    await until(lambda: ch.dtmf_sent)
    assert ch.dtmf_sent == ["1w23#"]  # the injected one never reached the switch
    assert f"bgapi uuid_send_dtmf {uuid} 1w23#" in [c for _, c in commands(rig, uuid)]
    assert "error" in rig.chat.requests[1].messages[-1]["content"]
    # The tool records it once the switch's job answered (after the command went out).
    await until(lambda: call.tools.state.dtmf_sent)
    assert call.tools.state.dtmf_sent == ["1w23#"]
    await hang_up(call)


async def test_take_message_is_kept_with_the_call(rig: Rig) -> None:
    uuid = "tools-message"
    args = {"name": "Jana Novak", "number": "+420 601 123 456", "reason": "Invoice question"}
    call = await place_call(
        rig, lambda m: ToolCall("take_message", args) if m[-1]["role"] == "user" else "Noted.", uuid
    )
    await say(call, "Please tell them Jana called")
    await until(lambda: call.tools.state.messages)
    msg = call.tools.state.messages[0]
    assert (msg.name, msg.number, msg.reason) == (
        "Jana Novak",
        "+420 601 123 456",
        "Invoice question",
    )
    assert msg.taken_at == "2026-01-14T09:30:00+00:00"
    assert call.tools.state.as_dict()["messages"][0]["name"] == "Jana Novak"
    await until(lambda: "Noted." in call.said.text)
    assert commands(rig, uuid) == []  # nothing went to the switch
    await hang_up(call)


async def test_business_hours_in_the_tenant_zone(rig: Rig) -> None:
    uuid = "tools-hours"
    call = await place_call(
        rig, lambda m: ToolCall("business_hours") if m[-1]["role"] == "user" else "Open.", uuid
    )
    await say(call, "Are you open?")
    await until(lambda: len(rig.chat.requests) == 2)
    result = rig.chat.requests[1].messages[-1]["content"]
    assert '"open": true' in result and "until 5 PM" in result
    await hang_up(call)


async def test_without_a_switch_only_local_tools_register(rig: Rig) -> None:
    tenant = Tenant.model_validate(TENANT)
    llm = GroqLLMService(api_key="k", base_url=rig.base_url)
    context = LLMContext()
    tools = register_tools(llm, context, None, tenant, "no-switch")
    assert tools is not None
    assert sorted(tools.handlers()) == ["business_hours", "take_message"]
    none = register_tools(llm, LLMContext(), None, Tenant(name="plain.example.com"), "x")
    assert none is None


async def test_switch_unreachable_fails_fast_and_the_call_goes_on(rig: Rig) -> None:
    uuid = "tools-esl-down"
    replies = iter([ToolCall("send_dtmf", {"digits": "5"})])
    call = await place_call(rig, lambda m: next(replies, "Sorry, that did not work."), uuid)
    outage = asyncio.create_task(rig.esl.outage(4.0))
    await until(lambda: not rig.client.connected, 2.0)
    await say(call, "Press five")
    await until(lambda: "did not work" in call.said.text, 5.0)
    assert not outage.done()  # the tool did not wait for the switch to come back
    tool_msg = rig.chat.requests[1].messages[-1]
    assert tool_msg["role"] == "tool" and "error" in tool_msg["content"]
    assert call.tools.state.dtmf_sent == []
    await outage
    assert await rig.client.wait_connected(5.0)  # and the shared connection comes back
    await hang_up(call)


async def test_text_and_a_tool_call_in_one_streamed_response(rig: Rig) -> None:
    uuid = "tools-text-then-call"

    def script(m: list[dict[str, Any]]) -> ChatReply:
        if m[-1]["role"] == "user":
            return ("Of course, one moment.", ToolCall("send_dtmf", {"digits": "9"}))
        return "Done."

    call = await place_call(rig, script, uuid)
    try:
        await say(call, "Dial nine for me")
        await until(lambda: rig.esl.channels[uuid].dtmf_sent == ["9"])
        await until(lambda: "Done." in call.said.text)
        assert call.said.text.startswith("Of course, one moment.")
        first = rig.chat.requests[0]
        assert first.reply_text == "Of course, one moment." and first.tool_calls
        # The context kept the words, then the call, then its result.
        roles = [(m["role"], bool(m.get("tool_calls"))) for m in rig.chat.requests[1].messages]
        assert roles[-3:] == [("assistant", False), ("assistant", True), ("tool", False)]
        assert rig.chat.requests[1].messages[-3]["content"] == "Of course, one moment."
    finally:
        await hang_up(call)
