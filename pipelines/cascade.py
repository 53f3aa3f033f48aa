"""The cascade: Silero VAD (in the user aggregator) -> STT -> LLM -> Piper TTS.

Written with the same composition API as a developer's own builder
(:mod:`pipeswitch.pipelines.compose`). Barge-in is Pipecat's own: a user-turn
start broadcasts an InterruptionFrame; the output transport stops playback in
the tenant's dialect and reports how far it got; the heard-context processor
keeps only what the caller heard in the conversation. A turn watchdog
(:mod:`pipeswitch.processors.turn_watchdog`) covers a provider that stalls or fails:
holding phrase, one LLM retry, cached apology, STT reconnect.
"""

from __future__ import annotations

from typing import Any

from loguru import logger
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.llm_service import LLMService
from pipecat.services.stt_service import STTService

from pipeswitch.pipelines.compose import CallContext, CallPipeline, register_builder
from pipeswitch.pipelines.llm_failover import failover_of, llm_with_fallback
from pipeswitch.pipelines.recovery import PHRASES
from pipeswitch.pipelines.services import ProviderUnavailable, stt_failover
from pipeswitch.processors.dtmf import dtmf_aggregator
from pipeswitch.processors.echo_guard import EchoGuard, EchoGuardParams
from pipeswitch.processors.turn_watchdog import TurnWatchdog, WatchdogParams


async def build_cascade(ctx: CallContext) -> CallPipeline:
    """Compose the cascade pipeline for one call."""
    # Before the first await: the greeting starts playing then, and its echo counts too.
    guard = cascade_echo_guard(ctx)
    stt, primary = await ctx.services.stt_and_llm()
    tts = ctx.services.tts()
    context = LLMContext()
    ctx.receptionist_tools(primary, context)
    llm = await _llm_slot(ctx, primary, context)
    # Caller audio to the VAD and the STT socket directly; the pipeline gets events.
    fast = ctx.media_fast_path(stt)
    if fast is not None and guard is not None:
        ctx.transport.input().set_media_sink(guard.sink(fast))  # echo never reaches them
    aggregators = ctx.context_aggregators(context, vad=fast is None)
    parts: dict[str, FrameProcessor] = {"stt": stt, "llm": llm, "tts": tts}
    if guard is not None:
        parts["echo_guard"] = guard.input()
    watchdog = _watchdog(ctx, stt, context)
    if watchdog is not None:
        parts["watchdog"] = watchdog.tail
        if fast is not None:
            watchdog.stt_replay = fast.replay  # a swallowed turn is sent to a new stream
    failover = failover_of(llm)
    if failover is not None:
        parts["llm_primary"] = primary
        if watchdog is not None:
            failover.on_failed_over = watchdog.llm_failed_over
            watchdog.failover = failover.fail_over
    pipeline = Pipeline(
        [
            ctx.transport.input(),
            *([guard.input()] if guard is not None and fast is None else []),
            stt,
            # Backchannels ("mm-hm" over the bot) become UserBackchannelFrames: no turn.
            *([guard.reference()] if guard is not None else []),
            *([watchdog.ear] if watchdog else []),
            dtmf_aggregator(),  # keys pressed -> a caller turn the LLM reads
            aggregators.user(),
            ctx.caller_audio_sink(),
            *([watchdog.head] if watchdog else []),
            llm,
            *([watchdog.mouth] if watchdog else []),
            tts,
            *([watchdog.tail] if watchdog else []),
            ctx.transport.output(),
            aggregators.assistant(),
            ctx.heard_context(context),
        ]
    )
    return CallPipeline(pipeline, context, parts=parts)


async def _llm_slot(
    ctx: CallContext, primary: LLMService[Any], context: LLMContext
) -> FrameProcessor:
    """The LLM, or Pipecat's LLMSwitcher over it and the tenant's fallback LLM."""
    try:
        backup = await ctx.services.fallback_llm()
    except ProviderUnavailable as exc:
        logger.bind(call=ctx.call.call_uuid, tenant=ctx.tenant.name).warning(
            "no fallback LLM for this call: {}", exc
        )
        return primary
    if backup is None:
        return primary
    ctx.receptionist_tools(backup, context)
    return llm_with_fallback(primary, backup)


def cascade_echo_guard(ctx: CallContext) -> EchoGuard | None:
    """The echo guard in front of the cascade's VAD and STT (``turns.echo_guard_cascade``).

    It mutes caller audio that is only the bot's echo (energy within the margin above
    the echo estimate) and holds a candidate until it is speech; the barge-in rule
    (``BargeInStartStrategy``, ``barge_in_min_secs``) then runs on what gets through.
    The bot's audio is timed where the transport writes it, the greeting included.
    """
    if not ctx.tenant.turns.echo_guard_cascade:
        return None
    guard = EchoGuard(EchoGuardParams(), interrupt=False)
    if ctx.transport.params.audio_out_filter is None:
        ctx.transport.params.audio_out_filter = guard.output_filter()
    ctx.transport.output().prompt_tap = guard.prompt_tap
    return guard


def _watchdog(ctx: CallContext, stt: STTService, context: LLMContext) -> TurnWatchdog | None:
    """The tenant's turn watchdog, its phrases fetched now if not cached (None: off)."""
    secs = ctx.tenant.turns.watchdog_secs
    if secs <= 0:
        return None
    url = ctx.endpoints.piper_for_rate(ctx.sample_rate)
    PHRASES.ensure(ctx.http, url, ctx.tenant.voice)
    local = ctx.endpoints.mode == "local" or ctx.tenant.providers.llm == "local"
    params = WatchdogParams.for_local_models(secs) if local else WatchdogParams.from_hold(secs)
    watchdog = TurnWatchdog(
        params,
        PHRASES.lookup(url, ctx.tenant.voice),
        logger.bind(call=ctx.call.call_uuid, tenant=ctx.tenant.name),
        stt=stt,
        context=context,
    )
    watchdog.stt_failover = stt_failover(stt, ctx.tenant, ctx.endpoints, ctx.sample_rate)
    watchdog.ear.watch_stt()
    return watchdog


register_builder("cascade", build_cascade)
