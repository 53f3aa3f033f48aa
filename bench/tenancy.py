"""Tenancy figures: tenant resolution (cached, cold, after an invalidation), call-record
throughput and its cost on the event loop that carries the audio, and outage behaviour.

    .venv/bin/python -m pipeswitch.bench.tenancy [--dsn postgresql://...] [--redis redis://...]

Creates a scratch database ``pipeswitch_bench_<pid>`` next to the DSN's and drops it after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import uuid as uuidlib
from typing import Any

import asyncpg

from pipeswitch.config.call_state import RedisCallState
from pipeswitch.config.db import SecretBox, connect, create_pool, generate_key, migrate
from pipeswitch.config.loaders import TenantResolver
from pipeswitch.config.pg_loader import PgTenantLoader
from pipeswitch.config.records import RecordWriter, call_rows
from pipeswitch.config.tenant_store import AgentFields, TenantStore
from pipeswitch.config.tenants import Tenant


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def summary(xs: list[float], unit_scale: float = 1e3) -> dict[str, float]:
    """p50/p99/max in ms (unit_scale 1e3) or µs (1e6)."""
    return {
        "p50": round(pct(xs, 50) * unit_scale, 3),
        "p99": round(pct(xs, 99) * unit_scale, 3),
        "max": round(max(xs) * unit_scale, 3),
        "n": len(xs),
    }


class LoopLag:
    """Event-loop lag sampler: what a 20 ms audio frame would wait behind other work."""

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.period)
            self.lags.append(max(0.0, loop.time() - t - self.period))

    def __enter__(self) -> LoopLag:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()


async def bench(
    dsn_base: str, redis_url: str, domains: int, calls: int, turns: int
) -> dict[str, Any]:
    name = f"pipeswitch_bench_{os.getpid()}"
    admin = await asyncpg.connect(dsn_base)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = dsn_base.rsplit("/", 1)[0] + "/" + name
    out: dict[str, Any] = {}
    try:
        conn = await connect(dsn)
        await migrate(conn)
        box = SecretBox(generate_key())
        store = TenantStore(conn, box)
        duids = []
        for i in range(domains):
            duid = uuidlib.uuid4()
            await conn.execute(
                "INSERT INTO v_domains (domain_uuid, domain_name, domain_enabled) VALUES ($1, $2, 'true')",
                duid,
                f"tenant{i}.example.com",
            )
            await store.create_agent(duid, AgentFields(agent_name="Reception", agent_default=True))
            await store.set_credential(duid, "groq", api_key=f"key-{i}")
            duids.append(duid)

        # --- resolution -------------------------------------------------------------------
        loader = PgTenantLoader(dsn, box)
        t0 = time.perf_counter()
        await loader.start()
        out["warm_start_s"] = round(time.perf_counter() - t0, 3)
        resolver = TenantResolver(loader)
        cached = []
        for i in range(20000):
            t = time.perf_counter()
            await resolver.resolve(f"tenant{i % domains}.example.com")
            cached.append(time.perf_counter() - t)
        out["resolve_cached_us"] = summary(cached, 1e6)

        # Cold: a domain this process has never seen (the first call after start-up misses).
        cold_loader = PgTenantLoader(dsn, box)
        cold_loader._pool = await create_pool(dsn, min_size=2)  # no warm-up read
        cold_loader._store = TenantStore(cold_loader._pool, box)
        cold = []
        for i in range(min(domains, 200)):
            t = time.perf_counter()
            await cold_loader.load(f"tenant{i}.example.com")
            cold.append(time.perf_counter() - t)
        out["resolve_cold_miss_ms"] = summary(cold)
        await cold_loader._pool.close()

        # After an invalidation: UPDATE committed -> the next resolve returns the new agent.
        propagation = []
        first_after = []
        for i in range(50):
            duid = duids[i % domains]
            key = f"tenant{i % domains}.example.com"
            msg = f"Greeting {i}"
            t = time.perf_counter()
            await conn.execute(
                "UPDATE v_voice_agents SET first_message = $2 WHERE domain_uuid = $1", duid, msg
            )
            while True:
                t1 = time.perf_counter()
                got = await resolver.resolve(key)
                if got.first_message == msg:
                    first_after.append(time.perf_counter() - t1)
                    break
                await asyncio.sleep(0.0005)
            propagation.append(time.perf_counter() - t)
        out["invalidation_update_to_next_call_ms"] = summary(propagation)
        out["resolve_first_after_invalidation_us"] = summary(first_after, 1e6)
        await loader.stop()

        # --- call records ---------------------------------------------------------------
        with LoopLag() as idle:  # the machine's own noise, for comparison
            await asyncio.sleep(0.5)
        out["loop_lag_idle_ms"] = summary(idle.lags)
        pool = await create_pool(dsn)
        writer = RecordWriter(TenantStore(pool, box))
        await writer.start()
        now = time.time()
        batch = [
            call_rows(
                domain_uuid=str(duids[i % domains]),
                call_uuid=f"bench-{i}",
                agent_uuid=None,
                caller=f"+1555{i:06d}",
                destination="1000",
                instance="bench",
                started_wall=now - 60,
                ended_wall=now,
                end_reason="caller hung up",
                metadata=None,
                turns=[
                    {
                        "role": "user" if k % 2 == 0 else "assistant",
                        "text": f"turn {k} " * 12,
                        "latency_ms": 500.0,
                    }
                    for k in range(turns)
                ],  # fmt: skip
                messages=[],
            )
            for i in range(calls)
        ]
        submit = []
        with LoopLag() as lag:
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            for rows in batch:
                t = time.perf_counter()
                writer.submit(rows)
                submit.append(time.perf_counter() - t)
            while writer.pending:
                await asyncio.sleep(0.005)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        out["records"] = {
            "calls": calls,
            "turns": calls * turns,
            "wall_s": round(wall, 3),
            "turns_per_s": round(calls * turns / wall),
            # This process's CPU (the event loop that also carries the calls' audio) per turn.
            "cpu_us_per_turn": round(cpu / (calls * turns) * 1e6, 1),
            "submit_us": summary(submit, 1e6),
            "loop_lag_while_writing_ms": summary(lag.lags),
        }
        # The audio path's share: 20 calls ending together (20 x `turns` turns in one batch).
        with LoopLag() as lag20:
            for rows in batch[:20]:
                rows.call["call_uuid"] += "-20"
                rows.call["voice_call_uuid"] = uuidlib.uuid4()
                for tr in rows.turns:
                    tr["voice_call_uuid"] = rows.call["voice_call_uuid"]
                writer.submit(rows)
            while writer.pending:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
        out["records_20_calls_loop_lag_ms"] = summary(lag20.lags)
        await writer.close()
        await pool.close()

        # --- Redis admission ------------------------------------------------------------
        state = RedisCallState(redis_url, instance_id="bench")
        bt = Tenant(
            name="bench.example.com", domain_uuid=str(uuidlib.uuid4()), max_concurrent_calls=1000
        )
        adm = []
        for i in range(500):
            t1 = time.perf_counter()
            await state.admit(f"b{i}", bt, {})
            adm.append(time.perf_counter() - t1)
        for i in range(500):
            await state.release(f"b{i}", bt)
        out["redis_admission_ms"] = summary(adm)
        await state.close()
        # Redis unreachable (nothing listens): what a call's admission costs before degrading.
        dead = RedisCallState("redis://127.0.0.1:1/0", instance_id="bench")
        down = []
        for i in range(20):
            t1 = time.perf_counter()
            await dead.admit(f"d{i}", bt, {})
            down.append(time.perf_counter() - t1)
        out["redis_down_admission_ms"] = summary(down)
        await dead.close()
        await conn.close()
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--domains", type=int, default=200)
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument(
        "--audio-path",
        type=int,
        default=0,
        metavar="CALLS",
        help="instead: CALLS emulated calls without and with tenancy (DB+Redis+records)",
    )
    a = p.parse_args()
    with contextlib.suppress(ImportError):
        from loguru import logger

        logger.remove()
    if a.audio_path:
        result = asyncio.run(audio_path(a.dsn, a.redis, a.audio_path, 3))
    else:
        result = asyncio.run(bench(a.dsn, a.redis, a.domains, a.calls, a.turns))
    print(json.dumps(result, indent=2))


# --- the audio path with and without tenancy ---------------------------------------------


async def calls_run(
    dsn: str | None, redis_url: str | None, calls: int, turns: int, stagger: float
) -> dict[str, Any]:
    """``calls`` emulated calls (FreeSWITCH emulator, emulated providers, real Piper) with
    ``turns`` questions each; wire turn latency and event-loop lag. With ``dsn``, the tenant
    lives in a domain, so every call is admitted through Redis and its record is written."""
    import aiohttp
    from pydantic import SecretStr

    from pipeswitch.bench.emulators.runner import EmulatorConfig, run_emulators
    from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig
    from pipeswitch.config.loaders import StaticTenantLoader
    from pipeswitch.config.settings import Settings
    from pipeswitch.pipelines.app import Pipeswitch
    from pipeswitch.pipelines.emulated import endpoints_for

    duid = uuidlib.uuid4()
    if dsn:
        conn = await connect(dsn)
        await conn.execute(
            "INSERT INTO v_domains (domain_uuid, domain_name, domain_enabled) VALUES ($1, $2, 'true')",
            duid,
            "calls.example.com",
        )
        await conn.close()
    tenant = Tenant(name="calls.example.com", domain_uuid=str(duid))
    settings = Settings(
        host="127.0.0.1",
        port=0,
        providers="emulated",
        database_url=SecretStr(dsn) if dsn else None,
        redis_url=SecretStr(redis_url) if redis_url else None,
        secrets_key=SecretStr(generate_key()),
    )
    latencies: list[float] = []
    async with run_emulators(
        EmulatorConfig(llm_script="office", stt_script="office", seed=1)
    ) as emu:
        app = Pipeswitch(
            settings,
            loader=StaticTenantLoader([tenant], default=tenant.name),
            default_tenant=tenant.name,
            endpoints=endpoints_for(emu),
        )
        await app.start()
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                app.endpoints.piper_for_rate(8000),
                json={"text": "What are your opening hours on Saturday?", "voice": "joe"},
            ) as r,
        ):
            wav = await r.read()
        import numpy as np

        a = np.frombuffer(wav[44:], dtype="<i2")
        idx = np.flatnonzero(np.abs(a) > 300)
        speech = a[idx[0] : idx[-1] + 1].tobytes()

        async def one(i: int) -> None:
            await asyncio.sleep(i * stagger)
            url = f"ws://127.0.0.1:{app.port}/fs/c{i}-{uuidlib.uuid4().hex[:6]}?domain={tenant.name}&rate=8000&mix=mono"
            s = FakeSwitchStream(StreamConfig(url=url, rate=8000, playback="voxcom"))
            await s.start()
            await s.wait_connected(5.0)
            await asyncio.sleep(2.5)  # the greeting
            for _ in range(turns):
                s.queue_caller_audio(speech)
                s.queue_caller_silence(0.3)
                await s.wait_caller_drained(timeout_s=10)
                end = s.last_voiced_sent_at()
                t0 = time.monotonic()
                got = None
                while time.monotonic() - t0 < 8 and got is None:
                    got = s.first_bot_audio_received_after(end or 0)
                    await asyncio.sleep(0.01)
                if got is not None and end is not None:
                    latencies.append(got - end)
                await asyncio.sleep(2.5)  # let the reply play out
            await s.hangup()

        with LoopLag(0.005) as lag:
            await asyncio.gather(*[one(i) for i in range(calls)])
            await asyncio.sleep(1.0)
        written = app.tenancy.records.stats.calls_written if app.tenancy.records else 0
        await app.stop(drain_secs=2.0)
        written = app.tenancy.records.stats.calls_written if app.tenancy.records else written
    return {
        "tenancy": bool(dsn),
        "turns_measured": len(latencies),
        "wire_latency_ms": summary(latencies),
        "wire_latency_p95_ms": round(pct(latencies, 95) * 1e3, 1) if latencies else None,
        "loop_lag_ms": summary(lag.lags),
        "loop_lag_p95_ms": round(pct(lag.lags, 95) * 1e3, 2),
        "records_written": written,
    }


async def audio_path(dsn_base: str, redis_url: str, calls: int, turns: int) -> dict[str, Any]:
    name = f"pipeswitch_bench_calls_{os.getpid()}"
    admin = await asyncpg.connect(dsn_base)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = dsn_base.rsplit("/", 1)[0] + "/" + name
    try:
        conn = await connect(dsn)
        await migrate(conn)
        await conn.close()
        without = await calls_run(None, None, calls, turns, 0.37)
        with_ = await calls_run(dsn, redis_url, calls, turns, 0.37)
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.close()
    return {"without_tenancy": without, "with_tenancy": with_}


if __name__ == "__main__":
    main()
