"""What the caller hears when a provider fails inside a turn: an apology, not dead air.

Pipecat reports a failed LLM or STT request as an ``ErrorFrame`` and keeps the pipeline
running (``ProcessorUnusablePolicy.CONTINUE``): the call survives, but the caller hears
nothing and does not know whether to repeat. Here the call says a short apology through
its TTS, at most once per ``min_gap_secs``, so a provider that fails every request does
not make the bot apologise over the caller. TTS failures cannot be spoken by that TTS;
they are left to the next turn (and counted in ``pipeswitch_provider_errors_total``).
"""

from __future__ import annotations

import time
from typing import Any

from pipecat.frames.frames import ErrorFrame, TTSSpeakFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.services.llm_service import LLMService
from pipecat.services.stt_service import STTService
from pipecat.services.tts_service import TTSService

LLM_APOLOGY = "Sorry, I had a problem just now. Could you say that again?"
STT_APOLOGY = "Sorry, I didn't catch that. Could you repeat it?"


def is_provider(processor: object) -> bool:
    """Whether ``processor`` is a provider service (its failures degrade a call, never end it)."""
    return isinstance(processor, (LLMService, STTService, TTSService))


def install_apology(worker: PipelineWorker, log: Any, min_gap_secs: float = 8.0) -> None:
    """Speak an apology when the call's LLM or STT reports an error."""
    last = [0.0]

    @worker.event_handler("on_pipeline_error")
    async def _apologize(_: Any, frame: ErrorFrame) -> None:
        proc = frame.processor
        if isinstance(proc, LLMService):
            text = LLM_APOLOGY
        elif isinstance(proc, STTService):
            text = STT_APOLOGY
        else:
            return
        now = time.monotonic()
        if now - last[0] < min_gap_secs:
            return
        last[0] = now
        log.warning("{} failed ({}); apologising to the caller", type(proc).__name__, frame.error)
        await worker.queue_frame(TTSSpeakFrame(text))
