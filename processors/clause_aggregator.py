"""Speak the first clause of a reply as soon as it exists.

Pipecat's TTS waits for a whole sentence before synthesizing. With a slow local
LLM (~37 tokens/s) the first sentence alone costs ~0.5-0.8 s; its first clause
("Sure, ...", "We open at nine, ...") is there much earlier. This aggregator
releases the first clause of each response once it has a few words, then
falls back to sentences (clause-sized chunks sound choppy when they keep coming).

A first sentence with no clause mark ("I'm currently open from 11:00 AM to 12:00
PM.") kept a one-thread local LLM's caller waiting 1.3-1.9 s. When the first chunk
is still open ``max_wait_s`` after the response's first token, it goes out at the
next word boundary (not after a number: "11:00 | AM"). A cloud LLM finishes its
first sentence long before that, so its chunks are unchanged.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from pipecat.utils.text.base_text_aggregator import Aggregation, TextType
from pipecat.utils.text.simple_text_aggregator import SimpleTextAggregator

CLAUSE_MARKS = frozenset(",;:")
# The first chunk goes out at a word boundary once it has waited this long.
FIRST_CHUNK_MAX_WAIT_S = 0.35


class FirstClauseAggregator(SimpleTextAggregator):
    """Sentence aggregation, except the first clause of a response goes out alone."""

    def __init__(
        self, min_words: int = 3, max_wait_s: float = FIRST_CHUNK_MAX_WAIT_S, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._min_words = min_words
        self._max_wait_s = max_wait_s
        self._first_done = False
        self._first_at: float | None = None  # the response's first token

    async def aggregate(self, text: str) -> AsyncIterator[Aggregation]:
        if self._first_done:
            async for agg in super().aggregate(text):
                yield agg
            return
        if self._first_at is None:
            self._first_at = time.monotonic()
        late = time.monotonic() - self._first_at >= self._max_wait_s
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
                and (self._text[-2] in CLAUSE_MARKS or (late and self._word_break_ok()))
                and len(self._text.split()) >= self._min_words
            ):
                clause = self._text.strip(" ")
                self._text = ""
                self._first_done = True
                yield Aggregation(text=clause, type=TextType.SENTENCE)

    def _word_break_ok(self) -> bool:
        """A late first chunk may end at this space: not after a number ("11:00 | AM")."""
        words = self._text.split()
        return bool(words) and not any(c.isdigit() for c in words[-1])

    def _new_response(self) -> None:
        self._first_done = False
        self._first_at = None

    async def flush(self) -> Aggregation | None:
        self._new_response()
        return await super().flush()

    async def handle_interruption(self) -> None:
        self._new_response()
        await super().handle_interruption()

    async def reset(self) -> None:
        self._new_response()
        await super().reset()
