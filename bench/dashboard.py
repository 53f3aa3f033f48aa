"""Render the Grafana dashboard's panels with matplotlib from scrapes of a loaded server.

There is no Grafana (nor Prometheus) on the CI machine, so this does their job for the
README picture: it runs an emulated load against one Pipeswitch server, scrapes its
``/metrics`` every ``--interval`` seconds, evaluates each panel's PromQL expression from
``deploy/grafana/dashboards/pipeswitch.json`` with a small evaluator for the forms that
dashboard uses (``sum by``, ``rate``, ``histogram_quantile``), and draws the panels in the
dashboard's grid. It is a matplotlib rendering of the same queries, not a Grafana screenshot.

    python -m pipeswitch.bench.dashboard --calls 12 --concurrency 4 --out docs/
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pipeswitch.bench.prometheus import RealPrometheus
from pipeswitch.bench.prometheus import available as prometheus_available

REPO_ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "pipeswitch.json"

Labels = frozenset[tuple[str, str]]
Scrape = tuple[float, dict[str, dict[Labels, float]]]


def parse_scrape(text: str) -> dict[str, dict[Labels, float]]:
    """Sample name -> labels -> value."""
    out: dict[str, dict[Labels, float]] = defaultdict(dict)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name][frozenset(s.labels.items())] = s.value
    return out


class Evaluator:
    """PromQL for the dashboard's forms, evaluated at each scrape time."""

    _RATE = re.compile(r"^rate\((\w+)\[(\d+)([sm])\]\)$")
    _SUM = re.compile(r"^sum by \(([\w, ]+)\) \((.+)\)$")
    _HQ = re.compile(r"^histogram_quantile\(([\d.]+), (.+)\)$")

    def __init__(self, scrapes: list[Scrape]) -> None:
        self.scrapes = scrapes

    def series(self, expr: str) -> dict[Labels, list[tuple[float, float]]]:
        """label set -> [(t, value)] for one expression."""
        out: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        for i, (t, _) in enumerate(self.scrapes):
            for labels, v in self._eval(expr.strip(), i).items():
                if v is not None and not math.isnan(v):
                    out[labels].append((t, v))
        return out

    def _eval(self, expr: str, i: int) -> dict[Labels, float]:
        if m := self._HQ.match(expr):
            return self._quantile(float(m.group(1)), self._eval(m.group(2), i))
        if m := self._SUM.match(expr):
            keys = [k.strip() for k in m.group(1).split(",")]
            grouped: dict[Labels, float] = defaultdict(float)
            for labels, v in self._eval(m.group(2), i).items():
                d = dict(labels)
                grouped[frozenset((k, d.get(k, "")) for k in keys)] += v
            return dict(grouped)
        if m := self._RATE.match(expr):
            window = float(m.group(2)) * (60 if m.group(3) == "m" else 1)
            return self._rate(m.group(1), window, i)
        return dict(self.scrapes[i][1].get(expr, {}))

    def _rate(self, name: str, window: float, i: int) -> dict[Labels, float]:
        t1, now = self.scrapes[i][0], self.scrapes[i][1].get(name, {})
        j = i
        while j > 0 and t1 - self.scrapes[j - 1][0] <= window:
            j -= 1
        t0, then = self.scrapes[j][0], self.scrapes[j][1].get(name, {})
        if t1 <= t0:
            return {}
        return {k: max(0.0, v - then.get(k, 0.0)) / (t1 - t0) for k, v in now.items()}

    @staticmethod
    def _quantile(q: float, buckets: dict[Labels, float]) -> dict[Labels, float]:
        groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        for labels, v in buckets.items():
            d = dict(labels)
            bound = d.pop("le", None)
            if bound is not None:
                groups[frozenset(d.items())].append((float(bound), v))
        out: dict[Labels, float] = {}
        for key, bs in groups.items():
            bs.sort()
            total = bs[-1][1] if bs else 0.0
            if total <= 0:
                continue
            rank, prev_le, prev_c = q * total, 0.0, 0.0
            for le, c in bs:
                if c >= rank:
                    if math.isinf(le):
                        out[key] = prev_le
                    else:
                        frac = (rank - prev_c) / (c - prev_c) if c > prev_c else 1.0
                        out[key] = prev_le + (le - prev_le) * frac
                    break
                prev_le, prev_c = le, c
        return out


def legend(fmt: str, labels: Labels) -> str:
    d = dict(labels)
    return re.sub(r"\{\{(\w+)\}\}", lambda m: d.get(m.group(1), ""), fmt) or "value"


Series = dict[Labels, list[tuple[float, float]]]


def panel_exprs() -> list[str]:
    """Every target expression of the dashboard, in panel order."""
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def render(scrapes: list[Scrape], path: Path, title: str) -> None:
    """The dashboard drawn from our own scrapes with the small evaluator."""
    ev = Evaluator(scrapes)
    render_series({e: ev.series(e) for e in panel_exprs()}, scrapes[0][0], path, title)


def render_series(series: dict[str, Series], t0: float, path: Path, title: str) -> None:
    """The dashboard's grid (3 panels a row) as one PNG, from expression -> series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    rows = math.ceil(len(panels) / 3)
    fig, axes = plt.subplots(rows, 3, figsize=(16, 3.1 * rows))
    scale = {"bytes": (1 / 2**20, "MB"), "s": (1000.0, "ms")}
    for ax, panel in zip(axes.flat, panels, strict=False):
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        k, suffix = scale.get(unit, (1.0, unit))
        for target in panel["targets"]:
            got = series.get(target["expr"], {})
            for labels, pts in sorted(got.items(), key=lambda kv: str(kv[0])):
                if pts:
                    ax.plot(
                        [t - t0 for t, _ in pts],
                        [v * k for _, v in pts],
                        lw=1.2,
                        label=legend(target.get("legendFormat", ""), labels),
                    )
        ax.set_title(panel["title"], fontsize=10)
        ax.set_ylabel(suffix, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


async def _load(base: str, speech: bytes, calls: int, concurrency: int, seed: int) -> None:
    from pipeswitch.bench.soak import one_call

    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)

    async def caller(n: int) -> None:
        async with gate:
            await asyncio.sleep(rng.uniform(0, 2))
            await one_call(base, 10_000 + n, speech, rng.choice([1, 2, 3]), "json-stream")

    async def refused(n: int) -> None:
        await asyncio.sleep(rng.uniform(0, 30))
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(f"{base}/fs/stranger-{n}?domain=unknown{n}.invalid") as ws,
        ):
            async for _ in ws:
                pass

    await asyncio.gather(
        *(caller(n) for n in range(calls)),
        *(refused(n) for n in range(max(1, calls // 4))),
        return_exceptions=True,
    )


async def run_dashboard(args: argparse.Namespace) -> int:
    from pipeswitch.bench.emulators.runner import EmulatorConfig, start_emulator_process
    from pipeswitch.bench.soak import QUESTION, _start_server, _stop_server, _trim

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    emu = await asyncio.to_thread(
        start_emulator_process, EmulatorConfig(llm_script="office", stt_script="office", seed=1)
    )
    proc: subprocess.Popen[bytes] | None = None
    scrapes: list[Scrape] = []
    from_prometheus: dict[str, Series] = {}
    try:
        ns = argparse.Namespace(log_level="WARNING", dialect="json-stream")
        proc, ready = await _start_server(emu.info, ns, out / "dashboard-server.log")
        async with contextlib.AsyncExitStack() as stack:
            prom: RealPrometheus | None = None
            if args.prometheus:
                prom = await stack.enter_async_context(
                    RealPrometheus([f"127.0.0.1:{ready['port']}"], scrape_interval_s=args.interval)
                )
            wall0 = time.time()
            await _load_and_scrape(args, ready, QUESTION, _trim, scrapes, out)
            if prom is not None:
                wall1 = time.time()
                for expr in panel_exprs():
                    from_prometheus[expr] = await prom.query_range(
                        expr, wall0, wall1, args.interval
                    )
                (out / "prometheus-targets.json").write_text(
                    json.dumps(await prom.target_health(), indent=1)
                )
    finally:
        if proc is not None:
            await asyncio.to_thread(_stop_server, proc)
        await asyncio.to_thread(emu.stop)
    load = f"{args.calls} emulated calls, {args.concurrency} at a time"
    if from_prometheus:
        render_series(
            from_prometheus,
            wall0,
            out / "dashboard.png",
            f"Pipeswitch dashboard: the Grafana panels' PromQL answered by Prometheus "
            f"{prometheus_version()}, drawn with matplotlib; {load}",
        )
    else:
        render(
            scrapes,
            out / "dashboard.png",
            f"Pipeswitch dashboard (the Grafana panels' queries, our own evaluator): {load}",
        )
    print(f"{len(scrapes)} scrapes; {out / 'dashboard.png'}, {out / 'metrics-scrape.txt'}")
    return 0


async def _load_and_scrape(
    args: argparse.Namespace,
    ready: dict[str, Any],
    question: str,
    trim: Callable[[bytes], bytes],
    scrapes: list[Scrape],
    out: Path,
) -> None:
    """Run the load; scrape ``/metrics`` ourselves too (the fallback and the saved scrape)."""
    base = f"ws://127.0.0.1:{ready['port']}"
    metrics_url = f"http://127.0.0.1:{ready['port']}/metrics"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{ready['piper_url'].split('?')[0]}?rate=8000", json={"text": question}
        ) as r:
            speech = trim((await r.read())[44:])
        load = asyncio.create_task(_load(base, speech, args.calls, args.concurrency, args.seed))
        last_text = ""
        tail = int(args.tail / args.interval)
        while tail > 0:
            async with http.get(metrics_url) as r:
                last_text = await r.text()
                scrapes.append((time.monotonic(), parse_scrape(last_text)))
            if load.done():
                tail -= 1
            await asyncio.sleep(args.interval)
        (out / "metrics-scrape.txt").write_text(last_text)


def prometheus_version() -> str:
    """``prometheus --version``'s version word."""
    done = subprocess.run(["prometheus", "--version"], capture_output=True, text=True, timeout=30)
    words = (done.stdout or done.stderr).split()
    return words[2] if len(words) > 2 else "?"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeswitch.bench.dashboard", description=__doc__)
    p.add_argument("--calls", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--tail", type=float, default=10.0, help="seconds of scrapes after the load")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "dashboard")
    p.add_argument(
        "--prometheus",
        action=argparse.BooleanOptionalAction,
        default=prometheus_available(),
        help="scrape with a real Prometheus (Debian's package) and draw its answers "
        "(default: when installed)",
    )
    asyncio.run(run_dashboard(p.parse_args(argv)))


if __name__ == "__main__":
    main()
