"""OpenAI Realtime API emulator (``wss://api.openai.com/v1/realtime`` on loopback).

Pipecat's unmodified ``OpenAIRealtimeLLMService`` connects to it by ``base_url``
(``ws://127.0.0.1:P/v1/realtime``) and gets what the GA Realtime API sends:

* ``session.created`` first; ``session.update`` -> ``session.updated``;
* ``input_audio_buffer.append`` (24 kHz s16le) runs an energy VAD on the PCM
  when server turn detection is on: ``input_audio_buffer.speech_started`` /
  ``speech_stopped`` (after the session's ``silence_duration_ms``), then
  ``input_audio_buffer.committed``, ``conversation.item.added`` for the user item,
  ``conversation.item.input_audio_transcription.completed`` (a scripted
  transcript: the emulator cannot recognise speech) and a response. With turn
  detection off the client drives ``input_audio_buffer.commit`` + ``response.create``;
* a response: ``response.created``, after the first-audio latency the assistant
  item, ``response.output_audio.delta`` chunks of real speech audio (synthesized
  by a :data:`SpeechSynth`), ``response.output_audio_transcript.delta`` words,
  the ``.done`` events and ``response.done``; a scripted :class:`ToolCall` gives a
  ``function_call`` item with ``response.function_call_arguments.done``;
* caller speech during a response cancels it (``response.done`` status
  ``cancelled``), like ``interrupt_response``;
* ``conversation.item.truncate`` is recorded (:attr:`OpenAIRealtimeEmulator.truncations`)
  with how much audio had been *sent* for the item, so a test can tell a
  truncation at the played-out position from one at the received position.

Timing: first audio ``ttfa`` after the trigger (speech stopped or response.create),
published gpt-realtime figures by default; audio then streams at
``audio_speed`` x real time (the API sends faster than real time).

Faults (:class:`RealtimeFaults`): refuse the upgrade with an HTTP status, drop the
TCP connection mid-response, stall (stop answering), send a malformed event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from pipeswitch.bench.emulators.deepgram import DEFAULT_TRANSCRIPTS, TranscriptScript
from pipeswitch.bench.emulators.latency import LatencyModel, LatencySpec
from pipeswitch.bench.emulators.openai_chat import ChatScript, ToolCall, default_reply
from pipeswitch.bench.emulators.serving import add_admin_routes, serve_emulator

# gpt-realtime server TTFB p50 732 ms (kwindla/aiewf-eval audio-timing deep dive, 30 turns,
# measured from the server VAD's speech_stopped). No p95 is published: 1.5 x the median is
# an assumption, stated as such in reports.
OPENAI_REALTIME_TTFA = LatencySpec(median_ms=732.0, p95_ms=1098.0)
REALTIME_RATE = 24000

# (text, sample rate) -> s16le mono PCM of that text spoken.
SpeechSynth = Callable[[str, int], Awaitable[bytes]]


async def tone_speech(text: str, rate: int) -> bytes:
    """Voice-like audio without a TTS: one 180 ms harmonic 'syllable' per word.

    Enough energy and spectral shape for the media server, the FreeSWITCH emulator's
    speech checks and an energy VAD; tests that need real speech pass a Piper synth.
    """
    words = max(1, len(text.split()))
    syl = int(rate * 0.18)
    gap = int(rate * 0.06)
    t = np.arange(syl) / rate
    env = np.sin(np.pi * np.arange(syl) / syl) ** 0.5
    out: list[np.ndarray] = []
    for i in range(words):
        f0 = 110.0 + 15.0 * (i % 4)
        wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 9))
        out.append((wave * env * 5000).astype("<i2"))
        out.append(np.zeros(gap, dtype="<i2"))
    return np.concatenate(out).tobytes()


def piper_speech(url: str, voice: str = "joe", session: Any = None) -> SpeechSynth:
    """A synth that asks a running Piper HTTP server (``POST url?rate=R``) for the audio."""
    import aiohttp

    async def synth(text: str, rate: int) -> bytes:
        own = session is None
        http = session or aiohttp.ClientSession()
        try:
            sep = "&" if "?" in url else "?"
            async with http.post(
                f"{url}{sep}rate={rate}", json={"text": text, "voice": voice}
            ) as r:
                r.raise_for_status()
                wav = await r.read()
        finally:
            if own:
                await http.close()
        return wav_data(wav)

    return synth


def wav_data(wav: bytes) -> bytes:
    """The PCM of a WAV's ``data`` chunk (Piper streams WAVs with unset sizes)."""
    i = wav.find(b"data", 12)
    return wav[i + 8 :] if i >= 0 else wav[44:]


_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences, so long replies stream: the first is synthesized and sent first."""
    return [p for p in _SENTENCE_RE.split(text.strip()) if p]


class SpeechStream:
    """A reply's audio, synthesized sentence by sentence ahead of sending.

    ``timeline`` holds ``(start_ms, duration_ms, sentence)`` for what was produced,
    so what a given ``audio_end_ms`` covered can be told in words.
    """

    def __init__(self, synth: SpeechSynth, text: str, rate: int) -> None:
        self.rate = rate
        self.sentences = split_sentences(text) or [text]
        self.timeline: list[tuple[int, int, str]] = []
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._produce(synth))

    async def _produce(self, synth: SpeechSynth) -> None:
        try:
            for sentence in self.sentences:
                await self._queue.put((sentence, await synth(sentence, self.rate)))
        finally:
            await self._queue.put(None)

    async def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        start = 0
        while (item := await self._queue.get()) is not None:
            sentence, pcm = item
            dur = len(pcm) * 1000 // (2 * self.rate)
            self.timeline.append((start, dur, sentence))
            start += dur
            yield item

    def cancel(self) -> None:
        """Stop synthesizing (the reply was cut)."""
        self._task.cancel()

    def heard(self, end_ms: int) -> str:
        """The words covered by the first ``end_ms`` of the reply's audio."""
        return heard_from_timeline(self.timeline, end_ms)


def heard_from_timeline(timeline: list[tuple[int, int, str]], end_ms: int) -> str:
    """Whole sentences before ``end_ms``, then the covered share of the one it cuts."""
    out: list[str] = []
    for start, dur, sentence in timeline:
        if end_ms >= start + dur:
            out.append(sentence)
        elif end_ms > start and dur > 0:
            words = sentence.split()
            out.extend(words[: int(len(words) * (end_ms - start) / dur)])
            break
        else:
            break
    return " ".join(out)


class EnergyVAD:
    """Speech start/stop on s16le PCM by 20 ms RMS, on the *audio* clock (ms of input).

    ``start_ms`` of loud windows start speech (reported at the first loud window);
    ``silence_ms`` of quiet windows stop it (reported at the first quiet window).
    """

    def __init__(self, rate: int, threshold: float = 400.0, start_ms: int = 60) -> None:
        """Configure; ``silence_ms`` is set per session (``turn_detection``)."""
        self.rate = rate
        self.threshold = threshold
        self.start_ms = start_ms
        self.silence_ms = 500
        self.win = rate // 50
        self._buf = np.zeros(0, dtype=np.int16)
        self.audio_ms = 0
        self.speaking = False
        self._loud_since: int | None = None
        self._quiet_since: int | None = None
        # Whether the last chunk fed held a loud window (the bench dates speech ends).
        self.loud_in_last_feed = False

    def feed(self, pcm: bytes) -> list[tuple[str, int]]:
        """Add audio; returns ``("start"|"stop", audio_ms)`` events in order."""
        a = np.frombuffer(pcm, dtype="<i2")
        self._buf = np.concatenate([self._buf, a]) if len(self._buf) else a
        events: list[tuple[str, int]] = []
        n = len(self._buf) // self.win
        if n == 0:
            return events
        wins = self._buf[: n * self.win].astype(np.float32).reshape(n, self.win)
        self._buf = self._buf[n * self.win :].copy()
        rms = np.sqrt(np.mean(wins * wins, axis=1))
        self.loud_in_last_feed = bool((rms > self.threshold).any())
        for loud in rms > self.threshold:
            now = self.audio_ms
            self.audio_ms += 20
            if not self.speaking:
                if loud:
                    if self._loud_since is None:
                        self._loud_since = now
                    if self.audio_ms - self._loud_since >= self.start_ms:
                        self.speaking = True
                        self._quiet_since = None
                        events.append(("start", self._loud_since))
                else:
                    self._loud_since = None
            else:
                if loud:
                    self._quiet_since = None
                else:
                    if self._quiet_since is None:
                        self._quiet_since = now
                    if self.audio_ms - self._quiet_since >= self.silence_ms:
                        self.speaking = False
                        self._loud_since = None
                        events.append(("stop", self._quiet_since))
        return events


@dataclass
class RealtimeFaults:
    """Faults for upcoming connections.

    Attributes:
        refuse_status: Refuse the WebSocket upgrade with this HTTP status.
        drop_after_audio_ms: Abort the TCP connection once this much response audio
            (ms, counted over the session) has been sent.
        drop_on_response: Abort when the Nth response (1-based) starts instead.
        stall_after_responses: After this many responses, accept input but answer nothing.
        malformed_on_response: Send a malformed event as the Nth response starts.
        count: Apply to this many upcoming connections only; None means all.
    """

    refuse_status: int | None = None
    drop_after_audio_ms: int | None = None
    drop_on_response: int | None = None
    stall_after_responses: int | None = None
    malformed_on_response: int | None = None
    count: int | None = None


@dataclass
class ResponseRecord:
    """One response: what was scripted, how much of its audio went out, how it ended."""

    id: str
    item_id: str
    trigger: str
    triggered_at: float
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    audio_ms_total: int = 0
    audio_ms_sent: int = 0
    first_audio_at: float | None = None
    status: str = "in_progress"
    # When the last loud caller audio before this response arrived (monotonic clock):
    # first_audio_at - speech_end_at is the provider's share of the turn.
    speech_end_at: float | None = None


@dataclass
class TruncateRecord:
    """A ``conversation.item.truncate`` as received."""

    item_id: str
    content_index: int
    audio_end_ms: int
    received_at: float
    audio_ms_sent: int | None
    heard_text: str = ""


@dataclass
class RealtimeSession:
    """One WebSocket session's log."""

    id: str
    opened_at: float
    headers: dict[str, str]
    query: dict[str, str]
    session_updates: list[dict[str, Any]] = field(default_factory=list)
    client_events: list[str] = field(default_factory=list)
    items_created: list[dict[str, Any]] = field(default_factory=list)
    user_transcripts: list[str] = field(default_factory=list)
    speech_started: list[float] = field(default_factory=list)
    # input_audio_buffer.append events refused (not whole 16-bit samples).
    bad_appends: int = 0
    speech_stopped: list[float] = field(default_factory=list)
    responses: list[ResponseRecord] = field(default_factory=list)
    truncations: list[TruncateRecord] = field(default_factory=list)
    audio_in_ms: int = 0
    closed_at: float | None = None
    close_reason: str = ""
    aborted_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


class OpenAIRealtimeEmulator:
    """Serves ``GET /v1/realtime`` (WebSocket) plus ``/_emulator/*`` admin endpoints."""

    def __init__(
        self,
        *,
        ttfa: LatencyModel | None = None,
        script: ChatScript | None = None,
        transcripts: TranscriptScript | None = None,
        speech: SpeechSynth | None = None,
        audio_speed: float = 4.0,
        faults: RealtimeFaults | None = None,
        api_key: str | None = None,
        vad_threshold: float = 400.0,
        cancel_lag_s: float = 0.0,
    ) -> None:
        """Create the emulator; ``script`` answers chat-style messages (see openai_chat).

        ``cancel_lag_s``: how long a ``response.cancel`` takes to stop the response (the
        network and the server), during which its audio keeps streaming.
        """
        self.ttfa = ttfa or OPENAI_REALTIME_TTFA.model(seed=0)
        self.script: ChatScript = script or default_reply
        self.transcripts: TranscriptScript = transcripts or DEFAULT_TRANSCRIPTS
        self.speech: SpeechSynth = speech or tone_speech
        self.audio_speed = audio_speed
        self.faults = faults or RealtimeFaults()
        self.api_key = api_key
        self.vad_threshold = vad_threshold
        self.cancel_lag_s = cancel_lag_s
        self.sessions: list[RealtimeSession] = []
        self.refused = 0
        self._faulted = 0
        self._live: set[web.WebSocketResponse] = set()

    @property
    def truncations(self) -> list[TruncateRecord]:
        """Every truncation, all sessions."""
        return [t for s in self.sessions for t in s.truncations]

    def set_faults(self, faults: RealtimeFaults) -> None:
        """Replace the faults for new connections."""
        self.faults = faults
        self._faulted = 0

    def clear(self) -> None:
        """Forget recorded sessions."""
        self.sessions = []
        self.refused = 0

    def add_routes(self, app: web.Application) -> None:
        """Register the realtime endpoint and the admin endpoints."""
        app.router.add_get("/v1/realtime", self.handle)
        add_admin_routes(
            app,
            self,
            RealtimeFaults,
            "sessions",
            lambda: {"sessions": [s.to_dict() for s in self.sessions]},
        )

    async def close_all(self) -> None:
        """Close every open session (server shutdown)."""
        for ws in list(self._live):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"emulator shutting down")

    def _take_faults(self) -> RealtimeFaults | None:
        f = self.faults
        active = any(v is not None for k, v in dataclasses.asdict(f).items() if k != "count")
        if not active:
            return None
        if f.count is not None and self._faulted >= f.count:
            return None
        self._faulted += 1
        return f

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Authenticate, apply refusal faults, then run one session."""
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or (
            self.api_key is not None and auth[7:] != self.api_key
        ):
            return _error_response(401, "invalid_api_key", "Incorrect API key provided.")
        faults = self._take_faults()
        if faults is not None and faults.refuse_status is not None:
            self.refused += 1
            return _error_response(faults.refuse_status, "server_error", "Emulated refusal.")
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        rec = RealtimeSession(
            id=f"sess_{uuid.uuid4().hex[:16]}",
            opened_at=time.monotonic(),
            headers={k: v for k, v in request.headers.items() if k.lower() != "authorization"},
            query=dict(request.query),
        )
        self.sessions.append(rec)
        self._live.add(ws)
        conn = _Conn(self, ws, request, rec, faults)
        try:
            await conn.run()
        finally:
            self._live.discard(ws)
            rec.closed_at = time.monotonic()
        return ws


def _error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"type": "invalid_request_error", "code": code, "message": message}},
        status=status,
    )


def _eid() -> str:
    return f"event_{uuid.uuid4().hex[:20]}"


def _item_text(item: dict[str, Any]) -> str:
    parts = item.get("content") or []
    return " ".join(
        str(p.get("text") or p.get("transcript") or "") for p in parts if isinstance(p, dict)
    ).strip()


class _Conn:
    """One session's state machine."""

    def __init__(
        self,
        emu: OpenAIRealtimeEmulator,
        ws: web.WebSocketResponse,
        request: web.Request,
        rec: RealtimeSession,
        faults: RealtimeFaults | None,
    ) -> None:
        self.emu = emu
        self.ws = ws
        self.request = request
        self.rec = rec
        self.faults = faults
        self.session: dict[str, Any] = {
            "type": "realtime",
            "object": "realtime.session",
            "id": rec.id,
            "model": request.query.get("model", "gpt-realtime"),
            "output_modalities": ["audio"],
            "instructions": "",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": REALTIME_RATE},
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": 0.5,
                        "prefix_padding_ms": 300,
                        "silence_duration_ms": 500,
                    },
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": REALTIME_RATE},
                    "voice": "alloy",
                },
            },
            "tools": [],
        }
        self.vad = EnergyVAD(REALTIME_RATE, threshold=emu.vad_threshold)
        self.items: list[dict[str, Any]] = []
        self.user_turns = 0
        self.response_task: asyncio.Task[None] | None = None
        self.current: ResponseRecord | None = None
        self.audio_sent_by_item: dict[str, int] = {}
        self.timeline_by_item: dict[str, list[tuple[int, int, str]]] = {}
        self.session_audio_ms = 0
        self.stalled = False
        self.pending_user_item: str | None = None
        self.last_loud_at: float | None = None
        self._send_lock = asyncio.Lock()

    # -- plumbing ---------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        event.setdefault("event_id", _eid())
        async with self._send_lock:
            await self.ws.send_str(json.dumps(event))

    def abort(self, reason: str) -> None:
        """Drop the TCP connection without a closing handshake."""
        self.rec.close_reason = reason
        self.rec.aborted_at = time.monotonic()
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    @property
    def server_vad(self) -> bool:
        td = (self.session.get("audio") or {}).get("input", {}).get("turn_detection")
        return bool(td)

    async def run(self) -> None:
        await self.send({"type": "session.created", "session": dict(self.session)})
        try:
            async for msg in self.ws:
                if msg.type is WSMsgType.TEXT:
                    await self.on_text(msg.data)
                elif msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            if self.response_task is not None:
                self.response_task.cancel()
            self.rec.close_reason = self.rec.close_reason or "client closed"

    async def on_text(self, data: str) -> None:
        try:
            evt = json.loads(data)
        except ValueError:
            await self.error("invalid_request_error", "invalid_json", "Invalid JSON.")
            return
        kind = str(evt.get("type", ""))
        if kind != "input_audio_buffer.append":
            self.rec.client_events.append(kind)
        handler = getattr(self, "on_" + kind.replace(".", "_"), None)
        if handler is None:
            await self.error("invalid_request_error", "unknown_event", f"Unknown event {kind}")
            return
        await handler(evt)

    async def error(self, etype: str, code: str, message: str, event_id: str | None = None) -> None:
        await self.send(
            {
                "type": "error",
                "error": {"type": etype, "code": code, "message": message, "event_id": event_id},
            }
        )

    # -- client events ------------------------------------------------------------

    async def on_session_update(self, evt: dict[str, Any]) -> None:
        update = evt.get("session") or {}
        self.rec.session_updates.append(update)
        for key, value in update.items():
            if key == "audio" and isinstance(value, dict):
                audio = self.session.setdefault("audio", {})
                for side in ("input", "output"):
                    if isinstance(value.get(side), dict):
                        audio.setdefault(side, {}).update(value[side])
            elif value is not None:
                self.session[key] = value
        td = self.session["audio"]["input"].get("turn_detection")
        if isinstance(td, dict) and td.get("silence_duration_ms") is not None:
            self.vad.silence_ms = int(td["silence_duration_ms"])
        await self.send({"type": "session.updated", "session": dict(self.session)})

    async def on_input_audio_buffer_append(self, evt: dict[str, Any]) -> None:
        pcm = base64.b64decode(evt.get("audio", ""))
        if len(pcm) % 2:
            # Not whole 16-bit samples: refuse it as a client error, keep the session.
            self.rec.bad_appends += 1
            await self.error(
                "invalid_request_error",
                "invalid_audio",
                f"Audio must be whole 16-bit PCM samples; got {len(pcm)} bytes.",
            )
            return
        self.rec.audio_in_ms += len(pcm) * 1000 // (2 * REALTIME_RATE)
        events = self.vad.feed(pcm)
        if self.vad.loud_in_last_feed:
            self.last_loud_at = time.monotonic()
        if not self.server_vad:
            return
        for kind, at_ms in events:
            if kind == "start":
                await self.speech_started(at_ms)
            else:
                await self.speech_stopped(at_ms)

    async def speech_started(self, at_ms: int) -> None:
        self.rec.speech_started.append(time.monotonic())
        self.pending_user_item = f"item_{uuid.uuid4().hex[:20]}"
        await self.send(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": at_ms,
                "item_id": self.pending_user_item,
            }
        )
        await self.cancel_response()

    async def speech_stopped(self, at_ms: int) -> None:
        self.rec.speech_stopped.append(time.monotonic())
        item_id = self.pending_user_item or f"item_{uuid.uuid4().hex[:20]}"
        self.pending_user_item = None
        await self.send(
            {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": at_ms, "item_id": item_id}
        )
        await self.commit(item_id)
        self.start_response("speech_stopped")

    async def commit(self, item_id: str | None = None) -> None:
        item_id = item_id or f"item_{uuid.uuid4().hex[:20]}"
        prev = self.items[-1]["id"] if self.items else None
        await self.send(
            {"type": "input_audio_buffer.committed", "previous_item_id": prev, "item_id": item_id}
        )
        transcript = self.transcript(self.user_turns)
        self.user_turns += 1
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self.items.append({**item, "content": [{"type": "input_audio", "transcript": transcript}]})
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        self.rec.user_transcripts.append(transcript)
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item_id,
                "content_index": 0,
                "transcript": transcript,
            }
        )

    def transcript(self, turn: int) -> str:
        script = self.emu.transcripts
        if callable(script):
            return str(script(turn))
        lines = list(script)
        return lines[turn % len(lines)] if lines else ""

    async def on_input_audio_buffer_commit(self, evt: dict[str, Any]) -> None:
        await self.commit()

    async def on_input_audio_buffer_clear(self, evt: dict[str, Any]) -> None:
        await self.send({"type": "input_audio_buffer.cleared"})

    async def on_conversation_item_create(self, evt: dict[str, Any]) -> None:
        item = dict(evt.get("item") or {})
        item.setdefault("id", f"item_{uuid.uuid4().hex[:20]}")
        self.rec.items_created.append(item)
        prev = self.items[-1]["id"] if self.items else None
        self.items.append(item)
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": item})

    async def on_conversation_item_truncate(self, evt: dict[str, Any]) -> None:
        item_id = str(evt.get("item_id", ""))
        end_ms = int(evt.get("audio_end_ms", 0))
        sent = self.audio_sent_by_item.get(item_id)
        heard = heard_from_timeline(self.timeline_by_item.get(item_id, []), end_ms)
        self.rec.truncations.append(
            TruncateRecord(
                item_id=item_id,
                content_index=int(evt.get("content_index", 0)),
                audio_end_ms=end_ms,
                received_at=time.monotonic(),
                audio_ms_sent=sent,
                heard_text=heard,
            )
        )
        if sent is None:
            await self.error("invalid_request_error", "item_not_found", f"No item {item_id}")
            return
        if end_ms > sent:
            await self.error(
                "invalid_request_error",
                "invalid_audio_end_ms",
                f"audio_end_ms {end_ms} is past the {sent} ms of audio sent",
            )
            return
        for item in self.items:
            if item.get("id") == item_id:
                item["content"] = [{"type": "output_audio", "transcript": heard}]
        await self.send(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": int(evt.get("content_index", 0)),
                "audio_end_ms": end_ms,
            }
        )

    async def on_conversation_item_retrieve(self, evt: dict[str, Any]) -> None:
        item_id = evt.get("item_id")
        for item in self.items:
            if item.get("id") == item_id:
                await self.send({"type": "conversation.item.retrieved", "item": item})
                return
        await self.error(
            "invalid_request_error",
            "item_retrieve_invalid_item_id",
            "no such item",
            event_id=evt.get("event_id"),
        )

    async def on_conversation_item_delete(self, evt: dict[str, Any]) -> None:
        item_id = evt.get("item_id")
        self.items = [i for i in self.items if i.get("id") != item_id]
        await self.send({"type": "conversation.item.deleted", "item_id": item_id})

    async def on_response_create(self, evt: dict[str, Any]) -> None:
        if self.response_task is not None and not self.response_task.done():
            await self.error(
                "invalid_request_error",
                "conversation_already_has_active_response",
                "Conversation already has an active response in progress.",
            )
            return
        self.start_response("response.create")

    async def on_response_cancel(self, evt: dict[str, Any]) -> None:
        if self.emu.cancel_lag_s > 0:
            await asyncio.sleep(self.emu.cancel_lag_s)  # the response streams on meanwhile
        if not await self.cancel_response():
            await self.error(
                "invalid_request_error", "response_cancel_not_active", "No active response."
            )

    # -- responses ------------------------------------------------------------------

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages, for the reply script."""
        msgs: list[dict[str, Any]] = []
        if self.session.get("instructions"):
            msgs.append({"role": "system", "content": self.session["instructions"]})
        for item in self.items:
            kind = item.get("type")
            if kind == "message":
                msgs.append({"role": item.get("role", "user"), "content": _item_text(item)})
            elif kind == "function_call":
                msgs.append(
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": item.get("call_id"),
                                "type": "function",
                                "function": {
                                    "name": item.get("name"),
                                    "arguments": item.get("arguments"),
                                },
                            }
                        ],
                    }
                )
            elif kind == "function_call_output":
                msgs.append(
                    {
                        "role": "tool",
                        "tool_call_id": item.get("call_id"),
                        "content": item.get("output"),
                    }
                )
        return msgs

    def start_response(self, trigger: str) -> None:
        if self.stalled:
            return
        n = len(self.rec.responses) + 1
        f = self.faults
        if f is not None and f.stall_after_responses is not None and n > f.stall_after_responses:
            self.stalled = True
            return
        rec = ResponseRecord(
            id=f"resp_{uuid.uuid4().hex[:20]}",
            item_id=f"item_{uuid.uuid4().hex[:20]}",
            trigger=trigger,
            triggered_at=time.monotonic(),
            speech_end_at=self.last_loud_at,
        )
        self.rec.responses.append(rec)
        self.current = rec
        self.response_task = asyncio.ensure_future(self.respond(rec, n))

    async def cancel_response(self) -> bool:
        task, rec = self.response_task, self.current
        if task is None or task.done() or rec is None:
            return False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        rec.status = "cancelled"
        await self.send(
            {
                "type": "response.done",
                "response": {
                    "id": rec.id,
                    "object": "realtime.response",
                    "status": "cancelled",
                    "status_details": {"type": "cancelled", "reason": "turn_detected"},
                    "output": [],
                },
            }
        )
        return True

    async def respond(self, rec: ResponseRecord, n: int) -> None:
        f = self.faults
        if f is not None and f.drop_on_response == n:
            self.abort(f"dropped on response {n}")
            return
        await self.send(
            {
                "type": "response.created",
                "response": {
                    "id": rec.id,
                    "object": "realtime.response",
                    "status": "in_progress",
                    "output": [],
                },
            }
        )
        if f is not None and f.malformed_on_response == n:
            await self.ws.send_str('{"type": "response.output_audio.delta", "delta": ')
            return
        reply = self.emu.script(self.chat_messages()) if callable(self.emu.script) else None
        if reply is None:
            reply = default_reply(self.chat_messages())
        delay = self.emu.ttfa.sample_s()
        if isinstance(reply, ToolCall) or (
            isinstance(reply, Sequence) and not isinstance(reply, str)
        ):
            calls: list[ToolCall] = (
                [reply]
                if isinstance(reply, ToolCall)
                else [c for c in reply if isinstance(c, ToolCall)]
            )
            await asyncio.sleep(delay)
            await self.function_calls(rec, calls)
            return
        text = str(reply)
        rec.text = text
        stream = SpeechStream(self.emu.speech, text, REALTIME_RATE)
        try:
            await asyncio.sleep(delay)
            await self.speak(rec, text, stream)
        finally:
            stream.cancel()

    async def function_calls(self, rec: ResponseRecord, calls: list[ToolCall]) -> None:
        outputs: list[dict[str, Any]] = []
        for i, call in enumerate(calls):
            item_id = rec.item_id if i == 0 else f"item_{uuid.uuid4().hex[:20]}"
            call_id = call.id or f"call_{uuid.uuid4().hex[:16]}"
            args = call.arguments_json()
            item = {
                "id": item_id,
                "object": "realtime.item",
                "type": "function_call",
                "status": "in_progress",
                "call_id": call_id,
                "name": call.name,
                "arguments": "",
            }
            prev = self.items[-1]["id"] if self.items else None
            await self.send(
                {
                    "type": "response.output_item.added",
                    "response_id": rec.id,
                    "output_index": i,
                    "item": item,
                }
            )
            await self.send(
                {"type": "conversation.item.added", "previous_item_id": prev, "item": item}
            )
            await self.send(
                {
                    "type": "response.function_call_arguments.delta",
                    "response_id": rec.id,
                    "item_id": item_id,
                    "output_index": i,
                    "call_id": call_id,
                    "delta": args,
                }
            )
            await self.send(
                {
                    "type": "response.function_call_arguments.done",
                    "response_id": rec.id,
                    "item_id": item_id,
                    "output_index": i,
                    "call_id": call_id,
                    "name": call.name,
                    "arguments": args,
                }
            )
            done = {**item, "status": "completed", "arguments": args}
            self.items.append(done)
            await self.send(
                {
                    "type": "response.output_item.done",
                    "response_id": rec.id,
                    "output_index": i,
                    "item": done,
                }
            )
            await self.send(
                {"type": "conversation.item.done", "previous_item_id": prev, "item": done}
            )
            rec.tool_calls.append({"call_id": call_id, "name": call.name, "arguments": args})
            outputs.append(done)
        rec.status = "completed"
        await self.send(
            {
                "type": "response.done",
                "response": {
                    "id": rec.id,
                    "object": "realtime.response",
                    "status": "completed",
                    "output": outputs,
                    "usage": {"total_tokens": 30, "input_tokens": 20, "output_tokens": 10},
                },
            }
        )

    async def speak(self, rec: ResponseRecord, text: str, stream: SpeechStream) -> None:
        item_id = rec.item_id
        prev = self.items[-1]["id"] if self.items else None
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": rec.id,
                "output_index": 0,
                "item": item,
            }
        )
        await self.send({"type": "conversation.item.added", "previous_item_id": prev, "item": item})
        await self.send(
            {
                "type": "response.content_part.added",
                "response_id": rec.id,
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "audio", "transcript": ""},
            }
        )
        self.items.append({**item, "content": [{"type": "output_audio", "transcript": text}]})
        self.timeline_by_item[item_id] = stream.timeline
        self.audio_sent_by_item[item_id] = 0
        chunk = REALTIME_RATE * 2 // 10  # 100 ms
        start = time.monotonic()
        f = self.faults
        first_word = True
        async for sentence, pcm in stream:
            total = len(pcm)
            rec.audio_ms_total += total * 1000 // (2 * REALTIME_RATE)
            words = sentence.split()
            words_sent = 0
            for off in range(0, total, chunk):
                piece = pcm[off : off + chunk]
                if rec.first_audio_at is None:
                    rec.first_audio_at = time.monotonic()
                    start = rec.first_audio_at
                await self.send(
                    {
                        "type": "response.output_audio.delta",
                        "response_id": rec.id,
                        "item_id": item_id,
                        "output_index": 0,
                        "content_index": 0,
                        "delta": base64.b64encode(piece).decode(),
                    }
                )
                ms = len(piece) * 1000 // (2 * REALTIME_RATE)
                rec.audio_ms_sent += ms
                self.session_audio_ms += ms
                self.audio_sent_by_item[item_id] = rec.audio_ms_sent
                due = int(len(words) * min(1.0, (off + len(piece)) / total))
                if due > words_sent:
                    delta = " ".join(words[words_sent:due])
                    await self.send(
                        {
                            "type": "response.output_audio_transcript.delta",
                            "response_id": rec.id,
                            "item_id": item_id,
                            "output_index": 0,
                            "content_index": 0,
                            "delta": ("" if first_word else " ") + delta,
                        }
                    )
                    first_word = False
                    words_sent = due
                if (
                    f is not None
                    and f.drop_after_audio_ms is not None
                    and self.session_audio_ms >= f.drop_after_audio_ms
                ):
                    self.abort(f"dropped after {self.session_audio_ms} ms of audio")
                    return
                wait = start + rec.audio_ms_sent / 1000 / self.emu.audio_speed - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
        common = {"response_id": rec.id, "item_id": item_id, "output_index": 0, "content_index": 0}
        await self.send({"type": "response.output_audio.done", **common})
        await self.send(
            {"type": "response.output_audio_transcript.done", **common, "transcript": text}
        )
        await self.send(
            {
                "type": "response.content_part.done",
                **common,
                "part": {"type": "audio", "transcript": text},
            }
        )
        done = {
            **item,
            "status": "completed",
            "content": [{"type": "output_audio", "transcript": text}],
        }
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": rec.id,
                "output_index": 0,
                "item": done,
            }
        )
        await self.send({"type": "conversation.item.done", "previous_item_id": prev, "item": done})
        rec.status = "completed"
        await self.send(
            {
                "type": "response.done",
                "response": {
                    "id": rec.id,
                    "object": "realtime.response",
                    "status": "completed",
                    "output": [done],
                    "usage": {"total_tokens": 60, "input_tokens": 40, "output_tokens": 20},
                },
            }
        )


async def serve_realtime(
    emu: OpenAIRealtimeEmulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Start ``emu`` on its own aiohttp runner; returns (runner, port)."""
    return await serve_emulator(emu, host, port)
