"""Options and summaries every bench driver shares (latency, capacity, profile).

One place for the drivers' common flags, the injected provider-latency profile
they ask for, and the JSON summary of one server session.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeswitch.bench.analysis import build_turn_records, summarize_calls, summarize_turns
from pipeswitch.bench.loadgen import CallSpec, LoadSpec
from pipeswitch.bench.run import ProviderProfile, SessionResult
from pipeswitch.pipelines.event_loop import EVENT_LOOP_KINDS


def add_common_arguments(p: argparse.ArgumentParser, *, replies: str) -> None:
    """Flags shared by the latency and capacity benches."""
    p.add_argument(
        "--replies",
        default=replies,
        choices=["unique", "fixed"],
        help="unique: Piper synthesizes each reply's first sentence; fixed: all cache hits",
    )
    p.add_argument("--stt-ttfs-ms", default="247,298", help="Deepgram TTFS median,p95")
    p.add_argument("--llm-ttft-ms", default="98,217", help="Groq TTFT median,p95")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--line-noise-dbfs",
        type=float,
        default=None,
        metavar="DBFS",
        help="white noise under the callers' audio at this RMS level (e.g. -50: a noisy line, "
        "above the VAD's -60 dBFS quiet gate); default digital silence between utterances",
    )
    p.add_argument(
        "--stream-buffer-ms",
        type=int,
        default=20,
        choices=[20, 40, 60, 80, 100],
        help="the emulated channels' STREAM_BUFFER_SIZE: caller audio in messages of this "
        "many ms (freeswitch-conf's voxcom dialplan sets 40; the others 20)",
    )
    p.add_argument("--server-log-level", default="WARNING")
    p.add_argument(
        "--loop",
        default="auto",
        choices=EVENT_LOOP_KINDS,
        help="both servers' event loop; auto is what `pipeswitch serve` and uvicorn (Pipecat's "
        "runner) pick: uvloop where installed",
    )
    p.add_argument(
        "--bench-loop",
        default="auto",
        choices=EVENT_LOOP_KINDS,
        help="the load generator's and the provider emulators' own event loop (they stand "
        "for FreeSWITCH and the cloud, which run elsewhere in production: the cheaper they "
        "are here, the less they take from the server's cores); auto: uvloop where installed",
    )
    p.add_argument(
        "--server-experiment",
        action="append",
        default=[],
        metavar="NAME",
        help="bench-only A/B patch of the Pipeswitch server (see bench/experiments.py)",
    )
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--no-warmup", action="store_true", help="measure from the server's very first call"
    )


def _pair(text: str) -> tuple[float, float]:
    a, _, b = text.partition(",")
    return float(a), float(b or a)


def providers_from(args: argparse.Namespace) -> ProviderProfile:
    """The injected-latency profile the flags ask for."""
    return ProviderProfile(
        stt_ttfs_ms=_pair(args.stt_ttfs_ms),
        llm_ttft_ms=_pair(args.llm_ttft_ms),
        replies=args.replies,
        seed=args.seed,
    )


def server_summary(kind: str, sr: SessionResult, tokens_per_s: float) -> dict[str, Any]:
    """Analysis of one session, JSON-ready."""
    records = build_turn_records(
        sr.server,
        sr.load,
        sr.server_calls,
        sr.stt_streams,
        sr.llm_requests,
        tokens_per_s=tokens_per_s,
        label=kind,
        server_spikes=sr.server_health.get("loop_lag_spikes"),
    )
    notes = list(sr.notes)
    other = sr.loaded.get("other")
    if other is not None and (other.cpu_pct or 0.0) > 25.0:
        notes.append(
            f"other processes on this machine used {other.cpu_pct:.0f} % of a core during "
            "the session: its figures are disturbed"
        )
    return {
        "server": kind,
        "summary": summarize_turns(records),
        "connections": summarize_calls(sr.load),
        "process": {
            "idle": {k: v.to_dict() for k, v in sr.idle.items()},
            "loaded": {k: v.to_dict() for k, v in sr.loaded.items()},
        },
        "server_probe": {
            "loop_lag_ms": sr.server_health.get("loop_lag_ms"),
            "gc_ms": sr.server_health.get("gc_ms"),
            "gc_frozen": sr.server_health.get("gc_frozen"),
            "speculation": sr.server_health.get("speculation"),
        },
        "config": {
            "vad_stop_secs": sr.server.vad_stop_secs,
            "policy_wait_secs": sr.server.policy_wait_secs,
        },
        "notes": notes,
        "turns": [r.to_dict() for r in records],
    }


def load_spec(
    args: argparse.Namespace, url_base: str, calls: list[CallSpec], t0: float, **kw: Any
) -> LoadSpec:
    """A load over ``calls`` with what every driver's flags set (rate, dialect, line noise,
    uplink message size)."""
    return LoadSpec(
        url_base,
        args.rate,
        args.dialect,
        calls,
        t0=t0,
        line_noise_dbfs=args.line_noise_dbfs,
        stream_buffer_ms=args.stream_buffer_ms,
        **kw,
    )
