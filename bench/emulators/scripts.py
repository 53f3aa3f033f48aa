"""Named transcript and reply scripts for the emulators.

A separate emulator process can only be told *which* script to use, so scripts
are picked by name from these registries, or by an import path
``"package.module:attribute"`` for one defined elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipeswitch.bench.emulators.deepgram import DEFAULT_TRANSCRIPTS, TranscriptScript
from pipeswitch.bench.emulators.openai_chat import (
    ChatReply,
    ChatScript,
    ToolCall,
    default_reply,
    keyword_script,
)

LONG_REPLY = (
    "Of course, let me walk you through everything. Our main office is on Market Street, "
    "right next to the central library. We open at nine in the morning and close at five "
    "in the afternoon, Monday to Friday. On Saturdays a smaller team is in from ten until "
    "two. Parking is free for the first hour, and there is a bus stop just outside. "
    "Is there anything else I can help you with today?"
)


def _numbered(turn: int) -> str:
    return f"This is caller turn number {turn + 1}."


STT_SCRIPTS: dict[str, TranscriptScript] = {
    "generic": DEFAULT_TRANSCRIPTS,
    "office": (
        "Hi, what are your opening hours?",
        "Can I book an appointment for Tuesday morning?",
        "What is your address?",
        "Thank you, goodbye.",
    ),
    # Each transcript names its turn, so logs show which utterance produced what.
    "numbered": _numbered,
}


def _short(messages: list[dict[str, Any]]) -> ChatReply:
    return "Okay."


def _long(messages: list[dict[str, Any]]) -> ChatReply:
    return LONG_REPLY


LLM_SCRIPTS: dict[str, ChatScript] = {
    "default": default_reply,
    "office": keyword_script(
        {
            "hours": "We are open nine to five, Monday to Friday. Anything else?",
            "appointment": "Tuesday at ten is free. Shall I book it for you?",
            "address": "We are at 12 Market Street, next to the library. Anything else?",
            "goodbye": "Thanks for calling. Goodbye!",
        }
    ),
    "short": _short,
    # Long enough (~70 words, several sentences) to be barged into.
    "long": _long,
    "weather_tool": keyword_script(
        {"weather": ToolCall(name="get_weather", arguments={"location": "San Francisco"})}
    ),
}


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_stt_script(spec: str | Sequence[str] | Callable[[int], str] | None) -> TranscriptScript:
    """A transcript script from a name, an import path, literal lines or a callable."""
    if spec is None:
        return DEFAULT_TRANSCRIPTS
    if isinstance(spec, str):
        if ":" in spec:
            return _import(spec)
        if spec not in STT_SCRIPTS:
            raise KeyError(f"unknown STT script {spec!r}; known: {sorted(STT_SCRIPTS)}")
        return STT_SCRIPTS[spec]
    return spec


def resolve_llm_script(spec: str | ChatScript | None) -> ChatScript:
    """A reply script from a name, an import path, a keyword table or a callable."""
    if spec is None:
        return default_reply
    if isinstance(spec, str):
        if ":" in spec:
            return _import(spec)
        if spec not in LLM_SCRIPTS:
            raise KeyError(f"unknown LLM script {spec!r}; known: {sorted(LLM_SCRIPTS)}")
        return LLM_SCRIPTS[spec]
    if isinstance(spec, Mapping):
        return keyword_script(spec)
    return spec
