"""The example Python builder answers an emulated call through the FreeSWITCH emulator."""

from __future__ import annotations

import asyncio

import pytest

from pipeswitch.pipelines.compose import CallPipeline
from pipeswitch.pipelines.examples.keyword_router import ANSWERS, KeywordRouter
from pipeswitch.pipelines.session import CallRecord
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet, wait_for_bot_audio

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_keyword_router_answers_without_the_llm(served: Served) -> None:
    assert served.app.sessions is not None
    done: asyncio.Future[tuple[CallRecord, CallPipeline]] = (
        asyncio.get_running_loop().create_future()
    )

    async def finished(rec: CallRecord, cp: CallPipeline) -> None:
        if rec.call.call_uuid == "example-router" and not done.done():
            done.set_result((rec, cp))

    served.app.sessions.finished_hooks.append(finished)
    llm_before = len(served.emu.openai.requests)
    try:
        speech = await served.speech(QUESTION, 8000)
        stream = await open_call(
            served.url(domain="router.test", uuid="example-router"), 8000, "json-stream"
        )
        try:
            assert await wait_for_bot_audio(stream, 0.0, timeout_s=3.0) is not None, "no greeting"
            await wait_bot_quiet(stream)
            _, answer = await ask(stream, speech, 8000)
            assert answer is not None, "no answer from the routed pipeline"
            await wait_bot_quiet(stream)
        finally:
            await stream.hangup()
        record, cp = await asyncio.wait_for(done, 10.0)
    finally:
        served.app.sessions.finished_hooks.remove(finished)

    router = cp.parts["router"]
    assert isinstance(router, KeywordRouter) and router.routed == 1
    # The table's answer is in the conversation, as if the LLM had said it ...
    said = [m["content"] for m in record.messages if m.get("role") == "assistant"]
    assert ANSWERS["opening hours"] in said
    # ... and the LLM was never asked the question.
    asked = [
        r
        for r in served.emu.openai.requests[llm_before:]
        if "opening hours" in str(r.body.get("messages", "")).lower()
    ]
    assert not asked
