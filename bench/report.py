"""Bench outputs: ``results.json``, ``report.md`` and PNG plots under ``bench/results/<ts>/``.

``bench/results/latest.json`` is a copy of the newest ``results.json`` (with
``results_dir`` added), so CI and people find the last run without a timestamp.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from pipeswitch.bench.analysis import STAGES
from pipeswitch.bench.stats import ratio

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "PIPESWITCH_BENCH_RESULTS"  # overrides RESULTS_ROOT (tests)


def results_root() -> Path:
    """Where timestamped result directories and ``latest.json`` go."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else RESULTS_ROOT


SERVER_LABELS = {"pipeswitch": "Pipeswitch", "reference": "plain Pipecat"}
COLORS = {"pipeswitch": "tab:blue", "reference": "tab:orange"}


def results_dir(explicit: Path | None, kind: str) -> Path:
    """``explicit`` or ``bench/results/<timestamp>-<kind>/`` (created)."""
    d = explicit or results_root() / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _f(v: Any, nd: int = 0) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _pp(s: dict[str, Any] | None, keys: Sequence[str] = ("p50", "p95", "max")) -> str:
    if not s or not s.get("n"):
        return "–"
    return " / ".join(_f(s.get(k)) for k in keys)


def _underruns(s: dict[str, Any]) -> str:
    c = s.get("underrun_causes") or {}
    causes = ", ".join(
        f"{label} {c[k]}"
        for k, label in (
            ("server", "srv"),
            ("loadgen", "lg"),
            ("both", "both"),
            ("unexplained", "?"),
        )
        if c.get(k)
    )
    return (
        f"{s['underruns']}"
        + (f" [{causes}]" if causes else "")
        + f" (playout {s['playout_underruns']})"
    )


def _ratio_s(a: float | None, b: float | None) -> str:
    r = ratio(a, b)
    return "–" if r is None else f"{r:.2f}×"


# -- latency -------------------------------------------------------------------------------


def _run_conditions(p: dict[str, Any]) -> str:
    """The event loops, the callers' line noise and uplink message size, where recorded."""
    out = f" Event loop: {p['event_loop']}." if p.get("event_loop") else ""
    if p.get("bench_loop"):
        out += f" Load generator and emulators on {p['bench_loop']}."
    if p.get("line_noise_dbfs") is not None:
        out += f" Callers' line noise {p['line_noise_dbfs']:.0f} dBFS."
    if p.get("stream_buffer_ms", 20) != 20:
        out += f" Caller audio in {p['stream_buffer_ms']} ms messages (STREAM_BUFFER_SIZE)."
    return out


def latency_markdown(doc: dict[str, Any]) -> str:
    """The latency report."""
    p = doc["params"]
    servers = doc["servers"]
    lines = [
        f"# Latency bench ({doc['created']})",
        "",
        f"{p['calls']} call(s) × {p['turns']} turn(s)"
        + (" + 1 barge-in per call" if p["barge_in"] else "")
        + f", {p['dialect']} dialect, {p['rate']} Hz, replies={p['replies']}, seed {p['seed']}; "
        f"injected STT TTFS {p['providers']['stt_ttfs_ms'][0]:.0f}/"
        f"{p['providers']['stt_ttfs_ms'][1]:.0f} ms, LLM TTFT "
        f"{p['providers']['llm_ttft_ms'][0]:.0f}/{p['providers']['llm_ttft_ms'][1]:.0f} ms "
        f"(median/p95); wall {doc['wall_s']:.0f} s."
        + _run_conditions(p)
        + (
            f" Server experiments (bench-only patches): {', '.join(p['server_experiments'])}."
            if p.get("server_experiments")
            else ""
        ),
        "",
        "All latencies in ms, p50 / p95 / max. Underruns: wire gaps > 40 ms while the bot "
        "talked, [whose event loop stalled meanwhile: srv = server, lg = load generator, "
        "? = neither], (playout: times a far end with no jitter buffer beyond the sender's "
        "lead would have run dry).",
        "",
        "| server | turns (lost, premature) | wire latency | **server overhead** | barge-in stop "
        "| STT TTFS inj. | endpointing floor | LLM TTFT inj. | TTS TTFB | observer total "
        "| underruns | greeting |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in servers.items():
        s = r["summary"]
        c = r["connections"]
        lines.append(
            f"| {SERVER_LABELS.get(kind, kind)} | {s['turns']} ({s['lost']}, {s.get('premature', 0)}) "
            f"| {_pp(s['wire_ms'])} | **{_pp(s['overhead_ms'])}** "
            f"| {_pp(s['barge_in']['stop_ms'])} | {_pp(s['stt_ttfs_ms'])} "
            f"| {_pp(s['endpointing_floor_ms'])} | {_pp(s['llm_ttft_ms'])} "
            f"| {_pp(s['tts_ttfb_ms'])} | {_pp(s['observer_ms'])} "
            f"| {_underruns(s)} | {_pp(c['greeting_ms'])} |"
        )
    if "pipeswitch" in servers and "reference" in servers:
        a, b = servers["pipeswitch"]["summary"], servers["reference"]["summary"]
        lines.append(
            f"| ours / reference (p95) | | {_ratio_s(a['wire_ms'].get('p95'), b['wire_ms'].get('p95'))} "
            f"| **{_ratio_s(a['overhead_ms'].get('p95'), b['overhead_ms'].get('p95'))}** "
            f"| {_ratio_s(a['barge_in']['stop_ms'].get('p95'), b['barge_in']['stop_ms'].get('p95'))} "
            "| | | | | | | |"
        )
    lines += [
        "",
        "Process view (whole session): CPU % of one core (200 = both cores), RSS MB.",
        "",
        "| server | server CPU % (main thread) | Piper CPU % | server RSS | Piper RSS "
        "| loop lag p99 / max | GC gen2 with calls up: count / max ms | upgrade p50 / p99 | load gen CPU % "
        "| emulators CPU % | other load on the machine / VM steal % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in servers.items():
        lines.append(_process_row(kind, r))
    lines += ["", "Mean wire-anchored stages of a turn (ms; they sum to the wire latency):", ""]
    kinds = list(servers)
    lines.append("| stage | " + " | ".join(SERVER_LABELS.get(k, k) for k in kinds) + " |")
    lines.append("|---|" + "---|" * len(kinds))
    for key, label in STAGES:
        vals = [servers[k]["summary"]["stage_means_ms"].get(key) for k in kinds]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join(_f(v) for v in vals) + " |")
    lines += ["", _overhead_note()]
    for kind, r in servers.items():
        spec = (r.get("server_probe") or {}).get("speculation")
        if spec and spec.get("started"):
            lines.append(
                f"- {SERVER_LABELS.get(kind, kind)}: speculative end of turn started "
                f"{spec['started']} time(s), confirmed {spec.get('confirmed', 0)}, "
                f"wasted {spec.get('wasted', 0)} (LLM requests whose reply was discarded)"
            )
        for n in r.get("notes", []):
            lines.append(f"- {SERVER_LABELS.get(kind, kind)}: {n}")
    return "\n".join(lines) + "\n"


def _process_row(kind: str, r: dict[str, Any]) -> str:
    loaded = r["process"]["loaded"]
    srv, pip, lg = loaded.get("server", {}), loaded.get("piper", {}), loaded.get("loadgen", {})
    lag = (r.get("server_probe") or {}).get("loop_lag_ms") or {}
    gc2 = ((r.get("server_probe") or {}).get("gc_ms") or {}).get("gen2") or {}
    c = r["connections"]
    return (
        f"| {SERVER_LABELS.get(kind, kind)} | {_f(srv.get('cpu_pct'))} "
        f"({_f(srv.get('main_thread_cpu_pct'))}) | {_f(pip.get('cpu_pct'))} "
        f"| {_f(srv.get('rss_mb_max'))} | {_f(pip.get('rss_mb_max'))} "
        f"| {_f(lag.get('p99'), 1)} / {_f(lag.get('max'), 1)} "
        f"| {_f(gc2.get('count'))} / {_f(gc2.get('max_ms'), 1)} "
        f"| {_pp(c['upgrade_ms'], ('p50', 'p99'))} | {_f(lg.get('cpu_pct'))} "
        f"| {_f(loaded.get('emulators', {}).get('cpu_pct'))} "
        f"| {_f(loaded.get('other', {}).get('cpu_pct'))} "
        f"/ {_f(loaded.get('steal', {}).get('cpu_pct'))} |"
    )


def _overhead_note() -> str:
    return (
        "Server overhead = wire latency − max(injected STT TTFS, VAD stop_secs + fixed turn-stop "
        "wait) − injected LLM TTFT − first-sentence token streaming − Piper TTFB − TTS leading "
        "silence. Deepgram's published TTFS (and the emulator's) is measured from the true end of "
        "speech with the 0.2 s VAD window inside it, so the VAD window is not subtracted a second "
        "time; the literal `wire − injected − stop_secs − TTS` is kept in results.json as "
        "`naive_overhead_ms`. The fixed turn-stop wait is 0 for Pipeswitch (complete transcript) "
        "and 0.2 s for the reference (`user_speech_timeout`)."
    )


def plot_latency(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Latency CDF (wire and overhead) and per-stage stacked bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = doc["servers"]
    paths: list[Path] = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in (
        (axes[0], "wire_ms", "Wire turn latency"),
        (axes[1], "overhead_ms", "Server overhead"),
    ):
        for kind, r in servers.items():
            xs = sorted(
                t[key] for t in r["turns"] if t["kind"] == "turn" and t.get(key) is not None
            )
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(
                xs, ys, where="post", label=SERVER_LABELS.get(kind, kind), color=COLORS.get(kind)
            )
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of turns")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    p = out_dir / "latency_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    kinds = list(servers)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottoms = [0.0] * len(kinds)
    cmap = plt.get_cmap("tab20")
    for i, (key, label) in enumerate(STAGES):
        vals = [max(0.0, servers[k]["summary"]["stage_means_ms"].get(key, 0.0)) for k in kinds]
        if not any(vals):
            continue
        ax.bar(
            [SERVER_LABELS.get(k, k) for k in kinds],
            vals,
            bottom=bottoms,
            label=label,
            color=cmap(i),
        )
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    ax.set_ylabel("ms (mean per turn)")
    ax.set_title("Where a turn's wire latency goes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p = out_dir / "latency_stages.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


# -- capacity ------------------------------------------------------------------------------


def capacity_markdown(doc: dict[str, Any]) -> str:
    """The capacity report: one table per server, then ours vs reference."""
    p = doc["params"]
    lines = [
        f"# Capacity bench ({doc['created']})",
        "",
        f"Steps {p['steps']}, {p['step_secs']:.0f} s per step (steady window "
        f"{p['window']}), {p['dialect']} dialect, {p['rate']} Hz, replies={p['replies']}, "
        f"seed {p['seed']}. Budget: server overhead p95 ≤ {p['overhead_budget_ms']:.0f} ms and "
        f"zero underruns (wire gap > 40 ms while the bot talks), no lost or premature turns, no failed calls. "
        f"Wall {doc['wall_s']:.0f} s."
        + _run_conditions(p)
        + (
            f" Server experiments (bench-only patches): {', '.join(p['server_experiments'])}."
            if p.get("server_experiments")
            else ""
        ),
        "",
        "Latencies in ms (p50 / p95); CPU in % of one core (200 = the machine); RSS in MB.",
        "",
    ]
    for kind, steps in doc["servers"].items():
        lines += [
            f"## {SERVER_LABELS.get(kind, kind)}",
            "",
            "| N | turns (lost, premature) | wire | overhead | barge stop | server CPU (main) "
            "| Piper CPU (syntheses / shared / 503s) | RSS server / Piper | CPU / call | RSS / call | underruns [stalled loop] (playout) | max gap "
            "| jitter p99 | upgrade loaded p50 / p99 (probes) | greeting | loop lag p99 / max "
            "| GC2 max (calls up) | load gen CPU / lag p99 | emulators / other / VM steal CPU | holds |",
            "|" + "---|" * 20,
        ]
        for st in steps:
            lines.append(_capacity_row(st))
        lines += _per_step_line(
            "Machine speed before each step (a fixed pure-Python loop on one core, "
            "lower is faster; this shared VM drifts by a third within an hour): ",
            [
                (st["n"], f"{st['machine_speed_s']:.3f} s")
                for st in steps
                if st.get("machine_speed_s")
            ],
        )
        lines += _per_step_line(
            "Event loops waiting for a CPU (main threads ready to run but not running, % of "
            "the window; server: its processes summed / load generator): ",
            [(st["n"], text) for st in steps if (text := _cpu_wait(st)) is not None],
        )
        lines += _per_step_line(
            "Silero windows scored / skipped by the quiet gate (every sample within -60 dBFS): ",
            [
                (st["n"], f"{st['vad'].get('scored', 0)} / {st['vad'].get('skipped', 0)}")
                for st in steps
                if st.get("vad")
            ],
        )
        best = doc["ceilings"].get(kind)
        near = (doc.get("near_clean_ceilings") or {}).get(kind)
        rel = (doc.get("relative_ceilings") or {}).get(kind)
        lines += [
            "",
            f"Largest N within budget — strict (overhead p95 ≤ budget, zero underruns): "
            f"**{_f(best)}**; near-clean (≤ 2 underruns per 1000 bot messages while the "
            f"server's loop stalled): **{_f(near)}**; relative (the baseline's rule: "
            f"overhead p95 within +50 ms of the smallest step, near-clean underruns): "
            f"**{_f(rel)}**",
            "",
        ]
    if len(doc["servers"]) == 2:
        lines += _capacity_ratios(doc)
    lines += ["", _overhead_note(), ""]
    for n in doc.get("notes", []):
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def _piper_counts(p: dict[str, Any] | None) -> str:
    """Piper's syntheses, requests that shared one, and queue-full rejections in a step."""
    if not p:
        return ""
    return (
        f" ({p.get('cache_misses', '-')} / {p.get('coalesced', '-')} / "
        f"{p.get('rejected_queue_full', '-')})"
    )


def _cpu_wait(st: dict[str, Any]) -> str | None:
    """A step's run-queue waits, server / load generator (None: not measured)."""
    loaded = st["process"]["loaded"]
    srv, lg = loaded.get("server") or {}, loaded.get("loadgen") or {}
    if srv.get("main_thread_wait_pct") is None:
        return None
    return f"{_f(srv['main_thread_wait_pct'], 1)} / {_f(lg.get('main_thread_wait_pct'), 1)}"


def _per_step_line(label: str, figures: list[tuple[int, str]]) -> list[str]:
    """A line under the capacity table: ``label`` then each step's figure (none: no line)."""
    return ["", label + ", ".join(f"N={n} {text}" for n, text in figures)] if figures else []


def _capacity_row(st: dict[str, Any]) -> str:
    s, c, pr = st["summary"], st["connections"], st["process"]
    srv, pip = pr["loaded"].get("server", {}), pr["loaded"].get("piper", {})
    lg = pr["loaded"].get("loadgen", {})
    lag = (st.get("server_probe") or {}).get("loop_lag_ms") or {}
    gc2 = ((st.get("server_probe") or {}).get("gc_ms") or {}).get("gen2") or {}
    lg_lag = (c.get("loadgen") or {}).get("loop_lag_ms") or {}
    if "main" in lg_lag:
        lg_lag = lg_lag["main"]
    return (
        f"| {st['n']} | {s['turns']} ({s['lost']}, {s.get('premature', 0)}) | {_pp(s['wire_ms'], ('p50', 'p95'))} "
        f"| {_pp(s['overhead_ms'], ('p50', 'p95'))} "
        f"| {_pp(s['barge_in']['stop_ms'], ('p50', 'p95'))} "
        f"| {_f(srv.get('cpu_pct'))} ({_f(srv.get('main_thread_cpu_pct'))}) "
        f"| {_f(pip.get('cpu_pct'))}{_piper_counts(st.get('piper'))} "
        f"| {_f(srv.get('rss_mb_max'))} / {_f(pip.get('rss_mb_max'))} "
        f"| {_f(st['per_call'].get('cpu_pct'), 1)} | {_f(st['per_call'].get('rss_mb'), 1)} "
        f"| {_underruns(s)} | {_f(s['max_gap_ms'])} "
        f"| {_f((s['interarrival_p99_ms'] or {}).get('p95'), 1)} "
        f"| {_pp(c['upgrade_loaded_ms'], ('p50', 'p99'))} ({c['probe_upgrade_ms']['n']}) "
        f"| {_pp(c['greeting_ms'], ('p50', 'p95'))} "
        f"| {_f(lag.get('p99'), 1)} / {_f(lag.get('max'), 1)} | {_f(gc2.get('max_ms'), 1)} "
        f"| {_f(lg.get('cpu_pct'))} / {_f(lg_lag.get('p99'), 1)} "
        f"| {_f(pr['loaded'].get('emulators', {}).get('cpu_pct'))} / "
        f"{_f(pr['loaded'].get('other', {}).get('cpu_pct'))} / "
        f"{_f(pr['loaded'].get('steal', {}).get('cpu_pct'))} "
        f"| {'yes' if st['holds'] else 'no: ' + ', '.join(st['why_not'])}"
        f"{' (near-clean)' if st.get('near_clean') and not st['holds'] else ''} |"
    )


def _capacity_ratios(doc: dict[str, Any]) -> list[str]:
    ours = {st["n"]: st for st in doc["servers"]["pipeswitch"]}
    ref = {st["n"]: st for st in doc["servers"]["reference"]}
    lines = [
        "## Pipeswitch vs plain Pipecat (ratios ours / reference at equal N)",
        "",
        "| N | wire p95 | overhead p95 | server CPU | CPU / call | RSS / call | underruns (ours / ref) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sorted(set(ours) & set(ref)):
        a, b = ours[n], ref[n]
        lines.append(
            f"| {n} | {_ratio_s(a['summary']['wire_ms'].get('p95'), b['summary']['wire_ms'].get('p95'))} "
            f"| {_ratio_s(a['summary']['overhead_ms'].get('p95'), b['summary']['overhead_ms'].get('p95'))} "
            f"| {_ratio_s(a['process']['loaded'].get('server', {}).get('cpu_pct'), b['process']['loaded'].get('server', {}).get('cpu_pct'))} "
            f"| {_ratio_s(a['per_call'].get('cpu_pct'), b['per_call'].get('cpu_pct'))} "
            f"| {_ratio_s(a['per_call'].get('rss_mb'), b['per_call'].get('rss_mb'))} "
            f"| {a['summary']['underruns']} / {b['summary']['underruns']} |"
        )
    for key, label in (
        ("ceilings", "strict"),
        ("near_clean_ceilings", "near-clean"),
        ("relative_ceilings", "relative"),
    ):
        co = (doc.get(key) or {}).get("pipeswitch")
        cr = (doc.get(key) or {}).get("reference")
        lines += [
            "",
            f"Capacity within budget ({label}): ours **{_f(co)}** vs reference **{_f(cr)}** "
            f"calls ({_ratio_s(float(co) if co else None, float(cr) if cr else None)}).",
        ]
    return lines


def plot_capacity(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """p95 wire latency / overhead and CPU vs calls, ours vs reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind, steps in doc["servers"].items():
        steps = sorted(steps, key=lambda s: s["n"])
        ns = [s["n"] for s in steps]
        lab = SERVER_LABELS.get(kind, kind)
        col = COLORS.get(kind)
        axes[0].plot(
            ns, [s["summary"]["wire_ms"].get("p95") for s in steps], "o-", label=lab, color=col
        )
        axes[1].plot(
            ns, [s["summary"]["overhead_ms"].get("p95") for s in steps], "o-", label=lab, color=col
        )
        axes[2].plot(
            ns,
            [s["process"]["loaded"].get("server", {}).get("cpu_pct") for s in steps],
            "o-",
            label=f"{lab} server",
            color=col,
        )
        axes[2].plot(
            ns,
            [s["process"]["loaded"].get("piper", {}).get("cpu_pct") for s in steps],
            "x--",
            label=f"{lab} Piper",
            color=col,
            alpha=0.6,
        )
    budget = doc["params"]["overhead_budget_ms"]
    axes[1].axhline(budget, color="gray", ls=":", label=f"budget {budget:.0f} ms")
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    for ax, title, unit in (
        (axes[0], "p95 wire turn latency", "ms (log)"),
        (axes[1], "p95 server overhead", "ms (log)"),
        (axes[2], "CPU (200 % = 2 cores)", "%"),
    ):
        ax.set_title(title)
        ax.set_xlabel("concurrent calls")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "capacity.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


# -- writing -------------------------------------------------------------------------------


def write_outputs(doc: dict[str, Any], out_dir: Path) -> str:
    """results.json, report.md, plots, latest.json; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = latency_markdown(doc) if doc["kind"] == "latency" else capacity_markdown(doc)
    try:
        plots = (
            plot_latency(doc, out_dir) if doc["kind"] == "latency" else plot_capacity(doc, out_dir)
        )
    except Exception as exc:  # a plot must never lose the numbers
        logger.warning("plotting failed: {}", exc)
        plots = []
    doc = {**doc, "results_dir": str(out_dir), "plots": [p.name for p in plots]}
    text = json.dumps(doc, indent=1, default=str)
    (out_dir / "results.json").write_text(text)
    (out_dir / "report.md").write_text(md + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots))
    root = results_root()
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest.json").write_text(text)
    logger.info("results in {}", out_dir)
    return md


def rerender(results_dir_: Path) -> str:
    """Re-write report.md and the plots of a finished run from its results.json.

    Capacity runs get their step verdicts and ceilings re-evaluated with the
    current rules (:mod:`bench.capacity`), so a rule change does not need a re-run.
    """
    doc = json.loads((results_dir_ / "results.json").read_text())
    if doc["kind"] == "capacity":
        from pipeswitch.bench.ceilings import evaluate, evaluate_near_clean, relative_ceiling

        budget = float(doc["params"]["overhead_budget_ms"])
        for kind, steps in doc["servers"].items():
            for st in steps:
                st["why_not"] = evaluate(st, budget)
                st["holds"] = not st["why_not"]
                st["near_clean"] = evaluate_near_clean(st, budget)
            strict = [s["n"] for s in steps if s["holds"]]
            near = [s["n"] for s in steps if s["near_clean"]]
            doc["ceilings"][kind] = max(strict) if strict else None
            doc.setdefault("near_clean_ceilings", {})[kind] = max(near) if near else None
            doc.setdefault("relative_ceilings", {})[kind] = relative_ceiling(steps)
    for k in ("results_dir", "plots"):
        doc.pop(k, None)
    return write_outputs(doc, results_dir_)


if __name__ == "__main__":
    import sys

    print(rerender(Path(sys.argv[1])))
