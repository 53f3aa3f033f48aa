"""Gemini Live calls end to end: FreeSWITCH emulator -> Pipeswitch -> Gemini emulator (TLS)."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.helpers import ask, is_speech_like, open_call, wait_bot_quiet
from tests.s2s.conftest import QUESTION, S2SServed

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
