"""Keep in the LLM context only what the caller actually heard.

Pipecat's assistant aggregator adds whole sentences once their audio has been
written; a sentence cut off by a barge-in is dropped entirely, so the model
forgets it had started answering. The output transport reports the heard part
of that sentence (:class:`~transports.frames.PlaybackInterruptedFrame`) just
before the interruption; this processor, placed after the assistant
aggregator, appends those words to the assistant's turn.
"""

from __future__ import annotations

from typing import Any

from pipecat.frames.frames import Frame, InterruptionFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipeswitch.transports.frames import PlaybackInterruptedFrame, PromptPlayedFrame


class HeardContextProcessor(FrameProcessor):
    """Appends the heard part of an interrupted sentence to the context."""

    def __init__(self, context: LLMContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._context = context
        self._pending = ""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, PromptPlayedFrame):
            self._context.add_message({"role": "assistant", "content": frame.text})
            return
        if isinstance(frame, PlaybackInterruptedFrame):
            self._pending = frame.heard_text.strip()
            return  # consumed: nothing after us needs it
        if isinstance(frame, InterruptionFrame) and self._pending:
            # The aggregator has already written the whole sentences of this turn.
            self.append_heard(self._pending)
            self._pending = ""
        await self.push_frame(frame, direction)

    def append_heard(self, text: str) -> None:
        """Extend this turn's assistant message, or add one if none was written."""
        messages = self._context.get_messages()
        last = messages[-1] if messages else None
        if (
            isinstance(last, dict)
            and last.get("role") == "assistant"
            and isinstance(last.get("content"), str)
        ):
            last["content"] = f"{last['content']} {text}".strip()
        else:
            self._context.add_message({"role": "assistant", "content": text})
