"""Turn-based fallback: one recorded caller turn in, the bot's spoken reply out.

For PBXs where neither mod_audio_stream nor unicast media is allowed. A
FreeSWITCH Lua script (``freeswitch-conf/pipeswitch_turn_based.lua``) records the
caller with silence detection, POSTs the WAV, plays the WAV it gets back and
acts on the reply's action. Same tenant configuration, same STT/LLM/TTS
services as the cascade (:mod:`pipelines.services`), same receptionist tools
(their switch-side effects become the reply's action), and the same
conversation across the turns of one call (kept per call uuid, with a TTL).

``POST /turn/{call_uuid}?domain=<domain>&rate=8000`` with ``Content-Type:
audio/wav`` (16-bit mono; an empty body asks for the greeting) answers
``audio/wav`` at ``rate`` with the rest in headers a shell ``curl -D`` can read:

* ``X-Pipeswitch-Action``: ``continue`` | ``transfer`` | ``hangup``
* ``X-Pipeswitch-Transfer-To``: the destination (transfer only), and
  ``X-Pipeswitch-Context``: the dialplan context to transfer in
* ``X-Pipeswitch-Text``: the reply text, URL-encoded
* ``X-Pipeswitch-Heard``: what the caller said, URL-encoded

``?format=json`` answers ``{"text", "heard", "action", "transfer_to", "context",
"audio_b64"}`` instead. ``DELETE /turn/{call_uuid}`` forgets the call (hangup).
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import wave
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    FunctionCallResultFrame,
    FunctionCallsStartedFrame,
    InputAudioRawFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSTextFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMAssistantAggregator
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from pipeswitch.config.loaders import TenantNotFound, TenantResolver
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.services import ProviderEndpoints, make_llm, make_stt, make_tts
from pipeswitch.processors.tools import (
    CallToolState,
    DeferredCallActions,
    register_tools,
)
from pipeswitch.transports.resample import StreamResampler
from pipeswitch.transports.unicast import Authorize, UnicastEndpoint, UnicastMedia

# A turn may not take longer than this end to end (the Lua script's curl waits as long).
TURN_TIMEOUT_SECS = 20.0
# After the LLM's last response ends, wait this long for a tool's follow-up response.
SETTLE_SECS = 0.15
MAX_WAV_BYTES = 8 * 1024 * 1024  # ~4 min at 16 kHz
# How long the STT may take to finalize the recording; none by then = nothing was said.
FINAL_WAIT_SECS = 2.0
REPROMPT = "Sorry, I didn't catch that. Could you say it again?"


class BadTurn(ValueError):
    """The request cannot be a caller turn (not a 16-bit mono WAV, bad rate...)."""


@dataclass
class TurnCall:
    """One call's memory across turns."""

    tenant: Tenant
    context: LLMContext
    state: CallToolState
    turns: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class TurnReply:
    """What one turn produced."""

    pcm: bytes
    rate: int
    text: str
    heard: str
    action: str = "continue"
    transfer_to: str = ""
    context: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def wav(self) -> bytes:
        """The reply as a 16-bit mono WAV."""
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.rate)
            w.writeframes(self.pcm)
        return buf.getvalue()


def read_wav(data: bytes) -> tuple[bytes, int]:
    """PCM and rate of a 16-bit mono (or stereo: left) WAV; raises :class:`BadTurn`."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            if w.getsampwidth() != 2:
                raise BadTurn("WAV must be 16-bit PCM")
            ch, rate = w.getnchannels(), w.getframerate()
            pcm = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise BadTurn(f"not a WAV file: {exc}") from exc
    if ch == 2:
        import numpy as np

        pcm = np.frombuffer(pcm, dtype="<i2")[0::2].tobytes()
    elif ch != 1:
        raise BadTurn(f"{ch} channels")
    if rate <= 0 or rate % 8000:
        raise BadTurn(f"sample rate {rate} is not a multiple of 8000")
    return pcm, rate


class TurnWatch:
    """What one turn produced so far: transcript, reply text and audio, LLM activity."""

    def __init__(self) -> None:
        self.heard: list[str] = []
        self.final = asyncio.Event()
        self.text: list[str] = []
        self.audio = bytearray()
        self.responses_open = 0
        self.calls_open = 0
        self.changed = asyncio.Event()
        self.first_audio_at: float | None = None

    @property
    def idle(self) -> bool:
        """No LLM response streaming and no tool running."""
        return self.responses_open == 0 and self.calls_open == 0


class _HeardTap(FrameProcessor):
    """After the STT: keeps the transcript (it reaches the LLM through the context)."""

    def __init__(self, watch: TurnWatch) -> None:
        super().__init__()
        self.watch = watch

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            if frame.text.strip():
                self.watch.heard.append(frame.text.strip())
            self.watch.final.set()
            return
        await self.push_frame(frame, direction)


class _ReplyTap(FrameProcessor):
    """After the TTS: collects the reply's audio and text, tracks LLM runs and tools."""

    def __init__(self, watch: TurnWatch) -> None:
        super().__init__()
        self.watch = watch

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        w = self.watch
        if isinstance(frame, TTSAudioRawFrame):
            if w.first_audio_at is None:
                w.first_audio_at = time.monotonic()
            w.audio += frame.audio
            return
        if isinstance(frame, TTSTextFrame):
            w.text.append(frame.text)
        elif isinstance(frame, LLMFullResponseStartFrame):
            w.responses_open += 1
        elif isinstance(frame, LLMFullResponseEndFrame):
            w.responses_open = max(0, w.responses_open - 1)
        elif isinstance(frame, FunctionCallsStartedFrame):
            w.calls_open += len(frame.function_calls)
        elif isinstance(frame, FunctionCallResultFrame):
            w.calls_open = max(0, w.calls_open - 1)
        w.changed.set()
        await self.push_frame(frame, direction)


class TurnEngine:
    """Runs turns: per call, the conversation and the tools' state live between turns."""

    def __init__(
        self,
        resolver: TenantResolver,
        endpoints: ProviderEndpoints,
        http: aiohttp.ClientSession,
        ttl_secs: float = 600.0,
    ) -> None:
        self.resolver = resolver
        self.endpoints = endpoints
        self.http = http
        self.ttl_secs = ttl_secs
        self.calls: dict[str, TurnCall] = {}

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_secs
        for uuid in [u for u, c in self.calls.items() if c.last_used < cutoff]:
            del self.calls[uuid]

    def forget(self, call_uuid: str) -> TurnCall | None:
        """Drop a call's memory (it hung up); returns what was kept."""
        return self.calls.pop(call_uuid, None)

    async def _call(self, call_uuid: str, domain: str | None) -> TurnCall:
        self._expire()
        call = self.calls.get(call_uuid)
        tenant = await self.resolver.resolve(domain)
        if call is None or call.tenant.name != tenant.name:
            call = TurnCall(tenant, LLMContext(), CallToolState())
            self.calls[call_uuid] = call
        call.last_used = time.monotonic()
        return call

    async def turn(
        self, call_uuid: str, domain: str | None, rate: int, pcm: bytes, in_rate: int
    ) -> TurnReply:
        """One caller turn (empty ``pcm``: the call just started, greet)."""
        call = await self._call(call_uuid, domain)
        async with call.lock:  # one turn at a time per call
            reply = await asyncio.wait_for(
                self._turn(call_uuid, call, rate, pcm, in_rate), TURN_TIMEOUT_SECS
            )
            call.turns += 1
            call.last_used = time.monotonic()
            return reply

    async def _turn(
        self, call_uuid: str, call: TurnCall, rate: int, pcm: bytes, in_rate: int
    ) -> TurnReply:
        t0 = time.monotonic()
        tenant = call.tenant
        log = logger.bind(call=call_uuid, tenant=tenant.name)
        if not pcm:
            text = tenant.first_message or ""
            if text and not call.context.get_messages():
                call.context.add_message({"role": "assistant", "content": text})
            audio = await self._speak_only(tenant, rate, text, call_uuid)
            return TurnReply(audio, rate, text, "", timings={"total": time.monotonic() - t0})
        if in_rate != rate:
            pcm = StreamResampler(in_rate, rate).process(pcm)
        stt, llm = await asyncio.to_thread(
            lambda: (make_stt(tenant, self.endpoints, rate), make_llm(tenant, self.endpoints))
        )
        tts = make_tts(tenant, self.endpoints, self.http, rate, call_uuid)
        watch = TurnWatch()
        call.state.action = None

        async def speak(text: str) -> None:  # announcements become part of the reply
            await llm.push_frame(TTSSpeakFrame(text))

        register_tools(
            llm,
            call.context,
            None,
            tenant,
            call_uuid,
            speak=speak,
            actions=DeferredCallActions(call.state),
            state=call.state,
        )
        assistant = LLMAssistantAggregator(call.context)
        worker = PipelineWorker(
            Pipeline([stt, _HeardTap(watch), llm, tts, _ReplyTap(watch), assistant]),
            params=PipelineParams(audio_in_sample_rate=rate, audio_out_sample_rate=rate),
            enable_rtvi=False,
            enable_turn_tracking=False,
            idle_timeout_secs=None,
            name=f"turn-{call_uuid}",
        )
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(worker)
        task = asyncio.ensure_future(runner.run())
        try:
            await worker.queue_frame(VADUserStartedSpeakingFrame())
            step = rate // 50 * 2
            for i in range(0, len(pcm), step):
                await worker.queue_frame(
                    InputAudioRawFrame(audio=pcm[i : i + step], sample_rate=rate, num_channels=1)
                )
            await worker.queue_frame(VADUserStoppedSpeakingFrame())  # Deepgram: Finalize
            try:
                await asyncio.wait_for(watch.final.wait(), FINAL_WAIT_SECS)
            except TimeoutError:
                pass  # silence (or noise): no final transcript
            t_stt = time.monotonic()
            heard = " ".join(watch.heard)
            if heard:
                call.context.add_message({"role": "user", "content": heard})
                await llm.queue_frame(LLMContextFrame(call.context))
                await self._settle(watch)
            await worker.queue_frame(EndFrame())
            await asyncio.wait_for(task, 10.0)
        finally:
            if not task.done():
                await worker.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if not heard:  # nothing understood: ask again, the conversation is unchanged
            pcm_out = await self._speak_only(tenant, rate, REPROMPT, call_uuid)
            return TurnReply(pcm_out, rate, REPROMPT, "", timings={"total": time.monotonic() - t0})
        reply = TurnReply(bytes(watch.audio), rate, "".join(watch.text).strip(), heard)
        action = call.state.action or {"action": "continue"}
        reply.action = action.get("action", "continue")
        if reply.action == "dtmf":  # the script has no use for it; keep talking
            reply.action = "continue"
        reply.transfer_to = action.get("transfer_to", "")
        reply.context = action.get("context", "")
        reply.timings = {
            "stt": t_stt - t0,
            "first_audio": (watch.first_audio_at or time.monotonic()) - t0,
            "total": time.monotonic() - t0,
        }
        log.info(
            "turn {}: heard {!r} -> {} ({:.0f} ms)",
            call.turns,
            heard[:60],
            reply.action,
            reply.timings["total"] * 1000,
        )
        return reply

    async def _settle(self, watch: TurnWatch) -> None:
        """Until the LLM has answered and no tool is pending (tools may re-run it)."""
        deadline = time.monotonic() + TURN_TIMEOUT_SECS
        seen_any = False
        while time.monotonic() < deadline:
            watch.changed.clear()
            try:
                await asyncio.wait_for(watch.changed.wait(), SETTLE_SECS if seen_any else 10.0)
                seen_any = True
                continue
            except TimeoutError:
                if seen_any and watch.idle:
                    return
                if not seen_any:
                    return

    async def _speak_only(self, tenant: Tenant, rate: int, text: str, call_uuid: str) -> bytes:
        if not text:
            return b""
        url = self.endpoints.piper_for_rate(rate) + f"&call={call_uuid}"
        async with self.http.post(
            url,
            json={"text": text, "voice": tenant.voice},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as r:
            r.raise_for_status()
            wav = await r.read()
        pcm, _ = read_wav(wav)
        return pcm


class TurnEndpoint:
    """The HTTP face of :class:`TurnEngine` (``/turn/{call_uuid}``).

    ``authorize(request, call_uuid, domain, tenant)`` returns None when the request may
    use the tenant's agent (the WebSocket calls' rule), else the reason.
    """

    def __init__(self, engine: TurnEngine, authorize: Authorize | None = None) -> None:
        self.engine = engine
        self.authorize = authorize

    def add_routes(self, app: web.Application, prefix: str = "/turn") -> None:
        """Register ``POST``/``DELETE <prefix>/{call_uuid}``."""
        app.router.add_post(prefix + "/{call_uuid}", self.handle)
        app.router.add_delete(prefix + "/{call_uuid}", self.handle_hangup)

    async def handle(self, request: web.Request) -> web.Response:
        """One turn; errors answer JSON with a reason (the script then falls back)."""
        uuid = request.match_info["call_uuid"]
        log = logger.bind(call=uuid, tenant=request.query.get("domain", "-"))
        try:
            rate = int(request.query.get("rate", "8000"))
            if rate not in (8000, 16000):
                raise BadTurn(f"rate {rate}: use 8000 or 16000")
            body = await request.read()
            if len(body) > MAX_WAV_BYTES:
                raise BadTurn("recording too large")
            pcm, in_rate = read_wav(body) if body else (b"", rate)
            domain = request.query.get("domain")
            if self.authorize is not None:
                tenant = await self.engine.resolver.resolve(domain)
                refusal = self.authorize(request, uuid, domain, tenant)
                if refusal:
                    log.warning("turn refused: not authorized: {}", refusal)
                    return web.json_response(
                        {"error": "not authorized", "action": "fallback"}, status=403
                    )
            reply = await self.engine.turn(uuid, domain, rate, pcm, in_rate)
        except (BadTurn, ValueError) as exc:
            log.warning("turn refused: {}", exc)
            return web.json_response({"error": str(exc), "action": "fallback"}, status=400)
        except TenantNotFound as exc:
            log.warning("turn refused: {}", exc)
            return web.json_response({"error": str(exc), "action": "fallback"}, status=404)
        except TimeoutError:
            log.warning("turn timed out")
            return web.json_response({"error": "timeout", "action": "fallback"}, status=504)
        if request.query.get("format") == "json":
            return web.json_response(
                {
                    "text": reply.text,
                    "heard": reply.heard,
                    "action": reply.action,
                    "transfer_to": reply.transfer_to,
                    "context": reply.context,
                    "audio_b64": base64.b64encode(reply.wav()).decode("ascii"),
                }
            )
        headers = {
            "X-Pipeswitch-Action": reply.action,
            "X-Pipeswitch-Text": quote(reply.text, safe=""),
            "X-Pipeswitch-Heard": quote(reply.heard, safe=""),
        }
        if reply.action == "transfer":
            headers["X-Pipeswitch-Transfer-To"] = reply.transfer_to
            headers["X-Pipeswitch-Context"] = reply.context
        return web.Response(body=reply.wav(), content_type="audio/wav", headers=headers)

    async def handle_hangup(self, request: web.Request) -> web.Response:
        """The call ended: forget it and return what the tools kept (messages...)."""
        uuid = request.match_info["call_uuid"]
        kept = self.engine.calls.get(uuid)
        domain = request.query.get("domain")
        if (
            kept is not None
            and self.authorize is not None
            and self.authorize(request, uuid, domain, kept.tenant)
        ):
            return web.json_response({"error": "not authorized"}, status=403)
        call = self.engine.forget(uuid)
        if call is None:
            return web.json_response({"known": False})
        return web.json_response({"known": True, "turns": call.turns, **call.state.as_dict()})


def fallback_mounts(app: Any) -> dict[str, web.Application]:
    """Sub-applications for the non-streaming modes, mounted on the call server.

    ``/turn`` always (turn-based fallback); ``/unicast`` when the process has an
    ESL connection (unicast media needs it to start the media). ``app`` is the
    running :class:`pipelines.app.Pipeswitch` (after its server exists).
    """
    mounts: dict[str, web.Application] = {}
    assert app.server is not None and app._http is not None
    turn = web.Application(client_max_size=MAX_WAV_BYTES)
    engine = TurnEngine(
        app.resolver, app.endpoints, app._http, ttl_secs=app.settings.turn_context_ttl_secs
    )
    authorize = http_authorizer(app.settings)
    TurnEndpoint(engine, authorize).add_routes(turn, prefix="")
    mounts["/turn"] = turn
    if app.esl is not None:
        unicast = web.Application()
        UnicastEndpoint(
            UnicastMedia(app.esl, app.settings),
            app.resolver,
            app.server.handler.run_call,
            app.server.accepting,
            stats=app.server.stats,
            authorize=authorize,
        ).add_routes(unicast, prefix="")
        mounts["/unicast"] = unicast
    return mounts


def http_authorizer(settings: Any) -> Authorize:
    """The WebSocket calls' access rule (``transports/auth.py``) for the HTTP triggers:
    a signed URL (``exp``/``sig`` over uuid, domain, exp), a token (``token=`` or
    ``X-Pipeswitch-Token``), or else the ``accept_unsigned`` policy."""
    from pipeswitch.transports.auth import check_access

    def authorize(
        request: web.Request, call_uuid: str, domain: str | None, tenant: Tenant
    ) -> str | None:
        decision = check_access(
            call_uuid=call_uuid,
            domain=domain,
            query=dict(request.query),
            headers=request.headers,
            peer=request.remote,
            access=tenant.access,
            policy=settings.accept_unsigned,
            now=time.time(),
        )
        return None if decision.allowed else decision.reason

    return authorize
