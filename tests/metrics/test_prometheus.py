"""``/metrics`` speaks Prometheus: a real call moves the counters, labels stay bounded,
and ``--workers`` processes are summed through the multiprocess directory."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    MetricsFrame,
    VADUserStartedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.observers.base_observer import FramePushed
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from prometheus_client.parser import text_string_to_metric_families

from pipeswitch.transports import metrics
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet, wait_for_bot_audio


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by (name, labels)."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(
    scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in scrape.items() if n == name and want <= set(ls))


async def scrape(served: Served) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with served.http.get(f"http://127.0.0.1:{served.app.port}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return samples(await r.text())


def test_tenant_labels_are_capped() -> None:
    labels = metrics.TenantLabels(limit=3)
    assert [labels(f"t{i}") for i in range(5)] == ["t0", "t1", "t2", "other", "other"]
    assert labels("t1") == "t1" and labels(None) == "-"


async def test_observer_reads_pipecat_frames() -> None:
    """TTFB and errors are labelled by the emitting service's class, never by call."""

    class FakeProviderSTTService(FrameProcessor):  # a real processor, named like a service
        pass

    obs = metrics.ProviderMetricsObserver("observer.test")
    src = FakeProviderSTTService()
    before = samples(metrics.generate_latest(metrics.REGISTRY).decode())

    def pushed(frame: Frame) -> FramePushed:
        return FramePushed(
            source=src,
            destination=src,
            frame=frame,
            direction=FrameDirection.DOWNSTREAM,
            timestamp=0,
        )

    await obs.on_push_frame(
        pushed(MetricsFrame(data=[TTFBMetricsData(processor=src.name, value=0.25)]))
    )
    await obs.on_push_frame(pushed(ErrorFrame(error="boom", processor=src)))
    await obs.on_push_frame(pushed(BotStartedSpeakingFrame()))
    await obs.on_push_frame(pushed(VADUserStartedSpeakingFrame()))
    await obs.on_push_frame(pushed(InterruptionFrame()))
    after = samples(metrics.generate_latest(metrics.REGISTRY).decode())
    name = "FakeProviderSTTService"
    for key, delta in (
        (("pipeswitch_provider_ttfb_seconds_count", {"provider": name}), 1),
        (("pipeswitch_provider_ttfb_seconds_sum", {"provider": name}), 0.25),
        (("pipeswitch_provider_errors_total", {"provider": name}), 1),
        (("pipeswitch_barge_in_stop_seconds_count", {"tenant": "observer.test"}), 1),
    ):
        n, ls = key
        assert value(after, n, **ls) - value(before, n, **ls) == pytest.approx(delta)


async def test_a_call_moves_the_counters(served: Served) -> None:
    before = await scrape(served)
    full_collections = gc.get_stats()[2]["collections"]
    rate = 8000
    speech = await served.speech(QUESTION, rate)
    stream = await open_call(served.url(uuid="metrics-call-1"), rate, "json-stream")
    try:
        assert await wait_for_bot_audio(stream, stream.events[0].t - 1.0, 3.0) is not None
        await wait_bot_quiet(stream)
        _, answer = await ask(stream, speech, rate)
        assert answer is not None
        mid = await scrape(served)
        assert value(mid, "pipeswitch_calls_active", tenant="default") >= 1
        await wait_bot_quiet(stream)
    finally:
        await stream.hangup()
    # The last call's cycles are collected as soon as the server is idle (bench soak: left to
    # the thresholds they pile up across calls and raise RSS and held sockets in steps).
    for _ in range(50):
        if not served.app.sessions or not served.app.sessions.active:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)
    assert gc.get_stats()[2]["collections"] > full_collections
    # A refused call: the tenant label is never the caller-supplied domain.
    async with served.http.ws_connect(served.url(domain="nobody.example", uuid="refused")) as bad:
        async for _ in bad:
            pass
        assert bad.close_code == 1008
    after = await scrape(served)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("pipeswitch_calls_started_total", tenant="default", pipeline="cascade") == 1
    assert delta("pipeswitch_turn_latency_seconds_count", tenant="default") >= 1
    assert delta("pipeswitch_greeting_seconds_count", tenant="default") == 1
    assert delta("pipeswitch_upgrade_seconds_count") >= 2
    assert delta("pipeswitch_calls_refused_total", reason="unknown_tenant") == 1
    assert delta("pipeswitch_provider_ttfb_seconds_count") >= 2  # STT and LLM at least
    assert value(after, "pipeswitch_event_loop_lag_seconds_count") > 0
    assert value(after, "pipeswitch_process_resident_memory_bytes") > 10e6
    assert not any("metrics-call-1" in str(k) for k in after), "a call id became a label"
    assert not any("nobody.example" in str(k) for k in after), "a caller's domain became a label"
    # The JSON counters the bench used stay at /metrics.json.
    async with served.http.get(f"http://127.0.0.1:{served.app.port}/metrics.json") as r:
        assert (await r.json())["calls_total"] >= 1


_CHILD = textwrap.dedent(
    """
    import sys
    from pipeswitch.transports import metrics
    metrics.call_started("acme", "cascade")
    metrics.TURN_LATENCY.labels("acme", "cascade").observe(0.5)
    if sys.argv[1] == "stay":
        metrics.PROCESS_RSS.set(123)
        print("up", flush=True)
        sys.stdin.read()  # alive until the test closes stdin
    """
)


def test_workers_are_summed(tmp_path: Path) -> None:
    """Two worker processes write samples; any process with the directory serves the sum."""
    env = {**os.environ, metrics.MULTIPROC_ENV: str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _CHILD, "exit"], env=env, timeout=60)
    assert done.returncode == 0
    alive = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "stay"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert alive.stdout is not None and alive.stdout.readline().strip() == b"up"
        # The finished worker is reaped by the parent: its live gauges go.
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(
            done_pid := _pid_of_files(tmp_path, exclude=alive.pid), str(tmp_path)
        )
        reader = subprocess.run(
            [
                sys.executable,
                "-c",
                "import asyncio, sys; from pipeswitch.transports import metrics; "
                "sys.stdout.write(asyncio.run(metrics.render())[0].decode())",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert reader.returncode == 0, reader.stderr
        got = samples(reader.stdout)
        assert value(got, "pipeswitch_calls_started_total", tenant="acme") == 2
        assert value(got, "pipeswitch_turn_latency_seconds_count", tenant="acme") == 2
        assert value(got, "pipeswitch_calls_active", tenant="acme") == 1  # only the live one
        rss = {
            dict(ls).get("pid"): v
            for (n, ls), v in got.items()
            if n == "pipeswitch_process_resident_memory_bytes"
        }
        assert rss.get(str(alive.pid)) == 123 and str(done_pid) not in rss
    finally:
        assert alive.stdin is not None
        alive.stdin.close()
        alive.wait(timeout=30)


def _pid_of_files(path: Path, exclude: int) -> int:
    pids = {
        int(p.stem.rsplit("_", 1)[1])
        for p in path.glob("*.db")
        if p.stem.rsplit("_", 1)[1].isdigit()
    }
    pids.discard(exclude)
    assert len(pids) == 1, pids
    return pids.pop()


async def test_ended_calls_are_collected_while_other_calls_run(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A never-idle server: every so many ended calls (the product's 256; the rule is the
    same at 2) their leftovers are collected while another call stays up."""
    import pipeswitch.pipelines.collector as collector

    monkeypatch.setattr(collector, "COLLECT_EVERY_CALLS", 2)
    monkeypatch.setattr(collector, "COLLECT_INTERVAL_SECS", 1e9)
    monkeypatch.setattr(collector, "CHECK_SECS", 0.05)
    assert served.app.sessions is not None
    keep = await open_call(served.url(uuid="gc-count-busy"), 8000, "json-stream")
    try:
        for _ in range(50):
            if "gc-count-busy" in served.app.sessions.active:
                break
            await asyncio.sleep(0.05)
        before = served.app.collector.collections
        for n in range(2):
            short = await open_call(served.url(uuid=f"gc-count-{n}"), 8000, "json-stream")
            await asyncio.sleep(0.3)
            await short.hangup()
            for _ in range(50):
                if f"gc-count-{n}" not in served.app.sessions.active:
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert "gc-count-busy" in served.app.sessions.active, "the server went idle"
        assert served.app.collector.collections == before + 1
    finally:
        await keep.hangup()


async def test_cycles_are_collected_on_a_clock_while_calls_run(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server under continuous load is never idle: while a call is up, automatic
    collection is paused and full collections come on the collector's clock (the
    product's period is an hour; the rule is the same at 0.3 s), each one timed into the
    GC pause histogram; when the last call ends automatic collection is back on."""
    import pipeswitch.pipelines.collector as collector

    monkeypatch.setattr(collector, "COLLECT_INTERVAL_SECS", 0.3)
    monkeypatch.setattr(collector, "CHECK_SECS", 0.05)
    assert served.app.sessions is not None
    for _ in range(60):  # an earlier test's calls may still be winding down
        if not served.app.sessions.active and not served.app.collector.paused:
            break
        await asyncio.sleep(0.05)
    gc.enable()
    keep = await open_call(served.url(uuid="gc-keeps-busy"), 8000, "json-stream")
    try:
        for _ in range(50):
            if "gc-keeps-busy" in served.app.sessions.active and served.app.collector.paused:
                break
            await asyncio.sleep(0.05)
        assert served.app.collector.paused and not gc.isenabled(), "automatic GC not paused"
        before = gc.get_stats()[2]["collections"]
        paused = metrics.GC_PAUSE._sum.get()
        periodic = served.app.collector.collections
        await asyncio.sleep(1.0)
        assert "gc-keeps-busy" in served.app.sessions.active, "the server went idle"
        assert served.app.collector.collections >= periodic + 2
        assert gc.get_stats()[2]["collections"] >= before + 2, "no full collection under load"
        assert metrics.GC_PAUSE._sum.get() > paused
    finally:
        await keep.hangup()
    for _ in range(60):
        if not served.app.sessions.active and gc.isenabled():
            break
        await asyncio.sleep(0.05)
    assert gc.isenabled() and not served.app.collector.paused
