"""The PostgreSQL tenant loader: lookups, routing, keys, live invalidation, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
from pydantic import SecretStr

from pipeswitch.config.loaders import TenantNotFound, TenantResolver
from pipeswitch.config.pg_loader import PgTenantLoader
from pipeswitch.pipelines.services import ProviderEndpoints
from pipeswitch.pipelines.tenancy import endpoints_for_tenant
from tests.tenancy.conftest import CuttableProxy, Db, dsn

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Seconds until ``check()`` holds (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not await check():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


@pytest_asyncio.fixture(loop_scope="session")
async def loader(db: Db, pg_proxy: CuttableProxy) -> AsyncIterator[PgTenantLoader]:
    """A loader talking to PostgreSQL through the cuttable proxy."""
    ld = PgTenantLoader(dsn(db.name, pg_proxy.port), db.box)
    await ld.start()
    await asyncio.wait_for(ld.listening.wait(), 5)
    yield ld
    await ld.stop()


async def test_resolves_by_name_and_uuid_with_routes_keys_tools(
    db: Db, loader: PgTenantLoader
) -> None:
    duid = await db.add_domain("Clinic.Example.com")
    main = await db.add_agent(duid, first_message="Clinic, hello.", playback="binary")
    sales = await db.add_agent(duid, agent_name="Sales", agent_default=False)
    await db.store.set_route(duid, "+4420555", sales)
    await db.store.set_credential(duid, "groq", api_key="tenant-groq-key")
    await db.store.set_tool(
        duid,
        main,
        "business_hours",
        {"timezone": "Europe/London", "business_hours": {"mon": ["09:00-17:00"]}},
    )
    await db.store.set_domain_settings(duid, {"max_concurrent_calls": 4})
    await db.store.set_signing_secret(duid, "s3cret")

    by_name = await loader.load("clinic.example.com")
    by_uuid = await loader.load(str(duid))
    assert by_name is not None and by_name == by_uuid
    assert by_name.name == "clinic.example.com" and by_name.agent_uuid == main
    assert by_name.playback == "binary" and by_name.first_message == "Clinic, hello."
    assert by_name.max_concurrent_calls == 4
    assert by_name.access.signing_secret is not None
    assert by_name.access.signing_secret.get_secret_value() == "s3cret"
    assert by_name.tools.enabled == ["business_hours"] and by_name.tools.timezone == "Europe/London"
    assert "tenant-groq-key" not in repr(by_name)  # keys never print

    resolver = TenantResolver(loader)
    routed = await resolver.resolve("clinic.example.com", "4420555")
    assert routed.agent_uuid == sales and routed.agent_name == "Sales"
    assert (await resolver.resolve("clinic.example.com", "999")).agent_uuid == main
    with pytest.raises(TenantNotFound):
        await resolver.resolve("nobody.example.com")

    # The tenant's own key replaces the deployment's for its providers only.
    ep = endpoints_for_tenant(
        ProviderEndpoints(mode="real", piper_url="", groq_api_key="deploy", deepgram_api_key="dg"),
        by_name,
    )
    assert ep.groq_api_key == "tenant-groq-key" and ep.deepgram_api_key == "dg"
    odd = by_name.model_copy(
        update={"provider_keys": {"local": SecretStr("x"), "nope": SecretStr("y")}}
    )
    assert endpoints_for_tenant(ep, odd) == ep  # the local model servers' key is not theirs


async def test_key_ref_only_reads_pipeswitch_key_variables(
    db: Db, loader: PgTenantLoader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPESWITCH_KEY_ACME_DG", "dg-from-env")
    monkeypatch.setenv("SOME_OTHER_SECRET", "must-not-leak")
    duid = await db.add_domain()
    await db.add_agent(duid)
    await db.store.set_credential(duid, "deepgram", key_ref="PIPESWITCH_KEY_ACME_DG")
    await db.store.set_credential(duid, "groq", key_ref="SOME_OTHER_SECRET")
    t = await loader.load(str(duid))
    assert t is not None
    assert {k: v.get_secret_value() for k, v in t.provider_keys.items()} == {
        "deepgram": "dg-from-env"
    }


async def test_change_reaches_the_next_call_within_a_second(db: Db, loader: PgTenantLoader) -> None:
    duid = await db.add_domain()
    agent = await db.add_agent(duid, first_message="Version one.")
    resolver = TenantResolver(loader, ttl_secs=30.0)  # the loader's own cache wins over a TTL
    assert (await resolver.resolve(str(duid))).first_message == "Version one."
    await db.conn.execute(
        "UPDATE v_voice_agents SET first_message = 'Version two.' WHERE voice_agent_uuid = $1::uuid",
        agent,
    )

    async def updated() -> bool:
        return (await resolver.resolve(str(duid))).first_message == "Version two."

    assert await until(updated, 1.0) < 1.0
    # Disabling the domain in FusionPBX refuses its next call.
    await db.conn.execute(
        "UPDATE v_domains SET domain_enabled = 'false' WHERE domain_uuid = $1", duid
    )

    async def refused() -> bool:
        try:
            await resolver.resolve(str(duid))
        except TenantNotFound:
            return True
        return False

    assert await until(refused, 1.0) < 1.0


async def test_cache_serves_while_postgres_is_down_and_catches_up_after(
    db: Db, loader: PgTenantLoader, pg_proxy: CuttableProxy
) -> None:
    duid = await db.add_domain()
    agent = await db.add_agent(duid, first_message="Before the outage.")
    assert (await loader.load(str(duid))) is not None
    await pg_proxy.cut()
    await until(lambda: _async(not loader.listening.is_set()), 3.0)
    misses = loader.stats["misses"]
    t = await loader.load(str(duid))  # a hit: no I/O, so the outage does not matter
    assert t is not None and t.first_message == "Before the outage."
    assert loader.stats["misses"] == misses
    with pytest.raises(OSError):
        await loader.load("never-seen.example.com")  # a miss needs the database
    # Changed while this loader could not hear the NOTIFY...
    await db.conn.execute(
        "UPDATE v_voice_agents SET first_message = 'During the outage.' WHERE voice_agent_uuid = $1::uuid",
        agent,
    )
    await asyncio.sleep(0.3)
    await pg_proxy.restore()

    async def caught_up() -> bool:
        t = await loader.load(str(duid))
        return t is not None and t.first_message == "During the outage."

    await until(caught_up, 8.0)  # ...read again once the listener is back


async def test_invalid_configuration_refuses_calls_rather_than_serving_stale(
    db: Db, loader: PgTenantLoader
) -> None:
    duid = await db.add_domain()
    await db.add_agent(duid)
    assert await loader.load(str(duid)) is not None
    await db.conn.execute(
        "UPDATE v_voice_agents SET playback = 'bogus' WHERE domain_uuid = $1", duid
    )

    async def dropped() -> bool:
        return str(duid) not in loader._entries

    await until(dropped, 2.0)


async def _async(value: bool) -> bool:
    return value
