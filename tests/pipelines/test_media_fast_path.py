"""The media fast path: caller audio reaches the VAD and Deepgram's socket without
travelling the pipeline as frames, and the call still takes turns and barges in."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from pipecat.frames.frames import (
    BotSpeakingFrame,
    BotStartedSpeakingFrame,
    InputAudioRawFrame,
    TranscriptionFrame,
    UserSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection
from pipecat.turns.types import ProcessFrameResult

from pipeswitch.bench.emulators.scripts import LLM_SCRIPTS
from pipeswitch.config.tenants import Tenant
from pipeswitch.processors.barge_in import BargeInStartStrategy
from pipeswitch.transports.call_info import CallInfo
from pipeswitch.transports.frames import CallerSpeechFrame
from pipeswitch.transports.transport import FreeSwitchInputTransport, FreeSwitchOutputTransport
from tests.conftest import BARGE_IN, QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet

pytestmark = pytest.mark.asyncio(loop_scope="session")

COUNTED = (
    InputAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
    TranscriptionFrame,
    CallerSpeechFrame,
)


class FrameCounter(BaseObserver):
    """Counts, per frame type, the pushes between processors of one call."""

    def __init__(self) -> None:
        super().__init__()
        self.pushes: Counter[type] = Counter()
        # When the output transport sent each BotSpeakingFrame downstream.
        self.bot_speaking: list[float] = []
        # When the input transport sent each UserSpeakingFrame downstream.
        self.user_speaking: list[float] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        for kind in COUNTED:
            if isinstance(data.frame, kind):
                self.pushes[kind] += 1
        if (
            isinstance(data.frame, BotSpeakingFrame)
            and isinstance(data.source, FreeSwitchOutputTransport)
            and data.direction is FrameDirection.DOWNSTREAM
        ):
            self.bot_speaking.append(time.monotonic())
        if (
            isinstance(data.frame, UserSpeakingFrame)
            and isinstance(data.source, FreeSwitchInputTransport)
            and data.direction is FrameDirection.DOWNSTREAM
        ):
            self.user_speaking.append(time.monotonic())


async def _one_turn(served: Served, uuid: str) -> tuple[FrameCounter, Any, float]:
    counter = FrameCounter()
    sessions = served.app.sessions
    assert sessions is not None

    def factory(call: CallInfo, tenant: Tenant) -> list[BaseObserver]:
        return [counter] if call.call_uuid == uuid else []

    sessions.observer_factories.append(factory)
    rate = 8000
    speech = await served.speech(QUESTION, rate)
    before = len(served.emu.deepgram.streams)
    try:
        stream = await open_call(served.url(uuid=uuid, rate=rate), rate, "json-stream")
        try:
            await wait_bot_quiet(stream, timeout_s=10.0)
            _, answer = await ask(stream, speech, rate)
            assert answer is not None, "the bot did not answer the caller's question"
            sent_secs = stream.audio_bytes_sent / (2 * rate)
            record = served.emu.deepgram.streams[before]
            # Wait (a loaded machine lags) for the STT to have all the audio sent so far.
            deadline = time.monotonic() + 10.0
            while record.audio_s < sent_secs - 0.1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await stream.hangup()
    finally:
        sessions.observer_factories.remove(factory)
    return counter, record, sent_secs


async def test_caller_audio_bypasses_the_pipeline_and_the_turn_still_works(
    served: Served,
) -> None:
    counter, record, sent_secs = await _one_turn(served, "fast-path-on")
    assert counter.pushes[InputAudioRawFrame] == 0, "caller audio travelled the pipeline"
    # The VAD's events and the STT's transcript are frames, as before.
    assert counter.pushes[VADUserStartedSpeakingFrame] >= 1
    assert counter.pushes[VADUserStoppedSpeakingFrame] >= 1
    assert counter.pushes[TranscriptionFrame] >= 1
    # The caller asked while the bot was quiet: no speech counts for the barge-in rule.
    assert counter.pushes[CallerSpeechFrame] == 0
    # The question is over a second long: UserSpeakingFrame once a second, not every 0.2 s.
    ticks = counter.user_speaking
    assert len(ticks) >= 2
    assert min(b - a for a, b in zip(ticks, ticks[1:], strict=False)) >= 0.9
    # Deepgram got the caller's audio (all but what was in flight at the hang-up) and a
    # Finalize after the VAD stop.
    assert record.finalizes >= 1
    assert record.audio_s == pytest.approx(sent_secs, abs=0.1)


async def test_speech_over_the_bot_is_counted_and_barges_in(served: Served) -> None:
    """Over the bot's reply the fast path pushes speech counts (the barge-in rule asks
    for ``barge_in_min_secs`` of them) and the reply stops."""
    uuid, rate = "fast-path-barge", 8000
    counter = FrameCounter()
    sessions = served.app.sessions
    assert sessions is not None

    def factory(call: CallInfo, tenant: Tenant) -> list[BaseObserver]:
        return [counter] if call.call_uuid == uuid else []

    question = await served.speech(QUESTION, rate)
    interrupt = await served.speech(BARGE_IN, rate)
    chat = served.emu.openai
    saved = chat.script
    chat.script = LLM_SCRIPTS["long"]  # type: ignore[assignment]
    sessions.observer_factories.append(factory)
    try:
        stream = await open_call(served.url(uuid=uuid, rate=rate), rate, "json-stream")
        try:
            await wait_bot_quiet(stream, timeout_s=10.0)
            _, answer = await ask(stream, question, rate)
            assert answer is not None
            await asyncio.sleep(1.2)  # the long reply is playing
            asked = counter.pushes[CallerSpeechFrame]
            stream.queue_caller_audio(interrupt)
            stream.queue_caller_silence(0.5)
            await asyncio.sleep(2.5)
            _, rx = stream.received_audio()
        finally:
            await stream.hangup()
    finally:
        chat.script = saved
        sessions.observer_factories.remove(factory)
    assert asked == 0  # the question was asked with the bot quiet
    assert counter.pushes[CallerSpeechFrame] >= 1
    voiced = [a.t for a in rx if a.non_silent and a.t > answer]
    gaps = [b - a for a, b in zip(voiced, voiced[1:], strict=False)]
    assert any(g > 0.2 for g in gaps), "the long reply played on over the caller"
    # The bot talked for over a second: BotSpeakingFrame once a second, not every 0.2 s.
    ticks = counter.bot_speaking
    assert len(ticks) >= 2
    assert min(b - a for a, b in zip(ticks, ticks[1:], strict=False)) >= 0.9


async def test_fast_path_can_be_turned_off(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPESWITCH_MEDIA_FAST_PATH", "0")
    counter, record, _ = await _one_turn(served, "fast-path-off")
    assert counter.pushes[InputAudioRawFrame] > 50  # Pipecat's frame path: 50 per second
    assert counter.pushes[CallerSpeechFrame] == 0
    assert record.audio_s > 1.0


async def test_barge_in_counts_fast_path_speech_over_the_bot() -> None:
    strategy = BargeInStartStrategy(0.2)
    await strategy.process_frame(BotStartedSpeakingFrame())
    started = await strategy.process_frame(VADUserStartedSpeakingFrame(start_secs=0.1))
    assert started is ProcessFrameResult.CONTINUE  # 0.1 s over the bot is not enough
    assert await strategy.process_frame(CallerSpeechFrame(secs=0.04)) is ProcessFrameResult.CONTINUE
    assert await strategy.process_frame(CallerSpeechFrame(secs=0.08)) is ProcessFrameResult.STOP
    # Speech that ends before it counts is no barge-in.
    await strategy.process_frame(VADUserStartedSpeakingFrame(start_secs=0.1))
    await strategy.process_frame(VADUserStoppedSpeakingFrame(stop_secs=0.2))
    assert await strategy.process_frame(CallerSpeechFrame(secs=0.5)) is ProcessFrameResult.CONTINUE
