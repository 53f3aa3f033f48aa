"""The turn recorder (pure): caller and bot turns, heard text, barge-in, latency."""

from __future__ import annotations

from typing import Any

import pytest
from pipecat.frames.frames import (
    AggregatedTextFrame,
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import FramePushed
from pipecat.processors.frame_processor import FrameDirection
from pipecat.utils.text.base_text_aggregator import TextType

from pipeswitch.pipelines.turn_recorder import TurnRecorder
from pipeswitch.transports.frames import PlaybackFinishedFrame

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def feed(rec: TurnRecorder, clock: Clock, events: list[tuple[float, Frame]]) -> None:
    for t, frame in events:
        clock.t = t
        await rec.on_push_frame(
            FramePushed(
                source=None,  # type: ignore[arg-type]
                destination=None,  # type: ignore[arg-type]
                frame=frame,
                direction=FrameDirection.DOWNSTREAM,
                timestamp=0,
            )
        )


def spoken(text: str) -> AggregatedTextFrame:
    """A sentence the TTS is about to speak."""
    f = AggregatedTextFrame(text, TextType.SENTENCE)
    f.will_be_spoken = True
    return f


def greeting_fact(text: str, secs: float) -> PlaybackFinishedFrame:
    return PlaybackFinishedFrame(
        text=text, duration=secs, playback_position=secs, outside_pipeline=True
    )


def said(text: str, secs: float, heard: float | None = None) -> PlaybackFinishedFrame:
    return PlaybackFinishedFrame(
        text=text,
        duration=secs,
        playback_position=secs if heard is None else heard,
        interrupted=heard is not None,
    )


async def test_greeting_question_answer_and_a_barge_in() -> None:
    clock = Clock()
    rec = TurnRecorder(clock=clock)
    answer = "We are open nine to five, Monday to Friday, and on Saturday mornings."
    await feed(
        rec,
        clock,
        [
            (1001.5, greeting_fact("Hello, how can I help?", 1.5)),
            (1002.0, VADUserStartedSpeakingFrame()),
            (1003.0, TranscriptionFrame("When are you open?", "caller", "t")),
            (1003.1, VADUserStoppedSpeakingFrame()),
            (1003.5, spoken(answer)),
            (1003.6, BotStartedSpeakingFrame()),
            (1003.6, BotStartedSpeakingFrame()),  # broadcast both ways: seen twice
            (1004.0, VADUserStartedSpeakingFrame()),
            (1004.1, said(answer, 4.0, heard=1.0)),
            (1004.1, BotStoppedSpeakingFrame()),
            (1005.0, TranscriptionFrame("Sorry, hold on.", "caller", "t")),
            (1005.2, VADUserStoppedSpeakingFrame()),
        ],
    )
    turns: list[dict[str, Any]] = rec.turns
    assert [t["role"] for t in turns] == ["assistant", "user", "assistant", "user"]
    greeting, question, reply, barge = turns
    assert greeting["text"] == greeting["heard_text"] == "Hello, how can I help?"
    assert greeting["started_at"] == 1000.0
    assert greeting["latency_ms"] is None and not greeting["interrupted"]
    assert question["text"] == "When are you open?"
    assert (question["started_at"], question["ended_at"]) == (1002.0, 1003.1)
    assert reply["latency_ms"] == 500.0 and reply["interrupted"]
    assert reply["text"] == answer and answer.startswith(reply["heard_text"])
    assert 0 < len(reply["heard_text"]) < len(answer)
    assert barge["text"] == "Sorry, hold on." and barge["ended_at"] == 1005.2


async def test_noise_without_transcript_is_not_a_turn() -> None:
    clock = Clock()
    rec = TurnRecorder(clock=clock)
    await feed(
        rec, clock, [(1.0, VADUserStartedSpeakingFrame()), (1.2, VADUserStoppedSpeakingFrame())]
    )
    assert rec.turns == []


async def test_a_hangup_mid_reply_keeps_what_was_about_to_be_said() -> None:
    clock = Clock()
    rec = TurnRecorder(clock=clock)
    await feed(
        rec,
        clock,
        [
            (1.0, TranscriptionFrame("Do you open on Sunday?", "caller", "t")),
            (1.2, VADUserStoppedSpeakingFrame()),
            (1.9, spoken("No, we are closed on Sundays.")),
            (2.0, BotStartedSpeakingFrame()),
        ],
    )
    question, reply = rec.turns
    assert reply["text"] == "No, we are closed on Sundays." and reply["heard_text"] == ""
    assert reply["interrupted"] and reply["latency_ms"] == 800.0
    assert "pending" not in reply
