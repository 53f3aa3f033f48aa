"""Talk to an agent from the browser: a WebSocket that is a mod_audio_stream call.

The page streams the microphone as 16 kHz s16le 20 ms frames (binary messages), exactly what
the ``binary`` playback build of mod_audio_stream sends, and the server answers as it answers
that build: raw PCM frames and ``{"type":"clearAudio"}`` on barge-in. The socket is handed to
:meth:`CallServer.serve_call` - the same transport, serializer, tenant limits, pipeline and
call records as a phone call; only the authorization differs (the console session instead of
a signed URL) and the tenant's dialect is forced to ``binary`` at 16 kHz.

The page also gets a side channel on the same socket: JSON text messages with the caller's
transcript, what the bot said (and how much of it was heard when a barge-in cut it), and each
turn's latency measured by the same Pipecat observer that measures phone calls.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from aiohttp import web
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    InterruptionFrame,
    TranscriptionFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.observers.user_bot_latency_observer import UserBotLatencyObserver

from pipeswitch.config.tenants import Tenant
from pipeswitch.processors.heard_context import SpeakingRate, heard_prefix
from pipeswitch.transports.call_info import CallInfo
from pipeswitch.transports.frames import PlaybackFinishedFrame

Json = dict[str, Any]
BROWSER_RATE = 16000


class ConsoleFeed(BaseObserver):
    """One browser call's transcript and playback facts, pushed to its page as JSON."""

    _TYPES = (TranscriptionFrame, PlaybackFinishedFrame, InterruptionFrame, BotStartedSpeakingFrame)

    def __init__(self, ws: web.WebSocketResponse, **kwargs: Any) -> None:
        super().__init__(observe_every_push=False, **kwargs)
        self._ws = ws
        self._rate = SpeakingRate()
        self.sent: list[Json] = []  # kept for the call's own checks (tests)

    async def send(self, event: Json) -> None:
        self.sent.append(event)
        if self._ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._ws.send_str(json.dumps(event))

    async def on_push_frame(self, data: FramePushed) -> None:
        frame = data.frame
        if not isinstance(frame, self._TYPES):
            return
        if isinstance(frame, TranscriptionFrame):
            if frame.text.strip():
                await self.send({"type": "console.user", "text": frame.text})
        elif isinstance(frame, PlaybackFinishedFrame):
            if not frame.interrupted:
                self._rate.add(frame.text, frame.duration)
                heard = frame.text
            else:
                heard = heard_prefix(frame.text, frame.playback_position, self._rate.chars_per_sec)
            await self.send(
                {
                    "type": "console.bot",
                    "text": frame.text,
                    "heard": heard,
                    "interrupted": frame.interrupted,
                    "heard_secs": round(frame.playback_position, 3),
                }
            )
        elif isinstance(frame, InterruptionFrame):
            await self.send({"type": "console.barge_in"})
        elif isinstance(frame, BotStartedSpeakingFrame):
            await self.send({"type": "console.bot_speaking"})


class BrowserCalls:
    """The console's live browser calls; a call-observer factory for :class:`CallSessions`."""

    def __init__(self) -> None:
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self.feeds: dict[str, ConsoleFeed] = {}

    def add(self, call_uuid: str, ws: web.WebSocketResponse) -> None:
        self._sockets[call_uuid] = ws

    def remove(self, call_uuid: str) -> None:
        self._sockets.pop(call_uuid, None)
        self.feeds.pop(call_uuid, None)

    def observers(self, call: CallInfo, tenant: Tenant) -> list[BaseObserver]:
        """Extra observers for a call: none unless it is one of ours."""
        ws = self._sockets.get(call.call_uuid)
        if ws is None:
            return []
        feed = ConsoleFeed(ws)
        self.feeds[call.call_uuid] = feed
        latency = UserBotLatencyObserver()  # the class that measures phone calls' turns

        @latency.event_handler("on_latency_measured")
        async def _on_latency(_: Any, secs: float) -> None:
            await feed.send({"type": "console.latency", "ms": round(secs * 1000.0)})

        return [feed, latency]
