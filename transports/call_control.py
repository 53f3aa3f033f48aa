"""What a call can ask FreeSWITCH to do, and the call events it can hear back.

mod_audio_stream carries audio only: stopping playback, playing a file, hanging
up, transferring, sending DTMF and learning about DTMF / hangup / bridge all go
over FreeSWITCH's Event Socket (protocol doc §8-9). This module is the seam:
pipelines, processors and tools code against :class:`CallControl`; the ESL
client (:mod:`pipeswitch.transports.esl`) implements it, and so can anything
else that reaches a switch (a test double must still speak real ESL: use the
emulator in ``bench/fakeswitch/esl.py``).

Every method fails fast with :class:`CallControlUnavailable` while the switch
is unreachable, so a call degrades (no playback control, no transfer) instead
of blocking its audio.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = [
    "EVENT_BACKGROUND_JOB",
    "EVENT_CHANNEL_BRIDGE",
    "EVENT_CHANNEL_HANGUP",
    "EVENT_CHANNEL_HANGUP_COMPLETE",
    "EVENT_CHANNEL_UNBRIDGE",
    "EVENT_CUSTOM",
    "EVENT_DTMF",
    "MAS_CONNECT",
    "MAS_DISCONNECT",
    "MAS_ERROR",
    "MAS_JSON",
    "MAS_PLAY",
    "MAS_SUBCLASSES",
    "CallControl",
    "CallControlError",
    "CallControlUnavailable",
    "CallEvent",
    "CallEventCallback",
    "CommandFailed",
    "Unsubscribe",
]

EVENT_DTMF = "DTMF"
# Fired when the hangup starts, before media bugs are closed: a module stuck in its
# cleanup (the voxcom deadlock) never lets CHANNEL_HANGUP_COMPLETE follow.
EVENT_CHANNEL_HANGUP = "CHANNEL_HANGUP"
EVENT_CHANNEL_HANGUP_COMPLETE = "CHANNEL_HANGUP_COMPLETE"
EVENT_CHANNEL_BRIDGE = "CHANNEL_BRIDGE"
EVENT_CHANNEL_UNBRIDGE = "CHANNEL_UNBRIDGE"
EVENT_CUSTOM = "CUSTOM"
EVENT_BACKGROUND_JOB = "BACKGROUND_JOB"

# mod_audio_stream's CUSTOM subclasses (mod_audio_stream.h; protocol doc §6).
MAS_CONNECT = "mod_audio_stream::connect"
MAS_DISCONNECT = "mod_audio_stream::disconnect"
MAS_ERROR = "mod_audio_stream::error"
MAS_JSON = "mod_audio_stream::json"
MAS_PLAY = "mod_audio_stream::play"
MAS_SUBCLASSES = (MAS_CONNECT, MAS_DISCONNECT, MAS_ERROR, MAS_JSON, MAS_PLAY)


class CallControlError(RuntimeError):
    """A call-control request could not be carried out."""


class CallControlUnavailable(CallControlError):
    """The switch is not reachable right now (ESL down or reconnecting); fail fast."""


class CommandFailed(CallControlError):
    """FreeSWITCH answered ``-ERR ...`` (no such channel, bad arguments, ...)."""

    def __init__(self, command: str, reply: str) -> None:
        super().__init__(f"{command.split(' ', 1)[0]} failed: {reply}")
        self.command = command
        self.reply = reply


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One FreeSWITCH event about one call, headers already URL-decoded.

    ``name`` is ``Event-Name`` (``DTMF``, ``CHANNEL_HANGUP_COMPLETE``, ``CUSTOM``...),
    ``subclass`` the ``Event-Subclass`` of CUSTOM events
    (``mod_audio_stream::play``...), ``body`` the event body (JSON text for
    mod_audio_stream events), ``t`` the ``time.monotonic()`` it was received.
    """

    name: str
    call_uuid: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = ""
    subclass: str | None = None
    t: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> str:
        """The subclass for CUSTOM events, else the event name."""
        return self.subclass or self.name

    @property
    def dtmf_digit(self) -> str | None:
        """``DTMF-Digit`` of a DTMF event."""
        return self.headers.get("DTMF-Digit") if self.name == EVENT_DTMF else None

    @property
    def hangup_cause(self) -> str | None:
        """``Hangup-Cause`` of a hangup event (``NORMAL_CLEARING``...)."""
        return self.headers.get("Hangup-Cause")


CallEventCallback = Callable[[CallEvent], Awaitable[None] | None]
Unsubscribe = Callable[[], None]


@runtime_checkable
class CallControl(Protocol):
    """Out-of-band control of calls on one FreeSWITCH (one shared ESL connection).

    Satisfies :class:`pipeswitch.transports.transport.PlaybackControl`. Methods
    raise :class:`CallControlUnavailable` at once when the switch is unreachable
    and :class:`CommandFailed` when it refuses. None of them blocks on a
    FreeSWITCH application: commands that may take time go through ``bgapi``.
    """

    @property
    def connected(self) -> bool:
        """Whether commands can be sent right now."""
        ...

    async def break_playback(self, call_uuid: str) -> None:
        """``uuid_break <uuid> all``: stop the current file and drop queued ones (~25 ms)."""
        ...

    async def play_file(self, call_uuid: str, path: str) -> None:
        """``sendmsg <uuid>`` execute ``playback <path>`` with ``event-lock: true``.

        Files queue in order and play gaplessly (~60 ms to first audio, doc §14);
        returns once FreeSWITCH accepted the message, not when playback ends.
        """
        ...

    async def hangup(self, call_uuid: str, cause: str = "NORMAL_CLEARING") -> None:
        """``uuid_kill <uuid> <cause>``."""
        ...

    async def transfer(
        self,
        call_uuid: str,
        destination: str,
        dialplan: str = "XML",
        context: str = "default",
        *,
        hand_over: bool = True,
    ) -> None:
        """``uuid_transfer <uuid> <destination> <dialplan> <context>``.

        ``hand_over=False``: the caller comes back to the agent (the call stays ours).
        """
        ...

    async def send_dtmf(self, call_uuid: str, digits: str) -> None:
        """``uuid_send_dtmf <uuid> <digits>`` (to the far end of the call)."""
        ...

    async def sendmsg(
        self, call_uuid: str, headers: Mapping[str, str], body: str | None = None
    ) -> None:
        """A raw ``sendmsg <uuid>`` (``call-command: execute|unicast|hangup``...)."""
        ...

    async def api(self, cmd: str) -> str:
        """A synchronous ``api <cmd>``; returns the reply body. Only for quick commands."""
        ...

    async def bgapi(self, cmd: str) -> str:
        """``bgapi <cmd>``; waits (without blocking the connection) for its
        ``BACKGROUND_JOB`` and returns the job's result body."""
        ...

    def subscribe(self, call_uuid: str, callback: CallEventCallback) -> Unsubscribe:
        """Deliver this call's events (DTMF, hangup, bridge/unbridge,
        ``CUSTOM mod_audio_stream::*``) to ``callback``; returns an unsubscribe."""
        ...
