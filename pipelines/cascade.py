"""The cascade: Silero VAD (in the user aggregator) -> STT -> LLM -> Piper TTS.

Written with the same composition API as a developer's own builder
(:mod:`pipeswitch.pipelines.compose`). Barge-in is Pipecat's own: a user-turn
start broadcasts an InterruptionFrame; the output transport stops playback in
the tenant's dialect and reports how far it got; the heard-context processor
keeps only what the caller heard in the conversation.
"""

from __future__ import annotations

from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext

from pipeswitch.pipelines.compose import CallContext, CallPipeline, register_builder
from pipeswitch.processors.dtmf import dtmf_aggregator


async def build_cascade(ctx: CallContext) -> CallPipeline:
    """Compose the cascade pipeline for one call."""
    stt, llm = await ctx.services.stt_and_llm()
    tts = ctx.services.tts()
    context = LLMContext()
    ctx.receptionist_tools(llm, context)
    # Caller audio to the VAD and the STT socket directly; the pipeline gets events.
    fast = ctx.media_fast_path(stt)
    aggregators = ctx.context_aggregators(context, vad=fast is None)
    pipeline = Pipeline(
        [
            ctx.transport.input(),
            stt,
            dtmf_aggregator(),  # keys pressed -> a caller turn the LLM reads
            aggregators.user(),
            ctx.caller_audio_sink(),
            llm,
            tts,
            ctx.transport.output(),
            aggregators.assistant(),
            ctx.heard_context(context),
        ]
    )
    return CallPipeline(pipeline, context, parts={"stt": stt, "llm": llm, "tts": tts})


register_builder("cascade", build_cascade)
