"""One call bound to the switch's event socket: playback, DTMF, hangup.

Per call, :class:`CallEventBridge` subscribes to that call's events on the
process's shared :class:`~pipeswitch.transports.call_control.CallControl` and

* plays each ``mod_audio_stream::play`` file of the ``file`` dialect with
  ``sendmsg <uuid> execute playback`` (``event-lock: true``), in order, so the
  community build is heard (gapless, ~60 ms to first audio; doc §14);
* stops playback on barge-in with ``uuid_break <uuid> all`` and drops the
  ``::play`` events of audio sent before the break that arrive after it (they
  would otherwise restart the interrupted reply);
* pushes each ``DTMF`` as an ``InputDTMFFrame`` through the call's input
  transport (the same path as DTMF relayed over the socket);
* ends the call at once on ``CHANNEL_HANGUP_COMPLETE``, even when the
  WebSocket lingers;
* when the bot ended the call (the pipeline finished and the goodbye played
  out), hangs the channel up with ``uuid_kill`` - closing the stream alone
  would leave the caller parked in silence.

Everything is fail-soft: with the switch unreachable a call keeps its audio
and loses only these controls.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry

from pipeswitch.transports.call_control import (
    EVENT_CHANNEL_BRIDGE,
    EVENT_CHANNEL_HANGUP,
    EVENT_CHANNEL_HANGUP_COMPLETE,
    EVENT_CHANNEL_UNBRIDGE,
    EVENT_DTMF,
    MAS_DISCONNECT,
    MAS_ERROR,
    MAS_PLAY,
    CallControl,
    CallControlError,
    CallEvent,
)

if TYPE_CHECKING:
    from pipeswitch.transports.transport import FreeSwitchCallTransport

__all__ = ["CallEventBridge", "DtmfDeduplicator", "keypad_entry"]

# ESL playback starts ~60 ms after the message was sent: the last file of a goodbye
# needs that much longer than the transport's own drain estimate before uuid_kill.
FILE_PLAYBACK_MARGIN_SECS = 0.25
_KEYS = {e.value: e for e in KeypadEntry}


def keypad_entry(digit: str) -> KeypadEntry | None:
    """The keypad entry for ``digit`` (0-9, *, #), None for anything else (A-D, garbage)."""
    return _KEYS.get(digit)


class DtmfDeduplicator:
    """Accepts each key press once when two sources report it.

    A dialplan may relay DTMF over the socket (``send_text {"event":"dtmf",…}``)
    while ESL reports the same press as a ``DTMF`` event.

    A press seen from one source is a duplicate when the same digit arrives from
    another source within ``window_secs``; repeats from the same source are real
    presses ("00") and always pass.
    """

    def __init__(self, window_secs: float = 0.5) -> None:
        self.window_secs = window_secs
        self._recent: list[tuple[float, str, str]] = []  # (t, digit, source)

    def accept(self, digit: str, source: str, now: float | None = None) -> bool:
        """Whether this report is a new press (and remember it)."""
        t = time.monotonic() if now is None else now
        self._recent = [r for r in self._recent if t - r[0] <= self.window_secs]
        for i, (_, d, src) in enumerate(self._recent):
            if d == digit and src != source:
                del self._recent[i]  # one report pairs with one press
                return False
        self._recent.append((t, digit, source))
        return True


class CallEventBridge:
    """The link between one call's transport and the switch's event socket.

    Implements :class:`~pipeswitch.transports.transport.PlaybackControl`, so it is
    installed as the transport's ``playback_control`` (per call: it knows which
    ``::play`` files are stale after a break).
    """

    def __init__(self, control: CallControl, transport: FreeSwitchCallTransport) -> None:
        self.control = control
        self.transport = transport
        self.call_uuid = transport.call.call_uuid
        self.file_playback = transport.serializer.needs_playback_control
        self.log = logger.bind(call=self.call_uuid)
        self.caller_gone = False
        self.transferred = False
        self.bridged_to: str | None = None
        self.played: list[str] = []
        self.dropped_stale = 0
        self._drop_below = -1
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._player: asyncio.Task[None] | None = None
        self._digits: asyncio.Queue[str] = asyncio.Queue()
        self._dtmf_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: Any = None
        self._warned = False

    def attach(self) -> CallEventBridge:
        """Subscribe to the call's events and take over its playback control."""
        self._unsubscribe = self.control.subscribe(self.call_uuid, self._on_event)
        self.transport.playback_control = self
        return self

    # -- PlaybackControl -------------------------------------------------------------------

    async def break_playback(self, call_uuid: str) -> None:
        """Barge-in: forget queued files, drop stale ``::play`` events, ``uuid_break all``."""
        self._drop_below = self.transport.serializer.next_play_seq
        while not self._queue.empty():
            self._queue.get_nowait()
        await self.control.break_playback(call_uuid)

    # -- events ----------------------------------------------------------------------------

    def _on_event(self, ev: CallEvent) -> None:
        kind = ev.kind
        if kind == MAS_PLAY:
            if self.file_playback:
                self._on_play(ev.body)
        elif ev.name == EVENT_DTMF:
            self._digits.put_nowait(ev.dtmf_digit or "")
            if self._dtmf_task is None:  # one consumer keeps the digits in order
                self._dtmf_task = asyncio.ensure_future(self._dtmf_loop())
        elif ev.name in (EVENT_CHANNEL_HANGUP, EVENT_CHANNEL_HANGUP_COMPLETE):
            # The first of the two ends the call: on a real switch a voxcom channel stuck
            # in its media-bug cleanup fires CHANNEL_HANGUP and never the COMPLETE.
            if self.caller_gone:
                return
            self.caller_gone = True
            cause = ev.hangup_cause or "UNKNOWN"
            self.log.info("channel hung up ({}); ending the call", cause)
            self._spawn(self.transport.hung_up(f"channel hung up: {cause}"))
        elif ev.name == EVENT_CHANNEL_BRIDGE:
            self.bridged_to = ev.headers.get("Other-Leg-Unique-ID") or "?"
            self.log.info("channel bridged to {}", self.bridged_to)
        elif ev.name == EVENT_CHANNEL_UNBRIDGE:
            self.log.info("channel unbridged from {}", self.bridged_to)
            self.bridged_to = None
        elif kind in (MAS_DISCONNECT, MAS_ERROR):
            self.log.info("{}: {}", kind, ev.body[:200])

    async def _dtmf_loop(self) -> None:
        while True:
            digit = await self._digits.get()
            try:
                await self.transport.input().push_dtmf(digit, "esl")
            except Exception as exc:
                self.log.warning("DTMF {!r} not delivered: {}", digit[:4], exc)

    def _on_play(self, body: str) -> None:
        try:
            data = json.loads(body)
            path = data["file"]
            if not isinstance(path, str) or not path:
                raise ValueError("no file")
        except (ValueError, KeyError, TypeError) as exc:
            self.log.warning("mod_audio_stream::play without a usable file ({}); skipped", exc)
            return
        seq = data.get("seq")
        if isinstance(seq, int) and seq < self._drop_below:
            self.dropped_stale += 1
            return  # audio sent before the last barge-in
        self._queue.put_nowait(path)
        if self._player is None:
            self._player = asyncio.ensure_future(self._play_loop())

    async def _play_loop(self) -> None:
        """One sendmsg at a time, in event order (FreeSWITCH queues them gaplessly)."""
        while True:
            path = await self._queue.get()
            try:
                await self.control.play_file(self.call_uuid, path)
                self.played.append(path)
            except (CallControlError, ValueError) as exc:
                if not self._warned:
                    self._warned = True
                    self.log.warning("cannot play bot audio over ESL: {}", exc)

    def _spawn(self, coro: Any) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                self.log.warning("call event handling failed: {}", exc)

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the call ends ---------------------------------------------------------------------

    async def finish(self) -> None:
        """The call is over on our side: unsubscribe; hang up if the bot ended it."""
        # A call transferred through the shared client is someone else's now.
        handed_over: set[str] = getattr(self.control, "handed_over", set())
        self.transferred = self.transferred or self.call_uuid in handed_over
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for task in (self._player, self._dtmf_task):
            if task is not None:
                task.cancel()
        self._player = self._dtmf_task = None
        for task in list(self._tasks):
            task.cancel()
        if self.transport.ended_by_bot and not (self.caller_gone or self.transferred):
            if self.file_playback:
                await asyncio.sleep(FILE_PLAYBACK_MARGIN_SECS)
            try:
                await self.control.hangup(self.call_uuid)
                self.log.info("bot ended the call: channel hung up")
            except CallControlError as exc:
                self.log.warning("could not hang the channel up: {}", exc)
