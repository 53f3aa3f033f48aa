"""Example builder: the cascade with a keyword router in front of the LLM.

A tenant uses it with::

    [[tenants]]
    name = "dental.example.com"
    pipeline = "python:pipeswitch.pipelines.examples.keyword_router:build"

Questions the office answers the same way every time ("opening hours",
"address") are answered from a table - no LLM round trip, so no provider
latency and no cost - and everything else goes to the LLM as usual.
Turn-taking, barge-in, heard-context and playback work around the inserted
processor unchanged: it is an ordinary Pipecat ``FrameProcessor`` placed
between the user aggregator and the LLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipecat.frames.frames import Frame, LLMContextFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipeswitch.pipelines.compose import CallContext, CallPipeline

ANSWERS: Mapping[str, str] = {
    "opening hours": "We are open Monday to Friday from nine to five, and Saturday from nine to one.",
    "address": "We are at 12 Riverside Road, next to the pharmacy.",
}


class KeywordRouter(FrameProcessor):
    """Answers known questions from a table; passes the rest to the LLM."""

    def __init__(self, answers: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._answers = {k.lower(): v for k, v in answers.items()}
        self.routed = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame) and direction is FrameDirection.DOWNSTREAM:
            answer = self._match(frame.context)
            if answer is not None:
                self.routed += 1
                # The assistant aggregator records what is spoken, as for an LLM reply.
                await self.push_frame(TTSSpeakFrame(answer, append_to_context=True))
                return
        await self.push_frame(frame, direction)

    def _match(self, context: LLMContext) -> str | None:
        messages = context.get_messages()
        last = messages[-1] if messages else None
        if not isinstance(last, dict) or last.get("role") != "user":
            return None
        text = str(last.get("content", "")).lower()
        for keyword, answer in self._answers.items():
            if keyword in text:
                return answer
        return None


async def build(ctx: CallContext) -> CallPipeline:
    """The cascade, with :class:`KeywordRouter` between the user aggregator and the LLM."""
    stt, llm = await ctx.services.stt_and_llm()
    tts = ctx.services.tts()
    context = LLMContext()
    aggregators = ctx.context_aggregators(context)
    router = KeywordRouter(ANSWERS)
    pipeline = Pipeline(
        [
            ctx.transport.input(),
            stt,
            aggregators.user(),
            ctx.caller_audio_sink(),
            router,
            llm,
            tts,
            ctx.transport.output(),
            aggregators.assistant(),
            ctx.heard_context(context),
        ]
    )
    return CallPipeline(pipeline, context, parts={"router": router, "llm": llm})
