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
class PlaybackFinishedFrame(SystemFrame):
    """A playback fact: how far one utterance's audio got at the far end.

    The output transport only reports facts (what was played, for how long,
    whether it was cut) - LiveKit's ``playback_position`` / ``interrupted``
    model. Turning seconds into the words the caller heard, and editing the
    conversation context, is a processor's job
    (:class:`~pipeswitch.processors.heard_context.HeardContextProcessor`).

    Pushed downstream when a sentence's audio has all been written, and just
    before the :class:`~pipecat.frames.frames.InterruptionFrame` passes the
    output transport when playback is cut by a barge-in.
    """

    # The utterance's text (a TTS sentence, or the greeting).
    text: str = ""
    # Seconds of its audio the caller heard (written minus what the far end dropped).
    playback_position: float = 0.0
    # Seconds of its audio written to the socket.
    duration: float = 0.0
    interrupted: bool = False
    # Played by the transport outside the pipeline (the cached greeting): Pipecat's
    # assistant aggregator never saw its text.
    outside_pipeline: bool = False


@dataclass
class CallerSpeechFrame(SystemFrame):
    """Caller speech that bypassed the pipeline: ``secs`` more of it, while the VAD hears speech.

    With the media fast path (:class:`~pipeswitch.transports.transport.CallerMediaSink`)
    caller audio never travels the pipeline; processors that measured speech by
    counting audio frames (the barge-in rule) count these instead - a few per
    second, and only while the caller is speaking.
    """

    secs: float = 0.0
