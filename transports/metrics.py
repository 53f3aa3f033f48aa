"""Prometheus metrics for the media server (``GET /metrics``, text exposition format).

Operators scrape one address per host or pod; ``serve --workers N`` runs N processes on
one port, so a scrape lands on any one of them. With ``PROMETHEUS_MULTIPROC_DIR`` set
(the ``--workers`` parent sets it for its children) every process writes its samples to
that directory and whichever worker answers the scrape aggregates all of them:
counters and histograms are summed, ``calls_active`` is summed over the live workers,
and RSS/CPU keep one series per worker (``pid`` label).

Labels are bounded: the tenant (capped, see :class:`TenantLabels`), the pipeline kind,
a reason from a fixed vocabulary, a provider's service class name. Never a call id.

This module knows no provider: TTFB and errors are read from Pipecat's own
``MetricsFrame``/``ErrorFrame`` by :class:`ProviderMetricsObserver`, labelled with the
emitting processor's class name (``DeepgramSTTService``, ``PiperHttpTTSService``...).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import aiohttp
from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    ErrorFrame,
    InterruptionFrame,
    MetricsFrame,
    VADUserStartedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.observers.base_observer import BaseObserver, FramePushed
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"

# Turn latencies are ~0.4-1.5 s; barge-in and upgrades are tens of ms; lag is ms.
_LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
_FAST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

CALLS_ACTIVE = Gauge(
    "pipeswitch_calls_active",
    "Calls in progress (summed over live workers).",
    ["tenant", "pipeline"],
    multiprocess_mode="livesum",
)
CALLS_STARTED = Counter(
    "pipeswitch_calls_started", "Calls accepted and handed to a pipeline.", ["tenant", "pipeline"]
)
CALLS_REFUSED = Counter(
    "pipeswitch_calls_refused",
    "Connections refused before a pipeline ran (reason: bad_url, capacity, unknown_tenant, ...).",
    ["tenant", "reason"],
)
HANDSHAKES_REAPED = Counter(
    "pipeswitch_handshakes_reaped",
    "Connections closed before any request (reason: headers not complete in time, too many "
    "connections before a request from one peer): slow-loris sockets.",
    ["reason"],
)
CALLS_FAILED = Counter(
    "pipeswitch_calls_failed",
    "Calls that ended on an error (reason: exception, pipeline_unavailable, provider_error...).",
    ["tenant", "pipeline", "reason"],
)
TURN_LATENCY = Histogram(
    "pipeswitch_turn_latency_seconds",
    "Caller's end of speech to the bot's first audio, per turn (Pipecat's latency observer).",
    ["tenant", "pipeline"],
    buckets=_LATENCY_BUCKETS,
)
BARGE_IN_STOP = Histogram(
    "pipeswitch_barge_in_stop_seconds",
    "VAD speech start while the bot speaks to the interruption reaching the output transport.",
    ["tenant"],
    buckets=_FAST_BUCKETS,
)
GREETING = Histogram(
    "pipeswitch_greeting_seconds",
    "Call accepted to the greeting starting to play.",
    ["tenant"],
    buckets=_FAST_BUCKETS + (3.0, 5.0),
)
UPGRADE = Histogram(
    "pipeswitch_upgrade_seconds",
    "HTTP request received to the WebSocket 101 sent (libwsc gives it 1 s).",
    buckets=_FAST_BUCKETS,
)
TURN_SPECULATIONS = Counter(
    "pipeswitch_turn_speculations",
    "Speculative LLM starts before the caller's turn was certain (outcome: started, "
    "confirmed by the turn end, wasted = withdrawn, its LLM work discarded).",
    ["tenant", "outcome"],
)
PROVIDER_TTFB = Histogram(
    "pipeswitch_provider_ttfb_seconds",
    "Time to first byte reported by a provider service (Pipecat TTFBMetricsData).",
    ["provider"],
    buckets=_LATENCY_BUCKETS,
)
PROVIDER_ERRORS = Counter(
    "pipeswitch_provider_errors", "ErrorFrames pushed by a provider service.", ["provider"]
)
PLAYBACK_UNDERRUNS = Counter(
    "pipeswitch_playback_underruns",
    "Times the far end ran dry in the middle of a bot utterance.",
    ["tenant"],
)
LOOP_LAG = Histogram(
    "pipeswitch_event_loop_lag_seconds",
    "How late the event loop woke a sampler timer (a blocked loop delays every call's audio).",
    buckets=_LAG_BUCKETS,
)
GC_PAUSE = Histogram(
    "pipeswitch_gc_pause_seconds",
    "Full garbage collections the server runs: hourly while calls are up, and when the "
    "last call ends (the event loop waits).",
    buckets=_LAG_BUCKETS,
)
PROCESS_RSS = Gauge(
    "pipeswitch_process_resident_memory_bytes",
    "Resident memory of each server process.",
    multiprocess_mode="liveall",
)
PROCESS_CPU = Gauge(
    "pipeswitch_process_cpu_seconds",
    "CPU seconds (user+system) used by each server process.",
    multiprocess_mode="liveall",
)


class TenantLabels:
    """Maps tenant names to label values, at most ``limit`` distinct ones per process.

    A fleet may serve thousands of domains; Prometheus must not get a series per domain
    forever. The first ``limit`` tenants seen keep their name, later ones are ``other``.
    """

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant: str | None) -> str:
        if not tenant:
            return "-"
        if tenant in self._seen:
            return tenant
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(tenant)
                return tenant
        return OTHER


tenant_label = TenantLabels(int(os.environ.get("PIPESWITCH_METRICS_MAX_TENANTS", "100")))


def multiprocess_dir() -> str | None:
    """The shared sample directory when this process is one of several workers."""
    return os.environ.get(MULTIPROC_ENV) or None


def call_started(tenant: str, pipeline: str) -> None:
    """A call was accepted and handed to its pipeline."""
    t = tenant_label(tenant)
    CALLS_STARTED.labels(t, pipeline).inc()
    CALLS_ACTIVE.labels(t, pipeline).inc()


def call_ended(tenant: str, pipeline: str) -> None:
    """A call started with :func:`call_started` is over."""
    CALLS_ACTIVE.labels(tenant_label(tenant), pipeline).dec()


def handshake_reaped(reason: str) -> None:
    """A connection was closed before its first request (transports/handshake.py)."""
    HANDSHAKES_REAPED.labels(reason).inc()


def call_refused(reason: str, tenant: str | None = None) -> None:
    """A connection was refused (the tenant only when it resolved: domains are caller input)."""
    CALLS_REFUSED.labels(tenant_label(tenant), reason).inc()


def call_failed(tenant: str, pipeline: str, reason: str) -> None:
    """A call ended on an error; ``reason`` comes from a fixed vocabulary."""
    CALLS_FAILED.labels(tenant_label(tenant), pipeline, reason).inc()


def turn_speculation(tenant: str, outcome: str) -> None:
    """One speculative end of turn started, confirmed or wasted (turn-taking's counter)."""
    TURN_SPECULATIONS.labels(tenant_label(tenant), outcome).inc()


def provider_name(processor: object) -> str:
    """A bounded label for a processor: its class name (``DeepgramSTTService``)."""
    if processor is None:
        return "unknown"
    if isinstance(processor, str):
        return processor.split("#", 1)[0] or "unknown"
    return type(processor).__name__


class ProviderMetricsObserver(BaseObserver):
    """Feeds provider TTFB/errors and barge-in timing from one call's frames.

    Sees each frame once (``observe_every_push=False``) and only looks at a handful of
    rare frame types, so it adds nothing measurable to the 20 ms audio path.
    """

    _TYPES = (
        MetricsFrame,
        ErrorFrame,
        VADUserStartedSpeakingFrame,
        BotStartedSpeakingFrame,
        BotStoppedSpeakingFrame,
        InterruptionFrame,
    )

    def __init__(self, tenant: str, **kwargs: Any) -> None:
        super().__init__(observe_every_push=False, **kwargs)
        self._tenant = tenant_label(tenant)
        self._bot_speaking = False
        self._user_started: float | None = None
        self.errors = 0

    async def on_push_frame(self, data: FramePushed) -> None:
        frame = data.frame
        if not isinstance(frame, self._TYPES):
            return
        if isinstance(frame, MetricsFrame):
            for m in frame.data:
                if isinstance(m, TTFBMetricsData) and m.value > 0:
                    PROVIDER_TTFB.labels(provider_name(m.processor)).observe(m.value)
        elif isinstance(frame, ErrorFrame):
            self.errors += 1
            PROVIDER_ERRORS.labels(provider_name(frame.processor or data.source)).inc()
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._user_started = time.monotonic() if self._bot_speaking else None
        elif isinstance(frame, InterruptionFrame) and self._user_started is not None:
            BARGE_IN_STOP.labels(self._tenant).observe(time.monotonic() - self._user_started)
            self._user_started = None


# -- process samples ----------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RuntimeSampler:
    """A small task measuring event-loop lag every ``interval`` and RSS/CPU every few s."""

    def __init__(self, interval: float = 0.25, process_every: float = 5.0) -> None:
        self.interval = interval
        self.process_every = process_every
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="metrics-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def sample_process(self) -> None:
        PROCESS_RSS.set(_rss_bytes())
        t = os.times()
        PROCESS_CPU.set(t.user + t.system)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_process = 0.0
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.interval)
            LOOP_LAG.observe(max(0.0, loop.time() - t0 - self.interval))
            if t0 - last_process >= self.process_every:
                last_process = t0
                self.sample_process()


# -- exposition ---------------------------------------------------------------------------

ExternalSource = Callable[[], Awaitable[Iterable[Metric]]]
_external: list[ExternalSource] = []


def add_external_source(source: ExternalSource) -> None:
    """Register a coroutine that returns extra metric families at scrape time.

    Used for state that lives outside this process (the local model servers' queues):
    whichever worker answers the scrape asks for it once.
    """
    _external.append(source)


def remove_external_source(source: ExternalSource) -> None:
    if source in _external:
        _external.remove(source)


class _Static(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


async def render() -> tuple[bytes, str]:
    """The scrape body and its content type, aggregated over workers when there are several."""
    families: list[Metric] = []
    for source in list(_external):
        try:
            families.extend(await source())
        except Exception as exc:  # an unreachable model server must not fail the scrape
            logger.debug("metrics source failed: {}", exc)
    path = multiprocess_dir()
    if path:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        PROCESS_RSS.set(_rss_bytes())  # this worker at least is fresh
    else:
        registry = REGISTRY
    body = generate_latest(registry)
    if families:
        extra = CollectorRegistry()
        extra.register(_Static(families))
        body += generate_latest(extra)
    return body, CONTENT_TYPE_LATEST


def model_queue_families(stats: dict[str, dict[str, Any]]) -> list[Metric]:
    """Gauges for local model servers' queues from their JSON ``/metrics``."""
    depth = GaugeMetricFamily(
        "pipeswitch_local_model_queue_depth",
        "Requests waiting for a local model.",
        labels=["model"],
    )
    waits = CounterMetricFamily(
        "pipeswitch_local_model_queue_waits",
        "Requests that had to wait for a local model (since the model server started).",
        labels=["model"],
    )
    wait_secs = CounterMetricFamily(
        "pipeswitch_local_model_queue_wait_seconds",
        "Total seconds requests waited for a local model (since the model server started).",
        labels=["model"],
    )
    for model, s in sorted(stats.items()):
        depth.add_metric([model], float(s.get("queue_depth", s.get("waiting", 0)) or 0))
        waits.add_metric([model], float(s.get("queue_waits", 0) or 0))
        wait_secs.add_metric([model], float(s.get("queue_wait_seconds", 0.0) or 0.0))
    return [depth, waits, wait_secs]


def model_queue_source(
    http: aiohttp.ClientSession, roots: dict[str, str], api_key: str
) -> ExternalSource:
    """A scrape-time source reading each local model server's JSON ``/metrics``."""

    async def fetch(model: str, root: str) -> tuple[str, dict[str, Any] | None]:
        try:
            async with http.get(
                f"{root}/metrics",
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=aiohttp.ClientTimeout(total=1.0),
            ) as r:
                if r.status != 200:
                    return model, None
                body = await r.json()
                return model, body if isinstance(body, dict) else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return model, None

    async def source() -> list[Metric]:
        got = await asyncio.gather(*(fetch(m, r) for m, r in roots.items() if r))
        return model_queue_families({m: s for m, s in got if s is not None})

    return source
