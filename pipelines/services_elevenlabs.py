"""ElevenLabs Conversational AI (Agents) as a Pipecat speech-to-speech service.

Pipecat 1.14 has no service for ElevenLabs Agents (feature request
pipecat-ai/pipecat#2812 was closed), so this is one in Pipecat's style: an
:class:`~pipecat.services.llm_service.LLMService` over the agent WebSocket, like
``OpenAIRealtimeLLMService``. The agent runs ASR, the LLM, TTS and turn-taking on
ElevenLabs' side; this service moves audio and events:

* caller audio (``InputAudioRawFrame``) -> ``{"user_audio_chunk": b64}`` in the
  agent's input format (resampled at most once, only if the pipeline's input rate
  is not already the agent's; mu-law encoded for ``ulaw_8000``);
* ``audio`` events -> ``TTSAudioRawFrame`` at the agent's output rate, bracketed by
  ``TTSStartedFrame``/``TTSStoppedFrame`` and ``LLMFullResponseStart/EndFrame``; the
  output transport's serializer resamples to the call's rate (the one edge);
* ``agent_response`` -> an ``AggregatedTextFrame`` before the audio and a
  ``TTSTextFrame`` after it, so the output transport and the assistant aggregator
  record what was actually played, exactly as in the cascade;
* ``user_transcript`` -> a ``TranscriptionFrame`` (downstream: the pipeline records
  it, after the echo guard had its say on backchannels);
* ``interruption`` -> Pipecat's interruption (``InterruptionFrame`` both ways);
  audio of the cut response (``event_id <=`` the interruption's) is dropped;
* ``ping`` -> ``pong`` with the same ``event_id``;
* ``client_tool_call`` -> Pipecat's function-call machinery (``run_function_calls``:
  ``FunctionCallsStartedFrame``, the registered handler, ``FunctionCallResultFrame``)
  -> ``client_tool_result``.

Barge-in memory. ConvAI has **no client-side truncate** (nothing like OpenAI's
``conversation.item.truncate``): the server cuts its own record of the agent's turn
when *its* VAD interrupts, and reports the cut with ``agent_response_correction``,
estimated from what it streamed, not from what the phone played. What a client may
send is ``contextual_update``: non-interrupting text added to the conversation. So on
every interruption this service tells the agent what the caller actually heard
(estimated from playout: the output transport's ``BotStartedSpeakingFrame`` to the
interruption), and keeps the server's correction for the record.

A refused or lost connection makes the service unusable
(``push_error(force_treat_as_permanent=True)``) and fires ``on_agent_disconnected``,
which is what a fallback to the cascade hangs on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import numpy as np
from loguru import logger
from pipecat.frames.frames import (
    AggregatedTextFrame,
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    FunctionCallCancelFrame,
    FunctionCallFromLLM,
    FunctionCallResultFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    StartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.llm_service import LLMService
from pipecat.services.settings import LLMSettings
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.text.base_text_aggregator import TextType
from pipecat.utils.time import time_now_iso8601
from pipecat.utils.types import NOT_GIVEN, NotGiven, is_given
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as websocket_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pipeswitch.processors.heard_context import heard_prefix
from pipeswitch.transports.resample import Resampler, edge_resampler

DEFAULT_BASE_URL = "wss://api.elevenlabs.io"
# Speaking rate assumed until a response's own text/audio ratio is known.
DEFAULT_CHARS_PER_SEC = 14.0


def format_rate(fmt: str) -> int:
    """Sample rate of a ConvAI audio format (``pcm_16000`` -> 16000, ``ulaw_8000`` -> 8000)."""
    kind, _, rate = fmt.partition("_")
    if kind not in ("pcm", "ulaw") or not rate.isdigit():
        raise ValueError(f"unknown ElevenLabs audio format {fmt!r}")
    return int(rate)


def _ulaw_table() -> np.ndarray[Any, np.dtype[np.int16]]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


_ULAW_DECODE = _ulaw_table()


def ulaw_decode(data: bytes) -> bytes:
    """G.711 mu-law -> s16le."""
    return _ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)].astype("<i2").tobytes()


def ulaw_encode(pcm: bytes) -> bytes:
    """s16le -> G.711 mu-law (bias 0x84, clip 32635)."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.int32)
    sign = (x < 0).astype(np.int32) << 7
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exp = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mant = (mag >> (exp + 3)) & 0x0F
    return (~(sign | (exp << 4) | mant) & 0xFF).astype(np.uint8).tobytes()


class Playout(Protocol):
    """What the caller has heard, measured where the audio leaves for the phone."""

    def mark(self) -> float:
        """A reference point (seconds of bot audio written so far)."""
        ...

    def heard_since(self, mark: float) -> float:
        """Seconds written since ``mark`` that the caller heard."""
        ...


@dataclass
class ElevenLabsAgentSettings(LLMSettings):
    """Runtime settings; each given, non-None one becomes a ``conversation_config_override``.

    The agent's own configuration (on ElevenLabs) must allow the override.

    Parameters:
        first_message: What the agent says first; ``""`` for nothing (the server
            plays its own greeting).
        voice_id: ``tts.voice_id`` override.
        language: ``agent.language`` override (ISO code).
    """

    first_message: str | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    voice_id: str | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    language: str | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


@dataclass
class _Response:
    """The agent response being received."""

    event_id: int
    text: str = ""
    audio_secs: float = 0.0
    audio_started: bool = False


class ElevenLabsAgentService(LLMService):
    """An ElevenLabs Agents conversation as a Pipecat LLM-like service.

    Events: ``on_agent_connected(service, conversation_id)``,
    ``on_agent_disconnected(service, reason)``, ``on_agent_correction(service,
    original, corrected)``.
    """

    Settings = ElevenLabsAgentSettings
    _settings: ElevenLabsAgentSettings

    def __init__(
        self,
        *,
        agent_id: str,
        api_key: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        use_signed_url: bool = False,
        input_format: str = "pcm_16000",
        output_format: str = "pcm_16000",
        context: LLMContext | None = None,
        settings: ElevenLabsAgentSettings | None = None,
        connect_timeout_secs: float = 3.0,
        stall_timeout_secs: float = 15.0,
        response_idle_secs: float = 0.4,
        user_id: str | None = None,
        playout: Playout | None = None,
        log_context: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Configure the conversation; nothing is connected until the pipeline starts.

        Args:
            agent_id: The agent (``agent_…``).
            api_key: ``xi-api-key``; required for private agents.
            base_url: ``wss://`` (or ``ws://`` for the emulator) origin of the API.
            use_signed_url: Fetch a one-use signed URL over HTTPS first (the key then
                never travels on the WebSocket).
            input_format: The agent's configured ``user_input_audio_format``; the
                metadata's value wins if it differs.
            output_format: The agent's configured ``agent_output_audio_format``.
            context: The call's context, carried by function calls.
            settings: Overrides (prompt, first message, voice, language).
            connect_timeout_secs: Budget for the upgrade and the initiation metadata.
            stall_timeout_secs: No message at all (pings included) for this long
                counts as a lost connection.
            response_idle_secs: An agent response is over when no audio for it came
                for this long (ConvAI sends no end-of-audio event by default).
            user_id: Sent in the initiation message.
            playout: Played-out audio at the transport; without it, playout is timed
                from the output transport's ``BotStartedSpeakingFrame``.
            log_context: Fields bound to every log line (``call``, ``tenant``).
            **kwargs: Passed to :class:`LLMService`.
        """
        default_settings = ElevenLabsAgentSettings(
            model=None,
            system_instruction=None,
            temperature=None,
            max_tokens=None,
            top_p=None,
            top_k=None,
            frequency_penalty=None,
            presence_penalty=None,
            seed=None,
            filter_incomplete_user_turns=False,
            user_turn_completion_config=None,
            first_message=None,
            voice_id=None,
            language=None,
        )
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(settings=default_settings, **kwargs)
        format_rate(input_format)
        format_rate(output_format)
        self._agent_id = agent_id
        self._api_key = api_key
        self._base_url = base_url.rstrip("/")
        self._use_signed_url = use_signed_url
        self._input_format = input_format
        self._output_format = output_format
        self._context = context or LLMContext()
        self._connect_timeout = connect_timeout_secs
        self._stall_timeout = stall_timeout_secs
        self._idle_secs = response_idle_secs
        self._user_id = user_id
        self._playout = playout
        self._reply_mark = 0.0
        self._log = logger.bind(**(log_context or {}))
        self._ws: ClientConnection | None = None
        self._receive_task: asyncio.Task[None] | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._in_resampler: Resampler | None = None
        self._pending_audio = bytearray()
        self._ready = asyncio.Event()
        self._disconnecting = False
        self._cut_event_id = 0
        self._response: _Response | None = None
        self._bot_started_at: float | None = None
        self._played_response: _Response | None = None
        self._open_tool_calls: set[str] = set()
        self.conversation_id: str | None = None
        self.corrections: list[tuple[str, str]] = []
        self.heard_updates: list[str] = []
        self.pings_answered = 0
        self.malformed_messages = 0
        self.disconnect_reason: str | None = None
        # Set by a pipeline builder: the call's fallback record (inspected by tests).
        self.fallback: Any = None
        self._register_event_handler("on_agent_connected")
        self._register_event_handler("on_agent_disconnected")
        self._register_event_handler("on_agent_correction")

    # -- properties -------------------------------------------------------------

    @property
    def context(self) -> LLMContext:
        """The conversation so far, as the cascade would hold it."""
        return self._context

    @property
    def input_rate(self) -> int:
        """Sample rate the agent expects from the caller."""
        return format_rate(self._input_format)

    @property
    def output_rate(self) -> int:
        """Sample rate of the agent's audio."""
        return format_rate(self._output_format)

    @property
    def connected(self) -> bool:
        """Whether the conversation is up (metadata received, socket open)."""
        return self._ready.is_set() and self._ws is not None

    def can_generate_metrics(self) -> bool:
        """TTFB is measured from the user transcript to the first agent audio."""
        return True

    # -- lifecycle --------------------------------------------------------------

    async def start(self, frame: StartFrame) -> None:
        """Dial the agent once the pipeline starts, from a task of its own.

        Awaited here, a provider that accepts TCP and never answers held the
        StartFrame (and the whole call, the fallback's budget with it) for the
        connect timeout. Audio before the conversation is up is held (the last 2 s)
        and sent once it is.
        """
        await super().start(frame)
        self._connect_task = self.create_task(self._connect(), "connect")

    async def stop(self, frame: EndFrame) -> None:
        """Close the conversation on a normal end of call."""
        await super().stop(frame)
        await self._disconnect()

    async def cancel(self, frame: CancelFrame) -> None:
        """Close the conversation when the call is cancelled (hang-up)."""
        await super().cancel(frame)
        await self._disconnect()

    async def cleanup(self) -> None:
        """Release the socket and tasks at teardown."""
        await super().cleanup()
        await self._disconnect()

    def _initiation_message(self) -> dict[str, Any]:
        s = self._settings
        agent: dict[str, Any] = {}
        if is_given(s.system_instruction) and s.system_instruction is not None:
            agent["prompt"] = {"prompt": s.system_instruction}
        if is_given(s.first_message) and s.first_message is not None:
            agent["first_message"] = s.first_message
        if is_given(s.language) and s.language is not None:
            agent["language"] = s.language
        override: dict[str, Any] = {}
        if agent:
            override["agent"] = agent
        if is_given(s.voice_id) and s.voice_id is not None:
            override["tts"] = {"voice_id": s.voice_id}
        msg: dict[str, Any] = {
            "type": "conversation_initiation_client_data",
            "conversation_config_override": override,
            "custom_llm_extra_body": {},
            "dynamic_variables": {},
            "source_info": {"source": "pipeswitch", "version": "1"},
        }
        if self._user_id:
            msg["user_id"] = self._user_id
        return msg

    async def _ws_url(self) -> tuple[str, dict[str, str]]:
        query = urllib.parse.urlencode({"agent_id": self._agent_id})
        if not self._use_signed_url:
            headers = {"xi-api-key": self._api_key} if self._api_key else {}
            return f"{self._base_url}/v1/convai/conversation?{query}", headers
        http_base = self._base_url.replace("wss://", "https://", 1).replace("ws://", "http://", 1)
        url = f"{http_base}/v1/convai/conversation/get-signed-url?{query}"
        timeout = aiohttp.ClientTimeout(total=self._connect_timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(url, headers={"xi-api-key": self._api_key or ""}) as r,
        ):
            if r.status != 200:
                raise ConnectionError(f"signed URL refused: HTTP {r.status}")
            body = await r.json()
        return str(body["signed_url"]), {}

    async def _connect(self) -> None:
        if self._ws is not None:
            return
        self._disconnecting = False
        self.disconnect_reason = None
        self._ready.clear()
        try:
            async with asyncio.timeout(self._connect_timeout):
                url, headers = await self._ws_url()
                self._ws = await websocket_connect(
                    url, additional_headers=headers, max_size=16 * 1024 * 1024
                )
                await self._ws.send(json.dumps(self._initiation_message()))
                self._receive_task = self.create_task(self._receive_loop(), "receive")
                await self._ready.wait()
        except (TimeoutError, OSError, InvalidStatus, ConnectionClosed, aiohttp.ClientError) as e:
            why = _describe(e)
            self._log.warning("ElevenLabs agent {} unavailable: {}", self._agent_id, why)
            await self._lost(f"connect failed: {why}")

    async def _disconnect(self) -> None:
        self._disconnecting = True
        task, self._connect_task = self._connect_task, None
        if task is not None and not task.done() and task is not asyncio.current_task():
            await self.cancel_task(task, timeout=1.0)
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), 2.0)
            except (TimeoutError, OSError, ConnectionClosed):
                pass
        for name in ("_receive_task", "_idle_task"):
            task = getattr(self, name)
            setattr(self, name, None)
            if task is not None and task is not asyncio.current_task():
                await self.cancel_task(task, timeout=1.0)
        self._ready.clear()

    async def _lost(self, reason: str) -> None:
        """The conversation is gone: report once, become unusable, let the fallback act."""
        if self._disconnecting or self.disconnect_reason is not None:
            return
        self.disconnect_reason = reason
        ws, self._ws = self._ws, None
        self._ready.clear()
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), 1.0)
            except (TimeoutError, OSError, ConnectionClosed):
                pass
        await self._finish_response(interrupted=True)
        # No exception object and a known category: this is the provider failing (the
        # fallback's cue), not a bug in a processor (which ends the call).
        await self.push_error(
            f"ElevenLabs agent: {reason}",
            category=ErrorCategory.CONNECTIVITY,
            force_treat_as_permanent=True,
        )
        await self._call_event_handler("on_agent_disconnected", reason)

    # -- receiving --------------------------------------------------------------

    async def _receive_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        try:
            while True:
                raw = await asyncio.wait_for(ws.recv(), self._stall_timeout)
                await self._on_message(raw)
        except TimeoutError:
            await self._lost(f"stalled: nothing received for {self._stall_timeout:.0f}s")
        except ConnectionClosed as e:
            await self._lost(_describe(e))

    async def _on_message(self, raw: str | bytes) -> None:
        try:
            msg = json.loads(raw)
            kind = msg["type"]
            handler = _HANDLERS.get(kind)
            if handler is not None:
                await handler(self, msg)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # A bad message is the provider's bug, not a reason to drop the call.
            self.malformed_messages += 1
            if self.malformed_messages <= 3:
                self._log.warning("malformed ElevenLabs message ignored ({!r}): {:.80}", e, raw)

    async def _on_metadata(self, msg: dict[str, Any]) -> None:
        ev = msg["conversation_initiation_metadata_event"]
        self.conversation_id = str(ev.get("conversation_id", ""))
        for attr, key in (
            ("_input_format", "user_input_audio_format"),
            ("_output_format", "agent_output_audio_format"),
        ):
            fmt = ev.get(key)
            if fmt and fmt != getattr(self, attr):
                format_rate(fmt)
                self._log.info("agent uses {} = {} (configured {})", key, fmt, getattr(self, attr))
                setattr(self, attr, fmt)
        self._ready.set()
        await self._call_event_handler("on_agent_connected", self.conversation_id)
        if self._pending_audio:
            pending, self._pending_audio = bytes(self._pending_audio), bytearray()
            await self._send_audio_bytes(pending)

    async def _on_ping(self, msg: dict[str, Any]) -> None:
        ev = msg["ping_event"]
        await self._send({"type": "pong", "event_id": ev["event_id"]})
        self.pings_answered += 1

    async def _on_user_transcript(self, msg: dict[str, Any]) -> None:
        text = str(msg["user_transcription_event"]["user_transcript"]).strip()
        if not text:
            return
        await self.push_frame(TranscriptionFrame(text, self._user_id or "", time_now_iso8601()))
        await self.start_ttfb_metrics()

    async def _on_agent_response(self, msg: dict[str, Any]) -> None:
        text = str(msg["agent_response_event"]["agent_response"]).strip()
        r = self._response
        if r is None or r.text:
            # A new response whose text came before its audio (the usual order).
            await self._finish_response(interrupted=False)
            r = await self._begin_response(event_id=self._cut_event_id + 1, text=text)
        else:
            r.text = text
            await self.push_frame(_spoken(AggregatedTextFrame(text, TextType.SENTENCE)))

    async def _on_audio(self, msg: dict[str, Any]) -> None:
        ev = msg["audio_event"]
        event_id = int(ev["event_id"])
        audio = base64.b64decode(ev["audio_base_64"])
        if event_id <= self._cut_event_id:
            return  # the interrupted response's tail
        r = self._response
        if r is None or (r.audio_started and r.event_id != event_id):
            await self._finish_response(interrupted=False)
            r = await self._begin_response(event_id=event_id, text="")
        r.event_id = event_id
        if self._output_format.startswith("ulaw"):
            audio = ulaw_decode(audio)
        if not r.audio_started:
            r.audio_started = True
            if self._playout is not None:
                self._reply_mark = self._playout.mark()
            await self.stop_ttfb_metrics()
            await self.push_frame(TTSStartedFrame())
        rate = self.output_rate
        r.audio_secs += len(audio) / (2 * rate)
        await self.push_frame(TTSAudioRawFrame(audio=audio, sample_rate=rate, num_channels=1))
        self._arm_idle()

    async def _on_interruption(self, msg: dict[str, Any]) -> None:
        event_id = int(msg["interruption_event"]["event_id"])
        self._cut_event_id = max(self._cut_event_id, event_id)
        await self._handle_interruption()
        await self.broadcast_interruption()

    async def _on_correction(self, msg: dict[str, Any]) -> None:
        ev = msg["agent_response_correction_event"]
        original = str(ev["original_agent_response"]).strip()
        corrected = str(ev["corrected_agent_response"]).strip()
        self.corrections.append((original, corrected))
        await self._call_event_handler("on_agent_correction", original, corrected)

    async def _on_tool_call(self, msg: dict[str, Any]) -> None:
        call = msg["client_tool_call"]
        call_id = str(call["tool_call_id"])
        name = str(call["tool_name"])
        args = call.get("parameters") or {}
        if not isinstance(args, dict):
            raise TypeError("client_tool_call parameters must be an object")
        if name not in self._functions and None not in self._functions:
            await self._send_tool_result(call_id, f"Unknown tool {name}", is_error=True)
            return
        self._open_tool_calls.add(call_id)
        await self.run_function_calls(
            [
                FunctionCallFromLLM(
                    function_name=name, tool_call_id=call_id, arguments=args, context=self._context
                )
            ]
        )

    async def _on_response_complete(self, msg: dict[str, Any]) -> None:
        await self._finish_response(interrupted=False)

    # -- responses --------------------------------------------------------------

    async def _begin_response(self, event_id: int, text: str) -> _Response:
        r = _Response(event_id=event_id, text=text)
        self._response = r
        await self.push_frame(LLMFullResponseStartFrame())
        if text:
            await self.push_frame(_spoken(AggregatedTextFrame(text, TextType.SENTENCE)))
        return r

    def _arm_idle(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
        self._idle_task = self.create_task(self._idle_end(), "response_idle")

    async def _idle_end(self) -> None:
        await asyncio.sleep(self._idle_secs)
        self._idle_task = None
        await self._finish_response(interrupted=False)

    async def _finish_response(self, *, interrupted: bool) -> None:
        r, self._response = self._response, None
        if r is None:
            return
        if r.audio_started:
            await self.push_frame(TTSStoppedFrame())
            self._played_response = r
        if not interrupted and r.text:
            # Written after the audio: the output transport and the assistant
            # aggregator count it as heard only once all of it was played.
            frame = TTSTextFrame(r.text, text_type=TextType.SENTENCE)
            frame.includes_inter_frame_spaces = True
            await self.push_frame(frame)
        await self.push_frame(LLMFullResponseEndFrame())

    # -- barge-in ---------------------------------------------------------------

    def heard_text(self, now: float | None = None) -> tuple[str, str]:
        """(heard part, full text) of the response playing now, from playout time."""
        r = self._response or self._played_response
        if r is None or not r.text:
            return "", ""
        if self._playout is not None:
            played = self._playout.heard_since(self._reply_mark)
        elif self._bot_started_at is not None:
            played = max(0.0, (now or time.monotonic()) - self._bot_started_at)
        else:
            return "", r.text
        if r.audio_secs > 0 and self._response is None:
            played = min(played, r.audio_secs)
        rate = len(r.text) / r.audio_secs if r.audio_secs > 1.0 else DEFAULT_CHARS_PER_SEC
        return heard_prefix(r.text, played, rate), r.text

    async def _handle_interruption(self) -> None:
        """Drop the cut response locally and tell the agent what the caller heard."""
        if self._bot_started_at is None and self._response is None:
            return
        heard, full = self.heard_text()
        r = self._response
        if r is not None:
            self._cut_event_id = max(self._cut_event_id, r.event_id)
        await self._finish_response(interrupted=True)
        self._bot_started_at = None
        self._played_response = None
        if full and heard != full:
            note = (
                f'The caller interrupted you. Of your last reply they heard only: "{heard}"'
                if heard
                else "The caller interrupted you before hearing any of your last reply."
            )
            self.heard_updates.append(heard)
            await self._send({"type": "contextual_update", "text": note})

    # -- sending ----------------------------------------------------------------

    async def _send(self, msg: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None or self._disconnecting:
            return
        try:
            await ws.send(json.dumps(msg))
        except ConnectionClosed as e:
            await self._lost(_describe(e))

    async def _send_audio_bytes(self, pcm: bytes) -> None:
        if self._input_format.startswith("ulaw"):
            pcm = ulaw_encode(pcm)
        await self._send({"user_audio_chunk": base64.b64encode(pcm).decode("ascii")})

    async def _send_user_audio(self, frame: InputAudioRawFrame) -> None:
        audio = frame.audio
        rate = self.input_rate
        if frame.sample_rate != rate:
            r = self._in_resampler
            if r is None or r.in_rate != frame.sample_rate or r.out_rate != rate:
                # Low delay: soxr "HQ" held 8 -> 16 kHz audio back 20 ms per turn end.
                r = self._in_resampler = edge_resampler(frame.sample_rate, rate)
            audio = r.process(audio)
            if not audio:
                return
        if not self._ready.is_set():
            # Until the metadata arrives: keep the last 2 s (the caller's first words).
            self._pending_audio.extend(audio)
            del self._pending_audio[: max(0, len(self._pending_audio) - rate * 4)]
            return
        await self._send_audio_bytes(audio)

    async def _send_tool_result(self, call_id: str, result: Any, *, is_error: bool) -> None:
        text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
        await self._send(
            {
                "type": "client_tool_result",
                "tool_call_id": call_id,
                "result": text,
                "is_error": is_error,
            }
        )

    # -- frames -----------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Caller audio out to the agent; playout and interruptions observed."""
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            if self.disconnect_reason is None:
                await self._send_user_audio(frame)
            return  # consumed: nothing downstream needs caller audio
        if isinstance(frame, InterruptionFrame):
            await self._handle_interruption()
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._bot_started_at = time.monotonic()
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_started_at = None
            self._played_response = None
        elif isinstance(frame, LLMContextFrame):
            # The agent keeps its own conversation; the frame only tells us the context.
            self._context = frame.context
            return
        await self.push_frame(frame, direction)

    async def push_frame(
        self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM
    ) -> None:
        """Answer tool calls as their results (or cancellations) go by."""
        if (
            direction is FrameDirection.DOWNSTREAM
            and isinstance(frame, FunctionCallResultFrame | FunctionCallCancelFrame)
            and frame.tool_call_id in self._open_tool_calls
        ):
            self._open_tool_calls.discard(frame.tool_call_id)
            if isinstance(frame, FunctionCallCancelFrame):
                await self._send_tool_result(frame.tool_call_id, "CANCELLED", is_error=True)
            else:
                result = frame.result if frame.result is not None else "COMPLETED"
                await self._send_tool_result(frame.tool_call_id, result, is_error=False)
        await super().push_frame(frame, direction)


def _spoken(frame: AggregatedTextFrame) -> AggregatedTextFrame:
    frame.will_be_spoken = True
    return frame


def _describe(e: BaseException) -> str:
    if isinstance(e, InvalidStatus):
        return f"HTTP {e.response.status_code}"
    if isinstance(e, ConnectionClosed):
        rcvd = e.rcvd
        return f"closed {rcvd.code} {rcvd.reason}".strip() if rcvd else "connection dropped (1006)"
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


_HANDLERS: dict[str, Any] = {
    "conversation_initiation_metadata": ElevenLabsAgentService._on_metadata,
    "ping": ElevenLabsAgentService._on_ping,
    "user_transcript": ElevenLabsAgentService._on_user_transcript,
    "agent_response": ElevenLabsAgentService._on_agent_response,
    "audio": ElevenLabsAgentService._on_audio,
    "interruption": ElevenLabsAgentService._on_interruption,
    "agent_response_correction": ElevenLabsAgentService._on_correction,
    "client_tool_call": ElevenLabsAgentService._on_tool_call,
    "agent_response_complete": ElevenLabsAgentService._on_response_complete,
}
