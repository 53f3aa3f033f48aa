"""Builders used by the tests: one valid, several broken on purpose."""

from __future__ import annotations

import asyncio
from typing import Any

from pipecat.frames.frames import (
    AggregatedTextFrame,
    Frame,
    InputDTMFFrame,
    InterruptionFrame,
    LLMContextFrame,
    OutputAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.utils.text.base_text_aggregator import TextType

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


class DigitBot(FrameProcessor):
    """A provider-free bot: DTMF ``1`` speaks a sentence, ``9`` interrupts whatever plays,
    ``7`` starts a task it never stops (like a reconnect loop that raced the call's end)."""

    def __init__(self, rate: int) -> None:
        super().__init__()
        self._rate = rate
        self.stray: asyncio.Task[None] | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputDTMFFrame) and frame.button.value == "1":
            await self._say("You pressed one, here is a sentence.", secs=0.6)
        elif isinstance(frame, InputDTMFFrame) and frame.button.value == "9":
            await self.push_frame(InterruptionFrame())
        elif isinstance(frame, InputDTMFFrame) and frame.button.value == "7":
            self.stray = self.create_task(_forever(), "stray-reconnect-loop")
        await self.push_frame(frame, direction)

    async def _say(self, text: str, secs: float) -> None:
        sentence = AggregatedTextFrame(text=text, text_type=TextType.SENTENCE)
        sentence.will_be_spoken = True
        await self.push_frame(sentence)
        chunk = b"\x00\x10" * (self._rate // 50)
        for _ in range(int(secs / 0.02)):
            await self.push_frame(
                OutputAudioRawFrame(audio=chunk, sample_rate=self._rate, num_channels=1)
            )
        await self.push_frame(TTSTextFrame(text=text, text_type=TextType.SENTENCE))


async def _forever() -> None:
    while True:
        await asyncio.sleep(5)


async def build_digit_bot(ctx: CallContext) -> CallPipeline:
    """Transport, a DTMF-driven bot and the heard-context processor: no providers at all."""
    context = LLMContext()
    bot = DigitBot(ctx.sample_rate)
    pipeline = Pipeline(
        [ctx.transport.input(), bot, ctx.transport.output(), ctx.heard_context(context)]
    )
    return CallPipeline(pipeline, context, parts={"bot": bot})
