"""Gemini Live API emulator (``BidiGenerateContent`` over ``wss://``) on loopback.

Pipecat's unmodified ``GeminiLiveLLMService`` (through google-genai's live client)
connects to it with ``http_options(base_url="https://127.0.0.1:P", async_client_args=
{"ssl": <context trusting the test CA>})``; google-genai turns that into
``wss://127.0.0.1:P/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent``.

Protocol (JSON text frames):

* client ``setup`` first -> ``setupComplete``; with ``sessionResumption.handle`` the
  conversation of that handle is restored (:attr:`GeminiSession.resumed_from`);
* ``realtimeInput.audio`` (``audio/pcm;rate=N``, 16 kHz expected) runs an energy
  VAD unless ``automaticActivityDetection.disabled``; then ``activityStart`` /
  ``activityEnd`` mark the caller's turn. Caller speech over the model sends
  ``serverContent.interrupted`` and stops the turn;
* a turn: ``serverContent.inputTranscription`` (scripted: no recognition), then
  after the first-audio latency ``serverContent.modelTurn`` parts with
  ``inlineData`` ``audio/pcm;rate=24000`` (real speech from a :data:`SpeechSynth`)
  and ``outputTranscription`` text, ``generationComplete``, ``turnComplete`` with
  ``usageMetadata``, and a ``sessionResumptionUpdate`` (new handle);
* a scripted :class:`ToolCall` sends ``toolCall.functionCalls``; the client's
  ``toolResponse`` continues the turn;
* ``clientContent`` turns join the conversation (recorded: a barge-in note arrives
  this way); ``turnComplete: true`` asks for a response;
* ``session_limit_s``: ``goAway`` with ``timeLeft`` ``goaway_lead_s`` before the
  limit, then the connection closes; the client resumes with its last handle.

Faults (:class:`GeminiFaults`): refuse the upgrade, drop mid-reply, stall, malformed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import re
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from pipeswitch.bench.emulators.deepgram import DEFAULT_TRANSCRIPTS, TranscriptScript
from pipeswitch.bench.emulators.latency import LatencyModel, LatencySpec
from pipeswitch.bench.emulators.openai_chat import (
    ChatReply,
    ChatScript,
    ToolCall,
    default_reply,
    keyword_script,
)
from pipeswitch.bench.emulators.openai_realtime import (
    EnergyVAD,
    SpeechStream,
    SpeechSynth,
    heard_from_timeline,
    tone_speech,
)
from pipeswitch.bench.emulators.serving import add_admin_routes, serve_emulator

# gemini-3.1-flash-live (minimal thinking) voice-to-voice median 1,632 ms (aiewf-eval,
# 30 turns, server VAD). No first-audio split is published: the server-VAD share
# (~500 ms) is taken off the V2V figure, and 1.5 x the median as p95 is an assumption.
GEMINI_LIVE_TTFA = LatencySpec(median_ms=1100.0, p95_ms=1650.0)
OUTPUT_RATE = 24000
_RATE_RE = re.compile(r"rate=(\d+)")


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def snake_keys(obj: Any) -> Any:
    """The client mixes snake_case and camelCase keys: normalise to snake_case."""
    if isinstance(obj, dict):
        return {_snake(k): snake_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snake_keys(v) for v in obj]
    return obj


def b64_bytes(data: str) -> bytes:
    """google-genai sends bytes as URL-safe base64, maybe unpadded; accept both alphabets."""
    data = data.replace("-", "+").replace("_", "/")
    return base64.b64decode(data + "=" * (-len(data) % 4))


@dataclass
class GeminiFaults:
    """Faults for upcoming connections (see :class:`.openai_realtime.RealtimeFaults`)."""

    refuse_status: int | None = None
    drop_after_audio_ms: int | None = None
    drop_on_turn: int | None = None
    stall_after_turns: int | None = None
    malformed_on_turn: int | None = None
    # After a drop, refuse every later connection (a provider that cannot take the call
    # back: the client's resumption fails and the call must fall back).
    refuse_after_drop: bool = False
    count: int | None = None


@dataclass
class TurnRecord:
    """One model turn: what was scripted, what went out, how it ended."""

    index: int
    trigger: str
    triggered_at: float
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    audio_ms_total: int = 0
    audio_ms_sent: int = 0
    first_audio_at: float | None = None
    status: str = "in_progress"
    # When the last loud caller audio before this turn arrived (monotonic clock).
    speech_end_at: float | None = None


@dataclass
class GeminiSession:
    """One WebSocket connection's log."""

    id: str
    opened_at: float
    path: str
    setup: dict[str, Any] = field(default_factory=dict)
    resumed_from: str | None = None
    audio_rates: list[int] = field(default_factory=list)
    audio_in_ms: int = 0
    client_contents: list[dict[str, Any]] = field(default_factory=list)
    tool_responses: list[dict[str, Any]] = field(default_factory=list)
    activity: list[str] = field(default_factory=list)
    user_transcripts: list[str] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    interruptions: int = 0
    handles_sent: list[str] = field(default_factory=list)
    go_away_sent_at: float | None = None
    closed_at: float | None = None
    close_reason: str = ""
    aborted_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclass
class _Conversation:
    """Server-side state that a resumption handle restores."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    user_turns: int = 0


class GeminiLiveEmulator:
    """Serves the BidiGenerateContent WebSocket (TLS) plus ``/_emulator/*`` admin."""

    def __init__(
        self,
        *,
        ttfa: LatencyModel | None = None,
        script: ChatScript | None = None,
        transcripts: TranscriptScript | None = None,
        speech: SpeechSynth | None = None,
        audio_speed: float = 4.0,
        faults: GeminiFaults | None = None,
        api_key: str | None = None,
        session_limit_s: float | None = None,
        goaway_lead_s: float = 1.0,
        vad_threshold: float = 400.0,
        vad_start_lag_s: float = 0.0,
    ) -> None:
        """Create the emulator; ``session_limit_s`` None = no connection limit.

        ``vad_start_lag_s``: how long the server VAD takes to call a barge-in, during
        which the cut reply keeps streaming (a client's local VAD is often quicker).
        """
        self.ttfa = ttfa or GEMINI_LIVE_TTFA.model(seed=0)
        self.script: ChatScript = script or default_reply
        self.transcripts: TranscriptScript = transcripts or DEFAULT_TRANSCRIPTS
        self.speech: SpeechSynth = speech or tone_speech
        self.audio_speed = audio_speed
        self.faults = faults or GeminiFaults()
        self.api_key = api_key
        self.session_limit_s = session_limit_s
        self.goaway_lead_s = goaway_lead_s
        self.vad_threshold = vad_threshold
        self.vad_start_lag_s = vad_start_lag_s
        self.sessions: list[GeminiSession] = []
        self.refused = 0
        self._faulted = 0
        self._handles: dict[str, _Conversation] = {}
        self._live: set[web.WebSocketResponse] = set()

    def set_faults(self, faults: GeminiFaults) -> None:
        """Replace the faults for new connections."""
        self.faults = faults
        self._faulted = 0

    def clear(self) -> None:
        """Forget recorded sessions."""
        self.sessions = []
        self.refused = 0

    def reply(self, messages: list[dict[str, Any]]) -> ChatReply:
        """The scripted reply to a conversation."""
        script = self.script
        if not callable(script):
            script = keyword_script(script)
        return script(messages)

    def add_routes(self, app: web.Application) -> None:
        """Register the live endpoint and the admin endpoints."""
        app.router.add_get("/ws/{method}", self.handle)
        add_admin_routes(
            app,
            self,
            GeminiFaults,
            "sessions",
            lambda: {"sessions": [s.to_dict() for s in self.sessions]},
        )

    async def close_all(self) -> None:
        """Close every open connection (server shutdown)."""
        for ws in list(self._live):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"emulator shutting down")

    def _take_faults(self) -> GeminiFaults | None:
        f = self.faults
        if not any(
            v not in (None, False) for k, v in dataclasses.asdict(f).items() if k != "count"
        ):
            return None
        if f.count is not None and self._faulted >= f.count:
            return None
        self._faulted += 1
        return f

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Authenticate, apply refusal faults, then run one connection."""
        if not request.match_info["method"].endswith("BidiGenerateContent"):
            raise web.HTTPNotFound()
        key = request.headers.get("x-goog-api-key") or request.query.get("key", "")
        if not key or (self.api_key is not None and key != self.api_key):
            return web.json_response(
                {
                    "error": {
                        "code": 403,
                        "message": "API key not valid.",
                        "status": "PERMISSION_DENIED",
                    }
                },
                status=403,
            )
        faults = self._take_faults()
        if faults is not None and faults.refuse_status is not None:
            self.refused += 1
            return web.json_response(
                {
                    "error": {
                        "code": faults.refuse_status,
                        "message": "Emulated refusal.",
                        "status": "UNAVAILABLE",
                    }
                },
                status=faults.refuse_status,
            )
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        rec = GeminiSession(
            id=f"gs_{uuid.uuid4().hex[:12]}", opened_at=time.monotonic(), path=request.path
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


def _content_text(content: dict[str, Any]) -> str:
    parts = content.get("parts") or []
    return " ".join(str(p.get("text", "")) for p in parts if isinstance(p, dict)).strip()


class _Conn:
    """One connection's state machine."""

    def __init__(
        self,
        emu: GeminiLiveEmulator,
        ws: web.WebSocketResponse,
        request: web.Request,
        rec: GeminiSession,
        faults: GeminiFaults | None,
    ) -> None:
        self.emu = emu
        self.ws = ws
        self.request = request
        self.rec = rec
        self.faults = faults
        self.conv = _Conversation()
        self.vad: EnergyVAD | None = None
        self.server_vad = True
        self.in_activity = False
        self.turn_task: asyncio.Task[None] | None = None
        self.current: TurnRecord | None = None
        self.pending_tool: asyncio.Future[dict[str, Any]] | None = None
        self.stream: SpeechStream | None = None
        self.last_loud_at: float | None = None
        self.session_audio_ms = 0
        self.stalled = False
        self.closing = False
        self._send_lock = asyncio.Lock()
        self._limit_task: asyncio.Task[None] | None = None
        self._late_starts: set[asyncio.Task[None]] = set()

    async def send(self, msg: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        async with self._send_lock:
            await self.ws.send_str(json.dumps(msg))

    def abort(self, reason: str) -> None:
        self.rec.close_reason = reason
        self.rec.aborted_at = time.monotonic()
        if self.faults is not None and self.faults.refuse_after_drop:
            self.emu.set_faults(GeminiFaults(refuse_status=503))
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def run(self) -> None:
        try:
            first = await self.ws.receive(timeout=10)
        except TimeoutError:
            await self.ws.close(code=1008, message=b"no setup")
            return
        if first.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return
        data = first.data if isinstance(first.data, str) else first.data.decode()
        try:
            msg = snake_keys(json.loads(data))
        except ValueError:
            await self.ws.close(code=1007, message=b"invalid setup")
            return
        setup = msg.get("setup")
        if not isinstance(setup, dict):
            await self.ws.close(code=1008, message=b"setup must come first")
            return
        await self.on_setup(setup)
        try:
            async for m in self.ws:
                if m.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    raw = m.data if isinstance(m.data, str) else m.data.decode()
                    await self.on_message(raw)
                elif m.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            for t in (self.turn_task, self._limit_task, *self._late_starts):
                if t is not None:
                    t.cancel()
            self.rec.close_reason = self.rec.close_reason or "client closed"

    async def on_setup(self, setup: dict[str, Any]) -> None:
        self.rec.setup = setup
        aad = (setup.get("realtime_input_config") or {}).get("automatic_activity_detection") or {}
        self.server_vad = not aad.get("disabled", False)
        silence = aad.get("silence_duration_ms")
        handle = (setup.get("session_resumption") or {}).get("handle")
        if handle and handle in self.emu._handles:
            self.conv = self.emu._handles[handle]
            self.rec.resumed_from = handle
        instr = setup.get("system_instruction")
        if instr and not self.conv.messages:
            text = instr if isinstance(instr, str) else _content_text(instr)
            self.conv.messages.append({"role": "system", "content": text})
        self._silence_ms = int(silence) if silence else 500
        await self.send({"setupComplete": {"sessionId": self.rec.id}})
        if "session_resumption" in setup:
            await self.new_handle()
        if self.emu.session_limit_s is not None:
            self._limit_task = asyncio.ensure_future(self.session_limit(self.emu.session_limit_s))

    async def session_limit(self, limit: float) -> None:
        lead = min(self.emu.goaway_lead_s, limit)
        await asyncio.sleep(limit - lead)
        self.rec.go_away_sent_at = time.monotonic()
        await self.send({"goAway": {"timeLeft": f"{lead:.3f}s"}})
        await asyncio.sleep(lead)
        self.closing = True
        self.rec.close_reason = "session limit"
        await self.ws.close(code=1000, message=b"session limit reached")

    async def on_message(self, raw: str) -> None:
        try:
            msg = snake_keys(json.loads(raw))
        except ValueError:
            await self.ws.close(code=1007, message=b"invalid JSON")
            return
        if "realtime_input" in msg:
            await self.on_realtime_input(msg["realtime_input"])
        elif "client_content" in msg:
            await self.on_client_content(msg["client_content"])
        elif "tool_response" in msg:
            await self.on_tool_response(msg["tool_response"])

    async def on_realtime_input(self, ri: dict[str, Any]) -> None:
        audio = ri.get("audio") or ri.get("media_chunks")
        if isinstance(audio, list):
            audio = audio[0] if audio else None
        if isinstance(audio, dict):
            m = _RATE_RE.search(str(audio.get("mime_type", "")))
            rate = int(m.group(1)) if m else 16000
            if rate not in self.rec.audio_rates:
                self.rec.audio_rates.append(rate)
            pcm = b64_bytes(str(audio.get("data", "")))
            self.rec.audio_in_ms += len(pcm) * 1000 // (2 * rate)
            if self.server_vad:
                if self.vad is None or self.vad.rate != rate:
                    self.vad = EnergyVAD(rate, threshold=self.emu.vad_threshold)
                    self.vad.silence_ms = self._silence_ms
                events = self.vad.feed(pcm)
                if self.vad.loud_in_last_feed:
                    self.last_loud_at = time.monotonic()
                for kind, _ in events:
                    if kind == "start":
                        if self.emu.vad_start_lag_s > 0:
                            self._spawn_late_start(self.emu.vad_start_lag_s)
                        else:
                            await self.caller_started()
                    else:
                        await self.caller_stopped()
        if "activity_start" in ri:
            self.rec.activity.append("start")
            self.in_activity = True
            await self.caller_started()
        if "activity_end" in ri:
            self.rec.activity.append("end")
            self.in_activity = False
            await self.caller_stopped()
        if ri.get("text") and str(ri["text"]).strip():
            self.conv.messages.append({"role": "user", "content": str(ri["text"])})
            self.start_turn("text")

    def _spawn_late_start(self, lag: float) -> None:
        async def late() -> None:
            await asyncio.sleep(lag)
            await self.caller_started()

        task = asyncio.ensure_future(late())
        self._late_starts.add(task)
        task.add_done_callback(self._late_starts.discard)

    async def caller_started(self) -> None:
        task = self.turn_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if self.current is not None:
                self.current.status = "interrupted"
                self.remember_heard(self.current)
            self.rec.interruptions += 1
            await self.send({"serverContent": {"interrupted": True}})

    def remember_heard(self, turn: TurnRecord) -> None:
        # The server keeps what it generated; the client tells it what was heard.
        if self.stream is not None and turn.text:
            said = heard_from_timeline(self.stream.timeline, turn.audio_ms_sent)
            self.conv.messages.append({"role": "assistant", "content": said})

    async def caller_stopped(self) -> None:
        transcript = self.transcript()
        self.rec.user_transcripts.append(transcript)
        self.conv.messages.append({"role": "user", "content": transcript})
        await self.send({"serverContent": {"inputTranscription": {"text": transcript}}})
        self.start_turn("speech_stopped")

    def transcript(self) -> str:
        script = self.emu.transcripts
        turn = self.conv.user_turns
        self.conv.user_turns += 1
        if callable(script):
            return str(script(turn))
        lines = list(script)
        return lines[turn % len(lines)] if lines else ""

    async def on_client_content(self, cc: dict[str, Any]) -> None:
        self.rec.client_contents.append(cc)
        for turn in cc.get("turns") or []:
            if isinstance(turn, dict):
                role = "assistant" if turn.get("role") == "model" else "user"
                text = _content_text(turn)
                if text:
                    self.conv.messages.append({"role": role, "content": text})
        if cc.get("turn_complete"):
            self.start_turn("client_content")

    async def on_tool_response(self, tr: dict[str, Any]) -> None:
        self.rec.tool_responses.append(tr)
        for fr in tr.get("function_responses") or []:
            self.conv.messages.append(
                {
                    "role": "tool",
                    "tool_call_id": fr.get("id"),
                    "content": json.dumps(fr.get("response")),
                }
            )
        if self.pending_tool is not None and not self.pending_tool.done():
            self.pending_tool.set_result(tr)
        else:
            self.start_turn("tool_response")

    def start_turn(self, trigger: str) -> None:
        if self.stalled or self.closing:
            return
        n = len(self.rec.turns) + 1
        f = self.faults
        if f is not None and f.stall_after_turns is not None and n > f.stall_after_turns:
            self.stalled = True
            return
        task = self.turn_task
        if task is not None and not task.done():
            return
        rec = TurnRecord(
            index=n, trigger=trigger, triggered_at=time.monotonic(), speech_end_at=self.last_loud_at
        )
        self.rec.turns.append(rec)
        self.current = rec
        self.turn_task = asyncio.ensure_future(self.model_turn(rec))

    async def model_turn(self, rec: TurnRecord) -> None:
        f = self.faults
        if f is not None and f.drop_on_turn == rec.index:
            self.abort(f"dropped on turn {rec.index}")
            return
        if f is not None and f.malformed_on_turn == rec.index:
            await self.ws.send_str('{"serverContent": {"modelTurn": ')
            return
        delay = self.emu.ttfa.sample_s()
        reply = self.emu.reply(list(self.conv.messages))
        if isinstance(reply, ToolCall) or (
            isinstance(reply, Sequence) and not isinstance(reply, str)
        ):
            calls: list[ToolCall] = (
                [reply]
                if isinstance(reply, ToolCall)
                else [c for c in reply if isinstance(c, ToolCall)]
            )
            await asyncio.sleep(delay)
            fcs = []
            for c in calls:
                cid = c.id or f"fc_{uuid.uuid4().hex[:12]}"
                args = c.arguments if isinstance(c.arguments, dict) else json.loads(c.arguments)
                fcs.append({"id": cid, "name": c.name, "args": args})
                rec.tool_calls.append({"id": cid, "name": c.name, "args": args})
            self.pending_tool = asyncio.get_running_loop().create_future()
            await self.send({"toolCall": {"functionCalls": fcs}})
            await self.pending_tool
            self.pending_tool = None
            rec.status = "tool_answered"
            follow = TurnRecord(
                index=len(self.rec.turns) + 1,
                trigger="tool_response",
                triggered_at=time.monotonic(),
            )
            self.rec.turns.append(follow)
            self.current = follow
            rec = follow
            reply = self.emu.reply(list(self.conv.messages))
            delay = self.emu.ttfa.sample_s()
        text = str(reply) if not isinstance(reply, ToolCall) else "Done."
        rec.text = text
        stream = SpeechStream(self.emu.speech, text, OUTPUT_RATE)
        self.stream = stream
        try:
            await asyncio.sleep(delay)
            await self.speak(rec, text, stream)
        finally:
            stream.cancel()

    async def speak(self, rec: TurnRecord, text: str, stream: SpeechStream) -> None:
        chunk = OUTPUT_RATE * 2 // 10
        start = time.monotonic()
        f = self.faults
        first_word = True
        async for sentence, pcm in stream:
            total = len(pcm)
            rec.audio_ms_total += total * 1000 // (2 * OUTPUT_RATE)
            words = sentence.split()
            words_sent = 0
            for off in range(0, total, chunk):
                piece = pcm[off : off + chunk]
                if rec.first_audio_at is None:
                    rec.first_audio_at = time.monotonic()
                    start = rec.first_audio_at
                await self.send(
                    {
                        "serverContent": {
                            "modelTurn": {
                                "parts": [
                                    {
                                        "inlineData": {
                                            "mimeType": f"audio/pcm;rate={OUTPUT_RATE}",
                                            "data": base64.b64encode(piece).decode(),
                                        }
                                    }
                                ]
                            }
                        }
                    }
                )
                ms = len(piece) * 1000 // (2 * OUTPUT_RATE)
                rec.audio_ms_sent += ms
                self.session_audio_ms += ms
                due = int(len(words) * min(1.0, (off + len(piece)) / total))
                if due > words_sent:
                    delta = " ".join(words[words_sent:due])
                    await self.send(
                        {
                            "serverContent": {
                                "outputTranscription": {"text": ("" if first_word else " ") + delta}
                            }
                        }
                    )
                    first_word = False
                    words_sent = due
                if (
                    f is not None
                    and f.drop_after_audio_ms is not None
                    and (self.session_audio_ms >= f.drop_after_audio_ms)
                ):
                    self.abort(f"dropped after {self.session_audio_ms} ms of audio")
                    return
                wait = start + rec.audio_ms_sent / 1000 / self.emu.audio_speed - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
        self.conv.messages.append({"role": "assistant", "content": text})
        rec.status = "completed"
        await self.send({"serverContent": {"generationComplete": True}})
        await self.send(
            {
                "serverContent": {"turnComplete": True},
                "usageMetadata": {
                    "promptTokenCount": 40,
                    "responseTokenCount": 20,
                    "totalTokenCount": 60,
                },
            }
        )
        await self.new_handle()

    async def new_handle(self) -> None:
        handle = f"h_{uuid.uuid4().hex[:16]}"
        self.emu._handles[handle] = self.conv
        self.rec.handles_sent.append(handle)
        await self.send({"sessionResumptionUpdate": {"newHandle": handle, "resumable": True}})


async def serve_gemini(
    emu: GeminiLiveEmulator,
    ssl_context: ssl.SSLContext | None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> tuple[web.AppRunner, int]:
    """Start ``emu`` (TLS when ``ssl_context`` is given); returns (runner, port)."""
    return await serve_emulator(emu, host, port, ssl_context=ssl_context)
