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

from loguru import logger
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.stt_service import STTService

from pipeswitch.pipelines.compose import CallContext, CallPipeline, register_builder
from pipeswitch.pipelines.recovery import PHRASES
from pipeswitch.processors.dtmf import dtmf_aggregator
from pipeswitch.processors.echo_guard import EchoGuard, EchoGuardParams
from pipeswitch.processors.turn_watchdog import TurnWatchdog, WatchdogParams


async def build_cascade(ctx: CallContext) -> CallPipeline:
    """Compose the cascade pipeline for one call."""
    # Before the first await: the greeting starts playing then, and its echo counts too.
    guard = cascade_echo_guard(ctx)
    stt, llm = await ctx.services.stt_and_llm()
    tts = ctx.services.tts()
    context = LLMContext()
    ctx.receptionist_tools(llm, context)
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
    watchdog.ear.watch_stt()
    return watchdog


register_builder("cascade", build_cascade)
