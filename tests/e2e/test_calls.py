"""End to end through the FreeSWITCH emulator: greeting, a question, an answer."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, is_speech_like, open_call, wait_bot_quiet, wait_for_bot_audio

pytestmark = pytest.mark.asyncio(loop_scope="session")


def read_files(paths: list[str]) -> bytes:
    """The ::play files' audio, in order (what an ESL player would play)."""
    return b"".join(Path(p).read_bytes() for p in paths if Path(p).exists())


@pytest.mark.parametrize("rate", [8000, 16000])
@pytest.mark.parametrize("dialect", ["json-stream", "binary", "file"])
async def test_greeting_then_answer(served: Served, dialect: str, rate: int) -> None:
    speech = await served.speech(QUESTION, rate)
    url = served.url(domain=f"{dialect}.test", rate=rate, uuid=f"e2e-{dialect}-{rate}")
    stream = await open_call(
        url, rate, dialect, metadata=json.dumps({"uuid": "x", "caller": "1001"})
    )
    try:
        connected = stream.events[0].t
        greeting = await wait_for_bot_audio(stream, connected - 1.0, timeout_s=3.0)
        assert greeting is not None, "no greeting"
        await wait_bot_quiet(stream)
        # Only whole 20 ms frames go out: nothing is left stuck in the module's buffer.
        assert not stream.playing
        if dialect == "file":
            # The greeting came as files in one burst; played (by ESL, absent here) it
            # lasts seconds. Ask after it, as the other dialects do: a question over it
            # is the echo guard's case (tests/processors/test_echo_guard.py).
            pcm, _ = stream.received_audio()
            played_to = greeting + len(pcm) / (2 * rate)
            await asyncio.sleep(max(0.0, played_to + 0.7 - time.monotonic()))
        end, answer = await ask(stream, speech, rate)
        assert answer is not None, "no answer after the question"
        await wait_bot_quiet(stream)
    finally:
        await stream.hangup()

    if dialect == "file":
        plays = [e for e in stream.events if e.name == "mod_audio_stream::play"]
        assert len(plays) >= 2  # greeting and answer, one file per sentence
        for ev in plays:
            assert ev.body["sampleRate"] == rate and ev.body["audioDataType"] == "raw"
            assert ev.body["file"].endswith(".r8" if rate == 8000 else ".r16")
        pcm = read_files(stream.files)
        if not pcm:
            pcm, _ = stream.received_audio()
    else:
        pcm, _ = stream.played_audio()
    # The answer (after the question) is speech at the stream rate.
    _, rx = stream.received_audio()
    after = [a for a in rx if a.t > end]
    assert after and any(a.non_silent for a in after)
    assert is_speech_like(pcm, rate)


async def test_greeting_arrives_quickly_and_metadata_may_come_late(served: Served) -> None:
    url = served.url(rate=8000, uuid="late-meta")
    stream = await open_call(
        url, 8000, "json-stream", metadata='{"caller":"1002"}', ordering="libwsc"
    )
    try:
        t = await wait_for_bot_audio(stream, 0.0, timeout_s=3.0)
        assert t is not None and stream.started_at is not None
        assert t - stream.started_at < 1.0
    finally:
        await stream.hangup()


async def test_twenty_concurrent_calls_are_all_answered(served: Served) -> None:
    speech = await served.speech(QUESTION, 8000)

    async def one(i: int) -> float | None:
        stream = await open_call(served.url(uuid=f"conc-{i}"), 8000, "json-stream")
        try:
            await wait_bot_quiet(stream, timeout_s=10.0)
            _, answer = await ask(stream, speech, 8000, timeout_s=10.0)
            return answer
        finally:
            await stream.hangup()

    answers = await asyncio.gather(*(one(i) for i in range(20)))
    assert all(a is not None for a in answers), (
        f"{sum(a is None for a in answers)} calls unanswered"
    )


async def test_hangup_closes_tcp_promptly(served: Served) -> None:
    stream = await open_call(served.url(uuid="hangup"), 8000, "json-stream")
    await asyncio.sleep(0.5)
    rec = await stream.hangup()
    assert rec.server_close_code == 1000
    assert rec.tcp_closed_at is not None and rec.close_sent_at is not None
    # A server that echoes CLOSE but keeps TCP open blocks FreeSWITCH's hangup thread.
    assert rec.tcp_closed_at - rec.close_sent_at < 0.5
    assert np.isfinite(rec.tcp_closed_at)
