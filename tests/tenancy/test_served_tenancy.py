"""Whole servers on PostgreSQL tenants and Redis state, driven through the FreeSWITCH emulator.

Two Pipeswitch instances share the database and Redis (as two hosts would). Providers are the
emulators and Piper of the session's ``served`` fixture.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import pytest_asyncio
from pydantic import SecretStr

from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream
from pipeswitch.config.settings import Settings
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.transports.auth import sign_call
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet, wait_for_bot_audio
from tests.tenancy.conftest import CuttableProxy, Db, dsn

pytestmark = pytest.mark.asyncio(loop_scope="session")
SECRET = "tenant-signing-secret"
ADMIN = "fleet-super-admin"


@dataclass
class Fleet:
    db: Db
    served: Served
    domain: str
    duid: uuidlib.UUID
    agent: str
    one: Pipeswitch
    two: Pipeswitch

    def url(self, app: Pipeswitch, call: str, *, sign: bool = True, **q: str) -> str:
        query = {"domain": self.domain, "rate": "8000", "mix": "mono", "caller": "+15550123", **q}
        if sign:
            exp = str(int(time.time()) + 60)
            query |= {"exp": exp, "sig": sign_call(SECRET, call, self.domain, int(exp))}
        return f"ws://127.0.0.1:{app.port}/fs/{call}?{urlencode(query)}"


def settings_for(db: Db, pg_port: int, redis_url: str, name: str, **kw: Any) -> Settings:
    return Settings(
        host="127.0.0.1",
        port=0,
        providers="emulated",
        idle_timeout_secs=30,
        database_url=SecretStr(dsn(db.name, pg_port)),
        redis_url=SecretStr(redis_url),
        secrets_key=SecretStr(db.key),
        accept_unsigned="never",
        instance_id=name,
        admin_token=SecretStr(ADMIN),
        **kw,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def fleet(
    db: Db, served: Served, redis_ok: str, pg_proxy: CuttableProxy
) -> AsyncIterator[Fleet]:
    duid = await db.add_domain()
    domain = (await db.store.find_domain(str(duid)))["domain_name"]  # type: ignore[index]
    agent = await db.add_agent(duid, first_message="Thanks for calling the clinic.")
    await db.store.set_domain_settings(duid, {"max_concurrent_calls": 1})
    await db.store.set_signing_secret(duid, SECRET)
    apps = []
    try:
        for name in ("instance-1", "instance-2"):
            # Instance 1 reaches PostgreSQL through the proxy a test may cut.
            port = pg_proxy.port if name == "instance-1" else 5432
            app = Pipeswitch(settings_for(db, port, redis_ok, name), endpoints=served.app.endpoints)
            apps.append(app)
            await app.start()
        yield Fleet(db, served, domain, duid, agent, apps[0], apps[1])
    finally:
        for app in apps:
            await app.stop(drain_secs=1.0)


async def until_idle(app: Pipeswitch) -> None:
    """The hangup has reached the server and the call's slot is released."""
    for _ in range(200):
        if app.server is not None and app.server.stats.calls_active == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the call did not end on the server")


async def outcome(url: str) -> tuple[int | None, str] | None:
    """Close code and reason of a refused call; None when the call was answered instead."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        msg = await asyncio.wait_for(ws.receive(), 5.0)
        if msg.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return None
        return ws.close_code, str(msg.extra or "")


async def refused(url: str) -> tuple[int | None, str]:
    """Close code and reason of a call the server refuses right after the upgrade."""
    got = await outcome(url)
    assert got is not None, "the call was answered"
    return got


async def answered(url: str) -> FakeSwitchStream:
    stream = await open_call(url, 8000, "json-stream")
    greeting = await wait_for_bot_audio(stream, 0.0, timeout_s=6.0)
    assert greeting is not None, "no greeting"
    return stream


async def test_signed_calls_answered_others_refused_with_1008(fleet: Fleet) -> None:
    # The tenant's greeting was synthesized ahead, as for file tenants.
    assert "Thanks for calling the clinic." in {g[2] for g in fleet.one.tenancy.warmed_greetings}
    call = f"sig-{uuidlib.uuid4()}"
    stream = await answered(fleet.url(fleet.one, call))
    await stream.hangup()
    before = fleet.one.server.stats.refused["auth"]  # type: ignore[union-attr]
    code, reason = await refused(fleet.url(fleet.one, f"u-{uuidlib.uuid4()}", sign=False))
    assert (code, reason) == (1008, "not authorized: signature or token required")
    exp = int(time.time()) - 5
    expired = {"exp": str(exp), "sig": sign_call(SECRET, "old", fleet.domain, exp)}
    code, reason = await refused(fleet.url(fleet.one, "old", sign=False, **expired))
    assert (code, reason) == (1008, "not authorized: signature expired")
    exp = int(time.time()) + 60
    other = {"exp": str(exp), "sig": sign_call("another-tenants-secret", "x1", fleet.domain, exp)}
    code, reason = await refused(fleet.url(fleet.one, "x1", sign=False, **other))
    assert (code, reason) == (1008, "not authorized: bad signature")
    assert fleet.one.server.stats.refused["auth"] == before + 3  # type: ignore[union-attr]


async def test_static_token_in_stream_extra_headers(fleet: Fleet) -> None:
    await fleet.db.store.set_stream_token(fleet.duid, "static-token-for-simple-setups")
    call = f"tok-{uuidlib.uuid4()}"
    url = fleet.url(fleet.one, call, sign=False)
    for _ in range(100):  # the NOTIFY re-reads the domain within milliseconds
        if fleet.one.loader._entries[str(fleet.duid)].default.access.token_sha256:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    # STREAM_EXTRA_HEADERS={"X-Pipeswitch-Token":"..."} as mod_audio_stream sends it.
    stream = await open_call(
        url,
        8000,
        "json-stream",
        extra_headers={"X-Pipeswitch-Token": "static-token-for-simple-setups"},
    )
    assert await wait_for_bot_audio(stream, 0.0, timeout_s=6.0) is not None
    await stream.hangup()
    code, reason = await refused(
        fleet.url(fleet.one, f"tok2-{uuidlib.uuid4()}", sign=False, token="wrong")
    )
    assert (code, reason) == (1008, "not authorized: bad token")


async def test_limit_holds_across_two_instances_and_records_land(fleet: Fleet) -> None:
    call = f"lim-{uuidlib.uuid4()}"
    first = await answered(fleet.url(fleet.one, call))
    try:
        two = fleet.two.server
        assert two is not None
        started, limited = two.stats.calls_total, two.stats.refused["tenant_limit"]
        code, reason = await refused(fleet.url(fleet.two, f"lim2-{uuidlib.uuid4()}"))
        assert (code, reason) == (4503, "tenant call limit reached (1)")
        # Refused at admission: counted as refused, never as a started call.
        assert two.stats.calls_total == started
        assert two.stats.refused["tenant_limit"] == limited + 1
        # The admin API on the other instance sees the call in the shared registry.
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{fleet.two.port}/admin"
            async with http.get(f"{base}/openapi.json") as r:
                assert r.status == 200 and "paths" in await r.json()
            async with http.get(
                f"{base}/domains/{fleet.domain}/live-calls",
                headers={"Authorization": f"Bearer {ADMIN}"},
            ) as r:
                live = await r.json()
        assert [(c["call_uuid"], c["instance"], c["agent"]) for c in live] == [
            (call, "instance-1", "Reception")
        ]
        speech = await fleet.served.speech(QUESTION, 8000)
        _, reply = await ask(first, speech, 8000)
        assert reply is not None
        await wait_bot_quiet(first)  # the whole reply played
    finally:
        await first.hangup()
    await until_idle(fleet.one)
    # The slot is free again, on the other instance.
    second = await answered(fleet.url(fleet.two, f"lim3-{uuidlib.uuid4()}"))
    await second.hangup()

    async def landed() -> Any:
        return await fleet.db.conn.fetchrow(
            "SELECT * FROM v_voice_calls WHERE domain_uuid = $1 AND call_uuid = $2",
            fleet.duid,
            call,
        )

    row = None
    for _ in range(100):
        if row := await landed():
            break
        await asyncio.sleep(0.05)
    assert row is not None and row["instance"] == "instance-1" and row["caller"] == "+15550123"
    assert str(row["voice_agent_uuid"]) == fleet.agent and row["turn_count"] >= 1
    turns = await fleet.db.store.list_turns(fleet.duid, call)
    roles = [t["role"] for t in turns]
    assert roles[:3] == ["assistant", "user", "assistant"], roles  # greeting, question, reply
    greeting, question, reply = turns[:3]
    assert greeting["turn_text"] == "Thanks for calling the clinic."
    assert question["turn_text"] and question["started_at"] < question["ended_at"]
    assert reply["turn_text"] and reply["heard_text"] and reply["latency_ms"] > 0
    assert not reply["interrupted"]


async def test_agent_disabled_in_the_database_refuses_the_next_call(fleet: Fleet) -> None:
    await fleet.db.conn.execute(
        "UPDATE v_voice_agents SET agent_enabled = false WHERE voice_agent_uuid = $1::uuid",
        fleet.agent,
    )
    try:
        t0 = time.monotonic()
        while True:
            got = await outcome(fleet.url(fleet.two, f"dis-{uuidlib.uuid4()}"))
            if got is not None and got[0] == 1008:
                reason = got[1]
                break
            assert time.monotonic() - t0 < 1.0, "the change did not reach the next call in 1 s"
        assert "disabled" in reason
    finally:
        await fleet.db.conn.execute(
            "UPDATE v_voice_agents SET agent_enabled = true WHERE voice_agent_uuid = $1::uuid",
            fleet.agent,
        )
    await asyncio.sleep(0.3)


async def test_postgres_down_mid_call_call_continues_records_land_later(
    fleet: Fleet, pg_proxy: CuttableProxy
) -> None:
    call = f"pgdown-{uuidlib.uuid4()}"
    stream = await answered(fleet.url(fleet.one, call))
    await pg_proxy.cut()
    try:
        speech = await fleet.served.speech(QUESTION, 8000)
        _, reply = await ask(stream, speech, 8000)
        assert reply is not None, "the call stopped answering when PostgreSQL went away"
        # A new call for the cached tenant is still answered while PostgreSQL is down.
        await stream.hangup()
        await until_idle(fleet.one)
        other = await answered(fleet.url(fleet.one, f"pgdown2-{uuidlib.uuid4()}"))
        await other.hangup()
        await asyncio.sleep(1.0)
        assert fleet.one.tenancy.records is not None and fleet.one.tenancy.records.pending >= 1
        count = await fleet.db.conn.fetchval(
            "SELECT count(*) FROM v_voice_calls WHERE call_uuid = $1", call
        )
        assert count == 0
    finally:
        await pg_proxy.restore()
    for _ in range(200):
        n = await fleet.db.conn.fetchval(
            "SELECT count(*) FROM v_voice_calls WHERE call_uuid = $1", call
        )
        if n:
            break
        await asyncio.sleep(0.05)
    assert n == 1


@pytest.mark.parametrize("degrade", ["open", "closed"])
async def test_redis_down(
    db: Db, served: Served, fleet: Fleet, redis_proxy: CuttableProxy, degrade: str
) -> None:
    settings = settings_for(
        db, 5432, f"redis://127.0.0.1:{redis_proxy.port}/0", f"r-{degrade}", limits_degrade=degrade
    )
    app = Pipeswitch(settings, endpoints=served.app.endpoints)
    try:
        await app.start()
        await redis_proxy.cut()
        url = fleet.url(app, f"redis-{degrade}-{uuidlib.uuid4()}")
        if degrade == "open":
            stream = await answered(url)
            await stream.hangup()
        else:
            assert await refused(url) == (4503, "call state unavailable")
        assert app.tenancy.state.stats.degraded == 1
    finally:
        await redis_proxy.restore()
        await app.stop(drain_secs=1.0)
