"""Line the caller's, the server's and the emulators' records of each turn up.

Three independent views of one turn, all on ``time.monotonic()``:

* the load generator (wire): last voiced caller frame sent, first audible bot
  frame received;
* the server's ``UserBotLatencyObserver`` breakdown (unix times, converted with
  the clock pair the probe reports): VAD stop, transcript, LLM, TTS, bot speaking;
* the emulators: the TTFS injected for the utterance (Deepgram) and the TTFT
  injected for the request (chat).

Utterances carry unique transcripts (``Question <n> …``, :mod:`bench.scenario`),
so the LLM request of a turn is found by text; the Deepgram stream of a call by
the call's transcripts (falling back to timing); the breakdown by time within
the call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeswitch.bench.emulators.openai_chat import last_user_text, tokenize
from pipeswitch.bench.loadgen import CallResult, LoadResult, TurnResult
from pipeswitch.bench.scenario import first_sentence
from pipeswitch.bench.servers import ServerInfo
from pipeswitch.bench.stats import Summary, TurnTimes, gap_cause, summarize

# Wire-anchored stages of a turn, in order (keys of TurnRecord.stages_ms).
STAGES: tuple[tuple[str, str], ...] = (
    ("vad_lag", "speech end -> VAD (input + Silero tail)"),
    ("endpointing_wait", "VAD stop_secs"),
    ("transcription", "VAD stop -> transcript"),
    ("turn_detection", "turn detection"),
    ("llm_inference", "LLM (TTFT)"),
    ("sentence_aggregation", "sentence aggregation"),
    ("speech_synthesis", "TTS (Piper TTFB)"),
    ("output_transport", "output transport"),
    ("pipeline", "other pipeline hops"),
    ("wire_out", "bot speaking -> first audible on the wire"),
)
_STAGE_KEYS = {k for k, _ in STAGES}
EMULATOR_WRITE_INTERVAL_S = 0.01  # OpenAIChatEmulator.min_write_interval_s


@dataclass
class TurnRecord:
    """Everything known about one turn (milliseconds unless named otherwise)."""

    server: str
    call: str
    index: int
    kind: str
    t_end: float | None
    lost: bool
    # Bot speech arrived this long after the caller's first word, before their last one.
    premature_ms: float | None = None
    wire_ms: float | None = None
    overhead_ms: float | None = None
    naive_overhead_ms: float | None = None
    external_ms: float | None = None
    stt_ttfs_ms: float | None = None
    endpointing_floor_ms: float | None = None
    stt_final_after_end_ms: float | None = None
    llm_ttft_ms: float | None = None
    llm_stream_ms: float | None = None
    tts_ttfb_ms: float | None = None
    lead_silence_ms: float | None = None
    observer_ms: float | None = None  # UserBotLatencyObserver's own total
    stages_ms: dict[str, float] = field(default_factory=dict)
    underruns: int = 0
    rx_frames: int = 0
    gaps_ms: list[float] = field(default_factory=list)
    gap_causes: list[str] = field(default_factory=list)
    playout_underruns: int = 0
    interarrival_p99_ms: float | None = None
    barge_stop_ms: float | None = None
    barge_note: str = ""
    matched: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, rounded to 0.1 ms."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 1)
        d["stages_ms"] = {k: round(v, 1) for k, v in self.stages_ms.items()}
        d["gaps_ms"] = [round(g, 1) for g in self.gaps_ms]
        return d


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000.0


def _offset(clock: dict[str, Any]) -> float:
    """unix - monotonic of the process that reported ``clock``."""
    return float(clock["unix"]) - float(clock["monotonic"])


@dataclass
class _Breakdown:
    anchor: float  # monotonic: VAD stop - stop_secs (the observer's "user stopped")
    bot_started: float  # monotonic
    total_s: float
    contributions: list[dict[str, Any]]
    ttfb: list[dict[str, Any]]


def _breakdowns(call: dict[str, Any], offset: float) -> list[_Breakdown]:
    out: list[_Breakdown] = []
    for b in call.get("breakdowns", []):
        if b.get("measured_from") != "user_silence" or b.get("user_turn_start_time") is None:
            continue
        anchor = float(b["user_turn_start_time"]) - offset
        total = float(b.get("total_secs") or 0.0)
        out.append(
            _Breakdown(anchor, anchor + total, total, b.get("contributions", []), b.get("ttfb", []))
        )
    return out


def _match_breakdown(turn: TurnResult, cands: list[_Breakdown]) -> _Breakdown | None:
    if turn.t_end is None or turn.first_rx is None:
        return None
    lo, hi = turn.t_end - 0.05, turn.first_rx + 0.3
    best: _Breakdown | None = None
    for b in cands:
        if lo <= b.bot_started <= hi and (
            best is None
            or abs(b.bot_started - turn.first_rx) < abs(best.bot_started - turn.first_rx)
        ):
            best = b
    return best


def _stream_owner(
    streams: Sequence[dict[str, Any]], server_calls: dict[str, dict[str, Any]]
) -> dict[int, str]:
    """Deepgram stream id -> call uuid, by the transcripts the call's LLM context holds."""
    owner: dict[int, str] = {}
    for st in streams:
        texts = [u["text"] for u in st.get("utterances", []) if not u.get("discarded")]
        if not texts:
            continue
        for uuid, call in server_calls.items():
            joined = " ".join(call.get("user_texts", []))
            if any(t and t in joined for t in texts):
                owner[int(st["id"])] = uuid
                break
    return owner


def _match_utterance(t_end: float, utts: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    best: dict[str, Any] | None = None
    for u in utts:
        if u.get("discarded"):
            continue
        d = float(u["speech_end_at"]) - t_end
        if -0.3 <= d <= 0.5 and (
            best is None or abs(d) < abs(float(best["speech_end_at"]) - t_end)
        ):
            best = u
    return best


def _llm_for(text: str, requests: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    for r in requests:
        if text and text in last_user_text(r.get("body", {}).get("messages", [])):
            return r
    return None


def _first_sentence_stream_s(reply: str, tokens_per_s: float) -> float:
    n = len(tokenize(first_sentence(reply)))
    if n <= 1 or tokens_per_s <= 0:
        return 0.0
    # The emulator writes due tokens at most every 10 ms after the first one.
    return math.ceil((n / tokens_per_s) / EMULATOR_WRITE_INTERVAL_S) * EMULATOR_WRITE_INTERVAL_S


def _tts_ttfb(b: _Breakdown) -> float | None:
    for t in b.ttfb:
        name = str(t.get("processor", ""))
        if "TTSService" in name and "STTService" not in name:
            return float(t["duration_secs"])
    for c in b.contributions:
        if c.get("key") == "speech_synthesis":
            return float(c["duration_secs"])
    return None


def _stages(turn: TurnResult, b: _Breakdown) -> dict[str, float]:
    assert turn.t_end is not None and turn.first_audible is not None
    st: dict[str, float] = {"vad_lag": (b.anchor - turn.t_end) * 1000.0}
    for c in b.contributions:
        key = str(c.get("key"))
        key = key if key in _STAGE_KEYS else "pipeline"
        st[key] = st.get(key, 0.0) + float(c["duration_secs"]) * 1000.0
    st["wire_out"] = (turn.first_audible - b.bot_started) * 1000.0
    return st


def build_turn_records(
    server: ServerInfo,
    load: LoadResult,
    server_calls: dict[str, Any],
    stt_streams: Sequence[dict[str, Any]],
    llm_requests: Sequence[dict[str, Any]],
    *,
    tokens_per_s: float,
    label: str | None = None,
    server_spikes: Sequence[Sequence[float]] | None = None,
) -> list[TurnRecord]:
    """One :class:`TurnRecord` per caller utterance of ``load``."""
    offset = _offset(server_calls["clock"])
    server_stalls = [(float(t), float(lag)) for t, lag in (server_spikes or [])]
    by_uuid = {c["call_uuid"]: c for c in server_calls.get("calls", [])}
    owner = _stream_owner(stt_streams, by_uuid)
    utts_by_call: dict[str, list[dict[str, Any]]] = {}
    all_utts: list[dict[str, Any]] = []
    for st in stt_streams:
        us = st.get("utterances", [])
        all_utts.extend(us)
        if int(st["id"]) in owner:
            utts_by_call.setdefault(owner[int(st["id"])], []).extend(us)
    out: list[TurnRecord] = []
    for call in load.calls:
        bds = _breakdowns(by_uuid.get(call.uuid, {}), offset)
        for turn in call.turns:
            out.append(
                _turn_record(
                    label or server.kind,
                    server,
                    call,
                    turn,
                    bds,
                    utts_by_call.get(call.uuid) or all_utts,
                    llm_requests,
                    tokens_per_s,
                )
            )
            rec = out[-1]
            if turn.first_rx is not None:
                for gap, at in zip(turn.gaps_ms, turn.gap_offsets_ms, strict=False):
                    start = turn.first_rx + at / 1000.0
                    rec.gap_causes.append(
                        gap_cause(start, start + gap / 1000.0, server_stalls, load.lag_spikes)
                    )
    return out


def _turn_record(
    label: str,
    server: ServerInfo,
    call: CallResult,
    turn: TurnResult,
    bds: list[_Breakdown],
    utts: list[dict[str, Any]],
    requests: Sequence[dict[str, Any]],
    tokens_per_s: float,
) -> TurnRecord:
    rec = TurnRecord(
        server=label,
        call=call.uuid,
        index=turn.index,
        kind=turn.kind,
        t_end=turn.t_end,
        lost=turn.lost,
        premature_ms=_ms(turn.premature_s),
        wire_ms=_ms(turn.wire_s),
        lead_silence_ms=_ms(turn.lead_silence_s),
        underruns=turn.underruns,
        rx_frames=turn.rx_frames,
        gaps_ms=list(turn.gaps_ms),
        playout_underruns=turn.playout_underruns,
        interarrival_p99_ms=turn.interarrival_p99_ms,
        barge_stop_ms=_ms(turn.barge_stop_s),
        barge_note=turn.barge_note,
    )
    if turn.t_end is None or turn.wire_s is None:
        return rec
    utt = _match_utterance(turn.t_end, utts)
    llm = _llm_for(str(utt["text"]), requests) if utt is not None else None
    bd = _match_breakdown(turn, bds)
    rec.matched = {"stt": utt is not None, "llm": llm is not None, "breakdown": bd is not None}
    ttfs = float(utt["ttfs_s"]) if utt is not None else None
    if utt is not None and utt.get("final_sent_at") is not None:
        rec.stt_final_after_end_ms = (float(utt["final_sent_at"]) - turn.t_end) * 1000.0
    ttft = float(llm["ttft_s"]) if llm is not None else None
    stream_s = (
        _first_sentence_stream_s(str(llm.get("reply_text", "")), tokens_per_s)
        if llm is not None
        else 0.0
    )
    tts = _tts_ttfb(bd) if bd is not None else None
    times = TurnTimes(
        wire_s=turn.wire_s,
        stt_ttfs_s=ttfs,
        vad_stop_s=server.vad_stop_secs,
        policy_wait_s=server.policy_wait_secs,
        llm_ttft_s=ttft,
        llm_stream_s=stream_s,
        tts_ttfb_s=tts,
        lead_silence_s=turn.lead_silence_s or 0.0,
    )
    rec.stt_ttfs_ms = _ms(ttfs)
    rec.endpointing_floor_ms = _ms(times.endpointing_floor_s())
    rec.llm_ttft_ms = _ms(ttft)
    rec.llm_stream_ms = _ms(stream_s)
    rec.tts_ttfb_ms = _ms(tts)
    rec.external_ms = _ms(times.external_s())
    rec.overhead_ms = _ms(times.overhead_s())
    rec.naive_overhead_ms = _ms(times.naive_overhead_s())
    if bd is not None and turn.first_audible is not None:
        rec.observer_ms = bd.total_s * 1000.0
        rec.stages_ms = _stages(turn, bd)
    return rec


# -- summaries ------------------------------------------------------------------------------


def summary_ms(values: Iterable[float | None]) -> dict[str, Any]:
    """p50/p95/p99/max/mean of ms values."""
    return summarize(values).to_dict(1)


def summarize_turns(records: Sequence[TurnRecord]) -> dict[str, Any]:
    """Latency summary of normal turns (barge-in replies reported apart)."""
    normal = [r for r in records if r.kind == "turn"]
    barge = [r for r in records if r.kind == "barge_in"]
    ok = [r for r in normal if not r.lost]
    stage_means: dict[str, float] = {}
    with_stages = [r for r in ok if r.stages_ms]
    for key, _ in STAGES:
        vals = [r.stages_ms.get(key, 0.0) for r in with_stages]
        if vals:
            stage_means[key] = round(sum(vals) / len(vals), 1)
    matched = {k: sum(1 for r in ok if r.matched.get(k)) for k in ("stt", "llm", "breakdown")}
    return {
        "turns": len(normal),
        "lost": sum(1 for r in normal if r.lost),
        # Replies that started before the caller finished (a turn-taking regression).
        "premature": sum(1 for r in normal if r.premature_ms is not None),
        "matched": matched,
        "wire_ms": summary_ms(r.wire_ms for r in ok),
        "overhead_ms": summary_ms(r.overhead_ms for r in ok),
        "naive_overhead_ms": summary_ms(r.naive_overhead_ms for r in ok),
        "external_ms": summary_ms(r.external_ms for r in ok),
        "stt_ttfs_ms": summary_ms(r.stt_ttfs_ms for r in ok),
        "endpointing_floor_ms": summary_ms(r.endpointing_floor_ms for r in ok),
        "llm_ttft_ms": summary_ms(r.llm_ttft_ms for r in ok),
        "tts_ttfb_ms": summary_ms(r.tts_ttfb_ms for r in ok),
        "lead_silence_ms": summary_ms(r.lead_silence_ms for r in ok),
        "observer_ms": summary_ms(r.observer_ms for r in ok),
        "stage_means_ms": stage_means,
        "barge_in": {
            "n": sum(1 for r in normal if r.barge_stop_ms is not None),
            "stop_ms": summary_ms(r.barge_stop_ms for r in normal),
            "not_stopped": sum(1 for r in normal if "did not stop" in r.barge_note),
            "reply_wire_ms": summary_ms(r.wire_ms for r in barge if not r.lost),
            "reply_lost": sum(1 for r in barge if r.lost),
        },
        "underruns": sum(r.underruns for r in records),
        "underrun_causes": {
            cause: sum(r.gap_causes.count(cause) for r in records)
            for cause in ("server", "loadgen", "both", "unexplained")
        },
        "playout_underruns": sum(r.playout_underruns for r in records),
        "bot_messages": sum(r.rx_frames for r in records),
        "underruns_per_1000": (
            round(1000.0 * sum(r.underruns for r in records) / n_msgs, 2)
            if (n_msgs := sum(r.rx_frames for r in records))
            else None
        ),
        "max_gap_ms": max((g for r in records for g in r.gaps_ms), default=None),
        "interarrival_p99_ms": summary_ms(r.interarrival_p99_ms for r in records),
    }


def summarize_calls(load: LoadResult) -> dict[str, Any]:
    """Connection-level figures: failures, upgrade times, greeting, load generator health."""
    calls = load.calls
    return {
        "calls": len(calls),
        "failed": sum(1 for c in calls if not c.connected or c.error),
        "errors": sorted({c.error for c in calls if c.error})[:5],
        "upgrade_ms": summary_ms(c.upgrade_ms for c in calls),
        # Calls that arrived while at least half of the others were already up.
        "upgrade_loaded_ms": summary_ms(
            [c.upgrade_ms for c in calls[len(calls) // 2 :]] + [c.upgrade_ms for c in load.probes]
        ),
        "probe_upgrade_ms": summary_ms(c.upgrade_ms for c in load.probes),
        "probes_failed": sum(1 for c in load.probes if not c.connected),
        "greeting_ms": summary_ms(c.greeting_ms for c in calls),
        "greeting_underruns": sum(c.greeting_underruns for c in calls),
        "loadgen": {
            "cpu_pct": None if load.cpu_pct is None else round(load.cpu_pct, 1),
            "loop_lag_ms": load.loop_lag_ms,
        },
    }


def summary_of(values: Sequence[float]) -> Summary:
    """Re-export for callers that want the dataclass."""
    return summarize(values)
