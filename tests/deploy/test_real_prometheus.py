"""The shipped Prometheus config and the Grafana dashboard's PromQL, on a real Prometheus.

Debian's ``prometheus`` package (``.ci/run`` installs it) scrapes a running Pipeswitch while it
answers a call; every panel's expression must then be accepted by the real engine, and the
panels an operator looks at first must have data. ``promtool`` checks the Compose config.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import pytest

from pipeswitch.bench import prometheus
from pipeswitch.bench.prometheus import RealPrometheus
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet, wait_for_bot_audio

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(autouse=True)
def _needs_prometheus() -> None:
    if not prometheus.available():
        pytest.fail("prometheus is missing: apt-get install -y prometheus (.ci/run does)")


def test_promtool_accepts_the_compose_prometheus_config() -> None:
    done = prometheus.promtool_check_config(DEPLOY / "prometheus" / "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check above can fail: a config with a bad scrape interval is refused."""
    bad = tmp_path / "prometheus.yml"
    bad.write_text("global:\n  scrape_interval: soon\n")
    assert prometheus.promtool_check_config(bad).returncode != 0


async def test_every_dashboard_panel_runs_on_real_prometheus(served: Served) -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "pipeswitch.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    target = f"127.0.0.1:{served.app.port}"
    async with RealPrometheus([target], scrape_interval_s=0.5) as prom:
        rate = 8000
        speech = await served.speech(QUESTION, rate)
        # Two calls: a labelled series is born at its first observation, and rate() sees only
        # increases after that (as on a live server, where traffic never stops).
        for n in range(2):
            stream = await open_call(served.url(uuid=f"prometheus-call-{n}"), rate, "json-stream")
            try:
                assert await wait_for_bot_audio(stream, stream.events[0].t - 1.0, 3.0) is not None
                await wait_bot_quiet(stream)
                _, answer = await ask(stream, speech, rate)
                assert answer is not None
                await wait_bot_quiet(stream)
            finally:
                await stream.hangup()
        # Enough scrapes after the call for rate() over [1m] to see it.
        deadline = time.monotonic() + 20.0
        while await prom.scrapes_of() < 8:
            assert time.monotonic() < deadline, prom.log()
            await asyncio.sleep(0.5)
        health = await prom.target_health()
        assert [(t["health"], t["lastError"]) for t in health] == [("up", "")]
        results = {}
        for expr in exprs:  # a PromQL error raises PrometheusError with the engine's message
            results[expr] = await prom.query(expr)
        # The first panels an operator reads have data after one answered call.
        started = await prom.query('sum(pipeswitch_calls_started_total{tenant="default"})')
        assert sum(started.values()) >= 1
        for expr in exprs:
            if any(
                name in expr
                for name in (
                    "pipeswitch_turn_latency_seconds_bucket",
                    "pipeswitch_greeting_seconds_bucket",
                    "pipeswitch_upgrade_seconds_bucket",
                    "pipeswitch_process_resident_memory_bytes",
                    "pipeswitch_calls_started_total",
                )
            ):
                assert any(math.isfinite(v) for v in results[expr].values()), expr
        rss = await prom.query("max(pipeswitch_process_resident_memory_bytes)")
        assert 50e6 < max(rss.values()) < 4e9
        end = time.time()
        series = await prom.query_range(
            "histogram_quantile(0.5, sum by (le) "
            "(rate(pipeswitch_turn_latency_seconds_bucket[1m])))",
            end - 10,
            end,
            1.0,
        )
        p50 = [v for pts in series.values() for _, v in pts]
        assert p50 and 0.05 < max(p50) < 5.0  # seconds: a turn latency, not a unit slip
