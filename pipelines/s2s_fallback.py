"""Shared speech-to-speech machinery: provider-rate edge, playout accounting, fallback.

* :class:`ProviderRateAdapter` resamples caller audio once, at the provider's edge
  (the pipeline runs at the telephone rate so local Silero can run; OpenAI Realtime
  takes 24 kHz, Gemini Live 16 kHz). Provider audio comes back at 24 kHz and the
  output transport resamples it once to the stream rate.
* :class:`TransportPlayout` answers "how much of this reply has the caller heard":
  audio written to the FreeSWITCH socket minus what the far end still held when
  playback was cut (for dialects whose clear drops it). Barge-in trims the
  provider's memory to this, not to what the provider sent.
* :class:`S2SFallback` watches the speech-to-speech service; when the provider
  refuses, does not connect within the tenant's budget, or drops mid-call, it
  switches the call to the tenant's cascade (Pipecat's ``ServiceSwitcher`` with
  its failover strategy does the switching), says a short apology, and carries
  the conversation so far into the cascade's context.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loguru import logger
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    TTSSpeakFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipeswitch.transports.resample import StreamResampler

if TYPE_CHECKING:
    from pipeswitch.transports.transport import FreeSwitchCallTransport


class ProviderRateAdapter(FrameProcessor):
    """Caller audio to the provider's input rate, with the project's stream resampler.

    Placed right before the speech-to-speech service, after the user aggregator
    (whose Silero runs at the telephone rate). A frame already at the target rate
    passes untouched, so 16 kHz calls into Gemini are not resampled at all.
    """

    def __init__(self, rate: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate = rate
        self._resampler: StreamResampler | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame) and frame.sample_rate != self.rate:
            r = self._resampler
            if r is None or r.in_rate != frame.sample_rate:
                r = self._resampler = StreamResampler(frame.sample_rate, self.rate)
            pcm = r.process(frame.audio)
            if not pcm:
                return
            frame = InputAudioRawFrame(audio=pcm, sample_rate=self.rate, num_channels=1)
        await self.push_frame(frame, direction)


class TransportPlayout:
    """What left the call's socket and was played, from the transport's own counters.

    ``mark()`` at the first audio of a reply; ``heard_since(mark)`` at barge-in is
    the seconds of that reply the caller heard: written since the mark, minus the
    audio still queued at the far end when the dialect's clear drops it (binary,
    file). With json-stream nothing can be recalled, so all written audio plays.
    """

    def __init__(self, transport: FreeSwitchCallTransport) -> None:
        self._t = transport

    def written_secs(self) -> float:
        """Bot audio written to the socket on this call so far."""
        return float(self._t.stats.audio_out_secs)

    def unplayed_secs(self) -> float:
        """Audio sent but not yet played at the far end that a clear would drop."""
        ser = self._t.serializer
        if not getattr(ser, "clear_drops_buffered", True):
            return 0.0
        # The output transport paces sends against this wall-clock horizon.
        # TODO(lead): expose it publicly on FreeSwitchOutputTransport.
        play_until = float(getattr(self._t.output(), "_play_until", 0.0))
        return max(0.0, play_until - time.monotonic())

    def mark(self) -> float:
        """A reference point: the written total now."""
        return self.written_secs()

    def heard_since(self, mark: float) -> float:
        """Seconds written since ``mark`` that the caller heard (or will, if not cut)."""
        return max(0.0, self.written_secs() - mark - self.unplayed_secs())


def heard_words(text: str, heard_secs: float, total_secs: float) -> str:
    """The words of ``text`` heard in ``heard_secs`` of its ``total_secs`` of audio."""
    if total_secs <= 0 or heard_secs >= total_secs:
        return text
    words = text.split()
    return " ".join(words[: int(len(words) * max(0.0, heard_secs) / total_secs)])


def s2s_instructions(system_prompt: str, first_message: str | None) -> str:
    """The provider's instructions: the tenant's prompt, and the greeting it already heard.

    The greeting is played from Piper's cache the moment the call connects (the
    provider is still connecting), so the model must know it was said.
    """
    if not first_message:
        return system_prompt
    return (
        f"{system_prompt}\n\nThe call has started and you have already greeted the caller "
        f'with: "{first_message}". Do not greet them again; answer what they say.'
    )


# -- fallback ------------------------------------------------------------------------------


@dataclass
class FallbackEvent:
    """One switch to the cascade: why, and how long the caller waited."""

    reason: str
    failed_at: float
    switched_at: float | None = None
    # Seconds from the failure being noticed to the apology's first audio on the socket.
    switch_secs: float | None = None
    messages_carried: int = 0


@dataclass
class FallbackState:
    """Per-call fallback record (kept on the CallPipeline's parts for tests and the bench)."""

    events: list[FallbackEvent] = field(default_factory=list)

    @property
    def fell_back(self) -> bool:
        """Whether the call is now on the cascade."""
        return bool(self.events)


def carry_conversation(source: LLMContext, target: LLMContext) -> int:
    """Copy the conversation (user/assistant text turns) into the cascade's context.

    Only plain text turns travel: provider-specific items (audio, tool envelopes)
    mean nothing to another LLM. Returns how many messages were carried.
    """
    n = 0
    for m in source.get_messages():
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        content = m.get("content")
        if role in ("user", "assistant") and isinstance(content, str) and content.strip():
            target.add_message({"role": role, "content": content})  # type: ignore[arg-type]
            n += 1
        elif role in ("user", "assistant") and isinstance(content, list):
            text = " ".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("text")
            ).strip()
            if text:
                target.add_message({"role": role, "content": text})  # type: ignore[arg-type]
                n += 1
    return n


FailureCallback = Callable[[str], Awaitable[None]]


class S2SFailureWatch(FrameProcessor):
    """Notices the speech-to-speech provider failing and reports it once.

    Sits right after the provider service: the service's ``ErrorFrame`` (connect
    refused, connection dropped, malformed event) travels upstream through it.
    A connect budget also counts as a failure: no provider session within
    ``connect_timeout_secs`` of the pipeline starting.
    """

    def __init__(
        self,
        on_failure: FailureCallback,
        *,
        connect_timeout_secs: float,
        connected: Callable[[], bool],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._on_failure = on_failure
        self._connect_timeout = connect_timeout_secs
        self._connected = connected
        self._failed = False
        self._watch: asyncio.Task[None] | None = None

    def start_watch(self) -> None:
        """Start the connect budget (called when the pipeline starts)."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._budget())

    async def _budget(self) -> None:
        deadline = time.monotonic() + self._connect_timeout
        while time.monotonic() < deadline:
            if self._connected() or self._failed:
                return
            await asyncio.sleep(0.05)
        await self.fail(f"no provider session within {self._connect_timeout:.1f}s")

    async def fail(self, reason: str) -> None:
        """Report the failure (once)."""
        if self._failed:
            return
        self._failed = True
        await self._on_failure(reason)

    async def cleanup(self) -> None:
        await super().cleanup()
        if self._watch is not None:
            self._watch.cancel()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, ErrorFrame) and direction is FrameDirection.UPSTREAM:
            await self.push_frame(frame, direction)
            await self.fail(str(frame.error)[:200])
            return
        if self._watch is None:
            self.start_watch()
        await self.push_frame(frame, direction)


def apology_frame(text: str) -> TTSSpeakFrame:
    """The short apology the cascade speaks when it takes over."""
    return TTSSpeakFrame(text)


log = logger
