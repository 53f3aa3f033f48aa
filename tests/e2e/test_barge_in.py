"""Barge-in: the caller talks over the bot; the bot stops and remembers only what was heard."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeswitch.bench.emulators.scripts import LLM_SCRIPTS, LONG_REPLY
from pipeswitch.config.tenants import Tenant
from tests.conftest import BARGE_IN, QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet

pytestmark = pytest.mark.asyncio(loop_scope="session")


def norm(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("dialect", ["json-stream", "binary"])
async def test_barge_in_stops_bot_and_context_keeps_heard_part(
    served: Served, dialect: str
) -> None:
    rate = 8000
    question = await served.speech(QUESTION, rate)
    interrupt = await served.speech(BARGE_IN, rate)
    chat = served.emu.openai
    saved = chat.script
    chat.script = LLM_SCRIPTS["long"]  # type: ignore[assignment]
    n_requests = len(chat.requests)
    uuid = f"barge-{dialect}"
    stream = await open_call(
        served.url(domain=f"{dialect}.test", rate=rate, uuid=uuid), rate, dialect
    )
    try:
        await wait_bot_quiet(stream, timeout_s=10.0)
        _, answer = await ask(stream, question, rate)
        assert answer is not None
        await asyncio.sleep(1.2)  # the long reply is playing
        stream.queue_caller_audio(interrupt)
        onset = None
        while onset is None:
            await asyncio.sleep(0.01)
            onset = next((f.t for f in stream.sent_frames if f.voiced and f.t > answer + 1.0), None)
        stream.queue_caller_silence(0.5)
        await asyncio.sleep(1.5)
        # The reply's audio stops arriving within 300 ms of the caller's speech onset
        # (a later burst is the answer to the barge-in itself, after a silent gap).
        _, rx = stream.received_audio()
        times = [a.t for a in rx if a.non_silent and a.t > onset - 0.5]
        stop = next(
            (t for t, nxt in zip(times, times[1:], strict=False) if nxt - t > 0.2), times[-1]
        )
        assert stop - onset < 0.3, f"bot audio still arriving {stop - onset:.3f}s after barge-in"
        if dialect == "binary":
            assert any(
                e.name == "mod_audio_stream::json" and "clearAudio" in e.raw for e in stream.events
            )
        # The barge-in is a turn of its own: wait for the LLM to be asked about it.
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline and not any(
            len(r.messages) > 3 for r in chat.requests[n_requests:]
        ):
            await asyncio.sleep(0.05)
    finally:
        chat.script = saved
        await stream.hangup()

    # The LLM request after the barge-in shows what the bot had said: only the heard part.
    later = [r for r in chat.requests[n_requests:] if len(r.messages) > 3]
    assert later, (
        f"no LLM request after the barge-in: {[r.messages for r in chat.requests[n_requests:]]}"
    )
    msgs = later[-1].messages
    spoken = norm(str(msgs[-2]["content"])) if msgs[-2].get("role") == "assistant" else ""
    assert msgs[-1].get("role") == "user"
    assert spoken, f"nothing of the interrupted reply was kept: {msgs}"
    assert norm(LONG_REPLY).startswith(spoken), spoken
    assert len(spoken) < len(norm(LONG_REPLY)) * 0.7, "unheard text was kept in the context"


async def test_barge_in_during_greeting_keeps_only_heard_words(served: Served) -> None:
    rate = 8000
    question = await served.speech(QUESTION, rate)
    chat = served.emu.openai
    n_requests = len(chat.requests)

    def this_calls_first_turn() -> list[dict[str, object]] | None:
        # A request of an earlier test's call can still arrive in this window (its
        # barge-in turn, sent as it hung up): this call's first turn is the request
        # whose context is the greeting (or its heard part) and one caller turn.
        for r in chat.requests[n_requests:]:
            roles = [m.get("role") for m in r.messages if m.get("role") != "system"]
            if roles == ["assistant", "user"]:
                return r.messages
        return None

    stream = await open_call(served.url(uuid="barge-greeting", rate=rate), rate, "json-stream")
    try:
        await asyncio.sleep(1.0)  # about half of the greeting has played
        stream.queue_caller_audio(question)
        stream.queue_caller_silence(0.4)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and this_calls_first_turn() is None:
            await asyncio.sleep(0.05)
    finally:
        await stream.hangup()
    msgs = this_calls_first_turn()
    assert msgs is not None, "the caller's question was not answered"
    greeting = norm(Tenant(name="default").first_message or "")
    heard = [norm(str(m["content"])) for m in msgs if m.get("role") == "assistant"]
    assert heard, f"nothing of the greeting was kept: {msgs}"
    assert greeting.startswith(heard[0]) and len(heard[0]) < len(greeting), heard[0]
