"""``pipeswitch bench profile``: where the Pipeswitch server's CPU goes under N calls.

Runs the capacity bench's caller pattern against one server (Pipeswitch, or
``--server reference``) and attaches ``py-spy record`` to the server process
for the steady window (sampling only threads that are running). The raw
collapsed stacks are kept (``profile-<server>.txt``, loadable in speedscope or
flamegraph.pl) and summarized: top functions by self and inclusive samples,
and the shares of the cost centres the capacity baseline named (asyncio
queue hops, FrameProcessor machinery, VAD executor hops, Silero ONNX, socket
sends, aiohttp framing, serialization, logging).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from pipeswitch.bench.caller_speech import load_caller_audio
from pipeswitch.bench.loadgen import CallSpec, LoadSpec
from pipeswitch.bench.options import (
    add_common_arguments,
    load_spec,
    providers_from,
    server_summary,
)
from pipeswitch.bench.report import SERVER_LABELS, results_dir
from pipeswitch.bench.run import SessionOptions, run_session
from pipeswitch.bench.servers import ServerKind, ServerProcess

# (label, regex on one frame "function (file:line)") - a sample counts once per category.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("asyncio.Queue get/put", r"\((?:.*/)?asyncio/queues\.py:"),
    ("FrameProcessor machinery (queues, push, process tasks)", r"frame_processor\.py:"),
    ("observers (incl. UserBotLatencyObserver, turn tracking)", r"/observers/"),
    ("user aggregator + turn strategies", r"llm_response_universal\.py:|/turns/"),
    ("VAD analyzer (incl. executor hop)", r"vad_analyzer\.py:|vad_controller\.py:"),
    ("Silero ONNX inference", r"onnxruntime|silero\.py:"),
    ("input transport", r"base_input\.py:|transports/transport\.py:.*_receive"),
    ("output transport + pacing", r"base_output\.py:"),
    ("serializer / dialect (json, base64)", r"serializer\.py:|dialects\.py:|base64|json/"),
    ("aiohttp WebSocket framing", r"aiohttp/_websocket|web_ws\.py:|client_ws\.py:"),
    ("socket send/recv syscalls", r"selector_events\.py:|sock_send|\(send|\(recv"),
    ("Deepgram STT client", r"/deepgram/"),
    ("LLM client (openai/httpx)", r"/openai/|/groq/|httpx|httpcore"),
    ("TTS client (Piper HTTP)", r"/piper/|tts_service\.py:"),
    ("loguru", r"loguru"),
    ("resampling", r"resampl|soxr"),
    ("event loop (select, run_once, callbacks)", r"base_events\.py:|selectors\.py:|events\.py:"),
    ("pipeline construction", r"build_cascade|cascade\.py:|SileroVADAnalyzer\.__init__"),
)
_FRAME_FN = re.compile(r"^(.*?) \((.*?):(\d+)\)$")


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``bench profile``."""
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--secs", type=float, default=25.0, help="py-spy recording time")
    p.add_argument("--sample-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--server", default="pipeswitch", choices=["pipeswitch", "reference"])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--dialect", default="json-stream", choices=["json-stream", "binary", "file"])
    p.add_argument("--rate", type=int, default=8000, choices=[8000, 16000])
    p.add_argument("--ramp-per-call-s", type=float, default=0.1)
    add_common_arguments(p, replies="fixed")


@dataclass
class ProfileSummary:
    """Collapsed-stack statistics."""

    samples: int
    main_thread: int
    self_top: list[tuple[str, int]]
    inclusive_top: list[tuple[str, int]]
    categories: list[tuple[str, int]]

    def pct(self, n: int) -> float:
        return 100.0 * n / self.samples if self.samples else 0.0


def _fn(frame: str) -> str:
    m = _FRAME_FN.match(frame.strip())
    if not m:
        return frame.strip()
    name, path, _line = m.groups()
    short = "/".join(path.split("/")[-2:])
    return f"{name} ({short})"


def parse_collapsed(lines: Iterable[str], top: int = 25) -> ProfileSummary:
    """Summarize py-spy ``--format raw`` output (``frame;frame;... count`` per line)."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    compiled = [(label, re.compile(rx)) for label, rx in CATEGORIES]
    total = main = 0
    for line in lines:
        line = line.rstrip()
        if not line or " " not in line:
            continue
        stack, _, count_s = line.rpartition(" ")
        try:
            count = int(count_s)
        except ValueError:
            continue
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread (", "process ")):
            thread = frames[0]
            frames = frames[1:]
            if "MainThread" in thread or "main" in thread.lower():
                main += count
        total += count
        if not frames:
            continue
        self_c[_fn(frames[-1])] += count
        for f in {_fn(x) for x in frames}:
            incl[f] += count
        for label, rx in compiled:
            if any(rx.search(x) for x in frames):
                cats[label] += count
    return ProfileSummary(
        samples=total,
        main_thread=main,
        self_top=self_c.most_common(top),
        inclusive_top=incl.most_common(top),
        categories=cats.most_common(),
    )


def profile_markdown(
    summary: ProfileSummary,
    server: str,
    calls: int,
    secs: float,
    extra: dict[str, Any],
    gil: ProfileSummary | None = None,
) -> str:
    """The hot-spot report."""
    s = summary
    lines = [
        f"# Profile: {SERVER_LABELS.get(server, server)} under {calls} calls ({secs:.0f} s, py-spy)",
        "",
        f"{s.samples} samples of running threads"
        + (f", {s.pct(s.main_thread):.0f} % on the main thread" if s.main_thread else "")
        + ".",
        "",
    ]
    for k, v in extra.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Cost centres (a sample counts once per centre; centres overlap)", ""]
    lines += ["| centre | % of samples |", "|---|---|"]
    lines += [f"| {label} | {s.pct(n):.1f} |" for label, n in s.categories]
    lines += ["", "## Top functions by self time", "", "| function | self % |", "|---|---|"]
    lines += [f"| `{f}` | {s.pct(n):.1f} |" for f, n in s.self_top]
    lines += ["", "## Top functions by inclusive time", "", "| function | incl. % |", "|---|---|"]
    lines += [f"| `{f}` | {s.pct(n):.1f} |" for f, n in s.inclusive_top]
    if gil is not None and gil.samples:
        lines += ["", "## While holding the GIL: cost centres", "", "| centre | % |", "|---|---|"]
        lines += [f"| {label} | {gil.pct(n):.1f} |" for label, n in gil.categories]
        lines += ["", "## While holding the GIL: top self", "", "| function | % |", "|---|---|"]
        lines += [f"| `{f}` | {gil.pct(n):.1f} |" for f, n in gil.self_top]
    return "\n".join(lines) + "\n"


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


async def run_profile(args: argparse.Namespace) -> int:
    """Run the load, record with py-spy, write the summary."""
    spy = _py_spy()
    if spy is None:
        logger.error("py-spy is not installed")
        return 2
    kind: ServerKind = args.server
    providers = providers_from(args)
    out_dir = results_dir(args.out, "profile")
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
    n = args.calls
    ramp = n * args.ramp_per_call_s
    begin = ramp + 3.0
    end = begin + args.secs
    raw = out_dir / f"profile-{kind}.txt"
    raw_gil = out_dir / f"profile-{kind}-gil.txt"

    def build(url_base: str, t0: float) -> LoadSpec:
        calls = [
            CallSpec(
                uuid=f"prof-{i:03d}",
                start_s=i * args.ramp_per_call_s,
                turns=None,
                barge_in_turn=1,
                seed=args.seed * 1000 + i,
            )
            for i in range(n)
        ]
        return load_spec(args, url_base, calls, t0, deadline_s=end, hangup_s=end + 12)

    async def record(server: ServerProcess, load: LoadSpec) -> dict[str, Any]:
        assert server.info is not None
        await asyncio.sleep(max(0.0, load.t0 + begin - time.monotonic()))
        base = [
            spy,
            "record",
            "--pid",
            str(server.info.pid),
            "--duration",
            str(int(args.secs)),
            "--rate",
            str(args.sample_rate),
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
        ]
        # Two samplers at once: every running thread, and only the GIL holder.
        runs = await asyncio.gather(
            asyncio.to_thread(
                subprocess.run,
                [*base, "-o", str(raw)],
                capture_output=True,
                text=True,
                timeout=args.secs + 60,
            ),
            asyncio.to_thread(
                subprocess.run,
                [*base, "--gil", "-o", str(raw_gil)],
                capture_output=True,
                text=True,
                timeout=args.secs + 60,
            ),
        )
        return {"rc": [r.returncode for r in runs], "stderr": [r.stderr[-300:] for r in runs]}

    sr = await run_session(
        kind,
        build,
        lambda load: (load.t0 + begin, load.t0 + end),
        audio,
        providers,
        opts,
        log_name=f"profile-{kind}",
        on_load=record,
    )
    spy_result = sr.extra.get("on_load", {})
    if not raw.exists():
        logger.error("py-spy wrote nothing: {}", spy_result)
        return 2
    summary = parse_collapsed(raw.read_text().splitlines(), args.top)
    gil = parse_collapsed(raw_gil.read_text().splitlines(), args.top) if raw_gil.exists() else None
    possible = args.secs * args.sample_rate
    st = server_summary(kind, sr, providers.tokens_per_s)
    srv = sr.loaded.get("server")
    extra = {
        "server CPU % (main thread)": (
            f"{srv.cpu_pct:.0f} ({srv.main_thread_cpu_pct or 0:.0f})"
            if srv and srv.cpu_pct
            else "–"
        ),
        "wire p50/p95 ms": f"{st['summary']['wire_ms'].get('p50')} / {st['summary']['wire_ms'].get('p95')}",
        "overhead p50/p95 ms": (
            f"{st['summary']['overhead_ms'].get('p50')} / {st['summary']['overhead_ms'].get('p95')}"
        ),
        "underruns": st["summary"]["underruns"],
        "loop lag ms": (sr.server_health.get("loop_lag_ms") or {}),
        "gc ms": (sr.server_health.get("gc_ms") or {}).get("gen2"),
        "raw stacks": f"{raw.name}, {raw_gil.name} (GIL holder only)",
        "server experiments": ", ".join(args.server_experiment) or "none",
        "other load on the machine (% of a core)": (
            f"{sr.loaded['other'].cpu_pct:.0f}"
            if "other" in sr.loaded and sr.loaded["other"].cpu_pct is not None
            else "–"
        ),
    }
    if gil is not None and possible:
        extra["GIL held (of wall time)"] = f"{100.0 * gil.samples / possible:.0f} %"
        extra["main thread's share of GIL time"] = f"{gil.pct(gil.main_thread):.0f} %"
        extra["main thread running (py-spy, of wall time)"] = (
            f"{100.0 * summary.main_thread / possible:.0f} %"
        )
    md = profile_markdown(summary, kind, n, args.secs, extra, gil)
    (out_dir / f"profile-{kind}.md").write_text(md)
    print(md)
    return 0
