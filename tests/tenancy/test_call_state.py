"""Call registry and per-tenant limits in Redis, across instances; TTLs; Redis outages."""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from typing import Literal

import pytest
import pytest_asyncio

from pipeswitch.config.call_state import LocalCallState, RedisCallState
from pipeswitch.config.tenants import Tenant
from tests.tenancy.conftest import CuttableProxy, redis_url

pytestmark = pytest.mark.asyncio(loop_scope="session")


def tenant(limit: int | None) -> Tenant:
    duid = str(uuidlib.uuid4())  # a fresh domain per test: no shared keys between runs
    return Tenant(name=f"d{duid[:8]}.example.com", domain_uuid=duid, max_concurrent_calls=limit)


@pytest_asyncio.fixture(loop_scope="session")
async def two_instances(redis_ok: str) -> AsyncIterator[tuple[RedisCallState, RedisCallState]]:
    a = RedisCallState(redis_ok, instance_id="instance-a")
    b = RedisCallState(redis_ok, instance_id="instance-b")
    yield a, b
    await a.close()
    await b.close()


async def test_limit_is_shared_across_instances(
    two_instances: tuple[RedisCallState, RedisCallState],
) -> None:
    a, b = two_instances
    t = tenant(2)
    assert (await a.admit("c1", t, {"agent": "Reception"})).allowed
    assert (await b.admit("c2", t, {"agent": "Reception"})).allowed
    third = await a.admit("c3", t, {})
    assert not third.allowed and third.reason == "tenant call limit reached (2)"
    assert b.stats.refused["tenant_limit"] == 0 and a.stats.refused["tenant_limit"] == 1
    live = {c["call_uuid"]: c for c in await b.active_calls(t)}
    assert set(live) == {"c1", "c2"}
    assert live["c1"]["instance"] == "instance-a" and live["c2"]["instance"] == "instance-b"
    assert live["c1"]["agent"] == "Reception" and live["c1"]["tenant"] == t.name
    await a.release("c1", t)
    assert (await b.admit("c3", t, {})).allowed


async def test_concurrent_admissions_never_exceed_the_limit(
    two_instances: tuple[RedisCallState, RedisCallState],
) -> None:
    a, b = two_instances
    t = tenant(3)
    results = await asyncio.gather(*[(a if i % 2 else b).admit(f"c{i}", t, {}) for i in range(12)])
    assert sum(r.allowed for r in results) == 3


async def test_a_crashed_instance_frees_its_slots_after_the_ttl(redis_ok: str) -> None:
    t = tenant(1)
    crashed = RedisCallState(redis_ok, instance_id="crashed", ttl_secs=0.5)
    alive = RedisCallState(redis_ok, instance_id="alive", ttl_secs=0.5)
    assert (await crashed.admit("c1", t, {})).allowed
    await crashed.redis.aclose()  # dies without releasing (no heartbeat either)
    assert not (await alive.admit("c2", t, {})).allowed
    await asyncio.sleep(0.6)
    assert (await alive.admit("c2", t, {})).allowed
    await alive.close()


async def test_heartbeat_keeps_live_calls_registered(redis_ok: str) -> None:
    t = tenant(1)
    a = RedisCallState(redis_ok, ttl_secs=1.0)
    other = RedisCallState(redis_ok, ttl_secs=1.0)
    await a.start()  # beats every 0.33 s
    assert (await a.admit("c1", t, {})).allowed
    await asyncio.sleep(2.2)  # well past the TTL: only the heartbeat keeps it
    assert not (await other.admit("c2", t, {})).allowed
    await a.close()
    await other.close()


async def test_transfer_state_is_visible_to_every_instance(
    two_instances: tuple[RedisCallState, RedisCallState],
) -> None:
    a, b = two_instances
    await a.set_transfer("c9", {"target": "2001", "announced": "1"})
    assert await b.get_transfer("c9") == {"target": "2001", "announced": "1"}


@pytest.mark.parametrize("degrade", ["open", "closed"])
async def test_redis_down_degrades_as_configured(
    redis_proxy: CuttableProxy, degrade: Literal["open", "closed"]
) -> None:
    t = tenant(1)
    s = RedisCallState(
        redis_url(redis_proxy.port),
        degrade=degrade,
        ttl_secs=1.0,
    )
    assert (await s.admit("before", t, {})).allowed
    await s.release("before", t)
    await redis_proxy.cut()
    got = await asyncio.wait_for(s.admit("during", t, {}), 2.0)
    assert got.degraded and got.allowed is (degrade == "open")
    assert s.stats.degraded == 1 and s.stats.errors >= 1
    await redis_proxy.restore()
    if degrade == "open":
        # The call admitted blind is registered by the next heartbeat once Redis is back.
        await s.heartbeat_once()
        assert [c["call_uuid"] for c in await s.active_calls(t)] == ["during"]
    await s.close()


async def test_local_state_without_redis() -> None:
    s = LocalCallState("solo")
    t = tenant(1)
    assert (await s.admit("c1", t, {})).allowed
    assert not (await s.admit("c2", t, {})).allowed
    await s.release("c1", t)
    assert (await s.admit("c2", t, {})).allowed
    assert [c["call_uuid"] for c in await s.active_calls(t)] == ["c2"]
    unlimited = tenant(None)
    assert all([(await s.admit(f"u{i}", unlimited, {})).allowed for i in range(50)])


async def test_a_hung_redis_costs_one_timeout_not_one_per_call() -> None:
    """Redis accepts but never answers: the first admission waits out the 0.5 s timeout,
    the next calls degrade at once until a retry window has passed."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    srv = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    s = RedisCallState(f"redis://127.0.0.1:{port}/0", degrade="open")
    t = tenant(3)
    costs = []
    for i in range(4):
        t0 = time.perf_counter()
        got = await s.admit(f"c{i}", t, {})
        costs.append(time.perf_counter() - t0)
        assert got.allowed and got.degraded
    # The first waits out the timeout; the others do not even try (well under it).
    assert costs[0] >= 0.4 and max(costs[1:]) < 0.25
    assert s.stats.errors == 1 and s.stats.degraded == 4
    for w in held:
        w.close()
    srv.close()
    await s.close()
