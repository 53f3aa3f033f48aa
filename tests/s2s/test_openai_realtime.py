"""OpenAI Realtime calls end to end: FreeSWITCH emulator -> Pipeswitch -> Realtime emulator."""

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
    n_sessions = len(s2s.realtime.sessions)
    stream = await open_call(s2s.url("rt-binary.test", rate, f"rt-{rate}"), rate, "binary")
    try:
        await wait_bot_quiet(stream, timeout_s=10.0)  # the greeting
        end, answer = await ask(stream, speech, rate, timeout_s=8.0)
        assert answer is not None, "no answer from the realtime pipeline"
        await wait_bot_quiet(stream, timeout_s=15.0)
    finally:
        await stream.hangup()
    await asyncio.sleep(0.3)
    sess = s2s.realtime.sessions[n_sessions]
    # The service configured the session: PCM 24 kHz, server VAD, the tenant's prompt.
    update = sess.session_updates[0]
    assert update["audio"]["input"]["format"]["rate"] == 24000
    assert update["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    assert "already greeted" in update["instructions"]
    # The caller's audio reached the provider at 24 kHz: its VAD heard one utterance of
    # roughly the question's length (audio clock, resampled once at the edge).
    assert len(sess.speech_stopped) == 1
    assert sess.audio_in_ms > 1000
    assert sess.responses and sess.responses[0].status == "completed"
    # The caller heard the provider's reply: speech at the stream rate, after the question.
    _, rx = stream.received_audio()
    pcm, _ = stream.played_audio()
    assert is_speech_like(pcm, rate)
    answer_ms = sum(a.nbytes for a in rx if a.t > end) * 1000 // (2 * rate)
    # All of the reply's audio (Piper at 24 kHz -> stream rate once) reached the caller.
    assert abs(answer_ms - sess.responses[0].audio_ms_total) < 300


async def test_barge_in_truncates_at_played_out_ms(s2s: S2SServed) -> None:
    """The truncation names what the caller heard, not the (much longer) audio received."""
    rate = 8000
    question = await s2s.speech(QUESTION, rate)
    interrupt = await s2s.speech(BARGE_IN, rate)
    rt = s2s.realtime
    saved, saved_speech = rt.script, rt.speech
    rt.script = LLM_SCRIPTS["long"]
    # Synthesized at once, so the provider runs far ahead of playback (as the real ones do).
    rt.speech = tone_speech
    n_sessions = len(rt.sessions)
    stream = await open_call(s2s.url("rt-binary.test", rate, "rt-barge"), rate, "binary")
    try:
        # ~2 s of a ~20 s reply heard; all of it already received
        answer = await answer_then_barge_in(stream, question, interrupt, rate, heard_s=2.0)
        await wait_bot_quiet(stream, quiet_s=0.3, timeout_s=5.0)
        await asyncio.sleep(0.5)
    finally:
        rt.script, rt.speech = saved, saved_speech
        await stream.hangup()
    sess = rt.sessions[n_sessions]
    reply = sess.responses[0]
    assert sess.truncations, "no conversation.item.truncate reached the provider"
    cut = sess.truncations[0]
    assert cut.item_id == reply.item_id
    # What the caller heard of the reply: the bot audio that reached the emulated module
    # between the reply's first audio and the barge-in (binary: the clear drops the rest).
    _, rx = stream.received_audio()
    onset = next(f.t for f in stream.sent_frames if f.voiced and f.t > answer + 1.0)
    heard_ms = sum(a.nbytes for a in rx if answer - 0.01 <= a.t <= onset + 0.3) * 1000 // (2 * rate)
    assert abs(cut.audio_end_ms - heard_ms) < 400, (cut.audio_end_ms, heard_ms)
    # Far less than what the provider had sent (and Pipecat had received) by then.
    assert cut.audio_ms_sent is not None and cut.audio_ms_sent - cut.audio_end_ms > 3000
    # The model's memory of its reply now ends where the caller stopped hearing it.
    assert 0 < len(cut.heard_text.split()) < len(reply.text.split()) / 2


async def test_cut_response_audio_in_flight_does_not_play(s2s: S2SServed) -> None:
    """Local turns: our barge-in sends ``response.cancel``; until the provider acts on
    it (here 1 s, ~4 s of audio at its pace) the cut response keeps streaming. None of
    that may reach the caller, who is talking (Pipecat alone plays it as a new reply)."""
    rate = 8000
    question = await s2s.speech(QUESTION, rate)
    interrupt = await s2s.speech(BARGE_IN, rate)
    rt = s2s.realtime
    saved, saved_speech, saved_lag = rt.script, rt.speech, rt.cancel_lag_s
    rt.script = LLM_SCRIPTS["long"]
    rt.speech = tone_speech
    rt.cancel_lag_s = 1.0
    n_sessions = len(rt.sessions)
    stream = await open_call(s2s.url("rt-local.test", rate, "rt-stale"), rate, "binary")
    try:
        answer = await answer_then_barge_in(
            stream, question, interrupt, rate, heard_s=1.5, silence_s=1.0
        )
        await wait_bot_quiet(stream, quiet_s=0.3, timeout_s=6.0)
        deadline = asyncio.get_running_loop().time() + 6.0
        while len(rt.sessions[n_sessions].responses) < 2:
            assert asyncio.get_running_loop().time() < deadline, (
                f"no reply to the barge-in: {rt.sessions[n_sessions].responses}"
            )
            await asyncio.sleep(0.05)
    finally:
        rt.script, rt.speech, rt.cancel_lag_s = saved, saved_speech, saved_lag
        await stream.hangup()
    sess = rt.sessions[n_sessions]
    cut, after = sess.responses[0], sess.responses[1]
    assert cut.status == "cancelled"
    # The barge-in's onset, replayed after the buffer clear, went as whole samples.
    assert sess.bad_appends == 0
    onset = next(f.t for f in stream.sent_frames if f.voiced and f.t > answer + 1.0)
    # From well after the barge-in until the barge-in's own reply: the cut response went
    # on streaming for 1 s at 4x real time, and none of it may be heard.
    window_end = after.first_audio_at or after.triggered_at
    _, rx = stream.received_audio()
    stale_ms = (
        sum(a.nbytes for a in rx if onset + 0.6 <= a.t < window_end and a.non_silent)
        * 1000
        // (2 * rate)
    )
    assert window_end - (onset + 0.6) > 0.5, "the window checked is too short to mean much"
    assert stale_ms < 100, f"{stale_ms} ms of the cut response played after the barge-in"


async def test_tool_call_through_realtime(s2s: S2SServed) -> None:
    """A receptionist tool runs from the realtime model's function call; the model answers."""
    rate = 8000
    question = await s2s.speech(QUESTION, rate)
    rt = s2s.realtime
    saved = rt.script
    rt.script = keyword_script({"hours": ToolCall(name="business_hours", arguments={})})
    n_sessions = len(rt.sessions)
    stream = await open_call(s2s.url("rt-tools.test", rate, "rt-tools"), rate, "binary")
    try:
        await wait_bot_quiet(stream, timeout_s=10.0)
        _, answer = await ask(stream, question, rate, timeout_s=10.0)
        assert answer is not None, "no spoken answer after the tool call"
        await wait_bot_quiet(stream, timeout_s=15.0)
    finally:
        rt.script = saved
        await stream.hangup()
    sess = rt.sessions[n_sessions]
    tools = sess.session_updates[0].get("tools") or []
    assert [t["name"] for t in tools] == ["business_hours"]
    call = sess.responses[0].tool_calls[0]
    outputs = [i for i in sess.items_created if i.get("type") == "function_call_output"]
    assert outputs and outputs[0]["call_id"] == call["call_id"]
    assert "open" in outputs[0]["output"]
    # The tool's result was spoken: a second response, with audio, answering it.
    follow = sess.responses[1]
    assert follow.trigger == "response.create" and follow.first_audio_at is not None
    assert "result is" in follow.text
