"""Gemini Live (speech-to-speech) pipeline.

Pipeline: transport in -> user aggregator (local Silero: Gemini reports no turn
starts/stops, so turns are tracked here) -> 16 kHz edge resampler ->
``GeminiLiveLLMService`` -> transport out (24 kHz -> stream rate, once) ->
assistant aggregator -> heard-context.

Turn detection per tenant: Gemini's server VAD (it answers on its own and sends
``interrupted`` on barge-in), or local Silero with Gemini's VAD disabled (the
service brackets the caller's turn with ``activityStart``/``activityEnd``).

Barge-in: Gemini has no truncate. Its history holds everything it generated,
which runs ahead of playback, so on a barge-in the service tells it, as context
that asks for no answer, which words of its reply the caller actually heard
(measured at the FreeSWITCH socket, like OpenAI's truncation).

Long calls: Gemini ends connections at its session limit after a ``goAway``.
The service resumes with the latest session-resumption handle as soon as the
model is quiet, before the limit cuts the connection (Pipecat alone would wait
for the close and count it as a failure; three in ten seconds are fatal).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from typing import Any

from google.genai.types import Content, HttpOptions, LiveServerMessage, Part
from loguru import logger
from pipecat.frames.frames import BotStoppedSpeakingFrame, Frame, InterruptionFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.google.gemini_live.llm import GeminiLiveLLMService, GeminiVADParams

from pipeswitch.pipelines.compose import CallContext, CallPipeline, register_builder
from pipeswitch.pipelines.openai_realtime import local_turn_aggregators
from pipeswitch.pipelines.s2s_fallback import (
    ProviderRateAdapter,
    S2SFallback,
    TransportPlayout,
    heard_words,
    s2s_echo_guard,
    s2s_instructions,
    s2s_pipeline,
    standby_cascade,
)
from pipeswitch.pipelines.services import ProviderUnavailable
from pipeswitch.processors.tools import ReceptionistTools

GEMINI_INPUT_RATE = 16000
GEMINI_OUTPUT_RATE = 24000
DEFAULT_GEMINI_MODEL = "models/gemini-3.8-live"
# Resume this long before the connection's announced end at the latest.
RESUME_MARGIN_SECS = 0.3
_SECS_RE = re.compile(r"^\s*([0-9.]+)s\s*$")


def heard_note(heard: str) -> str:
    """What the model is told after a barge-in (context only; it must not answer it)."""
    if heard:
        return (
            f'(The caller interrupted you. Of your last reply they heard only: "{heard}". '
            "Anything after that was not heard.)"
        )
    return "(The caller interrupted you before hearing any of your last reply.)"


class ResumingGeminiService(GeminiLiveLLMService):
    """``GeminiLiveLLMService`` that trims its memory to what was heard and resumes on goAway."""

    def __init__(self, *, playout: TransportPlayout, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._playout = playout
        self._reply_mark = 0.0
        self._reply_bytes = 0
        self._reply_text = ""
        self._reply_open = False
        self._turn_pending = False
        # Gemini is still sending a generation (no turnComplete/interrupted yet). Ours,
        # not Pipecat's _bot_is_responding: it is cleared before Gemini's own
        # `interrupted` is broadcast, so that interruption never marks a generation stale.
        self._generating = False
        # A local barge-in cut a generation Gemini has not ended: what it still sends
        # of it is stale (never played, never "opens" a reply) until it ends it.
        self._stale = False
        self._resume_task: asyncio.Task[None] | None = None
        self.heard_notes: list[str] = []
        self.resumptions = 0
        self.receptionist: ReceptionistTools | None = None
        self.fallback: S2SFallback | None = None

    @property
    def connected(self) -> bool:
        """Whether a live session is up."""
        return self._session is not None

    async def _connection_task_handler(self, config: Any) -> None:
        # A refused or failed connect escapes Pipecat's connection task, which the task
        # manager only logs: report it, so the call can fall back instead of going deaf.
        try:
            await super()._connection_task_handler(config)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._disconnecting:
                await self.push_error(error_msg=f"Gemini Live connection failed: {exc}")

    # -- the caller speaks first --------------------------------------------------------

    async def _handle_session_ready(self, session: Any) -> None:
        await super()._handle_session_ready(session)
        if self._context is None:
            # Instructions and tools went in the setup; the greeting is already playing.
            # Nothing to seed, so the caller's audio may flow at once.
            self._ready_for_realtime_input = True

    async def _handle_context(self, context: LLMContext, direction: Any = None) -> None:
        if self._context is None:
            # The first context is the conversation so far (greeting, first turn) that
            # the live session already holds: adopt it, without re-seeding it or
            # reconnecting for tools the setup already declared.
            self._context = context
            await self._process_completed_function_calls(send_new_results=False)
            return
        await super()._handle_context(context, direction)

    # -- what the caller heard -------------------------------------------------------

    def _reply_started(self) -> None:
        self._turn_pending = False
        if not self._reply_open:
            self._reply_open = True
            self._reply_mark = self._playout.mark()
            self._reply_bytes = 0
            self._reply_text = ""

    async def _handle_msg_model_turn(self, msg: LiveServerMessage) -> None:
        if self._stale:
            return
        self._generating = True
        sc = msg.server_content
        parts = sc.model_turn.parts if sc is not None and sc.model_turn is not None else None
        if parts and parts[0].inline_data is not None and parts[0].inline_data.data:
            self._reply_started()
            self._reply_bytes += len(parts[0].inline_data.data)
        await super()._handle_msg_model_turn(msg)

    async def _handle_msg_output_transcription(self, message: LiveServerMessage) -> None:
        if self._stale:
            return
        sc = message.server_content
        if sc is not None and sc.output_transcription is not None:
            self._generating = True
            self._reply_started()
            self._reply_text += sc.output_transcription.text or ""
        await super()._handle_msg_output_transcription(message)

    async def _send_heard_note(self) -> None:
        """After a barge-in: tell the model which words of its reply the caller heard.

        The reply is "open" from its first audio until the caller has heard all of it
        (the output transport's BotStoppedSpeaking), which is usually long after
        Gemini's turnComplete: it generates faster than real time.
        """
        if not self._reply_open:
            return
        self._reply_open = False
        received = self._reply_bytes / (2 * GEMINI_OUTPUT_RATE)
        heard_secs = min(received, self._playout.heard_since(self._reply_mark))
        heard = heard_words(self._reply_text.strip(), heard_secs, received)
        note = heard_note(heard)
        self.heard_notes.append(note)
        if self._session is None or self._disconnecting:
            return
        try:
            await self._session.send_client_content(
                turns=[Content(role="user", parts=[Part(text=note)])], turn_complete=False
            )
        except Exception as exc:
            await self._handle_send_error(exc)

    async def _handle_user_stopped_speaking(self, frame: Any) -> None:
        self._turn_pending = True  # the caller waits for a reply: no resume now
        await super()._handle_user_stopped_speaking(frame)

    async def _handle_msg_input_transcription(self, message: LiveServerMessage) -> None:
        self._turn_pending = True
        await super()._handle_msg_input_transcription(message)

    async def _handle_msg_turn_complete(self, message: LiveServerMessage) -> None:
        self._turn_pending = False
        self._generating = self._stale = False
        await super()._handle_msg_turn_complete(message)

    @property
    def busy(self) -> bool:
        """A turn is under way (caller speaking, reply awaited or being generated)."""
        return self._bot_is_responding or self._user_is_speaking or self._turn_pending

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, InterruptionFrame):
            # Until Gemini ends the cut generation, its audio still in flight must
            # neither play after the barge-in nor count as a new reply.
            self._stale = self._generating
            await self._send_heard_note()
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._reply_open = False  # played to its end
        await super().process_frame(frame, direction)

    # -- server messages ----------------------------------------------------------------

    async def _handle_server_message(self, message: LiveServerMessage) -> None:
        sc = message.server_content
        if sc is not None and sc.interrupted:
            # Gemini's own VAD cut the reply: measure before the interruption stops playback.
            await self._send_heard_note()
            self._generating = self._stale = False
        if message.go_away is not None:
            self._on_go_away(message.go_away.time_left)
        await super()._handle_server_message(message)

    def _on_go_away(self, time_left: str | None) -> None:
        m = _SECS_RE.match(time_left or "")
        secs = float(m.group(1)) if m else 1.0
        logger.info("Gemini goAway: {:.1f}s left; resuming between turns", secs)
        if self._resume_task is None or self._resume_task.done():
            self._resume_task = self.create_task(self._resume_before(secs), "gemini-resume")

    async def _resume_before(self, secs: float) -> None:
        deadline = time.monotonic() + max(0.0, secs - RESUME_MARGIN_SECS)
        while self.busy and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # bounded by the goAway's time left
        self.resumptions += 1
        self._generating = self._stale = False  # a new connection sends nothing stale
        await self._disconnect()
        await self._connect(session_resumption_handle=self._session_resumption_handle)

    async def cleanup(self) -> None:
        if self._resume_task is not None and self._resume_task is not asyncio.current_task():
            await self.cancel_task(self._resume_task)
        await super().cleanup()


def _http_options(ctx: CallContext) -> HttpOptions | None:
    ep = ctx.endpoints
    if not ep.gemini_url and not ep.gemini_ca_file:
        return None
    args: dict[str, Any] | None = None
    if ep.gemini_ca_file:
        args = {"ssl": ssl.create_default_context(cafile=ep.gemini_ca_file)}
    return HttpOptions(base_url=ep.gemini_url or None, async_client_args=args)


def make_gemini_live(ctx: CallContext) -> ResumingGeminiService:
    """The Gemini Live service for one call (blocking constructor: call in a thread)."""
    ep = ctx.endpoints
    if not ep.google_api_key:
        raise ProviderUnavailable("Gemini Live needs PIPESWITCH_GOOGLE_API_KEY")
    p = ctx.tenant.providers
    vad = (
        GeminiVADParams(disabled=True)
        if p.turn_detection == "local"
        else GeminiVADParams(silence_duration_ms=p.realtime_silence_ms)
    )
    settings = GeminiLiveLLMService.Settings(
        model=p.realtime_model or DEFAULT_GEMINI_MODEL,
        system_instruction=s2s_instructions(ctx.tenant.system_prompt, ctx.tenant.first_message),
        vad=vad,
    )
    if p.realtime_voice:
        settings.voice = p.realtime_voice
    return ResumingGeminiService(
        api_key=ep.google_api_key,
        settings=settings,
        tools=ctx.tool_schema(),
        http_options=_http_options(ctx),
        # The caller speaks first (the greeting played from cache): a context arriving
        # is history, not a cue to answer.
        inference_on_context_initialization=False,
        playout=TransportPlayout(ctx.transport),
    )


async def build_gemini_live(ctx: CallContext) -> CallPipeline:
    """Compose the Gemini Live pipeline for one call (with the cascade on standby)."""
    guard = s2s_echo_guard(ctx)  # before the first await (the greeting's echo)
    llm = await asyncio.to_thread(make_gemini_live, ctx)
    context = LLMContext()
    llm.receptionist = ctx.receptionist_tools(llm, context, provider_voice=True)
    pipeline, fallback = s2s_pipeline(
        ctx,
        context=context,
        # Gemini reports no turn starts/stops: Silero tracks the caller's turns either way.
        rt_pair=local_turn_aggregators(ctx, context),
        edge=[ProviderRateAdapter(GEMINI_INPUT_RATE)],
        llm=llm,
        connected=lambda: llm.connected,
        cascade=await standby_cascade(ctx, context),
        guard=guard,
    )
    llm.fallback = fallback
    parts: dict[str, FrameProcessor] = {"llm": llm}
    if guard is not None:
        parts["echo_guard"] = guard.input()
    return CallPipeline(pipeline, context, parts=parts)


register_builder("gemini-live", build_gemini_live)
