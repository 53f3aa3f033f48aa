"""Speak the first clause of a reply as soon as it exists.

Pipecat's TTS waits for a whole sentence before synthesizing. With a slow local
LLM (~37 tokens/s) the first sentence alone costs ~0.5-0.8 s; its first clause
("Sure, ...", "We open at nine, ...") is there much earlier. This aggregator
releases the first clause of each response once it has a few words, then
falls back to sentences (clause-sized chunks sound choppy when they keep coming).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pipecat.utils.text.base_text_aggregator import Aggregation, TextType
from pipecat.utils.text.simple_text_aggregator import SimpleTextAggregator

CLAUSE_MARKS = frozenset(",;:")


class FirstClauseAggregator(SimpleTextAggregator):
    """Sentence aggregation, except the first clause of a response goes out alone."""

    def __init__(self, min_words: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._min_words = min_words
        self._first_done = False

    async def aggregate(self, text: str) -> AsyncIterator[Aggregation]:
        if self._first_done:
            async for agg in super().aggregate(text):
                yield agg
            return
        for i, char in enumerate(text):
            if self._first_done:
                async for agg in super().aggregate(text[i:]):
                    yield agg
                return
            async for agg in super().aggregate(char):
                self._first_done = True
                yield agg
            # A clause mark counts only when a space follows ("10:00" and "1,000" don't).
            if (
                not self._first_done
                and char == " "
                and len(self._text) >= 2
                and self._text[-2] in CLAUSE_MARKS
                and len(self._text.split()) >= self._min_words
            ):
                clause = self._text.strip(" ")
                self._text = ""
                self._first_done = True
                yield Aggregation(text=clause, type=TextType.SENTENCE)

    async def flush(self) -> Aggregation | None:
        self._first_done = False
        return await super().flush()

    async def handle_interruption(self) -> None:
        self._first_done = False
        await super().handle_interruption()

    async def reset(self) -> None:
        self._first_done = False
        await super().reset()
