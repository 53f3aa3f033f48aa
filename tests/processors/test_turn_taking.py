"""The turn-taking core as a pure function: scripted timelines, no clocks."""

from __future__ import annotations

from pipeswitch.processors.turn_taking import (
    CancelSpeculation,
    CancelTimer,
    EndTurn,
    Interim,
    SetTimer,
    Speculate,
    Timer,
    Transcript,
    TurnAction,
    TurnEvent,
    TurnParams,
    TurnState,
    VadStarted,
    VadStopped,
    looks_complete,
    update,
)

P = TurnParams(complete_wait=0.0, incomplete_wait=0.6, stt_timeout=0.8)


def run(events: list[TurnEvent], p: TurnParams = P) -> list[tuple[float, TurnAction]]:
    """Feed events (Timer events are generated from SetTimer actions in time order)."""
    state = TurnState()
    out: list[tuple[float, TurnAction]] = []
    timer: float | None = None
    queue = sorted(events, key=lambda e: e.t)
    while queue or timer is not None:
        if timer is not None and (not queue or timer <= queue[0].t):
            ev: TurnEvent = Timer(timer)
            timer = None
        else:
            ev = queue.pop(0)
        state, actions = update(state, ev, p)
        for a in actions:
            out.append((ev.t, a))
            if isinstance(a, SetTimer):
                timer = a.deadline
            elif isinstance(a, (CancelTimer, EndTurn)):
                timer = None
    return out


def end_times(actions: list[tuple[float, TurnAction]]) -> list[float]:
    return [t for t, a in actions if isinstance(a, EndTurn)]


def test_complete_question_ends_when_final_transcript_arrives() -> None:
    acts = run([VadStarted(0.0), VadStopped(1.2), Transcript(1.25, "What are your hours?", True)])
    assert end_times(acts) == [1.25]


def test_final_before_vad_stop_ends_at_vad_stop() -> None:
    acts = run([VadStarted(0.0), Transcript(1.1, "Yes.", True), VadStopped(1.2)])
    assert end_times(acts) == [1.2]


def test_trailing_connective_waits_for_more_speech() -> None:
    acts = run([VadStarted(0.0), VadStopped(1.0), Transcript(1.05, "I'd like to book and", True)])
    assert end_times(acts) == [1.6]


def test_resumed_speech_cancels_the_pending_end() -> None:
    acts = run(
        [
            VadStarted(0.0),
            VadStopped(1.0),
            Transcript(1.05, "I'd like to book, um", True),
            VadStarted(1.3),  # inside the 0.6 s window
            Interim(1.5),
            VadStopped(2.0),
            Transcript(2.05, "a cleaning for Tuesday.", True),
        ]
    )
    assert end_times(acts) == [2.05]


def test_segmented_stt_waits_for_the_next_segments_transcript() -> None:
    """Local Whisper: "Hello." (a pause), then the question. Its transcript comes 0.7 s
    after the second VAD stop; the turn must not end at 0.6 s on "Hello." alone."""
    events: list[TurnEvent] = [
        VadStarted(0.0),
        VadStopped(0.6),
        Transcript(0.7, "Hello.", True),
        VadStarted(0.9),
        VadStopped(2.8),
        Transcript(3.5, "What time do you open tomorrow?", True),
    ]
    segmented = TurnParams(
        complete_wait=0.0, incomplete_wait=0.6, stt_timeout=0.8, segmented_stt=True
    )
    assert end_times(run(events, segmented)) == [3.5]
    # A streaming STT's final stays settled over a VAD restart (its interims say otherwise).
    assert end_times(run(events))[0] == 3.4


def test_missing_final_transcript_falls_back_to_stt_timeout() -> None:
    acts = run([VadStarted(0.0), Transcript(0.5, "hello there", False), VadStopped(1.0)])
    assert end_times(acts) == [1.8]


def test_noise_without_any_transcript_is_not_a_turn() -> None:
    acts = run([VadStarted(0.0), VadStopped(0.4)])
    assert end_times(acts) == []


def test_transcript_without_vad_is_treated_as_a_pause() -> None:
    acts = run([Transcript(2.0, "That works for me.", True)])
    assert end_times(acts) == [2.0]


def test_looks_complete() -> None:
    assert looks_complete("What time do you open?")
    assert looks_complete("Thanks.")
    assert not looks_complete("I want to")
    assert not looks_complete("So I was thinking and.")
    assert not looks_complete("")
    assert not looks_complete("Hello.")  # an opener: the question usually follows
    assert not looks_complete("Hi there!")
    assert looks_complete("Yes.")


def kinds(actions: list[tuple[float, TurnAction]]) -> list[tuple[float, str]]:
    return [(t, type(a).__name__) for t, a in actions if not isinstance(a, (SetTimer, CancelTimer))]


def test_complete_final_before_vad_stop_speculates_and_the_turn_end_confirms() -> None:
    acts = run([VadStarted(0.0), Transcript(1.05, "What are your hours?", True), VadStopped(1.2)])
    assert kinds(acts) == [(1.05, "Speculate"), (1.2, "EndTurn")]
    spec = next(a for _, a in acts if isinstance(a, Speculate))
    end = next(a for _, a in acts if isinstance(a, EndTurn))
    assert spec.text == "What are your hours?" and end.confirms
    # The turn still ends exactly when it did without speculation.
    assert end_times(acts) == [1.2]


def test_more_words_withdraw_the_speculation() -> None:
    acts = run(
        [
            VadStarted(0.0),
            Transcript(1.05, "Can you help me?", True),
            Interim(1.15, "I need"),
            Transcript(1.6, "I need a new appointment.", True),
            VadStopped(1.8),
        ]
    )
    assert kinds(acts) == [
        (1.05, "Speculate"),
        (1.15, "CancelSpeculation"),
        (1.6, "Speculate"),
        (1.8, "EndTurn"),
    ]
    end = next(a for _, a in acts if isinstance(a, EndTurn))
    assert end.confirms


def test_caller_speaking_again_after_a_pause_withdraws_it() -> None:
    acts = run(
        [
            VadStarted(0.0),
            Transcript(1.05, "Hi, is this the clinic?", True),
            VadStopped(1.1),
            VadStarted(1.12),
        ]
    )
    # VAD stop with a complete final ends the turn at once: the speculation is confirmed.
    assert kinds(acts)[:2] == [(1.05, "Speculate"), (1.1, "EndTurn")]


def test_incomplete_or_interim_text_does_not_speculate() -> None:
    acts = run(
        [
            VadStarted(0.0),
            Interim(0.8, "I would like to"),
            Transcript(1.0, "I would like to book and", True),
            VadStopped(1.2),
            Transcript(1.9, "tomorrow.", True),
        ]
    )
    assert not [a for _, a in acts if isinstance(a, (Speculate, CancelSpeculation))]


def test_speculation_can_be_turned_off() -> None:
    off = TurnParams(speculate=False)
    state, actions = update(TurnState(speaking=True), Transcript(1.0, "Are you open?", True), off)
    assert actions == [] and state.speculated is None


def test_words_after_the_vad_stop_cancel_then_end() -> None:
    state = TurnState(speaking=True)
    state, a1 = update(state, Transcript(1.0, "Are you open?", True), P)
    assert a1 == [Speculate("Are you open?")]
    state, _ = update(state, Interim(1.1, ""), P)  # the STT is still working on the tail
    state, a2 = update(state, VadStopped(1.2), P)
    assert not [a for a in a2 if isinstance(a, EndTurn)]  # waits for the final transcript
    state, a3 = update(state, Transcript(1.3, "On Sunday?", True), P)
    assert a3 == [CancelSpeculation(), EndTurn()]
    assert state.speculated is None


async def test_strategy_counts_each_speculation_outcome() -> None:
    """The Pipecat strategy reports started/confirmed/wasted (fed to the metrics)."""
    from pipecat.frames.frames import (
        InterimTranscriptionFrame,
        TranscriptionFrame,
        VADUserStartedSpeakingFrame,
        VADUserStoppedSpeakingFrame,
    )

    from pipeswitch.processors.turn_taking import AdaptiveTurnStopStrategy

    seen: list[str] = []
    strategy = AdaptiveTurnStopStrategy(P, on_speculation=seen.append)
    ended: list[str] = []

    @strategy.event_handler("on_user_turn_stopped")
    async def _stopped(*_: object) -> None:
        ended.append("stopped")

    # Turn 1: complete final while the VAD counts its silence, then the VAD stop confirms.
    await strategy.process_frame(VADUserStartedSpeakingFrame())
    await strategy.process_frame(TranscriptionFrame("What are your hours?", "u", "t"))
    await strategy.process_frame(VADUserStoppedSpeakingFrame())
    await strategy.handle_user_turn_stopped()
    # Turn 2: the caller goes on ("... and on Sunday"): the speculation is withdrawn.
    await strategy.handle_user_turn_started()
    await strategy.process_frame(VADUserStartedSpeakingFrame())
    await strategy.process_frame(TranscriptionFrame("Are you open tomorrow?", "u", "t"))
    await strategy.process_frame(InterimTranscriptionFrame("and on", "u", "t"))

    assert seen == ["started", "confirmed", "started", "wasted"]
    assert (strategy.speculations, strategy.speculations_confirmed) == (2, 1)
    assert strategy.speculations_wasted == 1
    assert ended == ["stopped"]  # turn 1 ended (confirmed); turn 2 is still open
