"""What the emulated caller says and what the emulated providers answer.

The provider emulators run in their own process and take their scripts by
import path (``bench.scenario:stt_line`` …), so this module is imported there.

* Every caller utterance is "recognised" as ``Question <n> …`` with ``n`` unique
  across the whole emulator process, so the bench can tie a transcript, the LLM
  request that carried it and the server's record of the call together exactly.
* Replies: ``reply_unique`` starts with a short sentence no earlier turn had
  (Piper must synthesize it: a real TTS time-to-first-byte on the critical
  path) followed by fixed sentences (cached by Piper after their first use);
  ``reply_fixed`` is the same text every time (Piper answers from its cache, so
  the bench measures the media server, like the baseline's fake TTS).

The caller's questions themselves are real speech, synthesized once with Piper
(:mod:`bench.caller_speech`); their words do not matter to the emulators, which
detect speech by energy.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from pipeswitch.bench.emulators.openai_chat import last_user_text

# Spoken by the emulated caller (synthesized with Piper). No commas: a comma pause
# can split a question into two utterances, which is a different test.
QUESTIONS: tuple[str, ...] = (
    "What are your opening hours on Saturday?",
    "Can I book an appointment for next Tuesday?",
    "Where exactly is your office located?",
    "Do you have parking near the building?",
)
BARGE_IN = "Hold on can you repeat that please?"

_WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
)
# After the first sentence: the same every turn, so Piper synthesizes it once.
REPLY_REST = "We are open nine to five, Monday to Friday. Is there anything else?"
REPLY_FIXED_FIRST = "Sure, thanks for asking."

_utterances = itertools.count(1)
_QUESTION_RE = re.compile(r"question\s+(\d+)", re.IGNORECASE)


def stt_line(turn: int) -> str:
    """Deepgram emulator script: the transcript of the next utterance (unique number)."""
    return f"Question {next(_utterances)} about the opening hours?"


def question_number(text: str) -> int | None:
    """The ``n`` of ``Question <n>`` in a transcript (the last one, if several)."""
    found = _QUESTION_RE.findall(text)
    return int(found[-1]) if found else None


def unique_first_sentence(n: int) -> str:
    """A short first sentence that repeats only every 400 turns (Piper's LRU holds 64)."""
    a, b = _WORDS[(n // len(_WORDS)) % len(_WORDS)], _WORDS[n % len(_WORDS)]
    return f"Sure, {a} {b}."


def reply_unique(messages: list[dict[str, Any]]) -> str:
    """Chat emulator script: a fresh first sentence, then the fixed rest."""
    n = question_number(last_user_text(messages)) or len(messages)
    return f"{unique_first_sentence(n)} {REPLY_REST}"


def reply_fixed(messages: list[dict[str, Any]]) -> str:
    """Chat emulator script: the same reply every time (all Piper cache hits)."""
    return f"{REPLY_FIXED_FIRST} {REPLY_REST}"


def first_sentence(text: str) -> str:
    """The first sentence of a reply, as Pipecat's sentence aggregator would cut it."""
    m = re.search(r"[.?!](\s|$)", text)
    return text[: m.end()].strip() if m else text


REPLY_SCRIPTS = {"unique": "bench.scenario:reply_unique", "fixed": "bench.scenario:reply_fixed"}
STT_SCRIPT = "bench.scenario:stt_line"
