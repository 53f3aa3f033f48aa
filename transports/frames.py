"""Frames the FreeSWITCH transport adds to Pipecat's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipecat.frames.frames import SystemFrame


@dataclass
class CallMetadataFrame(SystemFrame):
    """The mod_audio_stream metadata TEXT frame (the ``start`` command's tail).

    ``data`` is the parsed JSON object, or None when the text is not JSON; the
    raw text is kept either way because the module passes arbitrary text.
    """

    text: str = ""
    data: dict[str, Any] | None = field(default=None)


@dataclass
class PlaybackInterruptedFrame(SystemFrame):
    """Playback was stopped mid-sentence: what of that sentence the caller heard.

    Pushed downstream by the output transport just before the InterruptionFrame,
    so the conversation context can keep the words that were actually played
    (Pipecat itself only keeps whole sentences whose audio was written).
    """

    heard_text: str = ""
    sentence: str = ""
    heard_secs: float = 0.0


@dataclass
class PromptPlayedFrame(SystemFrame):
    """A prompt played outside the pipeline (the greeting) reached the caller in full."""

    text: str = ""
