"""ElevenLabs Conversational AI (Agents) emulator: ``/v1/convai/conversation``.

Speaks the agent WebSocket protocol as the ``elevenlabs`` Python SDK
(``elevenlabs/conversational_ai/conversation.py``) and Pipeswitch's
:class:`~pipeswitch.pipelines.services_elevenlabs.ElevenLabsAgentService` use it,
on loopback:

* ``GET /v1/convai/conversation?agent_id=…`` upgraded to a WebSocket. Public agents
  need nothing else; private ones send ``xi-api-key`` (server-to-server) or come
  through a signed URL, ``GET /v1/convai/conversation/get-signed-url?agent_id=…``
  (``xi-api-key`` required) → ``{"signed_url": "ws://…&conversation_signature=…"}``.
* Client → server: ``conversation_initiation_client_data`` first (its
  ``conversation_config_override`` may set ``agent.prompt.prompt``,
  ``agent.first_message``, ``agent.language``, ``tts.voice_id``); then bare
  ``{"user_audio_chunk": "<b64>"}`` frames (no ``type``: that is the wire contract),
  ``pong`` with the ping's ``event_id``, ``client_tool_result``,
  ``contextual_update``, ``user_message``, ``user_activity``, ``feedback``.
* Server → client: ``conversation_initiation_metadata`` (``conversation_id``,
  ``agent_output_audio_format``, ``user_input_audio_format``), ``user_transcript``,
  ``agent_response``, ``audio`` (``audio_base_64`` + ``event_id``), ``interruption``
  (``event_id`` of the cut response: audio with ``event_id <=`` it is stale),
  ``agent_response_correction`` (what the server now believes was said),
  ``ping`` (``event_id``, ``ping_ms``), ``client_tool_call``.

There is no ASR: caller speech is found by energy (server-side VAD, 10 ms windows)
and each utterance is "recognised" as the next scripted line; replies come from a
script (text, or a :class:`ToolCall` the client must answer). Agent audio is real
speech: synthesized by a Piper HTTP server when ``piper_url`` is set (the tests'
one), else a voiced harmonic stand-in of the right length.

What is reproduced on purpose:

* **Timing**: the reply's first audio leaves ``response_latency`` after the server's
  end-of-turn (``end_silence_ms`` of silence), and audio is streamed faster than
  real time (``stream_speed``), as the real service does, so the *client* owns playout.
* **Barge-in**: caller energy for ``interrupt_min_ms`` while the agent's audio is
  (by the server's own wall-clock estimate) still playing sends ``interruption`` and
  then ``agent_response_correction`` truncated to what that estimate says was heard.
  ConvAI has no client-side truncate: a client that knows better tells the agent
  with ``contextual_update``; both are recorded for the tests.
* **Keepalive**: pings every ``ping_interval_s``; pongs are matched by ``event_id``.

Faults (:class:`ConvAIFaults`): refuse the upgrade, drop mid-call (abort or 1011),
stall (stop sending anything, pings included), send a malformed message.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from aiohttp import ClientSession, ClientTimeout, WSMsgType, web

from pipeswitch.bench.emulators.latency import LatencyModel, LatencySpec
from pipeswitch.bench.emulators.openai_chat import ToolCall
from pipeswitch.bench.emulators.serving import add_admin_routes, serve_emulator
from pipeswitch.bench.fakeswitch.audio import g711_decode

# End of the caller's turn (server VAD) -> first agent audio byte. No published figure
# for ElevenLabs Agents exists in our anchors: this is an assumption built from them
# (LLM TTFT ~400 ms + Flash TTS TTFB 170/190 ms), to be replaced by a measured one.
CONVAI_RESPONSE = LatencySpec(median_ms=600.0, p95_ms=900.0)

AUDIO_FORMATS = ("pcm_8000", "pcm_16000", "pcm_22050", "pcm_24000", "pcm_44100", "pcm_48000")
AudioFormat = str  # "pcm_<rate>" or "ulaw_8000"

ConvAIReply = str | ToolCall
# (user transcript, turn index) -> reply
ConvAIScript = Callable[[str, int], ConvAIReply] | Mapping[str, ConvAIReply]
# (text, rate) -> s16le speech; async so it can ask a Piper server
Synthesizer = Callable[[str, int], Awaitable[bytes]]

DEFAULT_USER_LINES: tuple[str, ...] = ("What are your opening hours tomorrow?",)


def format_rate(fmt: AudioFormat) -> int:
    """Sample rate of a ConvAI audio format name (``pcm_16000`` -> 16000)."""
    kind, _, rate = fmt.partition("_")
    if kind not in ("pcm", "ulaw") or not rate.isdigit():
        raise ValueError(f"unknown ConvAI audio format {fmt!r}")
    return int(rate)


def ulaw_encode(pcm: bytes) -> bytes:
    """G.711 mu-law encode s16le (numpy; the reference algorithm with bias 0x84)."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.int32)
    sign = (x < 0).astype(np.int32) << 7
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exp = np.floor(np.log2(mag)).astype(np.int32) - 7
    exp = np.clip(exp, 0, 7)
    mant = (mag >> (exp + 3)) & 0x0F
    return (~(sign | (exp << 4) | mant) & 0xFF).astype(np.uint8).tobytes()


def _first_loud(pcm: bytes, peak: int) -> int:
    """Index of the first sample louder than ``peak`` (-1: none)."""
    a = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2").astype(np.int32)
    idx = np.flatnonzero(np.abs(a) > peak)
    return int(idx[0]) if idx.size else -1


def _wav_body(wav: bytes) -> bytes:
    """The samples of a (possibly streamed, size-less) mono s16le WAV."""
    at = wav.find(b"data", 12)
    body = wav[at + 8 :] if at >= 0 else wav[44:]
    return body[: len(body) - len(body) % 2]


def scripted_reply(script: ConvAIScript, transcript: str, turn: int) -> ConvAIReply:
    """Apply a script: a callable, or a keyword table (first key found in the text)."""
    if callable(script):
        return script(transcript, turn)
    low = transcript.lower()
    for key, reply in script.items():
        if key.lower() in low:
            return reply
    return script.get("*", f"You said: {transcript}")


def default_script(transcript: str, turn: int) -> ConvAIReply:
    """Echo the caller's words back as one short sentence."""
    return f"You asked: {transcript.rstrip('?.!')}. We open at nine tomorrow."


def voiced_standin(text: str, rate: int) -> bytes:
    """A speech-like stand-in (harmonics with a syllable envelope), ~14 chars/s."""
    secs = max(0.4, len(text) / 14.0)
    t = np.arange(int(secs * rate)) / rate
    f0 = 120.0 + 15.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    sig = sum(np.sin(k * phase) / k for k in range(1, 6) if k * 150 < rate / 2)
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t) ** 2
    out = 6000.0 * np.asarray(sig) * env
    return np.clip(out, -32767, 32767).astype("<i2").tobytes()


@dataclass
class ConvAISettings:
    """Protocol and detector tunables.

    Attributes:
        input_format: ``user_input_audio_format`` announced in the metadata.
        output_format: ``agent_output_audio_format`` (``pcm_<rate>`` or ``ulaw_8000``).
        agent_ids: Agents that exist (None: any id is accepted).
        api_key: If set, ``xi-api-key`` (or a signed URL) must carry it.
        require_auth: Private agent: refuse connections with neither key nor signature.
        first_message: Spoken on connect unless the client overrides it.
        energy_threshold_dbfs: Server VAD level for a voiced 10 ms window.
        min_speech_ms: Voiced time that opens a caller utterance.
        end_silence_ms: Silence that ends the caller's turn (server turn-taking).
        interrupt_min_ms: Caller speech over the agent before it stops.
        stream_speed: Agent audio is sent this many times faster than real time.
        chunk_ms: Audio per ``audio`` event.
        ping_interval_s: Ping period (None: no pings).
        init_timeout_s: Close with 1008 if no initiation message comes by then.
        chars_per_sec: Speaking rate used to truncate a reply to what was heard.
    """

    input_format: AudioFormat = "pcm_16000"
    output_format: AudioFormat = "pcm_16000"
    agent_ids: Sequence[str] | None = None
    api_key: str | None = None
    require_auth: bool = False
    first_message: str | None = "Hello, this is the emulated agent. How can I help?"
    energy_threshold_dbfs: float = -40.0
    min_speech_ms: int = 60
    end_silence_ms: int = 400
    interrupt_min_ms: int = 120
    stream_speed: float = 2.0
    chunk_ms: int = 100
    ping_interval_s: float | None = 2.0
    init_timeout_s: float = 5.0
    chars_per_sec: float = 14.0


@dataclass
class ConvAIFaults:
    """Faults for new conversations.

    Attributes:
        reject_status: Refuse the upgrade with this HTTP status.
        drop_after_s: Drop the conversation this long after it opened.
        drop_after_turns: Drop right after the Nth caller turn is transcribed.
        drop_mode: ``abort`` (TCP reset, 1006) or ``close`` (1011).
        stall_after_s: Stop sending anything (pings too) after this long.
        malformed_after_turns: After the Nth caller turn, send one malformed message
            (invalid JSON, then an unknown type, then an ``audio`` without its event).
        connections: Apply to this many new connections only (None: all).
    """

    reject_status: int | None = None
    drop_after_s: float | None = None
    drop_after_turns: int | None = None
    drop_mode: Literal["abort", "close"] = "abort"
    stall_after_s: float | None = None
    malformed_after_turns: int | None = None
    connections: int | None = None

    @property
    def active(self) -> bool:
        """Whether any fault is set."""
        return any(
            v is not None
            for v in (
                self.reject_status,
                self.drop_after_s,
                self.drop_after_turns,
                self.stall_after_s,
                self.malformed_after_turns,
            )
        )


@dataclass
class AgentTurnRecord:
    """One agent response and what became of it."""

    event_id: int
    text: str
    audio_s: float = 0.0
    first_audio_at: float | None = None
    # When the first audible sample (peak > 500) would play if the client played the
    # reply from its first sample the moment that was sent: the reply's leading silence
    # is the provider's latency. (Not the audible chunk's send time: audio streams 2x
    # faster than real time, and the silence before it still has to play.)
    first_voiced_at: float | None = None
    audio_done_at: float | None = None
    interrupted_at: float | None = None
    corrected_text: str | None = None
    tool_call: dict[str, Any] | None = None


@dataclass
class UserTurnRecord:
    """One caller utterance found by the server VAD."""

    turn: int
    text: str
    speech_start_at: float
    speech_end_at: float | None = None
    transcript_at: float | None = None
    over_agent: bool = False
    interrupted_event_id: int | None = None


@dataclass
class ConversationRecord:
    """Everything one conversation did; read by tests and the bench."""

    id: str
    agent_id: str
    auth: str
    opened_at: float
    query: dict[str, str] = field(default_factory=dict)
    init: dict[str, Any] | None = None
    closed_at: float | None = None
    close_reason: str = ""
    audio_in_s: float = 0.0
    audio_in_chunks: int = 0
    user_turns: list[UserTurnRecord] = field(default_factory=list)
    agent_turns: list[AgentTurnRecord] = field(default_factory=list)
    pings_sent: list[int] = field(default_factory=list)
    pongs: dict[int, float] = field(default_factory=dict)
    contextual_updates: list[str] = field(default_factory=list)
    user_messages: list[str] = field(default_factory=list)
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    malformed_in: list[str] = field(default_factory=list)
    malformed_out: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = dataclasses.asdict(self)
        d["pongs"] = {str(k): v for k, v in self.pongs.items()}
        return d

    def override(self, *path: str) -> Any:
        """A value from the client's ``conversation_config_override`` (or None)."""
        node: Any = (self.init or {}).get("conversation_config_override") or {}
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node


class ElevenLabsConvAIEmulator:
    """Serves the agent endpoint for any number of concurrent conversations."""

    def __init__(
        self,
        *,
        settings: ConvAISettings | None = None,
        faults: ConvAIFaults | None = None,
        response_latency: LatencyModel | None = None,
        user_lines: Sequence[str] | Callable[[int], str] | None = None,
        script: ConvAIScript | None = None,
        piper_url: str | None = None,
        synthesize: Synthesizer | None = None,
    ) -> None:
        """Create (not start) the emulator; see :class:`ConvAISettings` for the knobs."""
        self.settings = settings or ConvAISettings()
        self.faults = faults or ConvAIFaults()
        self.response_latency = response_latency or CONVAI_RESPONSE.model(seed=0)
        self.user_lines: Sequence[str] | Callable[[int], str] = user_lines or DEFAULT_USER_LINES
        self.script: ConvAIScript = script or default_script
        self.piper_url = piper_url
        self._synthesize = synthesize
        self._speech_cache: dict[tuple[str, int], bytes] = {}
        self._http: ClientSession | None = None
        self._faulted = 0
        self._signatures: set[str] = set()
        self.conversations: list[ConversationRecord] = []
        self.rejected = 0
        self._live: set[_Conversation] = set()

    # -- public helpers -------------------------------------------------------

    def set_faults(self, faults: ConvAIFaults) -> None:
        """Replace the faults for new connections."""
        self.faults = faults
        self._faulted = 0

    def clear(self) -> None:
        """Forget recorded conversations (open ones keep going)."""
        self.conversations = []

    def user_line(self, turn: int) -> str:
        """The scripted transcript of the caller's ``turn``-th utterance."""
        if callable(self.user_lines):
            return str(self.user_lines(turn))
        lines = list(self.user_lines)
        return lines[turn % len(lines)] if lines else ""

    async def speech(self, text: str, rate: int) -> bytes:
        """Agent speech for ``text`` at ``rate`` (Piper when configured; cached)."""
        key = (text, rate)
        if key in self._speech_cache:
            return self._speech_cache[key]
        pcm: bytes | None = None
        if self._synthesize is not None:
            pcm = await self._synthesize(text, rate)
        elif self.piper_url:
            if self._http is None:
                self._http = ClientSession(timeout=ClientTimeout(total=30))
            sep = "&" if "?" in self.piper_url else "?"
            async with self._http.post(
                f"{self.piper_url}{sep}rate={rate}", json={"text": text, "voice": None}
            ) as r:
                r.raise_for_status()
                pcm = _wav_body(await r.read())
        if not pcm:
            pcm = voiced_standin(text, rate)
        self._speech_cache[key] = pcm
        return pcm

    def drop_live(self, mode: Literal["abort", "close"] = "abort") -> int:
        """Drop every open conversation now, as a provider outage would; returns how many."""
        live = [c for c in self._live if not c.ws.closed]
        for conv in live:
            conv.drop_now("drop_live", mode)
        return len(live)

    async def close_all(self) -> None:
        """Close every conversation (1001) and the Piper client."""
        for conv in list(self._live):
            if not conv.ws.closed:
                conv.record.close_reason = "server shutdown"
                await conv.ws.close(code=1001, message=b"Emulator shutting down")
        if self._http is not None:
            await self._http.close()
            self._http = None

    def add_routes(self, app: web.Application) -> None:
        """Register the conversation, signed-URL and admin endpoints."""
        app.router.add_get("/v1/convai/conversation", self.handle_conversation)
        app.router.add_get("/v1/convai/conversation/get-signed-url", self.handle_signed_url)
        add_admin_routes(
            app,
            self,
            ConvAIFaults,
            "conversations",
            lambda: {"conversations": [c.to_dict() for c in self.conversations]},
        )

    # -- HTTP / WebSocket -----------------------------------------------------

    def _key_ok(self, key: str) -> bool:
        want = self.settings.api_key
        return bool(key) and (want is None or key == want)

    async def handle_signed_url(self, request: web.Request) -> web.Response:
        """``get-signed-url``: a one-use signature for a private agent."""
        if not self._key_ok(request.headers.get("xi-api-key", "")):
            return _detail(401, "invalid_api_key", "Invalid API key")
        agent_id = request.query.get("agent_id", "")
        if not self._agent_ok(agent_id):
            return _detail(404, "agent_not_found", f"Agent {agent_id} not found")
        sig = uuid.uuid4().hex
        self._signatures.add(sig)
        host = request.host
        url = f"ws://{host}/v1/convai/conversation?agent_id={agent_id}&conversation_signature={sig}"
        return web.json_response({"signed_url": url})

    def _agent_ok(self, agent_id: str) -> bool:
        ids = self.settings.agent_ids
        return bool(agent_id) and (ids is None or agent_id in ids)

    async def handle_conversation(self, request: web.Request) -> web.StreamResponse:
        """Authenticate, apply faults, then run one conversation."""
        agent_id = request.query.get("agent_id", "")
        if not self._agent_ok(agent_id):
            return _detail(404, "agent_not_found", f"Agent {agent_id} not found")
        sig = request.query.get("conversation_signature", "")
        key = request.headers.get("xi-api-key", "")
        if sig:
            if sig not in self._signatures:
                return _detail(403, "invalid_signature", "Invalid or used signature")
            self._signatures.discard(sig)
            auth = "signed_url"
        elif key:
            if not self._key_ok(key):
                return _detail(401, "invalid_api_key", "Invalid API key")
            auth = "xi-api-key"
        elif self.settings.require_auth:
            return _detail(403, "auth_required", "This agent requires authentication")
        else:
            auth = "public"
        faults = self._take_faults()
        if faults is not None and faults.reject_status is not None:
            self.rejected += 1
            return _detail(faults.reject_status, "emulated_fault", "Emulated rejection")

        ws = web.WebSocketResponse(autoping=True, max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        record = ConversationRecord(
            id=f"conv_{uuid.uuid4().hex[:20]}",
            agent_id=agent_id,
            auth=auth,
            opened_at=time.monotonic(),
            query=dict(request.query),
        )
        self.conversations.append(record)
        conv = _Conversation(self, ws, request, record, faults)
        self._live.add(conv)
        try:
            await conv.run()
        finally:
            self._live.discard(conv)
            conv.shutdown()
            record.closed_at = time.monotonic()
        return ws

    def _take_faults(self) -> ConvAIFaults | None:
        f = self.faults
        if not f.active:
            return None
        if f.connections is not None and self._faulted >= f.connections:
            return None
        self._faulted += 1
        return f


def _detail(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"detail": {"status": code, "message": message}}, status=status)


class _Conversation:
    """One agent conversation: server VAD, turn-taking, speaking, pings."""

    def __init__(
        self,
        emu: ElevenLabsConvAIEmulator,
        ws: web.WebSocketResponse,
        request: web.Request,
        record: ConversationRecord,
        faults: ConvAIFaults | None,
    ) -> None:
        self.emu = emu
        self.ws = ws
        self.request = request
        self.record = record
        self.faults = faults
        s = emu.settings
        self.s = s
        self.in_rate = format_rate(s.input_format)
        self.out_rate = format_rate(s.output_format)
        self.win = max(1, self.in_rate // 100)  # 10 ms
        self.thr = (32768.0 * 10 ** (s.energy_threshold_dbfs / 20.0)) ** 2
        self.leftover: npt.NDArray[np.int16] = np.zeros(0, dtype=np.int16)
        self.voiced_run_ms = 0
        self.silent_run_ms = 0
        self.utt: UserTurnRecord | None = None
        self.turns = 0
        self.event_id = 0
        self.ping_id = 0
        self.speaking: AgentTurnRecord | None = None
        self.speak_task: asyncio.Task[None] | None = None
        self.speak_started_at = 0.0
        self.pending_tool: tuple[str, asyncio.Future[dict[str, Any]]] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stalled = False
        self.dropped = False
        self.send_lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def shutdown(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    async def run(self) -> None:
        try:
            first = await self.ws.receive(timeout=self.s.init_timeout_s)
        except TimeoutError:
            self.record.close_reason = "no initiation message"
            await self.ws.close(code=1008, message=b"Expected conversation_initiation_client_data")
            return
        if first.type is not WSMsgType.TEXT:
            self.record.close_reason = "client closed before initiation"
            return
        try:
            init = json.loads(first.data)
        except ValueError:
            init = None
        if not isinstance(init, dict) or init.get("type") != "conversation_initiation_client_data":
            self.record.close_reason = "bad initiation message"
            await self.ws.close(code=1008, message=b"Expected conversation_initiation_client_data")
            return
        self.record.init = init
        await self._send(
            {
                "type": "conversation_initiation_metadata",
                "conversation_initiation_metadata_event": {
                    "conversation_id": self.record.id,
                    "agent_output_audio_format": self.s.output_format,
                    "user_input_audio_format": self.s.input_format,
                },
            }
        )
        self._arm_faults()
        if self.s.ping_interval_s:
            self._spawn(self._pinger(self.s.ping_interval_s))
        first_message = self.record.override("agent", "first_message")
        if first_message is None:
            first_message = self.s.first_message
        if first_message:
            self._start_reply(str(first_message), delay=0.0)
        while True:
            msg = await self.ws.receive()
            if msg.type is WSMsgType.TEXT:
                await self._on_text(msg.data)
            elif msg.type is WSMsgType.BINARY:
                self.record.malformed_in.append("binary frame")
            else:
                if not self.record.close_reason:
                    self.record.close_reason = "dropped" if self.dropped else "client closed"
                return

    def _arm_faults(self) -> None:
        f = self.faults
        if f is None:
            return
        loop = asyncio.get_running_loop()
        if f.drop_after_s is not None:
            loop.call_later(f.drop_after_s, self._drop, "drop_after_s")
        if f.stall_after_s is not None:
            loop.call_later(f.stall_after_s, self._stall)

    def _stall(self) -> None:
        self.stalled = True
        self.record.close_reason = "fault: stalled"

    def _drop(self, why: str) -> None:
        self.drop_now(why, self.faults.drop_mode if self.faults is not None else "abort")

    def drop_now(self, why: str, mode: Literal["abort", "close"]) -> None:
        if self.dropped or self.ws.closed:
            return
        self.dropped = True
        self.record.close_reason = f"fault: {why}"
        if mode == "close":
            self._spawn(self.ws.close(code=1011, message=b"Emulated provider failure"))
        elif self.request.transport is not None:
            self.request.transport.abort()

    async def _send(self, msg: dict[str, Any] | str) -> None:
        if self.stalled or self.ws.closed:
            return
        async with self.send_lock:
            try:
                await self.ws.send_str(msg if isinstance(msg, str) else json.dumps(msg))
            except ConnectionError:
                pass

    # -- client messages ------------------------------------------------------

    async def _on_text(self, data: str) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            self.record.malformed_in.append(data[:80])
            return
        if not isinstance(msg, dict):
            self.record.malformed_in.append(data[:80])
            return
        if "user_audio_chunk" in msg:
            try:
                chunk = base64.b64decode(msg["user_audio_chunk"], validate=True)
            except (ValueError, TypeError):
                self.record.malformed_in.append("bad base64 audio")
                return
            self._on_audio(chunk, time.monotonic())
            return
        kind = msg.get("type")
        if kind == "pong":
            eid = msg.get("event_id")
            if isinstance(eid, int):
                self.record.pongs[eid] = time.monotonic()
            else:
                self.record.malformed_in.append("pong without event_id")
        elif kind == "client_tool_result":
            self.record.tool_results.append(msg)
            if self.pending_tool is not None and msg.get("tool_call_id") == self.pending_tool[0]:
                fut = self.pending_tool[1]
                if not fut.done():
                    fut.set_result(msg)
        elif kind == "contextual_update":
            self.record.contextual_updates.append(str(msg.get("text", "")))
        elif kind == "user_message":
            text = str(msg.get("text", ""))
            self.record.user_messages.append(text)
            self._on_user_text(text)
        elif kind in ("user_activity", "feedback"):
            pass
        else:
            self.record.malformed_in.append(f"unknown type {kind!r}")

    # -- server VAD -----------------------------------------------------------

    def _on_audio(self, chunk: bytes, now: float) -> None:
        if self.s.input_format.startswith("ulaw"):
            chunk = g711_decode(chunk, "pcmu")
        if len(chunk) % 2:
            chunk = chunk[:-1]
        self.record.audio_in_chunks += 1
        samples = np.frombuffer(chunk, dtype="<i2")
        self.record.audio_in_s += samples.size / self.in_rate
        buf = np.concatenate((self.leftover, samples)) if self.leftover.size else samples
        n = buf.size // self.win
        self.leftover = buf[n * self.win :].copy()
        if n == 0:
            return
        frames = buf[: n * self.win].reshape(n, self.win).astype(np.float32)
        voiced = np.einsum("ij,ij->i", frames, frames) / self.win > self.thr
        for v in voiced.tolist():
            self._vad_step(bool(v), now)

    def _agent_audible(self, now: float) -> bool:
        """Whether, by the server's wall-clock estimate, agent audio is still playing."""
        a = self.speaking
        if a is None or a.first_audio_at is None or a.interrupted_at is not None:
            return False
        return now < a.first_audio_at + a.audio_s + 0.1 or self.speak_task is not None

    def _vad_step(self, voiced: bool, now: float) -> None:
        if voiced:
            self.voiced_run_ms += 10
            self.silent_run_ms = 0
            if self.utt is None and self.voiced_run_ms >= self.s.min_speech_ms:
                self.utt = UserTurnRecord(
                    turn=self.turns,
                    text="",
                    speech_start_at=now - self.voiced_run_ms / 1000.0,
                    over_agent=self._agent_audible(now),
                )
                self.record.user_turns.append(self.utt)
            utt = self.utt
            if (
                utt is not None
                and utt.interrupted_event_id is None
                and self.voiced_run_ms >= self.s.interrupt_min_ms
                and self._agent_audible(now)
            ):
                self._interrupt(utt, now)
        else:
            self.silent_run_ms += 10
            if self.silent_run_ms >= 30:
                self.voiced_run_ms = 0
            if self.utt is not None and self.silent_run_ms >= self.s.end_silence_ms:
                utt, self.utt = self.utt, None
                utt.speech_end_at = now - self.silent_run_ms / 1000.0
                if self._agent_audible(now) and utt.interrupted_event_id is None:
                    return  # a blip over the agent (echo, cough): not a turn
                self._end_user_turn(utt, now)

    def _interrupt(self, utt: UserTurnRecord, now: float) -> None:
        a = self.speaking
        if a is None:
            return
        a.interrupted_at = now
        utt.interrupted_event_id = a.event_id
        if self.speak_task is not None:
            self.speak_task.cancel()
            self.speak_task = None
        heard_s = max(0.0, now - (a.first_audio_at or now))
        n = int(heard_s * self.s.chars_per_sec)
        cut = a.text.rfind(" ", 0, n + 1) if n < len(a.text) else len(a.text)
        a.corrected_text = a.text[: max(0, cut)].rstrip(" ,;:")
        self._spawn(self._send_interruption(a))

    async def _send_interruption(self, a: AgentTurnRecord) -> None:
        await self._send({"type": "interruption", "interruption_event": {"event_id": a.event_id}})
        await self._send(
            {
                "type": "agent_response_correction",
                "agent_response_correction_event": {
                    "original_agent_response": a.text,
                    "corrected_agent_response": a.corrected_text or "",
                },
            }
        )

    def _end_user_turn(self, utt: UserTurnRecord, now: float) -> None:
        turn = self.turns
        self.turns += 1
        utt.text = self.emu.user_line(turn)
        self._on_user_text(utt.text, utt)

    def _on_user_text(self, text: str, utt: UserTurnRecord | None = None) -> None:
        self._spawn(self._answer(text, utt))

    async def _answer(self, text: str, utt: UserTurnRecord | None) -> None:
        await self._send(
            {"type": "user_transcript", "user_transcription_event": {"user_transcript": text}}
        )
        if utt is not None:
            utt.transcript_at = time.monotonic()
        n_user = len(self.record.user_turns) + len(self.record.user_messages)
        f = self.faults
        if f is not None and f.drop_after_turns is not None and n_user >= f.drop_after_turns:
            self._drop("drop_after_turns")
            return
        if f is not None and f.malformed_after_turns == n_user:
            await self._send_malformed()
        reply = scripted_reply(self.emu.script, text, max(0, n_user - 1))
        delay = self.emu.response_latency.sample_s()
        if isinstance(reply, ToolCall):
            said = await self._tool_round_trip(reply, delay)
            if said is not None:
                self._start_reply(said, 0.1)
            return
        self._start_reply(reply, delay)

    async def _send_malformed(self) -> None:
        self.record.malformed_out += 1
        await self._send("{not json")
        await self._send({"type": "totally_new_event", "x": 1})
        await self._send({"type": "audio", "nothing": True})

    async def _tool_round_trip(self, call: ToolCall, delay: float) -> str | None:
        await asyncio.sleep(delay)
        call_id = call.id or f"toolu_{uuid.uuid4().hex[:12]}"
        params = call.arguments if isinstance(call.arguments, dict) else json.loads(call.arguments)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending_tool = (call_id, fut)
        self.event_id += 1
        tool: dict[str, Any] = {"name": call.name, "parameters": params}
        rec = AgentTurnRecord(event_id=self.event_id, text="", tool_call=tool)
        self.record.agent_turns.append(rec)
        await self._send(
            {
                "type": "client_tool_call",
                "client_tool_call": {
                    "tool_name": call.name,
                    "tool_call_id": call_id,
                    "parameters": params,
                    "expects_response": True,
                },
            }
        )
        try:
            result = await asyncio.wait_for(fut, 10.0)
        except TimeoutError:
            return "Sorry, I could not look that up."
        finally:
            self.pending_tool = None
        tool["result"] = result.get("result")
        return f"Here is what I found: {result.get('result')}."

    # -- speaking -------------------------------------------------------------

    def _start_reply(self, text: str, delay: float) -> None:
        if self.speak_task is not None:
            self.speak_task.cancel()
        self.event_id += 1
        rec = AgentTurnRecord(event_id=self.event_id, text=text)
        self.record.agent_turns.append(rec)
        self.speaking = rec
        self.speak_task = self._spawn(self._speak(rec, delay))

    async def _speak(self, rec: AgentTurnRecord, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            pcm = await self.emu.speech(rec.text, self.out_rate)
            await self._send(
                {"type": "agent_response", "agent_response_event": {"agent_response": rec.text}}
            )
            step = int(self.out_rate * self.s.chunk_ms / 1000) * 2
            t0 = time.monotonic()
            rec.first_audio_at = t0
            for i in range(0, len(pcm), step):
                chunk = pcm[i : i + step]
                payload = ulaw_encode(chunk) if self.s.output_format.startswith("ulaw") else chunk
                await self._send(
                    {
                        "type": "audio",
                        "audio_event": {
                            "audio_base_64": base64.b64encode(payload).decode(),
                            "event_id": rec.event_id,
                        },
                    }
                )
                if rec.first_voiced_at is None and (at := _first_loud(chunk, 500)) >= 0:
                    # Playable once sent and once the audio before it has played.
                    rec.first_voiced_at = max(time.monotonic(), t0 + rec.audio_s) + (
                        at / self.out_rate
                    )
                rec.audio_s += len(chunk) / 2 / self.out_rate
                due = t0 + rec.audio_s / self.s.stream_speed
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            rec.audio_done_at = time.monotonic()
        finally:
            if self.speak_task is asyncio.current_task():
                self.speak_task = None

    async def _pinger(self, period: float) -> None:
        last_rtt: int | None = None
        while not self.ws.closed:
            await asyncio.sleep(period)
            self.ping_id += 1
            eid = self.ping_id
            sent = time.monotonic()
            self.record.pings_sent.append(eid)
            await self._send({"type": "ping", "ping_event": {"event_id": eid, "ping_ms": last_rtt}})
            await asyncio.sleep(min(period / 2, 0.5))
            got = self.record.pongs.get(eid)
            last_rtt = None if got is None else math.ceil((got - sent) * 1000)


async def serve_convai(
    emu: ElevenLabsConvAIEmulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Start ``emu`` on its own port (0: a free one); returns the runner and the port."""
    return await serve_emulator(emu, host, port)
