"""OpenAI Realtime (speech-to-speech) pipeline: caller audio in, the model's voice out.

Pipeline: transport in -> user aggregator (turns) -> 24 kHz edge resampler ->
``OpenAIRealtimeLLMService`` -> transport out (24 kHz -> stream rate, once) ->
assistant aggregator -> heard-context.

Turn detection per tenant: OpenAI's server VAD (the service proposes turn
starts/stops, Pipecat's external strategies resolve them), or local Silero with
the server VAD off (``turn_detection=False``; the service commits the buffer and
asks for a response when the local turn ends).

Barge-in trims the model's memory to what the caller heard: the
``conversation.item.truncate`` carries the played-out milliseconds measured at the
FreeSWITCH socket (:class:`~pipeswitch.pipelines.s2s_fallback.TransportPlayout`),
not Pipecat's default (received audio capped by wall-clock time since the first
delta), which counts audio still queued in the server or dropped at the far end.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from loguru import logger
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import InputAudioRawFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import (
    SpeechTimeoutUserTurnStopStrategy,
)
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from pipeswitch.pipelines.compose import CallContext, CallPipeline, register_builder
from pipeswitch.pipelines.s2s_fallback import (
    ProviderRateAdapter,
    S2SFallback,
    TransportPlayout,
    s2s_echo_guard,
    s2s_instructions,
    s2s_pipeline,
    standby_cascade,
)
from pipeswitch.pipelines.services import ProviderUnavailable
from pipeswitch.processors.barge_in import BargeInStartStrategy
from pipeswitch.processors.tools import ReceptionistTools

OPENAI_REALTIME_RATE: Literal[24000] = 24000
DEFAULT_REALTIME_MODEL = "gpt-realtime-2.1"


@dataclass
class TruncationFact:
    """One truncation this call sent: where it cut, against what had been received."""

    item_id: str
    audio_end_ms: int
    received_ms: int
    heard_ms: int


class PlayedOutRealtimeService(OpenAIRealtimeLLMService):
    """``OpenAIRealtimeLLMService`` whose barge-in truncation uses played-out audio.

    Everything else is Pipecat's: the wire protocol, turn handling, function calls.
    """

    def __init__(self, *, playout: TransportPlayout, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._playout = playout
        self._reply_mark = 0.0
        self.truncations: list[TruncationFact] = []
        # The response a barge-in cut: its deltas still in flight (sent before the
        # provider saw our cancel, or its own VAD's) are stale and must not play.
        self._cut_response_id: str | None = None
        # Caller audio said before the session is up (the last 2 s), sent once it is.
        self._held_pcm = bytearray()
        self._held_rate = 0
        self._connect_deferred = False
        self._connect_task: asyncio.Task[None] | None = None
        # The call's receptionist tools (what they did), when the tenant enables any.
        self.receptionist: ReceptionistTools | None = None
        # The call's switch to the cascade, when the tenant has one to fall back to.
        self.fallback: S2SFallback | None = None

    @property
    def connected(self) -> bool:
        """Whether the provider session is up (session.updated received)."""
        return bool(self._api_session_ready)

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        """Dial the provider in the background, not inside the pipeline's set-up.

        Pipecat connects in ``setup()``, and a worker sets its processors up one after
        another before any frame flows: a provider that takes the TCP connection and
        never answers the handshake held the whole call (the fallback's connect budget
        included, which starts with the pipeline) for the WebSocket's 10 s open
        timeout. Dialled from a task, the pipeline starts at once, the budget runs
        from the call's start, and the caller's audio before the session is up is
        held (the last 2 s) and sent once it is.
        """
        self._connect_deferred = True
        try:
            await super().setup(setup)
        finally:
            self._connect_deferred = False
        self._connect_task = self.create_task(self._connect(), "connect")

    async def _connect(self) -> None:
        if not self._connect_deferred:
            await super()._connect()

    async def _send_user_audio(self, frame: InputAudioRawFrame) -> None:
        if not self._api_session_ready:
            # The caller's first words, said while the provider was still connecting.
            self._held_rate = frame.sample_rate
            self._held_pcm.extend(frame.audio)
            del self._held_pcm[: max(0, len(self._held_pcm) - 4 * frame.sample_rate)]
            return
        await super()._send_user_audio(frame)

    async def _replay_user_audio_preroll(self) -> None:
        # Pipecat keeps the last int(48000 * secs) bytes, an odd count for some VAD
        # start windows (0.15 + 0.2 s: 16799): replayed as is, every sample after the
        # first is byte-shifted noise (the emulator refused it; a real provider hears
        # garbage where the barge-in's first words were). The tail ends on a sample
        # boundary, so drop the half sample at its start.
        buf = self._user_audio_preroll_buffer
        if len(buf) % 2:
            del buf[0]
        await super()._replay_user_audio_preroll()

    async def _handle_evt_session_updated(self, evt: Any) -> None:
        await super()._handle_evt_session_updated(evt)
        if self._held_pcm:
            pcm, self._held_pcm = bytes(self._held_pcm), bytearray()
            await super()._send_user_audio(
                InputAudioRawFrame(audio=pcm, sample_rate=self._held_rate, num_channels=1)
            )

    async def _disconnect(self) -> None:
        task, self._connect_task = self._connect_task, None
        if task is not None and not task.done() and task is not asyncio.current_task():
            await self.cancel_task(task, timeout=1.0)
        await super()._disconnect()

    async def _handle_context(self, context: LLMContext, direction: Any) -> None:
        if self._context is None:
            # The caller speaks first (the greeting already played from cache, and the
            # session's instructions say so): adopt the context without asking for a
            # response, or the model would answer the first turn twice (server VAD
            # already created that response).
            self._context = context
            self._llm_needs_conversation_setup = False
            await self._process_completed_function_calls(send_new_results=False)
            if direction == FrameDirection.UPSTREAM and self._results_awaiting_response:
                # A tool result came back before any other context: answer it.
                await self._create_response()
            return
        await super()._handle_context(context, direction)

    async def _receive_task_handler(self) -> None:
        # Pipecat's receive loop ends silently when the provider drops the connection
        # (or raises on a malformed event, which the task manager only logs): report it
        # as an error, so the call can fall back instead of going deaf.
        try:
            await super()._receive_task_handler()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._disconnecting:
                await self.push_error(error_msg=f"OpenAI Realtime connection failed: {exc}")
            return
        if not self._disconnecting and self._websocket is not None:
            await self.push_error(error_msg="OpenAI Realtime closed the connection")

    async def _handle_evt_audio_delta(self, evt: Any) -> None:
        if self._cut_response_id is not None and evt.response_id == self._cut_response_id:
            return  # the cut response, still in flight: never played
        if self._current_audio_response is None:
            # First audio of a reply: everything written before it is someone else's.
            self._reply_mark = self._playout.mark()
        await super()._handle_evt_audio_delta(evt)

    async def _handle_evt_audio_transcript_delta(self, evt: Any) -> None:
        if self._cut_response_id is not None and evt.response_id == self._cut_response_id:
            return  # words of the cut response the caller never hears
        await super()._handle_evt_audio_transcript_delta(evt)

    async def _truncate_current_audio_response(self) -> None:
        current = self._current_audio_response
        if current is None:
            return
        self._current_audio_response = None
        self._cut_response_id = current.response_id
        received_ms = self._calculate_audio_duration_ms(current.total_size)
        heard_ms = int(self._playout.heard_since(self._reply_mark) * 1000)
        end_ms = max(0, min(heard_ms, received_ms))
        self.truncations.append(TruncationFact(current.item_id, end_ms, received_ms, heard_ms))
        try:
            await self.send_client_event(
                events.ConversationItemTruncateEvent(
                    item_id=current.item_id,
                    content_index=current.content_index,
                    audio_end_ms=end_ms,
                )
            )
        except Exception as exc:  # the session goes on without the trim
            logger.warning("realtime truncation failed (non-fatal): {}", exc)


def session_properties(
    ctx: CallContext, tools: ToolsSchema | None = None
) -> events.SessionProperties:
    """The Realtime session for this tenant: PCM 24 kHz both ways, its VAD choice, voice."""
    p = ctx.tenant.providers
    turn_detection: events.TurnDetection | bool = (
        False
        if p.turn_detection == "local"
        else events.TurnDetection(silence_duration_ms=p.realtime_silence_ms)
    )
    return events.SessionProperties(
        instructions=s2s_instructions(ctx.tenant.system_prompt, ctx.tenant.first_message),
        audio=events.AudioConfiguration(
            input=events.AudioInput(
                format=events.PCMAudioFormat(rate=OPENAI_REALTIME_RATE),
                transcription=events.InputAudioTranscription(),
                turn_detection=turn_detection,
            ),
            output=events.AudioOutput(
                format=events.PCMAudioFormat(rate=OPENAI_REALTIME_RATE),
                voice=p.realtime_voice,
            ),
        ),
        # In the first session.update already: the first turn may call a tool before any
        # context reaches the service.
        tools=tools,
    )


def make_openai_realtime(
    ctx: CallContext, tools: ToolsSchema | None = None
) -> PlayedOutRealtimeService:
    """The Realtime service for one call (blocking constructor: call in a thread)."""
    ep = ctx.endpoints
    if not ep.openai_api_key:
        raise ProviderUnavailable("OpenAI Realtime needs PIPESWITCH_OPENAI_API_KEY")
    p = ctx.tenant.providers
    return PlayedOutRealtimeService(
        api_key=ep.openai_api_key,
        base_url=ep.openai_realtime_url,
        playout=TransportPlayout(ctx.transport),
        settings=OpenAIRealtimeLLMService.Settings(
            model=p.realtime_model or DEFAULT_REALTIME_MODEL,
            session_properties=session_properties(ctx, tools),
        ),
    )


def local_turn_aggregators(ctx: CallContext, context: LLMContext) -> LLMContextAggregatorPair:
    """Silero in the user aggregator, with the barge-in gate while the bot talks."""
    t = ctx.tenant.turns
    return LLMContextAggregatorPair(
        context,
        # Explicit: with the cascade on standby the service's metadata stays in its branch.
        realtime_service_mode=True,
        user_params=LLMUserAggregatorParams(
            vad_analyzer=ctx.vad(),
            user_turn_strategies=UserTurnStrategies(
                start=[BargeInStartStrategy(t.barge_in_min_secs)],
                # No transcript exists before the provider has the committed turn.
                stop=[
                    SpeechTimeoutUserTurnStopStrategy(
                        user_speech_timeout=t.vad_stop_secs, wait_for_transcript=False
                    )
                ],
            ),
        ),
    )


def s2s_aggregators(ctx: CallContext, context: LLMContext) -> LLMContextAggregatorPair:
    """Server VAD: the service proposes turns. Local: Silero with the barge-in gate."""
    if ctx.tenant.providers.turn_detection != "local":
        return LLMContextAggregatorPair(context, realtime_service_mode=True)
    return local_turn_aggregators(ctx, context)


async def build_openai_realtime(ctx: CallContext) -> CallPipeline:
    """Compose the OpenAI Realtime pipeline for one call (with the cascade on standby)."""
    guard = s2s_echo_guard(ctx)  # before the first await (the greeting's echo)
    llm = await asyncio.to_thread(make_openai_realtime, ctx, ctx.tool_schema())
    context = LLMContext()
    llm.receptionist = ctx.receptionist_tools(llm, context, provider_voice=True)
    pipeline, fallback = s2s_pipeline(
        ctx,
        context=context,
        rt_pair=s2s_aggregators(ctx, context),
        edge=[ProviderRateAdapter(OPENAI_REALTIME_RATE)],
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


register_builder("openai-realtime", build_openai_realtime)
