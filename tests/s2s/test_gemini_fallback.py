"""Gemini Live refusing: the call continues on the tenant's cascade."""

from __future__ import annotations

import asyncio

import pytest

from pipeswitch.bench.emulators.gemini_live import GeminiFaults
from tests.e2e.helpers import ask, open_call, wait_bot_quiet
from tests.s2s.conftest import QUESTION, S2SServed, reset_faults
from tests.s2s.test_openai_fallback import keep_calls

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_refused_gemini_falls_back_to_cascade(s2s: S2SServed) -> None:
    rate = 16000
    speech = await s2s.speech(QUESTION, rate)
    s2s.gemini.set_faults(GeminiFaults(refuse_status=503))
    kept, hook = keep_calls(s2s)
    chat = s2s.emu.openai
    n_chat = len(chat.requests)
    stream = await open_call(s2s.url("gm-binary.test", rate, "gm-refused"), rate, "binary")
    try:
        await wait_bot_quiet(stream, timeout_s=10.0)
        _, answer = await ask(stream, speech, rate, timeout_s=8.0)
        assert answer is not None, "the cascade did not answer after Gemini refused"
        await wait_bot_quiet(stream, timeout_s=10.0)
    finally:
        reset_faults(s2s)
        await stream.hangup()
        await asyncio.sleep(0.3)
        s2s.app.sessions.finished_hooks.remove(hook)  # type: ignore[union-attr]
    assert s2s.gemini.refused >= 1
    _, cp = kept["gm-refused"]
    events = cp.parts["llm"].fallback.events
    assert len(events) == 1 and "503" in events[0].reason
    assert len(chat.requests) > n_chat  # the cascade's LLM took the caller's turn
