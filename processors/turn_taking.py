"""When has the caller finished their turn? A pure core and its Pipecat strategy.

Telephone audio is 8 kHz; smart-turn v3 (trained on wideband speech) misjudges
it and falls back to its 3 s timeout, and a fixed speech timeout either answers mid-sentence
or wastes time. Instead the decision uses what the STT already tells us: once
the VAD has stopped and the transcript is settled (a final segment with no
interim after it), a transcript that reads
as complete ("...opening hours?") ends the turn at once, one that trails off
("I'd like to book, um") waits ``incomplete_wait`` for more speech. If the
final transcript never comes, ``stt_timeout`` after the VAD stop ends the turn
with what we have.

Speculation: Deepgram often finalizes a segment while the VAD is still
counting its ``stop_secs`` of silence. When such a final segment reads as a
complete question, the LLM starts on it at once (Pipecat's speculative
inference: the response is held by the LLM service until the turn is
confirmed), and the turn end that follows confirms it when the transcript is
unchanged - the LLM's first tokens are then already there. New words, or the
caller speaking again, withdraw it. When the turn ends is not changed by this.

The core is ``update(state, event, params) -> (state, actions)``: no clocks, no
tasks, testable in microseconds; :class:`AdaptiveTurnStopStrategy` drives it
from frames and one timer.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from pipecat.frames.frames import (
    EagerEndOfTurnCancelFrame,
    Frame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult, UserTurnSpeculation
from pipecat.turns.user_stop.base_user_turn_stop_strategy import BaseUserTurnStopStrategy
from pipecat.turns.user_stop.eager_user_turn_stop_strategy import EagerUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import (
    EagerUserTurnStrategies,
    ExternalUserTurnStrategies,
    UserTurnStrategies,
)

# Words after which a sentence is rarely over, even with a period from the STT.
_CONTINUATIONS = frozenset(
    [
        "and",
        "but",
        "or",
        "so",
        "because",
        "um",
        "uh",
        "er",
        "like",
        "the",
        "a",
        "an",
        "to",
        "of",
        "for",
        "with",
        "my",
        "your",
        "our",
        "if",
        "then",
        "that",
        "which",
        "when",
        "while",
        "is",
        "are",
        "was",
    ]
)
_WORD = re.compile(r"[A-Za-z']+")


# A turn made only of these is an opener: callers say "Hello," and go straight on.
_OPENERS = frozenset(
    [
        "hello",
        "hi",
        "hey",
        "hiya",
        "yeah",
        "so",
        "okay",
        "ok",
        "well",
        "um",
        "uh",
        "good",
        "morning",
        "afternoon",
        "evening",
        "there",
    ]
)


def looks_complete(text: str) -> bool:
    """Heuristic: terminal punctuation, not ending on a connective, not just an opener."""
    t = text.strip()
    if not t or t[-1] not in ".?!":
        return False
    words = _WORD.findall(t.lower())
    if not words or words[-1] in _CONTINUATIONS:
        return False
    return not all(w in _OPENERS for w in words)


@dataclass(frozen=True, slots=True)
class TurnParams:
    """Seconds; see :class:`config.tenants.TurnSettings` for the defaults' reasons."""

    complete_wait: float = 0.0
    incomplete_wait: float = 0.6
    stt_timeout: float = 0.8
    speculate: bool = True
    # The STT sends one final per stretch of speech and no interims (local Whisper): a
    # new VAD start makes the last final stale, as an interim would for Deepgram. Without
    # this "Hello." (a pause) "What time do you open?" ended 0.6 s after the second VAD
    # stop on "Hello." alone when Whisper took longer than that (pipeswitch demo, loaded).
    segmented_stt: bool = False


@dataclass(frozen=True, slots=True)
class TurnState:
    """What is known about the caller's current turn."""

    speaking: bool = False
    vad_stopped_at: float | None = None
    text: str = ""
    finalized: bool = False
    deadline: float | None = None
    # The turn text a speculative inference is running on, if any.
    speculated: str | None = None


@dataclass(frozen=True, slots=True)
class VadStarted:
    t: float


@dataclass(frozen=True, slots=True)
class VadStopped:
    t: float


@dataclass(frozen=True, slots=True)
class Transcript:
    t: float
    text: str
    final: bool


@dataclass(frozen=True, slots=True)
class Interim:
    t: float
    text: str = ""


@dataclass(frozen=True, slots=True)
class Timer:
    t: float


TurnEvent = VadStarted | VadStopped | Transcript | Interim | Timer


@dataclass(frozen=True, slots=True)
class EndTurn:
    """End the caller's turn now (the LLM runs on the aggregated transcript).

    ``confirms``: a speculative inference already answers exactly this text.
    """

    confirms: bool = False


@dataclass(frozen=True, slots=True)
class Speculate:
    """Start the LLM on ``text`` now, its response held until the turn ends."""

    text: str


@dataclass(frozen=True, slots=True)
class CancelSpeculation:
    """The speculative inference answers a turn that did not happen: discard it."""


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Wake the core with a Timer event at ``deadline`` (replaces any earlier timer)."""

    deadline: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    """No wake-up needed."""


TurnAction = EndTurn | SetTimer | CancelTimer | Speculate | CancelSpeculation


def _same_words(a: str, b: str) -> bool:
    """Equal but for case and punctuation (what an STT changes when it commits)."""
    return _WORD.findall(a.lower()) == _WORD.findall(b.lower())


def _end(state: TurnState) -> tuple[TurnState, list[TurnAction]]:
    """End the turn, confirming or withdrawing a speculation in flight."""
    spec = state.speculated
    state = replace(state, deadline=None, speculated=None)
    if spec is None:
        return state, [EndTurn()]
    if _same_words(spec, state.text):
        return state, [EndTurn(confirms=True)]
    return state, [CancelSpeculation(), EndTurn()]


def _withdraw(state: TurnState, actions: list[TurnAction]) -> TurnState:
    if state.speculated is not None:
        actions.append(CancelSpeculation())
        return replace(state, speculated=None)
    return state


def _decide(state: TurnState, now: float, p: TurnParams) -> tuple[TurnState, list[TurnAction]]:
    """After VAD stop: end now, or set the deadline that applies."""
    if state.vad_stopped_at is None:
        return state, []
    if state.finalized and state.text.strip():
        wait = p.complete_wait if looks_complete(state.text) else p.incomplete_wait
        deadline = state.vad_stopped_at + wait
    else:
        deadline = state.vad_stopped_at + p.stt_timeout
    if deadline <= now and state.text.strip():
        return _end(state)
    return replace(state, deadline=deadline), [SetTimer(deadline)]


def update(state: TurnState, event: TurnEvent, p: TurnParams) -> tuple[TurnState, list[TurnAction]]:
    """Advance the turn state machine by one event."""
    if isinstance(event, VadStarted):
        # The caller carries on: earlier evidence of an ending is stale.
        actions: list[TurnAction] = [CancelTimer()]
        state = _withdraw(state, actions)
        finalized = state.finalized and not p.segmented_stt
        return replace(
            state, speaking=True, vad_stopped_at=None, deadline=None, finalized=finalized
        ), actions
    if isinstance(event, VadStopped):
        return _decide(replace(state, speaking=False, vad_stopped_at=event.t), event.t, p)
    if isinstance(event, Interim):
        actions = []
        if event.text.strip():
            state = _withdraw(state, actions)  # more words are coming
        return replace(state, finalized=False), actions
    if isinstance(event, Transcript):
        text = (state.text + " " + event.text).strip() if event.text.strip() else state.text
        state = replace(state, text=text, finalized=event.final)
        if state.speaking:
            actions = []
            if state.speculated is not None and not _same_words(state.speculated, text):
                state = _withdraw(state, actions)
            if p.speculate and event.final and state.speculated is None and looks_complete(text):
                # Final and complete while the VAD still counts its silence: start early.
                state = replace(state, speculated=text)
                actions.append(Speculate(text))
            return state, actions
        if state.vad_stopped_at is None:
            # Transcript with no VAD stop (the VAD missed quiet speech): treat it as a pause.
            state = replace(state, vad_stopped_at=event.t)
        return _decide(state, event.t, p)
    # Timer
    if state.speaking or state.deadline is None or event.t < state.deadline:
        return state, []
    if state.text.strip():
        return _end(state)
    # Nothing was transcribed (noise, a cough): no turn to answer.
    return replace(state, deadline=None, vad_stopped_at=None), []


SpeculationOutcome = Literal["started", "confirmed", "wasted"]


class AdaptiveTurnStopStrategy(BaseUserTurnStopStrategy):
    """Pipecat user-turn stop strategy driven by :func:`update`.

    ``on_speculation`` is told each speculation's fate ("started", then "confirmed"
    or "wasted"): the call's composer feeds it to the metrics, so how often
    speculation fires and how much LLM work it throws away is visible per tenant.
    """

    def __init__(
        self,
        params: TurnParams | None = None,
        *,
        on_speculation: Callable[[SpeculationOutcome], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._p = params or TurnParams()
        self._state = TurnState()
        self._timer: asyncio.Task[None] | None = None
        self._on_speculation = on_speculation
        # Speculative inferences started, confirmed by the turn end, and withdrawn
        # (wasted LLM work: prompt tokens and a first token nobody hears).
        self.speculations = 0
        self.speculations_confirmed = 0
        self.speculations_wasted = 0

    def _count(self, outcome: SpeculationOutcome) -> None:
        if outcome == "started":
            self.speculations += 1
        elif outcome == "confirmed":
            self.speculations_confirmed += 1
        else:
            self.speculations_wasted += 1
        if self._on_speculation is not None:
            self._on_speculation(outcome)

    async def handle_user_turn_started(self) -> None:
        # Keep the live VAD flag; only the turn's text and deadlines are per turn.
        await self._cancel_timer()
        await self._drop_speculation()
        self._state = TurnState(speaking=self._state.speaking)

    async def handle_user_turn_stopped(self) -> None:
        await self._cancel_timer()
        await self._drop_speculation()
        self._state = TurnState()

    async def _drop_speculation(self) -> None:
        if self._state.speculated is not None:
            self._state = replace(self._state, speculated=None)
            self._count("wasted")
            await self.trigger_user_turn_speculation_cancelled()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._cancel_timer()

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        now = time.monotonic()
        event: TurnEvent | None = None
        if isinstance(frame, VADUserStartedSpeakingFrame):
            event = VadStarted(now)
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            event = VadStopped(now)
        elif isinstance(frame, TranscriptionFrame):
            # A TranscriptionFrame is an is_final segment: its words will not change.
            # Deepgram often sends it just *before* the VAD stop (its own endpointing),
            # and then answers Pipecat's Finalize with an empty result that makes no
            # frame; so "final and no interim since" is the signal, not `finalized`.
            event = Transcript(now, frame.text, True)
        elif isinstance(frame, InterimTranscriptionFrame):
            event = Interim(now, frame.text)
        if event is not None:
            await self._apply(event)
        return ProcessFrameResult.CONTINUE

    async def _apply(self, event: TurnEvent) -> None:
        self._state, actions = update(self._state, event, self._p)
        for action in actions:
            if isinstance(action, EndTurn):
                await self._cancel_timer()
                if action.confirms:
                    self._count("confirmed")
                    await self.trigger_user_turn_finalized(confirms_speculation=True)
                else:
                    await self.trigger_user_turn_stopped()
            elif isinstance(action, Speculate):
                self._count("started")
                await self.trigger_user_turn_inference_triggered(
                    speculation=UserTurnSpeculation(text=action.text)
                )
            elif isinstance(action, CancelSpeculation):
                self._count("wasted")
                await self.trigger_user_turn_speculation_cancelled()
            elif isinstance(action, SetTimer):
                await self._cancel_timer()
                delay = max(0.0, action.deadline - time.monotonic())
                self._timer = self.task_manager.create_task(
                    self._fire(delay), f"{self}::turn_timer"
                )
            else:
                await self._cancel_timer()

    async def _fire(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._timer = None
        await self._apply(Timer(time.monotonic()))

    async def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer is not asyncio.current_task():
            await self.task_manager.cancel_task(timer)


class CountedEagerUserTurnStopStrategy(EagerUserTurnStopStrategy):
    """Pipecat's eager end of turn (Deepgram Flux), telling ``on_speculation`` each outcome.

    Flux predicts the end of a turn (EagerEndOfTurn) and withdraws it (TurnResumed);
    Pipecat's strategy does the speculating. This only counts, the same way
    :class:`AdaptiveTurnStopStrategy` does, so both STTs report comparable figures.
    """

    def __init__(
        self,
        *,
        on_speculation: Callable[[SpeculationOutcome], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._on_speculation = on_speculation
        self._in_flight = False
        self.speculations = 0
        self.speculations_confirmed = 0
        self.speculations_wasted = 0

    def _count(self, outcome: SpeculationOutcome) -> None:
        if outcome == "started":
            self._in_flight = True
            self.speculations += 1
        else:
            self._in_flight = False
            if outcome == "confirmed":
                self.speculations_confirmed += 1
            else:
                self.speculations_wasted += 1
        if self._on_speculation is not None:
            self._on_speculation(outcome)

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, EagerEndOfTurnCancelFrame) and self._in_flight:
            self._count("wasted")  # TurnResumed: the caller went on
        return await super().process_frame(frame)

    async def trigger_user_turn_inference_triggered(
        self, *, speculation: UserTurnSpeculation | None = None
    ) -> None:
        if speculation is not None:
            self._count("started")
        await super().trigger_user_turn_inference_triggered(speculation=speculation)

    async def trigger_user_turn_finalized(
        self,
        *,
        enable_user_speaking_frames: bool | None = None,
        confirms_speculation: bool = False,
    ) -> None:
        if confirms_speculation and self._in_flight:
            self._count("confirmed")
        await super().trigger_user_turn_finalized(
            enable_user_speaking_frames=enable_user_speaking_frames,
            confirms_speculation=confirms_speculation,
        )

    async def trigger_user_turn_speculation_cancelled(self) -> None:
        if self._in_flight:
            self._count("wasted")
        await super().trigger_user_turn_speculation_cancelled()


def provider_turn_strategies(
    speculate: bool, on_speculation: Callable[[SpeculationOutcome], None] | None = None
) -> UserTurnStrategies:
    """Turns decided by the STT (Deepgram Flux): Pipecat's external/eager strategies.

    The service owns turn detection, so these replace the VAD-driven chain rather than
    run beside it (a local detector would trigger a second inference for the same turn).
    """
    if not speculate:
        return ExternalUserTurnStrategies()
    strategies = EagerUserTurnStrategies()
    strategies.stop = [CountedEagerUserTurnStopStrategy(on_speculation=on_speculation)]
    return strategies
