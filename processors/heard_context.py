"""Keep in the LLM context only what the caller actually heard.

Pipecat's assistant aggregator adds whole sentences once their audio has been
written; a sentence cut off by a barge-in is dropped entirely, so the model
forgets it had started answering. The output transport reports playback facts
(:class:`~pipeswitch.transports.frames.PlaybackFinishedFrame`: which utterance,
how many seconds of it were heard, interrupted or not); this processor, placed
after the assistant aggregator, turns the heard seconds of a cut sentence into
its heard words - at the speaking rate measured on this call's own finished
sentences - and appends them to the assistant's turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipecat.frames.frames import Frame, InterruptionFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipeswitch.transports.frames import PlaybackFinishedFrame

# Speaking rate used to place a cut inside a sentence until the call has measured its own
# (Piper's voices speak 14-17 characters a second at their default length scale).
DEFAULT_CHARS_PER_SEC = 16.0
# Sentences shorter than this say little about the speaking rate (pauses dominate).
_MIN_RATE_SAMPLE_SECS = 0.3
# Seconds of finished speech before the measured rate replaces the default.
_MIN_RATE_TOTAL_SECS = 1.0
# A sentence that played out with less than this share of the audio its text needs at the
# call's speaking rate was cut short at the source (a TTS stream that broke and could not
# be resumed): only its start was heard. Piper's own pauses only lengthen a sentence.
TRUNCATED_RATIO = 0.5
# Too short a sentence to tell a cut from a fast one.
_MIN_TRUNCATED_EXPECTED_SECS = 0.8
# Cut sentences waiting for the assistant aggregator to write them (it may do so later).
_MAX_PENDING_CUTS = 8


def heard_prefix(sentence: str, heard_secs: float, chars_per_sec: float) -> str:
    """The words of ``sentence`` spoken in ``heard_secs`` (whole words only)."""
    n = int(heard_secs * chars_per_sec)
    if n <= 0:
        return ""
    if n >= len(sentence):
        return sentence
    cut = sentence.rfind(" ", 0, n + 1)
    return sentence[:cut].rstrip(" ,;:") if cut > 0 else ""


@dataclass(frozen=True, slots=True)
class Interruption:
    """A barge-in cut the bot: what it was saying, and what of it the caller heard.

    ``index`` is the position, in the context's messages, of the assistant message
    that ends with ``heard`` (call records mark that turn as interrupted).
    """

    index: int
    sentence: str
    heard: str


class SpeakingRate:
    """Characters per second of this call's bot speech, from finished sentences."""

    __slots__ = ("_chars", "_secs")

    def __init__(self) -> None:
        self._chars = 0
        self._secs = 0.0

    def add(self, text: str, secs: float) -> None:
        """Count one sentence that played to its end."""
        if text and secs > _MIN_RATE_SAMPLE_SECS:
            self._chars += len(text)
            self._secs += secs

    @property
    def chars_per_sec(self) -> float:
        """The measured rate, or the default until enough speech was measured."""
        if self._secs > _MIN_RATE_TOTAL_SECS:
            return self._chars / self._secs
        return DEFAULT_CHARS_PER_SEC


class HeardContextProcessor(FrameProcessor):
    """Appends the heard part of an interrupted utterance to the context."""

    def __init__(self, context: LLMContext, **kwargs: Any) -> None:
        # Direct mode: every bot frame crosses here, and nothing here waits; frames run
        # through in the output transport's task instead of a queue and a task of our own.
        kwargs.setdefault("enable_direct_mode", True)
        super().__init__(**kwargs)
        self._context = context
        self._rate = SpeakingRate()
        self._pending = ""
        self._pending_sentence = ""
        self.interruptions: list[Interruption] = []
        # (sentence, heard words) of sentences the TTS cut short, until found in the context.
        self._cuts: list[tuple[str, str]] = []
        self.truncations = 0

    @property
    def chars_per_sec(self) -> float:
        """This call's measured speaking rate (for tests and logs)."""
        return self._rate.chars_per_sec

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, PlaybackFinishedFrame):
            self._on_playback(frame)
            if self._cuts:
                self._apply_cuts()
            return  # consumed: nothing after us needs it
        if self._cuts:
            self._apply_cuts()  # the aggregator may have written the cut sentence by now
        if isinstance(frame, InterruptionFrame) and self._pending_sentence:
            # The aggregator has already written the whole sentences of this turn.
            if self._pending:
                self.append_heard(self._pending)
            self.interruptions.append(
                Interruption(
                    # Nothing heard: the cut sentence has no message of its own.
                    index=len(self._context.get_messages()) - 1 if self._pending else -1,
                    sentence=self._pending_sentence,
                    heard=self._pending,
                )
            )
            self._pending = self._pending_sentence = ""
        await self.push_frame(frame, direction)

    def _on_playback(self, fact: PlaybackFinishedFrame) -> None:
        if not fact.interrupted and self._cut_short(fact):
            heard = heard_prefix(fact.text, fact.playback_position, self._rate.chars_per_sec)
            self._cuts = [*self._cuts[-(_MAX_PENDING_CUTS - 1) :], (fact.text, heard.strip())]
            self.truncations += 1
            return  # not a speaking-rate sample either
        if not fact.interrupted:
            self._rate.add(fact.text, fact.duration)
            if fact.outside_pipeline and fact.text:
                # Played outside the pipeline: the assistant aggregator never saw it.
                self._context.add_message({"role": "assistant", "content": fact.text})
            return
        self._pending = heard_prefix(
            fact.text, fact.playback_position, self._rate.chars_per_sec
        ).strip()
        self._pending_sentence = fact.text

    def _cut_short(self, fact: PlaybackFinishedFrame) -> bool:
        """Whether a sentence that was not interrupted still played only its start."""
        if fact.outside_pipeline or not fact.text:
            return False
        expected = len(fact.text) / self._rate.chars_per_sec
        return expected >= _MIN_TRUNCATED_EXPECTED_SECS and fact.duration < TRUNCATED_RATIO * (
            expected
        )

    def _apply_cuts(self) -> None:
        """Replace each cut sentence, in the latest assistant message that holds it, by the
        words heard. Pipecat's aggregator writes whole sentences, possibly after the fact."""
        messages = self._context.get_messages()
        for msg in reversed(messages[-4:]):
            if not (isinstance(msg, dict) and msg.get("role") == "assistant"):
                continue
            content = msg.get("content")
            if not isinstance(content, str):
                continue
            left = []
            for sentence, heard in self._cuts:
                at = content.rfind(sentence)
                if at < 0:
                    left.append((sentence, heard))
                    continue
                content = f"{content[:at]}{heard}{content[at + len(sentence) :]}"
            if len(left) < len(self._cuts):
                msg["content"] = " ".join(content.split())
                self._cuts = left
            if not self._cuts:
                return

    def append_heard(self, text: str) -> None:
        """Extend this turn's assistant message, or add one if none was written."""
        messages = self._context.get_messages()
        last = messages[-1] if messages else None
        if (
            isinstance(last, dict)
            and last.get("role") == "assistant"
            and isinstance(last.get("content"), str)
        ):
            last["content"] = f"{last['content']} {text}".strip()
        else:
            self._context.add_message({"role": "assistant", "content": text})
