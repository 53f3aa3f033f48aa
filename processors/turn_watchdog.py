"""Per-turn watchdog: the caller never waits in dead air for a provider that hangs.

A provider that fails loudly (5xx, refused connection) raises an ``ErrorFrame``; one that
stalls (a hung Deepgram stream, an LLM that never sends its first token, a TTS request
that never answers) raises nothing, and the caller hears silence. The watchdog times
each caller turn from the end of speech (the VAD stop, minus its stop delay):

* ``hold_secs`` (1.2 s): no bot audio yet and the caller is silent -> a short holding
  phrase ("One moment, please.") from pre-synthesized PCM, pushed straight to the
  output transport, so it plays even when the TTS is the provider that is down;
* ``retry_secs``: the turn was committed but the LLM has produced no text -> the stuck
  request is cancelled (an interruption downstream of the user aggregator) and the LLM
  runs once more on the same context;
* ``give_up_secs``: still no answer -> interrupt whatever is stuck and play the cached
  apology (asking the caller to repeat).

Caller speech cancels the turn's timer (never speak over the caller), and the reply's
first TTS audio ends it (the interruption before a retry cancels the stuck request, so
a late answer cannot play twice). The watchdog also keeps the STT alive: a stream that
gives no transcript while the caller speaks is reconnected (Pipecat buffers the audio
that arrives meanwhile and sends it on; what the hung stream swallowed is sent again from
the media fast path's history, so the turn is answered rather than apologised for); one
that Pipecat gave up on (refused, 5xx) is revived with backoff, and at once when the
caller starts speaking, on the tenant's second endpoint when the first stays down.

Four small frame-in/frame-out processors share one :class:`TurnWatchdog`: ``ear``
(after the STT), ``head`` (after the user aggregator), ``mouth`` (after the LLM) and
``tail`` (after the TTS, before the output transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    FunctionCallsStartedFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.stt_service import STTService

HOLDING_PHRASE = "One moment, please."
# A replayed turn starts this long before the VAD's start (which fires after start_secs
# of speech, plus a chunk): the first word is not clipped.
REPLAY_PRE_ROLL_SECS = 0.6
LLM_APOLOGY = "Sorry, I had a problem just now. Could you say that again?"
STT_APOLOGY = "Sorry, I didn't catch that. Could you repeat it?"
RECOVERY_PHRASES = (HOLDING_PHRASE, LLM_APOLOGY, STT_APOLOGY)

# Cached phrase audio: text -> (pcm, sample rate), or None while it is not available.
PhraseLookup = Callable[[str], "tuple[bytes, int] | None"]


@dataclass(frozen=True)
class WatchdogParams:
    """Seconds from the end of the caller's speech (tenant ``turns.watchdog_secs``)."""

    hold_secs: float = 1.2
    retry_secs: float = 2.5
    give_up_secs: float = 5.0
    # The LLM gets at least this long after the turn is committed before a retry.
    llm_secs: float = 1.5
    # Speech shorter than this with no transcript is a cough, not a turn.
    min_speech_secs: float = 0.5
    # No transcript (not even an interim) this long after the VAD stop of a real segment:
    # the STT stalled (Deepgram's final comes ~0.3 s after the stop, interims earlier; a
    # reconnect drops a final still on its way, so this errs long: a loaded box is slow).
    stt_stall_secs: float = 2.0
    # Cancel and rerun an LLM that gave no text (a cloud request that hung). Off for a local
    # LLM: it is slow, not stuck, and a rerun on a loaded CPU only starts the wait again.
    retry_llm: bool = True

    @classmethod
    def from_hold(cls, hold_secs: float) -> WatchdogParams:
        """Scale the later deadlines with the tenant's holding budget."""
        return cls(hold_secs=hold_secs, retry_secs=hold_secs + 1.3, give_up_secs=hold_secs + 3.8)

    @classmethod
    def for_local_models(cls, hold_secs: float) -> WatchdogParams:
        """The offline stack: a healthy turn takes ~1.3 s on a quiet CPU and several seconds
        on a loaded one, so the holding phrase waits at least 3 s, the LLM is never
        cancelled and rerun, and the apology comes only after 12 s of silence."""
        hold = max(hold_secs, 3.0)
        return cls(
            hold_secs=hold,
            retry_secs=hold,
            give_up_secs=max(12.0, hold + 9.0),
            stt_stall_secs=8.0,
            retry_llm=False,
        )


class TurnWatchdog:
    """One call's turn state, shared by the four processors."""

    # The call's alone: unwired with the call's processors (pipelines/dismantle.py).
    call_owned: ClassVar[bool] = True

    def __init__(
        self,
        params: WatchdogParams,
        phrases: PhraseLookup,
        log: Any,
        *,
        stt: STTService | None = None,
        context: LLMContext | None = None,
    ) -> None:
        self.params = params
        self.phrases = phrases
        self.log = log
        self.stt = stt
        self.context = context
        self.ear = _Ear(self)
        self.head = _Head(self)
        self.mouth = _Mouth(self)
        self.tail = _Tail(self)
        # Turn state (reset at each end of speech).
        self.caller_speaking = False
        self.speech_started_at = 0.0
        self.speech_end: float | None = None
        self.transcript_since_start = False
        self.final_since_start = False
        self.committed_at: float | None = None
        self.llm_text = False
        self.answered = True  # nothing to answer before the caller's first turn
        self.held = False
        self.retried = False
        self.apologised = False
        self.stt_failed = False
        self.pending_error: tuple[str, str] | None = None
        # Moves the call to its fallback LLM before a retry (the LLM stalled); returns
        # False when there is none left. Set by the builder when the tenant has one.
        self.failover: Callable[[str], Awaitable[bool]] | None = None
        # Moves the STT to its fallback endpoint (once) when a reconnect fails.
        self.stt_failover: Callable[[], Awaitable[bool]] | None = None
        # Sends the STT again the caller audio it was sent between two monotonic times
        # (the media fast path keeps it); returns the seconds sent.
        self.stt_replay: Callable[[float, float], Awaitable[float]] | None = None
        # Counters for logs and tests.
        self.holds = 0
        self.retries = 0
        self.apologies = 0
        self.stt_reconnects = 0
        self.llm_failovers = 0
        self.stt_failovers = 0
        self.stt_replays = 0

    @property
    def waiting(self) -> bool:
        """A caller turn ended and nothing has answered it yet."""
        return self.speech_end is not None and not self.answered and not self.caller_speaking

    def speech_started(self) -> None:
        self.caller_speaking = True
        self.speech_started_at = time.monotonic()
        self.transcript_since_start = False
        self.final_since_start = False
        self.pending_error = None
        # A speculative LLM run may start before the VAD stop: the turn's state starts here.
        self.committed_at = None
        self.llm_text = False
        self.tail.cancel_timer()

    def speech_stopped(self, stop_secs: float) -> None:
        self.caller_speaking = False
        now = time.monotonic()
        end = now - stop_secs
        long_enough = end - self.speech_started_at >= self.params.min_speech_secs
        if not (self.transcript_since_start or long_enough):
            return  # a cough or a click: not a turn to watch
        self.speech_end = end
        pending, self.pending_error = self.pending_error, None
        self.answered = False
        self.held = self.retried = self.apologised = False
        self.tail.start_timer()
        if pending is not None:
            self.tail.create_task(self.provider_error(*pending), "apologise-pending")

    def answer_heard(self) -> None:
        if not self.answered:
            self.answered = True
            self.tail.cancel_timer()

    async def llm_failed_over(self, why: str) -> None:
        """The call moved to its fallback LLM: ask it the waiting turn now, not at the
        retry deadline (the failed request's error stopped at the switcher)."""
        self.llm_failovers += 1
        self.log.warning("LLM failed over to the fallback ({})", why[:120])
        # The failed request was this turn's: ask again, even when a few words of it had
        # arrived (a stream dropped mid-reply); the retry's interruption cuts them.
        if not self.caller_speaking and self.speech_end is not None and self.committed_at:
            self.answered = False
            self.retried = True
            self.retries += 1
            # From a task: this runs inside the switcher handling the failed request's
            # error, and the retry's interruption cancels that very request.
            self.tail.create_task(self.head.retry(), "llm-failover-retry")

    async def provider_error(self, kind: str, error: str) -> bool:
        """A provider reported an error; True when the caller was told (cached audio)."""
        if kind == "stt":
            self.stt_failed = True
            return False
        if self.caller_speaking:
            # A speculative LLM run failed before the caller finished: say so once they do.
            self.pending_error = (kind, error)
            return False
        if self.apologised or self.speech_end is None:
            return False
        if kind == "tts" and self.answered:
            return False  # a later sentence failed; the caller already has an answer
        self.log.warning("{} failed ({}); apologising from cached audio", kind.upper(), error)
        self.apologised = True
        self.apologies += 1
        self.answered = True
        self.tail.cancel_timer()
        return await self.tail.say(LLM_APOLOGY)


class _Ear(FrameProcessor):
    """After the STT: caller speech (VAD), transcripts, and the STT's health."""

    def __init__(self, w: TurnWatchdog) -> None:
        super().__init__(name="watchdog-ear", enable_direct_mode=True)
        self._w = w
        self._stall_task: asyncio.Task[None] | None = None
        self._revive_task: asyncio.Task[None] | None = None
        self._revive_now_task: asyncio.Task[bool] | None = None
        self._reconnecting = False
        self._stt_handler_added = False
        # Set when the call ends: a reconnect started after the STT has disconnected for
        # good would open a stream (and its reconnect loop) that nobody ever closes.
        self._closing = False

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        w = self._w
        if isinstance(frame, (EndFrame, CancelFrame)):
            self._closing = True
            await self._cancel_tasks()
        elif isinstance(frame, (TranscriptionFrame, InterimTranscriptionFrame)):
            w.transcript_since_start = True
            # Interims alone do not end the wait: a stream whose finals break (a malformed
            # message) still sends them, and the turn waits for a final that never comes.
            if isinstance(frame, TranscriptionFrame):
                w.final_since_start = True
                if self._stall_task is not None:
                    await self.cancel_task(self._stall_task)
                    self._stall_task = None
        elif isinstance(frame, VADUserStartedSpeakingFrame) and not w.caller_speaking:
            # Either direction: the aggregator's VAD broadcasts it upstream; a media fast
            # path in the transport sends it down. Once per segment either way.
            w.speech_started()
            if self._stall_task is not None:
                await self.cancel_task(self._stall_task)
                self._stall_task = None
            stt = w.stt
            if stt is not None and not stt.is_usable and not self._reconnecting:
                self._revive_now_task = self.create_task(
                    self._reconnect("STT down, caller speaking"), "stt-revive-now"
                )
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and w.caller_speaking:
            # The VAD decided at frame.timestamp (wall clock): count the queueing since.
            lag = min(1.0, max(0.0, time.time() - frame.timestamp))
            w.speech_stopped(frame.stop_secs + lag)
            if w.stt is not None and w.speech_end is not None and not w.final_since_start:
                if self._stall_task is not None:
                    await self.cancel_task(self._stall_task)
                self._stall_task = self.create_task(
                    self._stall_check(self._w.params.stt_stall_secs), "stt-stall-check"
                )
        await self.push_frame(frame, direction)

    async def _stall_check(self, secs: float) -> None:
        await asyncio.sleep(secs)
        self._stall_task = None
        w = self._w
        if not w.final_since_start and not self._reconnecting:
            what = "final transcript" if w.transcript_since_start else "transcript"
            await self._reconnect(f"no {what} for the caller's speech")

    async def _reconnect(self, why: str) -> bool:
        """Reconnect the STT (Pipecat buffers the caller's audio meanwhile and sends it)."""
        stt = self._w.stt
        if stt is None or self._reconnecting or self._closing:
            return False
        self._reconnecting = True
        began = time.monotonic()
        try:
            self._w.stt_reconnects += 1
            self._w.log.warning("STT: {}; reconnecting", why)
            await stt.set_usable(True)
            await stt._reconnect()
            ok = stt.is_usable
            move = self._w.stt_failover
            if not ok and not self._closing and move is not None and await move():
                self._w.stt_failovers += 1
                self._w.log.warning("STT: endpoint down; moved to the fallback endpoint")
                await stt.set_usable(True)
                await stt._reconnect()
                ok = stt.is_usable
        finally:
            self._reconnecting = False
        if self._closing:
            return False
        if not ok:
            self._ensure_revival()
            return False
        self._w.stt_failed = False
        await self._replay_lost_turn(began)
        return True

    async def _replay_lost_turn(self, until: float) -> None:
        """The caller's last turn got no transcript from the old stream: send its audio
        to the new one, so it is answered instead of apologised for."""
        w = self._w
        if (
            w.stt_replay is None
            or w.caller_speaking
            or w.final_since_start
            or w.speech_end is None
            or w.answered
        ):
            return
        secs = await w.stt_replay(w.speech_started_at - REPLAY_PRE_ROLL_SECS, until)
        if secs > 0:
            w.stt_replays += 1
            w.log.info("STT: sent the caller's last {:.1f}s again on the new stream", secs)

    def watch_stt(self) -> None:
        """Revive the STT whenever Pipecat gives up on it (refused, 5xx, dropped)."""
        stt = self._w.stt
        if stt is None or self._stt_handler_added:
            return
        self._stt_handler_added = True
        tracker = getattr(stt, "_quick_failure_tracker", None)
        if tracker is not None:
            # Pipecat's Deepgram retries a failing connect 3 times, 4-10 s apart, inside the
            # service's start: every frame of the call (the caller's VAD events included)
            # queues behind it. Let it give up at once; _revive retries off the pipeline.
            tracker.max_consecutive_failures = 1

        @stt.event_handler("on_usable_changed")
        async def _usable(_: Any, usable: bool) -> None:
            if not usable:
                self._ensure_revival()

    def _ensure_revival(self) -> None:
        if self._closing:
            return
        if self._revive_task is None or self._revive_task.done():
            self._revive_task = self.create_task(self._revive(), "stt-revive")

    async def _revive(self) -> None:
        delay = 1.0
        stt = self._w.stt
        while stt is not None and not stt.is_usable and not self._closing:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            if stt.is_usable or self._reconnecting:
                continue
            await self._reconnect("STT unusable")

    async def _cancel_tasks(self) -> None:
        tasks = (self._stall_task, self._revive_task, self._revive_now_task)
        self._stall_task = self._revive_task = self._revive_now_task = None
        for task in tasks:
            if task is not None and not task.done() and task is not asyncio.current_task():
                await self.cancel_task(task)

    async def cleanup(self) -> None:
        await super().cleanup()
        self._closing = True
        await self._cancel_tasks()


class _Head(FrameProcessor):
    """After the user aggregator: the committed turn, and where a retry is injected."""

    def __init__(self, w: TurnWatchdog) -> None:
        super().__init__(name="watchdog-head", enable_direct_mode=True)
        self._w = w

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            self._w.committed_at = time.monotonic()
            self._w.context = frame.context
        await self.push_frame(frame, direction)

    async def retry(self) -> None:
        """Cancel the stuck LLM request (an interruption) and run the LLM again."""
        context = self._w.context
        if context is None:
            return
        await self.push_frame(InterruptionFrame())
        self._w.committed_at = time.monotonic()
        await self.push_frame(LLMContextFrame(context=context))

    async def interrupt(self) -> None:
        await self.push_frame(InterruptionFrame())


class _Mouth(FrameProcessor):
    """After the LLM: whether the LLM has produced text this turn."""

    def __init__(self, w: TurnWatchdog) -> None:
        super().__init__(name="watchdog-mouth", enable_direct_mode=True)
        self._w = w

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        # Text, or a tool call (a retry would run the tool twice): the LLM is not stuck.
        if isinstance(frame, (LLMTextFrame, FunctionCallsStartedFrame)):
            self._w.llm_text = True
        await self.push_frame(frame, direction)


class _Tail(FrameProcessor):
    """After the TTS: the reply's audio ends the turn; cached phrases are played here."""

    def __init__(self, w: TurnWatchdog) -> None:
        super().__init__(name="watchdog-tail", enable_direct_mode=True)
        self._w = w
        self.watchdog = w  # how the call controller finds the watchdog (pipeline parts)
        self._timer: asyncio.Task[None] | None = None
        self._playing_until = 0.0
        self._interrupted = asyncio.Event()
        self.bot_speaking = False

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self._w.answer_heard()
        elif isinstance(frame, InterruptionFrame):
            self._interrupted.set()
        elif isinstance(frame, BotStartedSpeakingFrame):
            self.bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self.bot_speaking = False
        await self.push_frame(frame, direction)

    async def interrupt_then(self, text: str | None = None) -> None:
        """Interrupt from the head and wait for it to pass here, so it cannot cut ``text``."""
        self._interrupted.clear()
        await self._w.head.interrupt()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._interrupted.wait(), timeout=1.0)
        if text:
            await self.say(text)

    def start_timer(self) -> None:
        self.cancel_timer()
        self._timer = self.create_task(self._watch(), "turn-watchdog")

    def cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and not timer.done() and timer is not asyncio.current_task():
            timer.cancel()

    async def _until(self, delay: float) -> None:
        end = self._w.speech_end
        assert end is not None
        await asyncio.sleep(max(0.0, end + delay - time.monotonic()))

    async def _watch(self) -> None:
        w, p = self._w, self._w.params
        await self._until(p.hold_secs)
        if not w.waiting or self.bot_speaking:
            return  # answered, or the caller spoke over a reply that is still playing
        w.held = True
        w.holds += 1
        w.log.info("no reply {:.1f}s after the caller's turn; holding phrase", p.hold_secs)
        await self.say(HOLDING_PHRASE)
        await self._until(p.retry_secs)
        if w.committed_at is not None:
            await asyncio.sleep(max(0.0, w.committed_at + p.llm_secs - time.monotonic()))
        await asyncio.sleep(max(0.0, self._playing_until - time.monotonic()))
        # With a fallback LLM the turn is asked again there (llm_failed_over).
        if (
            p.retry_llm
            and w.waiting
            and w.committed_at is not None
            and not w.llm_text
            and not w.retried
            and (w.failover is None or not await w.failover("no text from the LLM in time"))
        ):
            w.retried = True
            w.retries += 1
            w.log.warning("LLM gave no text for the caller's turn; cancelling and retrying once")
            await w.head.retry()
        await self._until(p.give_up_secs)
        await asyncio.sleep(max(0.0, self._playing_until - time.monotonic()))
        if not w.waiting or w.apologised:
            return
        w.apologised = True
        w.apologies += 1
        phrase = LLM_APOLOGY if w.committed_at is not None else STT_APOLOGY
        w.log.warning("no reply {:.1f}s after the caller's turn; apologising", p.give_up_secs)
        w.answered = True
        await self.interrupt_then(phrase)

    async def say(self, text: str) -> bool:
        """Play a cached phrase now; False when it is not cached (Piper was down at start)."""
        found = self._w.phrases(text)
        if found is None:
            self._w.log.warning("recovery phrase {!r} is not cached; nothing to play", text)
            return False
        pcm, rate = found
        step = rate * 2 // 5  # 200 ms frames: few frames, and an interruption still cuts it
        for i in range(0, len(pcm), step):
            await self.push_frame(
                TTSAudioRawFrame(audio=pcm[i : i + step], sample_rate=rate, num_channels=1)
            )
        start = max(time.monotonic(), self._playing_until)
        self._playing_until = start + len(pcm) / (2 * rate)
        return True

    async def cleanup(self) -> None:
        await super().cleanup()
        self.cancel_timer()
