"""The bench's statistics: percentiles, audio timelines, overhead arithmetic."""

from __future__ import annotations

import math

import pytest

from pipeswitch.bench.stats import (
    UNDERRUN_GAP_S,
    RxFrame,
    TurnTimes,
    analyse_reply,
    cpu_percent,
    first_gap_after,
    per_call,
    percentile,
    premature_reply_at,
    ratio,
    reply_window_frames,
    summarize,
)

# -- percentiles ---------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy_linear() -> None:
    xs = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(xs, 0) == 15.0
    assert percentile(xs, 100) == 50.0
    assert percentile(xs, 50) == 35.0
    assert percentile(xs, 40) == pytest.approx(29.0)  # numpy.percentile(xs, 40)
    assert percentile(xs, 95) == pytest.approx(48.0)


def test_percentile_ignores_order_none_and_nan() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([], 50) is None
    assert percentile([math.nan, 4.0], 50) == 4.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_and_scale() -> None:
    s = summarize([0.1, 0.2, None, 0.3, 0.4])
    assert s.n == 4
    assert s.max == 0.4 and s.min == 0.1
    assert s.mean == pytest.approx(0.25)
    ms = s.scaled(1000.0)
    assert ms.p50 == pytest.approx(250.0)
    assert ms.to_dict()["max"] == 400.0
    empty = summarize([])
    assert empty.n == 0 and empty.p95 is None and empty.scaled(1000).p95 is None


def test_ratio() -> None:
    assert ratio(50.0, 100.0) == 0.5
    assert ratio(None, 1.0) is None
    assert ratio(1.0, 0.0) is None


# -- underruns and jitter from a synthetic receive timeline --------------------------------


def _paced(t0: float, n: int, step: float = 0.020, dur: float = 0.020) -> list[RxFrame]:
    return [RxFrame(t0 + i * step, dur, True) for i in range(n)]


def test_steady_20ms_pacing_has_no_underrun_and_no_jitter() -> None:
    ra = analyse_reply(_paced(10.0, 50))
    assert ra.frames == 50
    assert ra.audio_s == pytest.approx(1.0)
    assert ra.underruns == 0
    assert ra.playout_underruns == 0
    assert max(ra.interarrival_dev_s) == pytest.approx(0.0, abs=1e-9)
    assert ra.first_t == 10.0 and ra.last_t == pytest.approx(10.98)


def test_gap_over_40ms_is_an_underrun() -> None:
    frames = _paced(0.0, 10)
    stall = 0.065  # the sender stalled: next message 65 ms after the previous one
    frames += _paced(frames[-1].t + stall, 10)
    ra = analyse_reply(frames)
    assert ra.underruns == 1
    assert ra.gaps_s == [pytest.approx(stall)]
    # Zero lead: playback ran dry for 65 - 20 = 45 ms.
    assert ra.playout_underruns == 1
    assert ra.playout_dry_s == pytest.approx(0.045)
    assert max(ra.interarrival_dev_s) == pytest.approx(stall - 0.020)


def test_exactly_40ms_is_not_an_underrun() -> None:
    frames = _paced(0.0, 5)
    frames.append(RxFrame(frames[-1].t + UNDERRUN_GAP_S, 0.02, True))
    assert analyse_reply(frames).underruns == 0


def test_a_playout_lead_hides_a_short_wire_gap() -> None:
    # Three messages back to back (the first frame plus a 40 ms lead), then real-time
    # pacing, then a 55 ms gap: the wire shows an underrun, the far end (60 ms queued
    # after each arrival) does not run dry.
    frames = [RxFrame(0.0, 0.02, True), RxFrame(0.001, 0.02, True), RxFrame(0.002, 0.02, True)]
    frames += _paced(0.020, 10)
    frames += _paced(frames[-1].t + 0.055, 5)
    ra = analyse_reply(frames)
    assert ra.underruns == 1
    assert ra.playout_underruns == 0


def test_trailing_silence_after_the_reply_is_not_counted() -> None:
    frames = _paced(0.0, 10)
    window = reply_window_frames(frames + _paced(5.0, 10), 0.0, 2.0)  # next reply excluded
    assert len(window) == 10
    assert analyse_reply(window).underruns == 0


def test_first_and_last_audible() -> None:
    frames = [RxFrame(0.0, 0.02, False), RxFrame(0.02, 0.02, False)]
    frames += _paced(0.04, 5)
    frames.append(RxFrame(0.2, 0.02, False))
    ra = analyse_reply(frames)
    assert ra.first_t == 0.0
    assert ra.first_audible_t == pytest.approx(0.04)
    assert ra.last_audible_t == pytest.approx(0.12)


def test_empty_reply() -> None:
    ra = analyse_reply([])
    assert ra.frames == 0 and ra.first_t is None and ra.underruns == 0


def test_barge_in_stop_is_last_message_before_the_silence() -> None:
    times = [i * 0.02 for i in range(100)]  # bot talks from 0 to 1.98 s
    stopped_at = 1.30
    times = [t for t in times if t <= stopped_at] + [3.0, 3.02]  # next reply later
    assert first_gap_after(times, after=1.0, min_gap_s=0.3) == pytest.approx(stopped_at)


def test_barge_in_stop_when_audio_runs_to_the_end_of_the_window() -> None:
    times = [i * 0.02 for i in range(100)]
    assert first_gap_after(times, after=1.0, min_gap_s=0.3) == pytest.approx(1.98)


def test_barge_in_stop_none_when_nothing_after_the_caller_started() -> None:
    assert first_gap_after([0.0, 0.02, 0.04], after=1.0, min_gap_s=0.3) is None


# -- overhead arithmetic -------------------------------------------------------------------


def _times(**kw: float | None) -> TurnTimes:
    base: dict[str, float | None] = {
        "wire_s": 0.700,
        "stt_ttfs_s": 0.247,
        "vad_stop_s": 0.2,
        "policy_wait_s": 0.0,
        "llm_ttft_s": 0.098,
        "llm_stream_s": 0.010,
        "tts_ttfb_s": 0.250,
        "lead_silence_s": 0.005,
    }
    base.update(kw)
    return TurnTimes(**base)  # type: ignore[arg-type]  # None is what the test is about


def test_overhead_subtracts_the_slower_of_stt_and_vad_once() -> None:
    t = _times()
    assert t.endpointing_floor_s() == pytest.approx(0.247)  # TTFS already contains the VAD
    assert t.external_s() == pytest.approx(0.247 + 0.098 + 0.010 + 0.250 + 0.005)
    assert t.overhead_s() == pytest.approx(0.700 - 0.610)


def test_overhead_uses_the_vad_window_when_stt_is_faster() -> None:
    t = _times(stt_ttfs_s=0.150)
    assert t.endpointing_floor_s() == pytest.approx(0.2)
    assert t.overhead_s() == pytest.approx(0.700 - (0.2 + 0.098 + 0.010 + 0.250 + 0.005))


def test_reference_policy_wait_counts_as_external() -> None:
    # SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.2): the turn cannot end
    # before VAD stop_secs + 0.2 s even when the transcript came earlier.
    t = _times(wire_s=0.900, policy_wait_s=0.2)
    assert t.endpointing_floor_s() == pytest.approx(0.4)
    assert t.overhead_s() == pytest.approx(0.900 - (0.4 + 0.098 + 0.010 + 0.250 + 0.005))


def test_naive_formula_double_counts_the_vad_window() -> None:
    t = _times()
    naive = t.naive_overhead_s()
    over = t.overhead_s()
    assert naive is not None and over is not None
    # literal: wire - ttfs - ttft - stream - stop_secs - tts (no lead silence)
    assert naive == pytest.approx(0.700 - 0.247 - 0.098 - 0.010 - 0.2 - 0.250)
    assert over - naive == pytest.approx(0.2 - 0.005)


def test_overhead_unknown_when_a_part_is_missing() -> None:
    assert _times(stt_ttfs_s=None).overhead_s() is None
    assert _times(llm_ttft_s=None).overhead_s() is None
    assert _times(tts_ttfb_s=None).overhead_s() is None


def test_cpu_and_per_call() -> None:
    assert cpu_percent(10.0, 12.5, 5.0) == pytest.approx(50.0)
    assert cpu_percent(1.0, 1.0, 0.0) is None
    assert per_call(70.0, 10.0, 10) == pytest.approx(6.0)
    assert per_call(None, 10.0, 10) is None
    assert per_call(70.0, 10.0, 0) is None


# -- premature replies: the bot talking before the caller finished ---------------------------


def test_premature_reply_in_the_callers_mid_sentence_pause() -> None:
    # Caller speaks 10.0-12.0 s with a pause around 11 s; the bot answers into the pause.
    frames = _paced(11.05, 10) + _paced(12.5, 5)
    assert premature_reply_at(frames, 10.0, 12.0) == pytest.approx(11.05)


def test_reply_after_the_last_word_is_not_premature() -> None:
    frames = _paced(12.4, 20)
    assert premature_reply_at(frames, 10.0, 12.0) is None
    # Audio arriving exactly with the last voiced frame is not "while talking" either.
    assert premature_reply_at([RxFrame(12.0, 0.02, True)], 10.0, 12.0) is None


def test_silent_bot_messages_while_the_caller_talks_are_not_a_reply() -> None:
    # Comfort noise / a playout lead of silence is not the bot speaking.
    frames = [RxFrame(10.5 + 0.02 * i, 0.02, False) for i in range(20)]
    assert premature_reply_at(frames, 10.0, 12.0) is None
    assert premature_reply_at([*frames, RxFrame(11.9, 0.02, True)], 10.0, 12.0) == 11.9


def test_machine_speed_is_the_best_of_its_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeswitch.bench import servers

    ticks = iter([0.0, 0.5, 1.0, 1.2, 2.0, 2.9])  # 0.5, 0.2, 0.9 s
    monkeypatch.setattr(servers, "SPEED_LOOP", 10)
    assert servers.machine_speed_s(3, clock=lambda: next(ticks)) == 0.2
