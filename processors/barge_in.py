"""When caller speech over the bot counts as a barge-in.

Pipecat's VAD start strategy starts the caller's turn (and interrupts the bot)
on the first voiced 150 ms. Over the bot's own voice that is too eager on a
phone line: a cough, a line click or the far end's echo of the bot starts a
turn and cuts the bot off. While the bot is talking, this strategy lets the
caller's turn start only after ``min_secs`` of continuous speech; when the bot
is quiet it behaves exactly like the VAD strategy.

Speech is measured in caller audio frames (they pass the user aggregator 50
times a second), or, with the media fast path, in the ``CallerSpeechFrame`` it
pushes per chunk while the caller speaks - not with a timer: no task per call,
and deterministic in tests.
"""

from __future__ import annotations

from typing import Any

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InputAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_start.base_user_turn_start_strategy import BaseUserTurnStartStrategy

from pipeswitch.transports.frames import CallerSpeechFrame


class BargeInStartStrategy(BaseUserTurnStartStrategy):
    """VAD turn start that asks for ``min_secs`` of speech while the bot talks."""

    def __init__(self, min_secs: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._min_secs = max(0.0, min_secs)
        self._bot_speaking = False
        # Seconds of caller speech heard over the bot, or None when none is pending.
        self._pending: float | None = None

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        """Track the bot's speech and the caller's; start the turn when it counts."""
        if isinstance(frame, InputAudioRawFrame):
            if self._pending is None:
                return ProcessFrameResult.CONTINUE
            self._pending += len(frame.audio) / (2 * frame.sample_rate * frame.num_channels)
            if self._pending >= self._min_secs:
                return await self._start()
        elif isinstance(frame, CallerSpeechFrame):
            if self._pending is None:
                return ProcessFrameResult.CONTINUE
            self._pending += frame.secs
            if self._pending >= self._min_secs:
                return await self._start()
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            # The VAD already heard its start_secs of speech before saying so.
            if not self._bot_speaking or frame.start_secs >= self._min_secs:
                return await self._start()
            self._pending = frame.start_secs
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._pending = None  # too short to be a barge-in
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
            if self._pending is not None:
                return await self._start()  # the caller is still talking: it is their turn
        return ProcessFrameResult.CONTINUE

    async def _start(self) -> ProcessFrameResult:
        self._pending = None
        await self.trigger_user_turn_started()
        return ProcessFrameResult.STOP
