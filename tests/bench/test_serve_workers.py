"""``bench … --workers N`` drives N server processes on one port, as ``serve --workers N``."""

from __future__ import annotations

import asyncio
import json

from pipeswitch.bench.emulators.runner import EmulatorConfig, run_emulators
from pipeswitch.bench.serve import merge_health, tenant_overrides
from pipeswitch.bench.servers import ProcessGroup, ServerProcess
from pipeswitch.transports.handoff import MARGIN
from tests.e2e.helpers import open_call, wait_for_bot_audio


def test_tenant_overrides_parse_json_values() -> None:
    got = tenant_overrides("turns.speculate=false, providers.stt=deepgram-flux")
    assert got == {"turns": {"speculate": False}, "providers": {"stt": "deepgram-flux"}}


def test_merged_health_sums_calls_and_keeps_the_worst_loop() -> None:
    a = {"pid": 1, "calls_total": 3, "calls_active": 1, "loop_lag_ms": {"p99": 4.0, "max": 9.0}}
    b = {"pid": 2, "calls_total": 2, "calls_active": 2, "loop_lag_ms": {"p99": 7.0, "max": 8.0}}
    a["speculation"] = {"started": 2, "wasted": 1}
    b["speculation"] = {"started": 1, "wasted": 0}
    a["gc_ms"] = {"gen2": {"count": 1, "total_ms": 5.0, "p99_ms": 5.0, "max_ms": 5.0}}
    b["gc_ms"] = {"gen2": {"count": 0, "total_ms": 0.0, "idle_count": 2}}
    m = merge_health([a, b])
    assert (m["calls_total"], m["calls_active"]) == (5, 3)
    assert m["loop_lag_ms"] == {"p99": 7.0, "max": 9.0}
    assert m["speculation"] == {"started": 3, "wasted": 1}
    assert m["gc_ms"]["gen2"]["max_ms"] == 5.0
    assert (m["gc_ms"]["gen2"]["count"], m["gc_ms"]["gen2"]["idle_count"]) == (1, 2)
    assert [w["pid"] for w in m["workers"]] == [1, 2]


async def test_two_workers_share_a_port_and_report_each() -> None:
    async with run_emulators(EmulatorConfig(seed=1)) as emu:
        urls = {"deepgram_url": emu.deepgram_url, "groq_base_url": emu.groq_base_url}
        server = ServerProcess("pipeswitch", urls, workers=2, start_timeout_s=180.0)
        info = await server.start()
        try:
            assert len(info.worker_pids) == 2 and info.pid not in info.worker_pids
            procs = server.processes()
            assert isinstance(procs["server"], ProcessGroup)
            assert {"worker0", "worker1"} <= set(procs)
            streams = []
            for i in range(6):  # the kernel spreads them, the busier worker hands some over
                url = f"{server.url_base}/fs/w-{i}?rate=8000&mix=mono&domain=default"
                streams.append(await open_call(url, 8000, "json-stream"))
            for s in streams:
                assert await wait_for_bot_audio(s, 0.0, timeout_s=10.0) is not None
            health = await server.get("/bench/health")
            for s in streams:
                await s.hangup()
            for _ in range(50):  # each worker files its calls' records once they end
                calls = await server.get("/bench/calls")
                if len(calls["calls"]) == 6:
                    break
                await asyncio.sleep(0.1)
        finally:
            await server.stop()
    assert len(health["workers"]) == 2
    assert health["calls_total"] == 6
    per_worker = [w["calls_total"] for w in health["workers"]]
    assert sum(per_worker) == 6
    # Evened out at accept: a worker 2 ahead of the other hands the next call over, so
    # they are never more than 2 apart (6 calls, whatever the hash did).
    assert max(per_worker) - min(per_worker) <= MARGIN, per_worker
    assert all(w["handoffs"] is not None for w in health["workers"])
    assert len(calls["calls"]) == 6
    json.dumps(health)  # JSON all the way (results.json keeps it)
