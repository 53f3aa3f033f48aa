"""What the emulator records: FreeSWITCH events, frames on the wire, the close.

Why: tests, the latency bench and the demo all read the same records; all
timestamps are ``time.monotonic()`` like the other Pipeswitch components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "ERR_CONNECT_FAILED",
    "ERR_IO",
    "ERR_NOT_SUPPORTED",
    "ERR_PROTOCOL",
    "ERR_TIMEOUT",
    "EVENT_CONNECT",
    "EVENT_DISCONNECT",
    "EVENT_ERROR",
    "EVENT_JSON",
    "EVENT_PLAY",
    "CloseRecord",
    "ReceivedAudio",
    "SentFrame",
    "StreamEvent",
    "WireMessage",
]

EVENT_CONNECT = "mod_audio_stream::connect"
EVENT_DISCONNECT = "mod_audio_stream::disconnect"
EVENT_ERROR = "mod_audio_stream::error"
EVENT_JSON = "mod_audio_stream::json"
EVENT_PLAY = "mod_audio_stream::play"

# libwsc ErrorCode values used in ::error events.
ERR_IO = 1
ERR_NOT_SUPPORTED = 4
ERR_CONNECT_FAILED = 6
ERR_TIMEOUT = 10
ERR_PROTOCOL = 11


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One ``CUSTOM`` event as FreeSWITCH fires it.

    ``raw`` is the exact event body; ``body`` is it parsed as JSON when it is
    JSON (any JSON value), else the raw text.
    """

    name: str
    raw: str
    body: Any
    t: float
    uuid: str

    @property
    def headers(self) -> dict[str, str]:
        """The event headers an ESL client would match on (subset)."""
        return {
            "Event-Name": "CUSTOM",
            "Event-Subclass": self.name,
            "Unique-ID": self.uuid,
            "Content-Length": str(len(self.raw.encode("utf-8"))),
        }


class SentFrame(NamedTuple):
    """One BINARY audio message put on the wire.

    ``voiced``: any caller frame in it had RMS above the threshold (from the
    source, not the mix). ``captured_at``: media-clock time of its newest frame.
    """

    t: float
    nbytes: int
    voiced: bool
    captured_at: float


class WireMessage(NamedTuple):
    """Any frame sent or received: time, opcode, payload bytes."""

    t: float
    opcode: int
    nbytes: int


class ReceivedAudio(NamedTuple):
    """Bot audio the emulated module accepted (streamAudio or fork binary).

    ``nbytes``: decoded audio at the stream rate (file bytes for mp3/ogg);
    ``non_silent``: peak above ``StreamConfig.non_silent_peak``.
    """

    t: float
    nbytes: int
    non_silent: bool
    kind: str


@dataclass(slots=True)
class CloseRecord:
    """How the WebSocket ended.

    ``initiator``: ``local`` (stop/hangup), ``server`` (server CLOSE first),
    ``protocol`` (libwsc rejected a frame), ``eof`` (server dropped TCP),
    ``connect`` (never opened).
    """

    initiator: str | None = None
    close_sent_at: float | None = None
    close_code_sent: int | None = None
    close_reason_sent: str | None = None
    server_close_at: float | None = None
    server_close_code: int | None = None
    server_close_reason: str | None = None
    server_eof_at: float | None = None
    tcp_closed_at: float | None = None

    @property
    def server_closed_tcp(self) -> bool:
        """The server closed TCP before the emulator gave up and closed it."""
        if self.server_eof_at is None:
            return False
        return self.tcp_closed_at is None or self.server_eof_at <= self.tcp_closed_at

    @property
    def server_eof_after_close_s(self) -> float | None:
        """Seconds from the first CLOSE on the wire to the server's EOF."""
        first = [t for t in (self.close_sent_at, self.server_close_at) if t is not None]
        if self.server_eof_at is None or not first:
            return None
        return self.server_eof_at - min(first)
