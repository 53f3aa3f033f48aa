"""``pipeswitch bench latency``: N emulated calls x M turns, per-turn latency and overhead.

Per server under test (Pipeswitch; with ``--reference`` also the plain Pipecat
reference, same load, same seeds) one session: fresh emulator process, fresh
server process, N calls staggered, each greeted, then M question/answer turns
and one barge-in (the caller talks over the last reply). Reported per turn:

* wire latency - last voiced caller frame sent -> first audible bot frame received;
* server overhead - wire latency minus what the server had to wait for
  (:class:`bench.stats.TurnTimes`): the endpointing floor ``max(injected STT
  TTFS, VAD stop_secs + fixed turn-stop wait)``, injected LLM TTFT (+ first
  sentence streaming), Piper TTFB, TTS leading silence;
* barge-in stop - caller starts talking over the bot -> bot audio stops arriving;
* the pipeline's own ``UserBotLatencyObserver`` breakdown, anchored on the wire.

``--gate-overhead-p95-ms X`` makes the exit status 1 when Pipeswitch's overhead
p95 exceeds X (2 when the bench itself could not measure).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loguru import logger
from tqdm import tqdm

from pipeswitch.bench.caller_speech import load_caller_audio
from pipeswitch.bench.loadgen import CallSpec, LoadSpec, TurnResult
from pipeswitch.bench.options import (
    add_common_arguments,
    load_spec,
    providers_from,
    server_summary,
)
from pipeswitch.bench.report import results_dir, write_outputs
from pipeswitch.bench.run import SessionOptions, SessionResult, run_session
from pipeswitch.bench.servers import ServerKind
from pipeswitch.pipelines.event_loop import resolve as resolve_loop


def add_latency_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``bench latency``."""
    p.add_argument("--calls", type=int, default=1, help="concurrent calls (default 1)")
    p.add_argument("--turns", type=int, default=3, help="question/answer turns per call")
    p.add_argument("--dialect", default="json-stream", choices=["json-stream", "binary", "file"])
    p.add_argument("--rate", type=int, default=8000, choices=[8000, 16000])
    p.add_argument("--reference", action="store_true", help="also run the plain Pipecat reference")
    p.add_argument("--gate-overhead-p95-ms", type=float, default=None, metavar="MS")
    p.add_argument("--no-barge-in", action="store_true")
    p.add_argument("--stagger-s", type=float, default=0.37, help="call start spacing")
    add_common_arguments(p, replies="unique")
    from pipeswitch.bench.s2s import add_s2s_arguments

    add_s2s_arguments(p)


async def run_latency(args: argparse.Namespace) -> int:
    """Run the latency bench; returns the exit status."""
    if getattr(args, "pipeline", "cascade") != "cascade":
        from pipeswitch.bench.s2s import run_s2s_latency

        return await run_s2s_latency(args)
    if args.reference and args.dialect != "json-stream":
        logger.error("the reference speaks the json-stream dialect only")
        return 2
    providers = providers_from(args)
    out_dir = results_dir(args.out, "latency")
    audio = await load_caller_audio(args.rate)
    opts = SessionOptions(
        dialect=args.dialect,
        log_level=args.server_log_level,
        event_loop=args.loop,
        bench_loop=args.bench_loop,
        log_dir=out_dir,
        warmup=not args.no_warmup,
        experiments=args.server_experiment,
    )
    barge = not args.no_barge_in
    kinds: list[ServerKind] = ["pipeswitch", "reference"] if args.reference else ["pipeswitch"]
    per_call = args.turns + (1 if barge else 0)
    bar = tqdm(
        total=len(kinds) * args.calls * per_call,
        unit="turn",
        disable=args.no_progress,
        desc="latency",
    )
    results: dict[str, Any] = {}
    t_start = time.monotonic()
    try:
        for kind in kinds:
            bar.set_description(f"latency {kind}")

            def build(url_base: str, t0: float, kind: str = kind) -> LoadSpec:
                calls = [
                    CallSpec(
                        uuid=f"{kind[:3]}-{i:03d}-{args.seed}",
                        start_s=i * args.stagger_s,
                        turns=args.turns,
                        barge_in_turn=args.turns - 1 if barge else None,
                        seed=args.seed * 1000 + i,
                    )
                    for i in range(args.calls)
                ]
                return load_spec(args, url_base, calls, t0)

            def on_turn(_: TurnResult) -> None:
                bar.update(1)

            sr = await run_session(
                kind,
                build,
                lambda load: (load.t0, None),
                audio,
                providers,
                opts,
                on_turn=on_turn,
                log_name=kind,
            )
            results[kind] = server_summary(kind, sr, providers.tokens_per_s)
            results[kind]["machine_speed_s"] = sr.extra.get("machine_speed_s")
            save_raw(out_dir / f"raw-{kind}.json.gz", sr)
    finally:
        bar.close()
    doc = {
        "kind": "latency",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "wall_s": round(time.monotonic() - t_start, 1),
        "params": {
            "calls": args.calls,
            "turns": args.turns,
            "barge_in": barge,
            "dialect": args.dialect,
            "rate": args.rate,
            "replies": args.replies,
            "seed": args.seed,
            "providers": asdict(providers),
            "gate_overhead_p95_ms": args.gate_overhead_p95_ms,
            "server_experiments": args.server_experiment,
            "event_loop": resolve_loop(args.loop),
            "bench_loop": resolve_loop(args.bench_loop),
            "line_noise_dbfs": args.line_noise_dbfs,
            "stream_buffer_ms": args.stream_buffer_ms,
        },
        "servers": results,
    }
    md = write_outputs(doc, out_dir)
    print(md)
    return gate(doc, args.gate_overhead_p95_ms)


def save_raw(path: Path, sr: SessionResult) -> None:
    """The unanalysed records (server observer dumps, emulator logs, caller view), gzipped."""
    raw = {
        "server_calls": sr.server_calls,
        "server_health": sr.server_health,
        "stt_streams": sr.stt_streams,
        "llm_requests": sr.llm_requests,
        "load": {
            "calls": [asdict(c) for c in sr.load.calls],
            "probes": [asdict(c) for c in sr.load.probes],
        },
    }
    with gzip.open(path, "wt") as f:
        json.dump(raw, f, default=str)


def gate(doc: dict[str, Any], budget_ms: float | None) -> int:
    """Exit status of the CI gate (0 when no budget is set and the bench worked)."""
    ours = doc["servers"].get("pipeswitch", {}).get("summary", {})
    p95 = (ours.get("overhead_ms") or {}).get("p95")
    n = (ours.get("overhead_ms") or {}).get("n", 0)
    turns = ours.get("turns", 0)
    if p95 is None or n == 0:
        logger.error("gate: no turn could be measured (turns={}, lost={})", turns, ours.get("lost"))
        return 2
    if n < turns - ours.get("lost", 0):
        logger.warning("gate: overhead known for {} of {} answered turns", n, turns)
    if budget_ms is None:
        return 0
    if ours.get("lost", 0):
        logger.error("gate: {} of {} turns got no reply", ours["lost"], turns)
        return 1
    if p95 > budget_ms:
        logger.error("gate FAILED: server overhead p95 {:.0f} ms > {:.0f} ms", p95, budget_ms)
        return 1
    logger.info("gate passed: server overhead p95 {:.0f} ms <= {:.0f} ms", p95, budget_ms)
    return 0
