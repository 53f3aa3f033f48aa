"""The dashboard renderer's PromQL subset computes what Prometheus would."""

from __future__ import annotations

import pytest

from pipeswitch.bench.dashboard import Evaluator, parse_scrape

SCRAPE_0 = """
# TYPE x_seconds histogram
x_seconds_bucket{le="0.5",tenant="a"} 0
x_seconds_bucket{le="1.0",tenant="a"} 0
x_seconds_bucket{le="+Inf",tenant="a"} 0
x_seconds_count{tenant="a"} 0
x_seconds_sum{tenant="a"} 0
# TYPE c counter
c_total{tenant="a"} 10
c_total{tenant="b"} 0
"""
SCRAPE_1 = """
# TYPE x_seconds histogram
x_seconds_bucket{le="0.5",tenant="a"} 50
x_seconds_bucket{le="1.0",tenant="a"} 100
x_seconds_bucket{le="+Inf",tenant="a"} 100
x_seconds_count{tenant="a"} 100
x_seconds_sum{tenant="a"} 60
# TYPE c counter
c_total{tenant="a"} 70
c_total{tenant="b"} 30
"""


def test_rate_sum_and_quantile() -> None:
    ev = Evaluator([(0.0, parse_scrape(SCRAPE_0)), (60.0, parse_scrape(SCRAPE_1))])
    rates = ev.series("sum by (tenant) (rate(c_total[1m]))")
    assert rates[frozenset({("tenant", "a")})][-1][1] == pytest.approx(1.0)
    assert rates[frozenset({("tenant", "b")})][-1][1] == pytest.approx(0.5)
    total = ev.series("sum by (le) (rate(x_seconds_bucket[1m]))")
    assert len(total) == 3
    p50 = ev.series("histogram_quantile(0.5, sum by (le) (rate(x_seconds_bucket[1m])))")
    assert p50[frozenset()][-1][1] == pytest.approx(0.5)
    p75 = ev.series("histogram_quantile(0.75, sum by (le) (rate(x_seconds_bucket[1m])))")
    assert p75[frozenset()][-1][1] == pytest.approx(0.75)  # linear inside (0.5, 1.0]
