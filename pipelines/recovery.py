"""What the caller hears when a provider fails inside a turn: an apology, not dead air.

Pipecat reports a failed LLM or STT request as an ``ErrorFrame`` and keeps the pipeline
running (``ProcessorUnusablePolicy.CONTINUE``): the call survives, but the caller hears
nothing and does not know whether to repeat. Here the call says a short apology through
its TTS, at most once per ``min_gap_secs``, so a provider that fails every request does
not make the bot apologise over the caller.

A cascade call has a :class:`~pipeswitch.processors.turn_watchdog.TurnWatchdog`: errors
go to it instead, and it plays the apology from PCM synthesized before the fault
(:class:`PhraseCache`), so a TTS that is down can still be apologised for.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from loguru import logger
from pipecat.frames.frames import ErrorFrame, TTSSpeakFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.services.llm_service import LLMService
from pipecat.services.stt_service import STTService
from pipecat.services.tts_service import TTSService

from pipeswitch.pipelines.piper_client import WavError, synthesize
from pipeswitch.processors.turn_watchdog import (
    LLM_APOLOGY,
    RECOVERY_PHRASES,
    STT_APOLOGY,
    TurnWatchdog,
)

__all__ = [
    "LLM_APOLOGY",
    "STT_APOLOGY",
    "PhraseCache",
    "install_apology",
    "is_provider",
    "watchdog_of",
]


class PhraseCache:
    """Recovery phrases as PCM, per (Piper URL, voice), kept for the process's life.

    Fetched once, in the background, when a call starts and they are missing (the Piper
    server has them warm: start-up synthesizes them with the greetings), so a later TTS
    fault cannot take the apology down with it.
    """

    def __init__(self) -> None:
        self._pcm: dict[tuple[str, str | None, str], tuple[bytes, int]] = {}
        self._fetching: dict[tuple[str, str | None], asyncio.Task[None]] = {}

    def lookup(self, url: str, voice: str | None) -> Any:
        """A ``text -> (pcm, rate) | None`` function for one call's watchdog."""
        return lambda text: self._pcm.get((url, voice, text))

    def ensure(self, http: aiohttp.ClientSession, url: str, voice: str | None) -> None:
        """Start fetching the phrases not cached yet (no-op when all are there)."""
        key = (url, voice)
        if all((url, voice, t) in self._pcm for t in RECOVERY_PHRASES):
            return
        task = self._fetching.get(key)
        if task is not None and not task.done():
            return
        self._fetching[key] = asyncio.ensure_future(self._fetch(http, url, voice))

    async def _fetch(self, http: aiohttp.ClientSession, url: str, voice: str | None) -> None:
        for text in RECOVERY_PHRASES:
            if (url, voice, text) in self._pcm:
                continue
            try:
                self._pcm[(url, voice, text)] = await synthesize(
                    http, url, text, voice=voice, timeout_secs=5
                )
            except (aiohttp.ClientError, TimeoutError, WavError) as exc:
                logger.warning("recovery phrase {!r} not cached: {}", text, exc)
                return


PHRASES = PhraseCache()


def is_provider(processor: object) -> bool:
    """Whether ``processor`` is a provider service (its failures degrade a call, never end it)."""
    return isinstance(processor, (LLMService, STTService, TTSService))


def watchdog_of(parts: dict[str, Any]) -> TurnWatchdog | None:
    """The call's turn watchdog, when its builder put one in the pipeline's parts."""
    w = getattr(parts.get("watchdog"), "watchdog", None)
    return w if isinstance(w, TurnWatchdog) else None


def install_apology(
    worker: PipelineWorker,
    log: Any,
    min_gap_secs: float = 8.0,
    watchdog: TurnWatchdog | None = None,
) -> None:
    """Speak an apology when the call's LLM or STT reports an error (through the
    watchdog's cached audio when the pipeline has one)."""
    last = [0.0]

    @worker.event_handler("on_pipeline_error")
    async def _apologize(_: Any, frame: ErrorFrame) -> None:
        proc = frame.processor
        if watchdog is not None:
            kind = (
                "llm"
                if isinstance(proc, LLMService)
                else "stt"
                if isinstance(proc, STTService)
                else "tts"
                if isinstance(proc, TTSService)
                else ""
            )
            if kind:
                await watchdog.provider_error(kind, frame.error)
            return
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
