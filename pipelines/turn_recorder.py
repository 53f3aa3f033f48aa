"""One call's transcript as turns, for the call record: who spoke, what was said, what the
caller actually heard of the bot, when, how long the bot took to answer, and whether the caller
cut it off.

A Pipecat observer (it only looks at frames, it never delays one): caller turns from the STT's
final transcripts between the user's speaking frames, bot turns from the output transport's
playback facts (:class:`~pipeswitch.transports.frames.PlaybackFinishedFrame`: each sentence's
text, seconds heard, interrupted), between the bot's speaking frames. Wall-clock timestamps.
"""

from __future__ import annotations

import time
from typing import Any

from pipecat.frames.frames import (
    AggregatedTextFrame,
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed

from pipeswitch.processors.heard_context import SpeakingRate, heard_prefix
from pipeswitch.transports.frames import PlaybackFinishedFrame

Turn = dict[str, Any]


class TurnRecorder(BaseObserver):
    """Collects the call's turns (``turns``) as plain dicts for the record writer."""

    _TYPES = (
        AggregatedTextFrame,
        TranscriptionFrame,
        PlaybackFinishedFrame,
        BotStartedSpeakingFrame,
        BotStoppedSpeakingFrame,
        UserStartedSpeakingFrame,
        UserStoppedSpeakingFrame,
        VADUserStartedSpeakingFrame,
        VADUserStoppedSpeakingFrame,
    )

    def __init__(self, clock: Any = time.time, **kwargs: Any) -> None:
        super().__init__(observe_every_push=False, **kwargs)
        self._clock = clock
        self._rate = SpeakingRate()
        self._done: list[Turn] = []
        self._user: Turn | None = None
        self._bot: Turn | None = None
        self._user_stopped_at: float | None = None

    @property
    def turns(self) -> list[Turn]:
        """Every turn so far in time order; a bot turn cut by the hangup keeps the text it was
        about to say (not heard, so marked interrupted)."""
        out = list(self._done)
        if self._user is not None:
            out.append(self._user)
        if self._bot is not None:
            out.append(self._finished_bot(self._bot))
        out = [t for t in out if t["text"].strip()]
        return sorted(out, key=lambda t: t["started_at"])

    @staticmethod
    def _finished_bot(bot: Turn) -> Turn:
        turn = {k: v for k, v in bot.items() if k not in ("pending", "after")}
        if bot["pending"]:
            turn["text"] = " ".join([bot["text"], *bot["pending"]]).strip()
            turn["interrupted"] = True
        return turn

    def _close_user(self) -> None:
        if self._user is not None:
            if self._user["text"].strip():
                self._done.append(self._user)
            self._user = None

    def _close_bot(self, now: float) -> None:
        if self._bot is not None:
            self._bot["ended_at"] = self._bot.get("ended_at") or now
            turn = self._finished_bot(self._bot)
            if turn["text"].strip():
                self._done.append(turn)
            self._bot = None

    def _open_user(self, now: float) -> Turn:
        if self._user is None:
            self._user = {"role": "user", "text": "", "started_at": now, "ended_at": None}
        return self._user

    def _reply(self, now: float) -> Turn:
        """The bot turn being spoken: a new one when the caller has said something since."""
        if self._user is not None and self._user["text"].strip():
            self._close_bot(now)
            stopped = self._user_stopped_at or now
            self._close_user()
            self._bot = self._new_bot(now, stopped)
        elif self._bot is None:
            self._bot = self._new_bot(now, None)
        return self._bot

    @staticmethod
    def _new_bot(now: float, after: float | None) -> Turn:
        """A bot turn; ``after``: when the caller stopped speaking, if it answers them."""
        return {
            "role": "assistant",
            "text": "",
            "heard_text": "",
            "started_at": now,
            "ended_at": None,
            "latency_ms": None,
            "interrupted": False,
            "pending": [],
            "after": after,
        }

    def _heard(self, frame: PlaybackFinishedFrame) -> str:
        if frame.interrupted:
            return heard_prefix(frame.text, frame.playback_position, self._rate.chars_per_sec)
        self._rate.add(frame.text, frame.duration)
        return frame.text

    async def on_push_frame(self, data: FramePushed) -> None:
        frame = data.frame
        if not isinstance(frame, self._TYPES):
            return
        now = self._clock()
        if isinstance(frame, UserStartedSpeakingFrame | VADUserStartedSpeakingFrame):
            self._open_user(now)
        elif isinstance(frame, TranscriptionFrame):
            if frame.text.strip():
                turn = self._open_user(now)
                turn["text"] = f"{turn['text']} {frame.text.strip()}".strip()
        elif isinstance(frame, UserStoppedSpeakingFrame | VADUserStoppedSpeakingFrame):
            if self._user is not None:
                self._user["ended_at"] = now
                self._user_stopped_at = now
        elif isinstance(frame, AggregatedTextFrame):
            # The sentence the TTS is about to say (its word-timed TTSTextFrames, a subclass,
            # would count it twice).
            if type(frame) is AggregatedTextFrame and frame.will_be_spoken and frame.text.strip():
                self._reply(now)["pending"].append(frame.text.strip())
        elif isinstance(frame, BotStartedSpeakingFrame):
            bot = self._reply(now)
            if bot["latency_ms"] is None and bot["after"] is not None:
                # Caller stopped speaking -> the answer's first audio, as the caller hears it.
                bot["latency_ms"] = round(max(0.0, now - bot["after"]) * 1000.0, 1)
        elif isinstance(frame, PlaybackFinishedFrame):
            heard = self._heard(frame)
            if frame.outside_pipeline:
                # The greeting, played by the transport before the pipeline ran: a turn of
                # its own, which started when its audio did.
                self._done.append(
                    {
                        "role": "assistant",
                        "text": frame.text,
                        "heard_text": heard,
                        "started_at": now - frame.playback_position,
                        "ended_at": now,
                        "latency_ms": None,
                        "interrupted": frame.interrupted,
                    }
                )
                return
            bot = self._reply(now)
            bot["pending"] = [p for p in bot["pending"] if p != frame.text.strip()]
            bot["text"] = f"{bot['text']} {frame.text.strip()}".strip()
            bot["heard_text"] = f"{bot['heard_text']} {heard.strip()}".strip()
            if frame.interrupted:
                bot["interrupted"] = True
                bot["ended_at"] = now
                bot["pending"].clear()  # what was still queued was never said
                self._close_bot(now)
        elif (
            isinstance(frame, BotStoppedSpeakingFrame)
            and self._bot is not None
            and not self._bot["pending"]  # more of the reply is still to be played
        ):
            self._bot["ended_at"] = now
            self._close_bot(now)
