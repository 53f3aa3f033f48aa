"""Migrations: idempotent, safe twice and from two instances at once, FusionPBX conventions."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest

from pipeswitch.config.db import bundled_migrations, connect, migrate
from tests.tenancy.conftest import V_DOMAINS, Db, dsn

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def fresh_database(suffix: str) -> str:
    name = f"pipeswitch_test_{os.getpid()}_{suffix}"
    admin = await asyncpg.connect(dsn("postgres"))
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    return name


async def drop_database(name: str) -> None:
    admin = await asyncpg.connect(dsn("postgres"))
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
    )
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.close()


async def test_twice_and_concurrently_from_two_instances() -> None:
    name = await fresh_database("mig")
    try:
        conns = [await connect(dsn(name)) for _ in range(3)]
        await conns[0].execute(V_DOMAINS)  # FusionPBX installed first
        assert await migrate(conns[0], dry_run=True) == [m.name for m in bundled_migrations()]
        assert await conns[0].fetchval("SELECT to_regclass('v_voice_agents')") is None
        # Two instances starting at once: one applies, the other waits on the lock, sees done.
        a, b = await asyncio.gather(migrate(conns[1]), migrate(conns[2]))
        assert sorted([a, b], key=len) == [[], [m.name for m in bundled_migrations()]]
        assert await migrate(conns[0]) == []  # and a third time: nothing
        applied = await conns[0].fetchval("SELECT count(*) FROM v_voice_schema_migrations")
        assert applied == len(bundled_migrations())
        # Each file is idempotent on its own too (hand-applied, or a tracking row lost).
        for m in bundled_migrations():
            await conns[0].execute(m.sql)
            await conns[0].execute(m.sql)
        for c in conns:
            await c.close()
    finally:
        await drop_database(name)


async def test_standalone_install_gets_a_minimal_v_domains() -> None:
    name = await fresh_database("standalone")
    try:
        conn = await connect(dsn(name))
        await migrate(conn)
        cols = {
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'v_domains'"
            )
        }
        assert {"domain_uuid", "domain_name", "domain_enabled"} <= cols
        await conn.close()
    finally:
        await drop_database(name)


async def test_fusionpbx_conventions(db: Db) -> None:
    tables = [
        r["table_name"]
        for r in await db.conn.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_name LIKE 'v_voice_%' AND table_name <> 'v_voice_schema_migrations'"
        )
    ]
    assert len(tables) == 10, tables
    for t in tables:
        cols = {
            r["column_name"]: r
            for r in await db.conn.fetch(
                "SELECT column_name, is_nullable, data_type FROM information_schema.columns"
                " WHERE table_name = $1",
                t,
            )
        }
        pk = t.removeprefix("v_").rstrip("s") + "_uuid"
        pk = {"voice_audit_uuid": "voice_audit_uuid"}.get(pk, pk)
        assert pk in cols and cols[pk]["data_type"] == "uuid", (t, pk)
        assert cols["domain_uuid"]["is_nullable"] == "NO", t
        assert {"insert_date", "update_date"} <= set(cols), t
        fk = await db.conn.fetchval(
            "SELECT count(*) FROM information_schema.referential_constraints rc"
            " JOIN information_schema.key_column_usage k ON k.constraint_name = rc.constraint_name"
            " JOIN information_schema.constraint_column_usage u"
            "   ON u.constraint_name = rc.constraint_name"
            " WHERE k.table_name = $1 AND k.column_name = 'domain_uuid'"
            "   AND u.table_name = 'v_domains'",
            t,
        )
        # The audit log outlives a deleted domain on purpose; everything else belongs to it.
        assert fk == (0 if t == "v_voice_audit" else 1), t
        # Every table is looked up by domain: an index leads with domain_uuid.
        indexed = await db.conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE tablename = $1"
            " AND (indexdef LIKE '%(domain_uuid)%' OR indexdef LIKE '%(domain_uuid,%')",
            t,
        )
        assert indexed >= 1, t


async def test_update_date_and_notify_triggers(db: Db) -> None:
    duid = await db.add_domain()
    agent = await db.add_agent(duid)
    got: list[str] = []
    listener = await connect(db.dsn)
    await listener.add_listener("pipeswitch_tenant", lambda *a: got.append(a[3]))
    before = await db.conn.fetchval(
        "SELECT update_date FROM v_voice_agents WHERE voice_agent_uuid = $1", agent
    )
    await db.conn.execute(
        "UPDATE v_voice_agents SET first_message = 'Hi' WHERE voice_agent_uuid = $1::uuid", agent
    )
    after = await db.conn.fetchval(
        "SELECT update_date FROM v_voice_agents WHERE voice_agent_uuid = $1", agent
    )
    assert after > before
    for _ in range(50):
        if got:
            break
        await asyncio.sleep(0.02)
    assert got == [str(duid)]
    await listener.close()
