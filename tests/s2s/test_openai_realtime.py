"""OpenAI Realtime calls end to end: FreeSWITCH emulator -> Pipeswitch -> Realtime emulator."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.helpers import ask, is_speech_like, open_call, wait_bot_quiet
from tests.s2s.conftest import QUESTION, S2SServed

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
