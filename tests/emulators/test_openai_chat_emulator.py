"""The real ``GroqLLMService`` / ``OpenAILLMService`` (openai SDK) against the chat emulator."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from openai import AsyncOpenAI
from pipecat.frames.frames import (
    ErrorFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMRunFrame,
    LLMTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.groq.llm import GroqLLMService
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.llm import OpenAILLMService

from pipeswitch.bench.emulators import ChatFaults, EmulatorConfig, ToolCall, run_emulators
from pipeswitch.bench.emulators.openai_chat import default_reply, tokenize
from pipeswitch.bench.emulators.scripts import LONG_REPLY
from tests.emulators.helpers import FrameRecorder, running_pipeline

TTFT_MS = 150.0
MODEL = "llama-3.3-70b-versatile"
SYSTEM = "You are a receptionist."


def _config(**kw: Any) -> EmulatorConfig:
    base: dict[str, Any] = {"llm_ttft_median_ms": TTFT_MS, "llm_ttft_p95_ms": 0.0}
    base.update(kw)
    return EmulatorConfig(**base)


def _groq(url: str) -> GroqLLMService:
    settings = GroqLLMService.Settings(model=MODEL, system_instruction=SYSTEM)
    return GroqLLMService(api_key="emulated", base_url=url, settings=settings)


def _context(user: str) -> LLMContext:
    return LLMContext(messages=[{"role": "user", "content": user}])


def _text(frames: list[tuple[float, LLMTextFrame]]) -> str:
    return "".join(f.text for _, f in frames)


async def test_streamed_reply_matches_script_with_ttft_and_request_log() -> None:
    async with run_emulators(_config()) as emu:
        llm = _groq(emu.groq_base_url)
        async with running_pipeline(llm) as h:
            sent = time.monotonic()
            await h.worker.queue_frame(LLMContextFrame(_context("What time do you close today?")))
            await h.down.wait_for(LLMFullResponseEndFrame, 5.0)

    expected = default_reply([{"role": "user", "content": "What time do you close today?"}])
    texts = h.down.of_type(LLMTextFrame)
    assert _text(texts) == expected
    assert len(texts) == len(tokenize(expected))  # one frame per streamed token
    ttft_ms = (texts[0][0] - sent) * 1000
    assert TTFT_MS - 30 <= ttft_ms <= TTFT_MS + 300, ttft_ms

    [req] = emu.openai.requests
    assert req.path == "/openai/v1/chat/completions"
    assert req.stream and req.body["stream_options"] == {"include_usage": True}
    assert req.model == MODEL
    assert req.messages[0] == {"role": "system", "content": SYSTEM}
    assert [m["role"] for m in req.messages] == ["system", "user"]
    assert req.messages[-1]["content"] == "What time do you close today?"
    assert req.outcome == "completed" and req.sent_text == expected


async def test_keyword_script_on_openai_path() -> None:
    table = {"refund": "Refunds take five days. Anything else?"}
    async with run_emulators(_config(llm_script=table, llm_ttft_median_ms=20.0)) as emu:
        llm = OpenAILLMService(
            api_key="emulated",
            base_url=emu.openai_base_url,
            settings=OpenAILLMService.Settings(model="gpt-4o-mini"),
        )
        async with running_pipeline(llm) as h:
            await h.worker.queue_frame(LLMContextFrame(_context("I want a REFUND please")))
            await h.down.wait_for(LLMFullResponseEndFrame, 5.0)
    assert _text(h.down.of_type(LLMTextFrame)) == table["refund"]
    assert emu.openai.requests[0].path == "/v1/chat/completions"


async def test_tool_call_round_trip() -> None:
    """A scripted ToolCall runs the registered handler; the result goes back in context."""
    script = {"weather": ToolCall(name="get_weather", arguments={"location": "Paris"})}
    async with run_emulators(_config(llm_script=script, llm_ttft_median_ms=20.0)) as emu:
        llm = _groq(emu.groq_base_url)
        calls: list[dict[str, Any]] = []

        async def get_weather(params: FunctionCallParams) -> None:
            calls.append(dict(params.arguments))
            await params.result_callback({"forecast": "sunny"})

        llm.register_function("get_weather", get_weather)
        context = _context("What's the weather like?")
        user, assistant = LLMContextAggregatorPair(context)
        # The assistant aggregator consumes the LLM's text, so record before it.
        out = FrameRecorder(FrameDirection.DOWNSTREAM)
        async with running_pipeline(Pipeline([user, llm, out, assistant])) as h:
            await h.worker.queue_frame(LLMRunFrame())
            await out.wait_for(LLMFullResponseEndFrame, 5.0, count=2)

    assert calls == [{"location": "Paris"}]
    first, second = emu.openai.requests
    assert first.tool_calls[0]["function"]["name"] == "get_weather"
    roles = [m["role"] for m in second.messages]
    assert roles[-2:] == ["assistant", "tool"]
    assert second.messages[-2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "sunny" in second.messages[-1]["content"]
    assert _text(out.of_type(LLMTextFrame)) == default_reply(second.messages)
    assert context.messages[-1] == {
        "role": "assistant",
        "content": _text(out.of_type(LLMTextFrame)),
    }


async def test_500_without_retry_gives_error_frame() -> None:
    faults = ChatFaults(status=500, should_retry=False)
    async with run_emulators(_config(llm_faults=faults)) as emu:
        llm = _groq(emu.groq_base_url)
        async with running_pipeline(llm) as h:
            await h.worker.queue_frame(LLMContextFrame(_context("Hello?")))
            [(_, err)] = await h.up.wait_for(ErrorFrame, 5.0)
            await h.down.wait_for(LLMFullResponseEndFrame, 2.0)
    assert "500" in err.error
    assert [r.status for r in emu.openai.requests] == [500]
    assert not h.down.of_type(LLMTextFrame)


async def test_429_with_retry_after_is_retried_by_the_sdk() -> None:
    faults = ChatFaults(status=429, retry_after_s=0.1, count=1)
    async with run_emulators(_config(llm_faults=faults, llm_ttft_median_ms=20.0)) as emu:
        llm = _groq(emu.groq_base_url)
        async with running_pipeline(llm) as h:
            await h.worker.queue_frame(LLMContextFrame(_context("Hello?")))
            await h.down.wait_for(LLMFullResponseEndFrame, 5.0)
    assert [r.status for r in emu.openai.requests] == [429, 200]
    retry_gap = emu.openai.requests[1].received_at - emu.openai.requests[0].received_at
    assert retry_gap >= 0.09
    assert _text(h.down.of_type(LLMTextFrame)) == emu.openai.requests[1].reply_text
    assert not h.up.of_type(ErrorFrame)


async def test_connection_drop_mid_stream_gives_error_frame() -> None:
    faults = ChatFaults(drop_after_tokens=3)
    async with run_emulators(_config(llm_faults=faults, llm_ttft_median_ms=20.0)) as emu:
        llm = _groq(emu.groq_base_url)
        async with running_pipeline(llm) as h:
            await h.worker.queue_frame(LLMContextFrame(_context("Hello?")))
            await h.up.wait_for(ErrorFrame, 5.0)
            await h.down.wait_for(LLMFullResponseEndFrame, 2.0)
    [req] = emu.openai.requests
    assert req.outcome == "dropped" and req.tokens_sent == 3
    assert _text(h.down.of_type(LLMTextFrame)) == req.sent_text


async def test_interruption_closes_the_stream_and_log_shows_what_was_sent() -> None:
    """Barge-in: Pipecat cancels the completion; the log keeps the streamed prefix."""
    cfg = _config(llm_script="long", llm_ttft_median_ms=20.0, llm_tokens_per_s=40.0)
    async with run_emulators(cfg) as emu:
        llm = _groq(emu.groq_base_url)
        async with running_pipeline(llm) as h:
            await h.worker.queue_frame(LLMContextFrame(_context("Tell me everything.")))
            await h.down.wait_for(LLMTextFrame, 3.0, count=5)
            await h.worker.queue_frame(InterruptionFrame())
            for _ in range(50):
                if emu.openai.requests[0].outcome != "pending":
                    break
                await asyncio.sleep(0.02)
    [req] = emu.openai.requests
    assert req.outcome == "client_disconnected"
    assert 5 <= req.tokens_sent < len(tokenize(LONG_REPLY))
    assert LONG_REPLY.startswith(req.sent_text)
    assert LONG_REPLY.startswith(_text(h.down.of_type(LLMTextFrame)))


async def test_non_streaming_models_and_auth_with_the_sdk() -> None:
    cfg = _config(llm_ttft_median_ms=10.0, api_key="sekrit")
    async with run_emulators(cfg) as emu:
        client = AsyncOpenAI(api_key="sekrit", base_url=emu.groq_base_url, max_retries=0)
        models = await client.models.list()
        assert MODEL in [m.id for m in models.data]
        done = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Are you open on Sunday?"}]
        )
        assert done.choices[0].message.content == default_reply(
            [{"role": "user", "content": "Are you open on Sunday?"}]
        )
        assert done.usage is not None and done.usage.completion_tokens > 0
        assert emu.openai.requests[-1].stream is False

        bad = AsyncOpenAI(api_key="wrong", base_url=emu.openai_base_url, max_retries=0)
        try:
            await bad.models.list()
        except Exception as e:  # openai.AuthenticationError
            assert getattr(e, "status_code", None) == 401
        else:
            raise AssertionError("wrong key accepted")
        await client.close()
        await bad.close()
