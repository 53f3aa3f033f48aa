"""Builders used by the tests: one valid, several broken on purpose."""

from __future__ import annotations

from typing import Any

from pipecat.frames.frames import Frame, LLMContextFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipeswitch.pipelines.compose import CallContext, CallPipeline


class Explodes(FrameProcessor):
    """A developer's processor with a bug: raises when the first user turn reaches it."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            raise RuntimeError("bug in a developer's processor")
        await self.push_frame(frame, direction)


async def build_raising(ctx: CallContext) -> CallPipeline:
    """The cascade with :class:`Explodes` between the user aggregator and the LLM."""
    stt, llm = await ctx.services.stt_and_llm()
    context = LLMContext()
    aggregators = ctx.context_aggregators(context)
    pipeline = Pipeline(
        [
            ctx.transport.input(),
            stt,
            aggregators.user(),
            ctx.caller_audio_sink(),
            Explodes(),
            llm,
            ctx.services.tts(),
            ctx.transport.output(),
            aggregators.assistant(),
            ctx.heard_context(context),
        ]
    )
    return CallPipeline(pipeline, context)


def not_async(ctx: CallContext) -> CallPipeline:  # pragma: no cover - refused at load
    raise AssertionError("never called")


async def two_args(ctx: CallContext, extra: Any) -> CallPipeline:  # pragma: no cover
    raise AssertionError("never called")


NOT_CALLABLE = 42
