"""Gemini Live calls end to end: FreeSWITCH emulator -> Pipeswitch -> Gemini emulator (TLS)."""

from __future__ import annotations

import asyncio

import pytest

from pipeswitch.bench.emulators.openai_chat import ToolCall, keyword_script
from pipeswitch.bench.emulators.openai_realtime import tone_speech
from pipeswitch.bench.emulators.scripts import LLM_SCRIPTS
from tests.e2e.helpers import ask, is_speech_like, open_call, wait_bot_quiet
from tests.s2s.conftest import BARGE_IN, QUESTION, S2SServed, answer_then_barge_in

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_call_answers_with_provider_speech(s2s: S2SServed, rate: int) -> None:
    speech = await s2s.speech(QUESTION, rate)
    n = len(s2s.gemini.sessions)
    stream = await open_call(s2s.url("gm-binary.test", rate, f"gm-{rate}"), rate, "binary")
    try:
        await wait_bot_quiet(stream, timeout_s=10.0)
        end, answer = await ask(stream, speech, rate, timeout_s=8.0)
        assert answer is not None, "no answer from the Gemini pipeline"
        await wait_bot_quiet(stream, timeout_s=15.0)
    finally:
        await stream.hangup()
    await asyncio.sleep(0.3)
    sess = s2s.gemini.sessions[n]
    # google-genai reached the emulator over wss:// (TLS with the test CA) with the setup.
    assert sess.path.endswith("GenerativeService.BidiGenerateContent")
    assert "already greeted" in str(sess.setup.get("system_instruction"))
    # Caller audio arrived at 16 kHz whatever the call's rate (resampled once, or not at all).
    assert sess.audio_rates == [16000]
    assert len(sess.user_transcripts) == 1 and sess.turns[0].status == "completed"
    _, rx = stream.received_audio()
    pcm, _ = stream.played_audio()
    assert is_speech_like(pcm, rate)
    answer_ms = sum(a.nbytes for a in rx if a.t > end) * 1000 // (2 * rate)
    assert abs(answer_ms - sess.turns[0].audio_ms_total) < 300


async def test_barge_in_tells_gemini_what_was_heard(s2s: S2SServed) -> None:
    """No truncate in Gemini: the heard part of the cut reply goes back as context.

    Gemini's VAD calls the barge-in 0.4 s after ours, its cut reply streaming on
    meanwhile: that stale audio neither plays nor counts as a second reply (once a
    second, "heard nothing" note followed the first when CI's timing made that race).
    """
    rate = 8000
    question = await s2s.speech(QUESTION, rate)
    interrupt = await s2s.speech(BARGE_IN, rate)
    gm = s2s.gemini
    saved, saved_speech, saved_lag = gm.script, gm.speech, gm.vad_start_lag_s
    gm.script = LLM_SCRIPTS["long"]
    gm.vad_start_lag_s = 0.4
    # Synthesized at once, so the provider runs far ahead of playback (as the real ones do).
    gm.speech = tone_speech
    n = len(gm.sessions)
    stream = await open_call(s2s.url("gm-binary.test", rate, "gm-barge"), rate, "binary")
    try:
        # ~2 s heard of a ~20 s reply that has all been sent
        await answer_then_barge_in(stream, question, interrupt, rate, heard_s=2.0)
        await wait_bot_quiet(stream, quiet_s=0.3, timeout_s=5.0)
        await asyncio.sleep(0.5)
    finally:
        gm.script, gm.speech, gm.vad_start_lag_s = saved, saved_speech, saved_lag
        await stream.hangup()
    sess = gm.sessions[n]
    reply = sess.turns[0]
    assert reply.status == "interrupted" and sess.interruptions >= 1
    # Generated far ahead of playback: the server holds much more than the caller heard.
    assert reply.audio_ms_sent > 5000
    notes = [
        p["text"]
        for cc in sess.client_contents
        for t in cc.get("turns", [])
        for p in t.get("parts", [])
        if "interrupted you" in p.get("text", "")
    ]
    assert len(notes) == 1, sess.client_contents
    heard = notes[0].split('heard only: "', 1)[1].split('"', 1)[0]
    # A prefix of the reply, about as long as the ~2 s the caller heard (not the 20 s sent).
    assert reply.text.startswith(heard)
    sent_words = len(reply.text.split()) * reply.audio_ms_sent / reply.audio_ms_total
    assert 2 <= len(heard.split()) < sent_words / 2
    # The note asked for no answer (turn_complete false) and the barge-in got its own reply.
    assert not any(cc.get("turn_complete") for cc in sess.client_contents)


async def test_local_turn_detection_brackets_activity(s2s: S2SServed) -> None:
    """Gemini's VAD off: local Silero sends activityStart/activityEnd around the turn."""
    rate = 8000
    speech = await s2s.speech(QUESTION, rate)
    n = len(s2s.gemini.sessions)
    stream = await open_call(s2s.url("gm-local.test", rate, "gm-local"), rate, "binary")
    try:
        await wait_bot_quiet(stream, timeout_s=10.0)
        _, answer = await ask(stream, speech, rate, timeout_s=8.0)
        assert answer is not None
        await wait_bot_quiet(stream, timeout_s=15.0)
    finally:
        await stream.hangup()
    sess = s2s.gemini.sessions[n]
    aad = sess.setup["realtime_input_config"]["automatic_activity_detection"]
    assert aad["disabled"] is True
    assert sess.activity[:2] == ["start", "end"]
    assert sess.turns[0].trigger == "speech_stopped" and sess.turns[0].status == "completed"


async def test_tool_call_through_gemini(s2s: S2SServed) -> None:
    rate = 8000
    question = await s2s.speech(QUESTION, rate)
    gm = s2s.gemini
    saved = gm.script
    gm.script = keyword_script({"hours": ToolCall(name="business_hours", arguments={})})
    n = len(gm.sessions)
    stream = await open_call(s2s.url("gm-tools.test", rate, "gm-tools"), rate, "binary")
    try:
        await wait_bot_quiet(stream, timeout_s=10.0)
        _, answer = await ask(stream, question, rate, timeout_s=10.0)
        assert answer is not None, "no spoken answer after the tool call"
        await wait_bot_quiet(stream, timeout_s=15.0)
    finally:
        gm.script = saved
        await stream.hangup()
    sess = gm.sessions[n]
    decls = sess.setup["tools"][0]["function_declarations"]
    assert [d["name"] for d in decls] == ["business_hours"]
    call = sess.turns[0].tool_calls[0]
    resp = sess.tool_responses[0]["function_responses"][0]
    assert resp["id"] == call["id"] and resp["name"] == "business_hours"
    assert "open" in str(resp["response"])
    assert sess.turns[1].trigger == "tool_response" and sess.turns[1].first_audio_at is not None
    assert "result is" in sess.turns[1].text


async def test_long_call_survives_session_limits(s2s: S2SServed) -> None:
    """A 20-minute call on an accelerated clock: Gemini's connection limit (10 min) is
    5 s here, so the call crosses it three times; every crossing resumes the session
    with its handle and no turn is lost."""
    rate = 8000
    speech = await s2s.speech("Hello?", rate)
    gm = s2s.gemini
    saved = gm.script, gm.session_limit_s
    gm.script = LLM_SCRIPTS["short"]
    gm.session_limit_s = 5.0
    n = len(gm.sessions)
    answered = 0
    stream = await open_call(s2s.url("gm-binary.test", rate, "gm-long"), rate, "binary")
    try:
        await wait_bot_quiet(stream, timeout_s=10.0)
        t0 = asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - t0 < 16.0:
            _, answer = await ask(stream, speech, rate, timeout_s=6.0)
            answered += answer is not None
            await wait_bot_quiet(stream, quiet_s=0.3, timeout_s=6.0)
            await asyncio.sleep(0.5)
    finally:
        gm.script, gm.session_limit_s = saved
        await stream.hangup()
    sessions = gm.sessions[n:]
    asked = sum(len(s.user_transcripts) for s in sessions)
    assert len(sessions) >= 3, [s.close_reason for s in sessions]
    for prev, nxt in zip(sessions, sessions[1:], strict=False):
        assert prev.go_away_sent_at is not None
        # Resumed with a handle the previous connection issued: the conversation carried on.
        assert nxt.resumed_from in prev.handles_sent
    assert answered >= 4 and answered == asked
