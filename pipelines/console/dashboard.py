"""Dashboard numbers, read from the same Prometheus exposition ``/metrics`` serves.

No counter of its own: :func:`pipeswitch.transports.metrics.render` is what a scrape gets
(summed over ``serve --workers N`` through the multiprocess collector), parsed back and
filtered to the domain's tenant label. Percentiles come from the turn-latency histogram the
way PromQL's ``histogram_quantile`` computes them (linear inside the bucket).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from pipeswitch.transports import metrics


@dataclass
class DomainNumbers:
    """What the dashboard shows for one domain (and the server-wide provider errors)."""

    calls_active: float = 0.0
    calls_started: float = 0.0
    calls_refused: dict[str, float] = field(default_factory=dict)
    calls_failed: dict[str, float] = field(default_factory=dict)
    turns: float = 0.0
    latency_p50: float | None = None
    latency_p95: float | None = None
    latency_p99: float | None = None
    greeting_p50: float | None = None
    provider_errors: dict[str, float] = field(default_factory=dict)
    provider_ttfb_p50: dict[str, float] = field(default_factory=dict)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """PromQL's estimate from cumulative bucket counts (``le`` -> count)."""
    if not buckets:
        return None
    les = sorted(buckets)
    total = buckets[les[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le in les:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return prev_le  # in the +Inf bucket: the highest finite bound
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


async def domain_numbers(tenant_name: str) -> DomainNumbers:
    """The domain's numbers as ``/metrics`` exposes them right now."""
    body, _ = await metrics.render()
    return parse_numbers(body.decode("utf-8", "replace"), tenant_name.lower())


def parse_numbers(text: str, tenant: str) -> DomainNumbers:
    out = DomainNumbers()
    latency: dict[float, float] = defaultdict(float)
    greeting: dict[float, float] = defaultdict(float)
    ttfb: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            mine = labels.get("tenant") == tenant
            name = s.name
            if name == "pipeswitch_calls_active" and mine:
                out.calls_active += s.value
            elif name == "pipeswitch_calls_started_total" and mine:
                out.calls_started += s.value
            elif name == "pipeswitch_calls_refused_total" and mine:
                out.calls_refused[labels["reason"]] = s.value
            elif name == "pipeswitch_calls_failed_total" and mine:
                key = labels["reason"]
                out.calls_failed[key] = out.calls_failed.get(key, 0.0) + s.value
            elif name == "pipeswitch_turn_latency_seconds_bucket" and mine:
                latency[float(labels["le"])] += s.value
            elif name == "pipeswitch_greeting_seconds_bucket" and mine:
                greeting[float(labels["le"])] += s.value
            elif name == "pipeswitch_provider_errors_total":
                out.provider_errors[labels["provider"]] = s.value
            elif name == "pipeswitch_provider_ttfb_seconds_bucket":
                ttfb[labels["provider"]][float(labels["le"])] += s.value
    if latency:
        out.turns = latency.get(math.inf, 0.0)
        out.latency_p50 = histogram_quantile(0.5, latency)
        out.latency_p95 = histogram_quantile(0.95, latency)
        out.latency_p99 = histogram_quantile(0.99, latency)
    out.greeting_p50 = histogram_quantile(0.5, greeting)
    for provider, b in ttfb.items():
        p = histogram_quantile(0.5, b)
        if p is not None:
            out.provider_ttfb_p50[provider] = p
    return out
