"""OpenAI Realtime failing: the call continues on the tenant's cascade, conversation kept."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeswitch.bench.emulators.openai_realtime import RealtimeFaults
from pipeswitch.bench.emulators.scripts import LLM_SCRIPTS, LONG_REPLY
from pipeswitch.pipelines.compose import CallPipeline
from pipeswitch.pipelines.session import CallRecord
from tests.e2e.helpers import ask, open_call, wait_bot_quiet
from tests.s2s.conftest import QUESTION, S2SServed, reset_faults

pytestmark = pytest.mark.asyncio(loop_scope="session")


def keep_calls(s2s: S2SServed) -> tuple[dict[str, Any], Any]:
    """Collect each finished call's pipeline parts by call uuid."""
    kept: dict[str, Any] = {}

    async def hook(rec: CallRecord, cp: CallPipeline) -> None:
        kept[rec.call.call_uuid] = (rec, cp)

    assert s2s.app.sessions is not None
    s2s.app.sessions.finished_hooks.append(hook)
    return kept, hook


async def test_refused_at_connect_falls_back_silently(s2s: S2SServed) -> None:
    rate = 8000
    speech = await s2s.speech(QUESTION, rate)
    s2s.realtime.set_faults(RealtimeFaults(refuse_status=503, count=1))
    kept, hook = keep_calls(s2s)
    chat = s2s.emu.openai
    n_chat = len(chat.requests)
    stream = await open_call(s2s.url("rt-binary.test", rate, "rt-refused"), rate, "binary")
    try:
        await wait_bot_quiet(stream, timeout_s=10.0)
        _, answer = await ask(stream, speech, rate, timeout_s=8.0)
        assert answer is not None, "the cascade did not answer after the refusal"
        await wait_bot_quiet(stream, timeout_s=10.0)
    finally:
        reset_faults(s2s)
        await stream.hangup()
        await asyncio.sleep(0.3)
        s2s.app.sessions.finished_hooks.remove(hook)  # type: ignore[union-attr]
    assert s2s.realtime.refused == 1
    _, cp = kept["rt-refused"]
    fb = cp.parts["llm"].fallback
    assert fb is not None and len(fb.events) == 1
    assert "503" in fb.events[0].reason or "connect" in fb.events[0].reason.lower()
    assert not fb.events[0].apologized  # nothing was lost: the caller had not spoken yet
    # The cascade's LLM (its STT's transcript) answered the caller's turn.
    req = chat.requests[n_chat]
    assert [m.get("role") for m in req.messages][-1] == "user"


async def test_drop_mid_call_apologizes_and_carries_context(s2s: S2SServed) -> None:
    rate = 8000
    speech = await s2s.speech(QUESTION, rate)
    rt = s2s.realtime
    saved = rt.script
    rt.script = LLM_SCRIPTS["long"]
    # Paced at real time, so the drop comes after the caller has heard about a second
    # of the reply whatever the load (at the default 4x, 1.5 s of audio is out within
    # ~0.4 s of playback, and whether its first word was heard became a race).
    speed = rt.audio_speed
    rt.audio_speed = 1.0
    rt.set_faults(RealtimeFaults(drop_after_audio_ms=1500, count=1))
    kept, hook = keep_calls(s2s)
    chat = s2s.emu.openai
    n_chat = len(chat.requests)
    n_sessions = len(rt.sessions)
    stream = await open_call(s2s.url("rt-binary.test", rate, "rt-drop"), rate, "binary")
    try:
        await wait_bot_quiet(stream, timeout_s=10.0)
        _, answer = await ask(stream, speech, rate, timeout_s=8.0)
        assert answer is not None, "no realtime answer before the drop"
        # The drop cuts the reply; the cascade's apology follows.
        await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=15.0)
        assert len(chat.requests) == n_chat  # the apology is spoken, not generated
        # Ask again: the cascade answers, knowing the conversation so far.
        _, again = await ask(stream, speech, rate, timeout_s=8.0)
        assert again is not None, "the cascade did not answer after the drop"
        await wait_bot_quiet(stream, timeout_s=10.0)
    finally:
        rt.script = saved
        rt.audio_speed = speed
        reset_faults(s2s)
        await stream.hangup()
        await asyncio.sleep(0.3)
        s2s.app.sessions.finished_hooks.remove(hook)  # type: ignore[union-attr]
    sess = rt.sessions[n_sessions]
    assert sess.close_reason.startswith("dropped")
    _, cp = kept["rt-drop"]
    event = cp.parts["llm"].fallback.events[0]
    assert event.apologized and event.switch_secs is not None
    assert event.switch_secs < 5.0  # Piper synthesizing the apology, on a loaded machine
    # Carried over: the realtime phase's caller turn (its transcript) and the part of the
    # reply the caller heard precede the cascade's own turn in what the LLM was sent.
    messages = chat.requests[n_chat].messages
    texts = [(m.get("role"), str(m.get("content", ""))) for m in messages]
    assert ("user", sess.user_transcripts[0]) in texts
    # (the words played before the drop: a prefix of the cut reply, however short)
    assert any(r == "assistant" and t and LONG_REPLY.startswith(t) for r, t in texts), texts


async def test_stalled_provider_falls_back_and_answers_the_turn(s2s: S2SServed) -> None:
    """The provider takes the caller's turn and says nothing: after the reply budget the
    cascade apologizes and answers that same turn (no need to ask again)."""
    rate = 8000
    speech = await s2s.speech(QUESTION, rate)
    s2s.realtime.set_faults(RealtimeFaults(stall_after_responses=0, count=1))
    kept, hook = keep_calls(s2s)
    chat = s2s.emu.openai
    n_chat = len(chat.requests)
    stream = await open_call(s2s.url("rt-stall.test", rate, "rt-stall"), rate, "binary")
    try:
        await wait_bot_quiet(stream, timeout_s=10.0)
        end, answer = await ask(stream, speech, rate, timeout_s=10.0)
        assert answer is not None, "nothing after the stall"
        assert answer - end > 1.5  # the reply budget (2 s) ran out first
        await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=15.0)
    finally:
        reset_faults(s2s)
        await stream.hangup()
        await asyncio.sleep(0.3)
        s2s.app.sessions.finished_hooks.remove(hook)  # type: ignore[union-attr]
    _, cp = kept["rt-stall"]
    event = cp.parts["llm"].fallback.events[0]
    assert "no reply" in event.reason and event.apologized and event.answered_pending_turn
    # The cascade's LLM answered the realtime phase's caller turn.
    req = chat.requests[n_chat]
    assert req.messages[-1]["role"] == "user"
    assert req.messages[-1]["content"] == s2s.realtime.sessions[-1].user_transcripts[0]
