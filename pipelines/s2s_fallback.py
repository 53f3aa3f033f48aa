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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    ErrorFrame,
    Frame,
    FunctionCallInProgressFrame,
    FunctionCallsStartedFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMRunFrame,
    ManuallySwitchServiceFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.service_switcher import ServiceSwitcher, ServiceSwitcherStrategyManual
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregator,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.llm_service import LLMService
from pipecat.services.stt_service import STTService
from pipecat.services.tts_service import TTSService

from pipeswitch.pipelines.services import ProviderUnavailable
from pipeswitch.transports.resample import Resampler, edge_resampler

if TYPE_CHECKING:
    from pipeswitch.pipelines.compose import CallContext
    from pipeswitch.processors.echo_guard import EchoGuard
    from pipeswitch.transports.transport import FreeSwitchCallTransport


class ProviderRateAdapter(FrameProcessor):
    """Caller audio to the provider's input rate, with the low-delay edge resampler.

    Placed right before the speech-to-speech service, after the user aggregator
    (whose Silero runs at the telephone rate). Each 20 ms frame goes on at once,
    resampled (soxr "HQ" held 8 -> 24 kHz audio back 60 ms: the provider heard the
    end of the caller's turn that much later). A frame already at the target rate
    passes untouched, so 16 kHz calls into Gemini are not resampled at all.
    """

    def __init__(self, rate: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate = rate
        self._resampler: Resampler | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame) and frame.sample_rate != self.rate:
            r = self._resampler
            if r is None or r.in_rate != frame.sample_rate:
                r = self._resampler = edge_resampler(frame.sample_rate, self.rate)
            pcm = r.process(frame.audio)
            if not pcm:
                return
            frame = InputAudioRawFrame(audio=pcm, sample_rate=self.rate, num_channels=1)
        await self.push_frame(frame, direction)


class ProviderAudioOut(FrameProcessor):
    """The provider's 24 kHz voice to the call's rate, once, right after the service.

    Pipecat's output transport would resample it too, but with soxr "VHQ", which
    releases telephone-sized chunks in ~100 ms bursts (measured: +100 ms p50 of
    server overhead per turn); soxr "HQ" still held the first 60 ms of a reply.
    The low-delay edge resampler answers every delta whole (3.6 ms filter delay).
    Frames stay ``TTSAudioRawFrame`` so the transport still counts bot speech.
    """

    def __init__(self, rate: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate = rate
        self._resampler: Resampler | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            self._resampler = None  # the filter's tail belongs to the cut reply
        elif isinstance(frame, TTSAudioRawFrame) and frame.sample_rate != self.rate:
            r = self._resampler
            if r is None or r.in_rate != frame.sample_rate:
                r = self._resampler = edge_resampler(frame.sample_rate, self.rate)
            pcm = r.process(frame.audio)
            if not pcm:
                return
            out = TTSAudioRawFrame(
                audio=pcm, sample_rate=self.rate, num_channels=1, context_id=frame.context_id
            )
            out.pts = frame.pts
            frame = out
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
        return self._t.output().unplayed_secs()

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

FailureCallback = Callable[[str], Awaitable[None]]
# Lets the interruption reach the S2S assistant half before the halves switch.
SETTLE_SECS = 0.05


@dataclass
class FallbackEvent:
    """One switch to the cascade: why, and how long the caller waited."""

    reason: str
    failed_at: float
    # Seconds from the failure being noticed to the cascade's first audio on the socket
    # (the apology), or to the switch itself when there was nothing to apologise for.
    switch_secs: float | None = None
    apologized: bool = False
    messages_carried: int = 0
    answered_pending_turn: bool = False


class CascadeEntry(FrameProcessor):
    """Head of the standby cascade branch: where the apology is spoken from."""

    async def say(self, text: str) -> None:
        """Speak ``text`` through the cascade's TTS."""
        await self.push_frame(TTSSpeakFrame(text))

    async def answer(self) -> None:
        """Have the cascade's LLM answer the conversation as it stands."""
        await self.push_frame(LLMRunFrame())

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class CascadeProbe(FrameProcessor):
    """After the cascade's TTS: notes when its first audio after the switch leaves."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.armed_event: FallbackEvent | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        event = self.armed_event
        if event is not None and isinstance(frame, TTSAudioRawFrame):
            event.switch_secs = time.monotonic() - event.failed_at
            self.armed_event = None
        await self.push_frame(frame, direction)


class S2SFailureWatch(FrameProcessor):
    """Notices the speech-to-speech provider failing and reports it once.

    Sits right before the provider service, so the service's ``ErrorFrame``
    (connect refused, connection dropped, malformed event) travels upstream
    through it; it is consumed here: the call goes on, on the cascade. Not
    connecting within ``connect_timeout_secs`` of the pipeline starting is a
    failure too.
    """

    def __init__(
        self,
        on_failure: FailureCallback,
        *,
        connect_timeout_secs: float,
        connected: Callable[[], bool],
        reply_timeout_secs: float = 15.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._on_failure = on_failure
        self._connect_timeout = connect_timeout_secs
        self._reply_timeout = reply_timeout_secs
        self._reply_watch: asyncio.TimerHandle | None = None
        self._stall_task: asyncio.Task[None] | None = None
        self._connected = connected
        self.failed = False
        # The caller talked on this branch (its turns seen here): a failure before the
        # provider heard them (no session yet) lost their words, and calls for the apology.
        self.caller_spoke = False
        self._pending = ""
        self._watch: asyncio.Task[None] | None = None

    async def _budget(self) -> None:
        deadline = time.monotonic() + self._connect_timeout
        while time.monotonic() < deadline:  # noqa: ASYNC110
            if self._connected() or self.failed:
                return
            await asyncio.sleep(0.05)  # bounded by the connect budget
        await self.fail(f"no provider session within {self._connect_timeout:.1f}s")

    async def fail(self, reason: str) -> None:
        """Report the failure (once)."""
        if self.failed:
            return
        self.failed = True
        await self._on_failure(reason)

    async def cleanup(self) -> None:
        await super().cleanup()
        if self._watch is not None:
            self._watch.cancel()
        self._disarm_reply()

    def _arm_reply(self) -> None:
        """The caller's turn ended: the provider owes a reply within the budget."""
        self._disarm_reply()
        loop = asyncio.get_running_loop()
        self._reply_watch = loop.call_later(self._reply_timeout, self._stalled)

    def _stalled(self) -> None:
        # A plain task, not one of this processor's: the fallback interrupts (and so
        # resets) this processor's own tasks on its way.
        self._stall_task = asyncio.ensure_future(
            self.fail(f"no reply within {self._reply_timeout:.1f}s of the caller's turn")
        )

    def _disarm_reply(self) -> None:
        if self._reply_watch is not None:
            self._reply_watch.cancel()
            self._reply_watch = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, ErrorFrame) and direction is FrameDirection.UPSTREAM:
            reason = str(frame.error)[:300]
            if self._watch is None:
                # Refused while the pipeline is still being set up: switching now would
                # send the switchers a frame before their StartFrame. Switch once started.
                self._pending = self._pending or reason
            else:
                await self.fail(reason)
            return
        if isinstance(frame, UserStartedSpeakingFrame):
            self.caller_spoke = True
        if not self.failed:
            if isinstance(frame, UserStoppedSpeakingFrame):
                self._arm_reply()
            elif isinstance(
                frame,
                (
                    UserStartedSpeakingFrame,
                    BotStartedSpeakingFrame,
                    FunctionCallInProgressFrame,
                    FunctionCallsStartedFrame,
                ),
            ):
                # The caller talks again, the bot is heard, or a tool is working.
                self._disarm_reply()
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame) and self._watch is None:
            self._watch = asyncio.ensure_future(self._budget())
            if self._pending:
                await self.fail(self._pending)


class S2SFallback:
    """Moves one call from its speech-to-speech branch to its cascade branch."""

    def __init__(
        self,
        *,
        head: ServiceSwitcher[Any],
        tail: ServiceSwitcher[Any],
        cascade: FrameProcessor,
        cascade_tail: FrameProcessor,
        entry: CascadeEntry,
        probe: CascadeProbe,
        watch: S2SFailureWatch,
        rt_user: LLMUserAggregator,
        context: LLMContext,
        apology: str,
        log: Any,
    ) -> None:
        self._head = head
        self._tail = tail
        self._cascade = cascade
        self._cascade_tail = cascade_tail
        self._entry = entry
        self._probe = probe
        self._watch = watch
        self._rt_user = rt_user
        self._context = context
        self._apology = apology
        self._log = log
        self.events: list[FallbackEvent] = []

    @property
    def fell_back(self) -> bool:
        """Whether the call is now on the cascade."""
        return bool(self.events)

    async def on_failure(self, reason: str) -> None:
        """The provider failed: switch both halves, apologise if the caller was mid-talk."""
        if self.events:
            return
        event = FallbackEvent(reason=reason, failed_at=time.monotonic())
        self.events.append(event)
        # The context is shared by both branches' aggregators: the conversation so far is
        # already the cascade's. Count what it carries, for the record.
        event.messages_carried = sum(
            1
            for m in self._context.get_messages()
            if isinstance(m, dict) and m.get("role") in ("user", "assistant")
        )
        self._log.warning(
            "speech-to-speech provider failed ({}); continuing on the cascade", reason
        )
        # Stop what the provider had sent (a cut reply would otherwise play on, stale,
        # for up to its whole length): the playback stops as on a barge-in, and the
        # S2S assistant half writes the words the caller heard into the shared context.
        await self._watch.broadcast_interruption()
        # A caller turn the provider transcribed but never answered is still held by the
        # realtime user half (it writes on the reply's start): write it now.
        if self._rt_user.aggregation_string():
            await self._rt_user.push_aggregation()
        await asyncio.sleep(SETTLE_SECS)
        await self._head.queue_frame(ManuallySwitchServiceFrame(service=self._cascade))
        await self._tail.queue_frame(ManuallySwitchServiceFrame(service=self._cascade_tail))
        caller_spoke = self._watch.caller_spoke or any(
            isinstance(m, dict) and m.get("role") == "user" for m in self._context.get_messages()
        )
        if caller_spoke and self._apology:
            event.apologized = True
            self._probe.armed_event = event
            await self._entry.say(self._apology)
        else:
            event.switch_secs = time.monotonic() - event.failed_at
        messages = self._context.get_messages()
        last = messages[-1] if messages else None
        if isinstance(last, dict) and last.get("role") == "user":
            # The provider took the caller's turn and never answered it: the cascade does.
            event.answered_pending_turn = True
            await self._entry.answer()


def s2s_pipeline(
    ctx: CallContext,
    *,
    context: LLMContext,
    rt_pair: LLMContextAggregatorPair,
    edge: list[FrameProcessor],
    llm: LLMService[Any],
    connected: Callable[[], bool],
    cascade: tuple[STTService, LLMService[Any], TTSService] | None,
    guard: EchoGuard | None = None,
) -> tuple[Pipeline, S2SFallback | None]:
    r"""The call's pipeline: the S2S branch alone, or S2S with the cascade on standby.

    ``guard``: the echo guard's gate heads the S2S branch, before its user aggregator
    (a local Silero there must not hear the echo either), and its transcript tap
    follows the provider (backchannels become ``UserBackchannelFrame``\ s).

    With a cascade, two ``ServiceSwitcher``s (Pipecat's; switched together) route
    frames either to [S2S user aggregator, edge, watch, S2S service] or to [STT,
    cascade user aggregator, LLM, TTS] before the output transport, and to the
    matching assistant aggregator after it. Both aggregator pairs write one shared
    ``LLMContext``, so the cascade starts with the conversation so far.
    """
    t = ctx.transport
    gate = [guard.input()] if guard is not None else []
    tap = [guard.reference()] if guard is not None else []
    if cascade is None:
        pipeline = Pipeline(
            [
                t.input(),
                *gate,
                rt_pair.user(),
                *edge,
                llm,
                *tap,
                ProviderAudioOut(ctx.sample_rate),
                t.output(),
                rt_pair.assistant(),
                ctx.heard_context(context),
            ]
        )
        return pipeline, None
    stt, llm_c, tts = cascade
    pair_c = ctx.context_aggregators(context)
    entry = CascadeEntry()
    log = logger.bind(call=ctx.call.call_uuid, tenant=ctx.tenant.name)
    holder: list[S2SFallback] = []

    async def on_failure(reason: str) -> None:
        await holder[0].on_failure(reason)

    p = ctx.tenant.providers
    watch = S2SFailureWatch(
        on_failure,
        connect_timeout_secs=p.s2s_connect_timeout_secs,
        connected=connected,
        reply_timeout_secs=p.s2s_reply_timeout_secs,
    )
    rt_user = rt_pair.user()
    s2s_branch = Pipeline(
        [*gate, rt_user, *edge, watch, llm, *tap, ProviderAudioOut(ctx.sample_rate)]
    )
    probe = CascadeProbe()
    cascade_branch = Pipeline(
        [entry, stt, pair_c.user(), ctx.caller_audio_sink(), llm_c, tts, probe]
    )
    head: ServiceSwitcher[Any] = ServiceSwitcher(
        [s2s_branch, cascade_branch], strategy_type=ServiceSwitcherStrategyManual
    )
    tail_rt = Pipeline([rt_pair.assistant(), ctx.heard_context(context)])
    tail_c = Pipeline([pair_c.assistant(), ctx.heard_context(context)])
    tail: ServiceSwitcher[Any] = ServiceSwitcher(
        [tail_rt, tail_c], strategy_type=ServiceSwitcherStrategyManual
    )
    fallback = S2SFallback(
        head=head,
        tail=tail,
        cascade=cascade_branch,
        cascade_tail=tail_c,
        entry=entry,
        probe=probe,
        watch=watch,
        rt_user=rt_user,
        context=context,
        apology=p.s2s_apology,
        log=log,
    )
    holder.append(fallback)
    return Pipeline([t.input(), head, t.output(), tail]), fallback


def s2s_echo_guard(ctx: CallContext) -> EchoGuard | None:
    """The tenant's echo guard for a speech-to-speech call (``turns.echo_guard``), or None.

    Made before the builder's first await: the cached greeting starts playing then,
    and its echo must not reach the provider either. The bot's audio is timed where
    the transport writes it (``audio_out_filter``) and at the greeting's tap.
    """
    from pipeswitch.processors.echo_guard import EchoGuard, EchoGuardParams

    if not ctx.tenant.turns.echo_guard:
        return None
    guard = EchoGuard(EchoGuardParams())
    if ctx.transport.params.audio_out_filter is None:
        ctx.transport.params.audio_out_filter = guard.output_filter()
    ctx.transport.output().prompt_tap = guard.prompt_tap
    return guard


async def standby_cascade(
    ctx: CallContext, context: LLMContext
) -> tuple[STTService, LLMService[Any], TTSService] | None:
    """The tenant's cascade services for fallback, or None (disabled or unavailable)."""
    if not ctx.tenant.providers.s2s_fallback:
        return None
    try:
        stt, llm_c = await ctx.services.stt_and_llm()
    except ProviderUnavailable as exc:
        logger.bind(call=ctx.call.call_uuid, tenant=ctx.tenant.name).warning(
            "no cascade to fall back to: {}", exc
        )
        return None
    ctx.receptionist_tools(llm_c, context)
    return stt, llm_c, ctx.services.tts()
