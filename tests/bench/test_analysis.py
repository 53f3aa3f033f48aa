"""Lining up the caller's, the server's and the emulators' records of one turn."""

from __future__ import annotations

from typing import Any

import pytest

from pipeswitch.bench.analysis import build_turn_records, summarize_turns
from pipeswitch.bench.loadgen import CallResult, LoadResult, TurnResult
from pipeswitch.bench.profile import parse_collapsed
from pipeswitch.bench.scenario import (
    first_sentence,
    question_number,
    reply_unique,
    unique_first_sentence,
)
from pipeswitch.bench.servers import ServerInfo

OFFSET = 1_000_000.0  # unix - monotonic in the fake server process


def _server(policy: float = 0.0) -> ServerInfo:
    return ServerInfo("pipeswitch", 1, 2, 3, "http://x", 0.2, policy)


def _load() -> LoadResult:
    turn = TurnResult(
        call="c1",
        index=0,
        kind="turn",
        speech_start=98.5,
        t_end=100.0,
        first_rx=100.70,
        first_audible=100.72,
        wire_s=0.72,
        lead_silence_s=0.02,
    )
    call = CallResult(uuid="c1", connected=True, turns=[turn])
    return LoadResult(calls=[call], probes=[], loop_lag_ms={}, cpu_pct=1.0, wall_s=10.0)


def _server_calls() -> dict[str, Any]:
    contributions = [
        ("endpointing_wait", 0.20),
        ("transcription", 0.05),
        ("llm_inference", 0.15),
        ("speech_synthesis", 0.25),
        ("pipeline", 0.01),
    ]
    breakdown = {
        "measured_from": "user_silence",
        "user_turn_start_time": OFFSET + 100.05,
        "total_secs": 0.66,
        "ttfb": [
            {"processor": "DeepgramSTTService#0", "duration_secs": 0.25, "start_time": 0},
            {"processor": "GroqLLMService#0", "duration_secs": 0.12, "start_time": 0},
            {"processor": "PiperHttpTTSService#0", "duration_secs": 0.24, "start_time": 0},
        ],
        "contributions": [{"key": k, "duration_secs": v} for k, v in contributions],
    }
    greeting = {"measured_from": "client_connected", "user_turn_start_time": None}
    return {
        "clock": {"unix": OFFSET + 200.0, "monotonic": 200.0},
        "calls": [
            {"call_uuid": "c1", "breakdowns": [greeting, breakdown], "user_texts": ["Question 7 x"]}
        ],
    }


STREAMS = [
    {
        "id": 5,
        "utterances": [
            {
                "text": "Question 7 x",
                "speech_end_at": 100.01,
                "ttfs_s": 0.25,
                "final_sent_at": 100.26,
                "discarded": False,
            }
        ],
    }
]
REQUESTS = [
    {
        "body": {"messages": [{"role": "user", "content": "Question 6 y"}]},
        "ttft_s": 0.9,
        "reply_text": "Wrong.",
    },
    {
        "body": {"messages": [{"role": "user", "content": "Question 7 x"}]},
        "ttft_s": 0.10,
        "reply_text": "Sure, alpha hotel. We are open.",
    },
]


def test_turn_record_joins_wire_server_and_emulators() -> None:
    (rec,) = build_turn_records(
        _server(), _load(), _server_calls(), STREAMS, REQUESTS, tokens_per_s=500.0
    )
    assert rec.matched == {"stt": True, "llm": True, "breakdown": True}
    assert rec.stt_ttfs_ms == pytest.approx(250.0)
    assert rec.llm_ttft_ms == pytest.approx(100.0)  # the request carrying this transcript
    assert rec.llm_stream_ms == pytest.approx(10.0)  # 3 tokens at 500/s, 10 ms writes
    assert rec.tts_ttfb_ms == pytest.approx(240.0)  # Piper's, not Deepgram's "STTService"
    assert rec.lead_silence_ms == pytest.approx(20.0)
    assert rec.endpointing_floor_ms == pytest.approx(250.0)
    assert rec.overhead_ms == pytest.approx(720.0 - (250 + 100 + 10 + 240 + 20))
    assert rec.stt_final_after_end_ms == pytest.approx(260.0)
    # Wire-anchored stages add up to the wire latency.
    assert rec.stages_ms["vad_lag"] == pytest.approx(50.0)
    assert rec.stages_ms["wire_out"] == pytest.approx(10.0)
    assert sum(rec.stages_ms.values()) == pytest.approx(720.0)


def test_reference_policy_wait_moves_the_floor() -> None:
    (rec,) = build_turn_records(
        _server(policy=0.2), _load(), _server_calls(), STREAMS, REQUESTS, tokens_per_s=500.0
    )
    assert rec.endpointing_floor_ms == pytest.approx(400.0)
    assert rec.overhead_ms == pytest.approx(720.0 - (400 + 100 + 10 + 240 + 20))


def test_unmatched_parts_leave_overhead_unknown() -> None:
    (rec,) = build_turn_records(
        _server(), _load(), _server_calls(), STREAMS, [], tokens_per_s=500.0
    )
    assert rec.matched["llm"] is False
    assert rec.overhead_ms is None
    assert rec.wire_ms == pytest.approx(720.0)


def test_summary_counts_lost_turns_apart() -> None:
    load = _load()
    load.calls[0].turns.append(TurnResult(call="c1", index=1, kind="turn", t_end=110.0, lost=True))
    recs = build_turn_records(
        _server(), load, _server_calls(), STREAMS, REQUESTS, tokens_per_s=500.0
    )
    s = summarize_turns(recs)
    assert s["turns"] == 2 and s["lost"] == 1
    assert s["wire_ms"]["n"] == 1
    assert s["overhead_ms"]["p50"] == pytest.approx(100.0)


def test_scenario_scripts_are_unique_and_parseable() -> None:
    assert question_number("Question 12 about the opening hours? question 13 too") == 13
    assert question_number("hello") is None
    firsts = {unique_first_sentence(n) for n in range(400)}
    assert len(firsts) == 400  # longer than Piper's 64-entry LRU cycle
    reply = reply_unique([{"role": "user", "content": "Question 21 about the opening hours?"}])
    assert first_sentence(reply) == unique_first_sentence(21)


def test_parse_collapsed_stacks() -> None:
    lines = [
        "thread (0x1 MainThread);run (asyncio/base_events.py:600);get (asyncio/queues.py:158) 30",
        "thread (0x1 MainThread);run (asyncio/base_events.py:600);push_frame "
        "(pipecat/processors/frame_processor.py:700) 50",
        "thread (0x2 ThreadPoolExecutor-0_0);run (onnxruntime/session.py:200) 20",
    ]
    s = parse_collapsed(lines, top=5)
    assert s.samples == 100
    assert s.main_thread == 80
    cats = dict(s.categories)
    assert cats["asyncio.Queue get/put"] == 30
    assert cats["FrameProcessor machinery (queues, push, process tasks)"] == 50
    assert cats["Silero ONNX inference"] == 20
    assert s.self_top[0] == ("push_frame (processors/frame_processor.py)", 50)


def _doc(p95: float | None, n: int = 6, turns: int = 6, lost: int = 0) -> dict[str, Any]:
    summary = {"overhead_ms": {"p95": p95, "n": n}, "turns": turns, "lost": lost}
    return {"servers": {"pipeswitch": {"summary": summary}}}


def test_gate_judges_overhead_not_absolute_latency() -> None:
    from pipeswitch.bench.latency import gate

    assert gate(_doc(83.0), 150.0) == 0
    assert gate(_doc(151.0), 150.0) == 1
    assert gate(_doc(83.0, lost=1, n=5), 150.0) == 1  # an unanswered turn fails the gate
    assert gate(_doc(None, n=0), 150.0) == 2  # nothing measured: the bench is broken
    assert gate(_doc(500.0), None) == 0  # no budget: report only


def _step(
    n: int, p95: float | None, srv: int = 0, other: int = 0, msgs: int = 10000, lost: int = 0
) -> dict[str, Any]:
    return {
        "n": n,
        "summary": {
            "overhead_ms": {"p95": p95},
            "underruns": srv + other,
            "underrun_causes": {"server": srv, "loadgen": other, "both": 0, "unexplained": 0},
            "bot_messages": msgs,
            "lost": lost,
        },
        "connections": {"failed": 0, "loadgen": {"loop_lag_ms": {"p99": 3.0}}},
    }


def test_capacity_verdicts() -> None:
    from pipeswitch.bench.capacity import (
        evaluate,
        evaluate_near_clean,
        loadgen_suspect,
        relative_ceiling,
    )

    assert evaluate(_step(5, 100.0), 150.0) == []
    assert evaluate(_step(5, 100.0, other=1), 150.0) == ["1 underruns"]
    assert evaluate(_step(5, 200.0), 150.0) == ["overhead p95 200 ms"]
    # Near-clean ignores gaps the server's loop did not cause, and tolerates 2 per 1000.
    assert evaluate_near_clean(_step(5, 100.0, srv=20, other=50), 150.0)
    assert not evaluate_near_clean(_step(5, 100.0, srv=21), 150.0)
    assert not evaluate_near_clean(_step(5, 100.0, lost=1), 150.0)
    # Relative: within +50 ms of the first step's p95, whatever the absolute value.
    steps = [_step(1, 180.0), _step(5, 220.0), _step(10, 240.0), _step(20, 600.0)]
    assert relative_ceiling(steps) == 5
    assert relative_ceiling([_step(1, None)]) is None
    lagging = _step(5, 100.0)
    lagging["connections"]["loadgen"]["loop_lag_ms"]["p99"] = 25.0
    assert loadgen_suspect(lagging) and not loadgen_suspect(_step(5, 100.0))


class _Rx:
    """What _analyse_call reads from a BenchStream: the bot audio it received."""

    def __init__(self, frames: list[Any]) -> None:
        self._frames = frames

    def rx_frames(self) -> list[Any]:
        return self._frames


def test_a_reply_that_starts_before_the_caller_finished_is_counted() -> None:
    from pipeswitch.bench.loadgen import _analyse_call, _Utterance
    from pipeswitch.bench.stats import RxFrame

    def spurt(t0: float, n: int) -> list[RxFrame]:
        return [RxFrame(t0 + 0.02 * i, 0.02, True) for i in range(n)]

    # Turn 0 is answered in the caller's mid-sentence pause (11.0 s, words end at 12.0);
    # turn 1 properly after its end; the barge-in talks over turn 1's reply on purpose.
    frames = spurt(11.0, 10) + spurt(12.6, 50) + spurt(20.5, 100) + spurt(24.0, 20)
    t0 = TurnResult(call="c1", index=0, kind="turn", speech_start=10.0, t_end=12.0)
    t1 = TurnResult(call="c1", index=1, kind="turn", speech_start=18.0, t_end=20.0)
    t1.barge_start = 21.0
    b = TurnResult(call="c1", index=1, kind="barge_in", speech_start=21.0, t_end=23.0)
    res = CallResult(uuid="c1", connected=True, hangup_at=30.0)
    _analyse_call(
        res,
        _Rx(frames),  # type: ignore[arg-type]
        [(t0, _Utterance(10.0, 12.0)), (t1, _Utterance(18.0, 20.0)), (b, _Utterance(21.0, 23.0))],
        None,
    )
    assert t0.premature_s == pytest.approx(1.0)
    assert t1.premature_s is None and b.premature_s is None
    recs = build_turn_records(
        _server(),
        LoadResult(calls=[res], probes=[], loop_lag_ms={}, cpu_pct=1.0, wall_s=1.0),
        _server_calls(),
        STREAMS,
        REQUESTS,
        tokens_per_s=500.0,
    )
    s = summarize_turns(recs)
    assert s["turns"] == 2 and s["premature"] == 1


def test_a_premature_reply_fails_a_capacity_step() -> None:
    from pipeswitch.bench.capacity import evaluate, evaluate_near_clean

    step = _step(5, 100.0)
    step["summary"]["premature"] = 2
    assert evaluate(step, 150.0) == ["2 premature replies"]
    assert not evaluate_near_clean(step, 150.0)
