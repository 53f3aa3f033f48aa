"""Call records: batched, buffered through a PostgreSQL outage, bounded, flushed on close."""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib

import pytest

from pipeswitch.config.db import create_pool
from pipeswitch.config.records import CallRows, RecordWriter, call_rows
from pipeswitch.config.tenant_store import TenantStore
from tests.tenancy.conftest import CuttableProxy, Db, dsn

pytestmark = pytest.mark.asyncio(loop_scope="session")


def rows_for(duid: uuidlib.UUID, turns: int = 4, caller: str = "+15550100") -> CallRows:
    now = time.time()
    return call_rows(
        domain_uuid=str(duid),
        call_uuid=f"call-{uuidlib.uuid4()}",
        agent_uuid=None,
        caller=caller,
        destination="1000",
        instance="test",
        started_wall=now - 30,
        ended_wall=now,
        end_reason="caller hung up",
        metadata={"k": "v"},
        turns=[
            {
                "role": "user" if i % 2 == 0 else "assistant",
                "text": f"turn {i}",
                "latency_ms": 500.0,
            }
            for i in range(turns)
        ],
        messages=[],
    )


async def count_calls(db: Db, duid: uuidlib.UUID) -> int:
    return int(
        await db.conn.fetchval("SELECT count(*) FROM v_voice_calls WHERE domain_uuid = $1", duid)
    )


async def test_batches_and_flush_on_close(db: Db) -> None:
    duid = await db.add_domain()
    pool = await create_pool(db.dsn)
    w = RecordWriter(TenantStore(pool, db.box), batch_calls=50)
    await w.start()
    for _ in range(120):
        assert w.submit(rows_for(duid, turns=6))
    await w.close()
    assert await count_calls(db, duid) == 120
    turns = await db.conn.fetchval(
        "SELECT count(*) FROM v_voice_turns WHERE domain_uuid = $1", duid
    )
    assert turns == 720
    assert w.stats.calls_written == 120 and w.stats.batches >= 3 and w.stats.calls_dropped == 0
    await pool.close()


async def test_postgres_outage_buffers_then_writes(db: Db, pg_proxy: CuttableProxy) -> None:
    duid = await db.add_domain()
    pool = await create_pool(dsn(db.name, pg_proxy.port), min_size=0)
    w = RecordWriter(TenantStore(pool, db.box), interval_secs=0.05)
    await w.start()
    w.submit(rows_for(duid))
    for _ in range(500):  # the first call is written before the outage (10 s: a loaded CI box)
        if await count_calls(db, duid) == 1:
            break
        await asyncio.sleep(0.02)
    assert await count_calls(db, duid) == 1
    await pg_proxy.cut()
    for _ in range(5):
        w.submit(rows_for(duid))
    await asyncio.sleep(0.8)
    assert w.stats.write_failures >= 1 and w.pending == 5
    assert await count_calls(db, duid) == 1
    await pg_proxy.restore()
    for _ in range(400):  # (the rows commit a moment before the writer hears so)
        if await count_calls(db, duid) == 6 and w.pending == 0:
            break
        await asyncio.sleep(0.025)
    assert await count_calls(db, duid) == 6 and w.pending == 0
    await w.close()
    await pool.close()


async def test_buffer_is_bounded_and_drops_are_counted(db: Db, pg_proxy: CuttableProxy) -> None:
    duid = await db.add_domain()
    pool = await create_pool(dsn(db.name, pg_proxy.port), min_size=0)
    await pg_proxy.cut()
    w = RecordWriter(TenantStore(pool, db.box), max_pending_calls=3)
    await w.start()
    accepted = [w.submit(rows_for(duid)) for _ in range(5)]
    assert accepted == [True, True, True, False, False]
    assert w.stats.calls_dropped == 2
    await w.close(timeout_secs=0.5)  # PostgreSQL still down: close gives up, does not hang
    await pg_proxy.restore()
    pool.terminate()


async def test_messages_taken_by_the_tools_are_stored(db: Db) -> None:
    from pipeswitch.pipelines.tenancy import taken_messages
    from pipeswitch.processors.tools import TakenMessage

    class Record:
        taken_messages = [
            TakenMessage(
                "Ann Lee", "+15550199", "Call back about the invoice", "2026-11-30T08:00:00+00:00"
            )
        ]

    duid = await db.add_domain()
    now = time.time()
    rows = call_rows(
        domain_uuid=str(duid), call_uuid=f"msg-{uuidlib.uuid4()}", agent_uuid=None,
        caller="+15550199", destination=None, instance="t", started_wall=now - 10,
        ended_wall=now, end_reason="x", metadata=None, turns=[],
        messages=taken_messages(Record(), None),
    )  # fmt: skip
    await db.store.write_records([rows.call], rows.turns, rows.messages)
    (msg,) = await db.store.list_messages(duid)
    assert (msg["caller_name"], msg["caller_number"], msg["reason"]) == (
        "Ann Lee",
        "+15550199",
        "Call back about the invoice",
    )
    assert msg["voice_call_uuid"] == rows.call["voice_call_uuid"]


async def test_a_call_postgres_refuses_is_dropped_not_retried_for_ever(db: Db) -> None:
    """A domain deleted between the call and the write: its record can never be written; the
    other calls of the batch still are, and later calls are not held up."""
    keep, gone = await db.add_domain(), await db.add_domain()
    pool = await create_pool(db.dsn)
    w = RecordWriter(TenantStore(pool, db.box), interval_secs=0.02)
    await db.conn.execute("DELETE FROM v_domains WHERE domain_uuid = $1", gone)
    w.submit(rows_for(keep))
    w.submit(rows_for(gone))
    w.submit(rows_for(keep))
    await w.start()
    for _ in range(200):
        if not w.pending:
            break
        await asyncio.sleep(0.02)
    assert w.pending == 0 and w.stats.calls_rejected == 1
    assert await count_calls(db, keep) == 2
    w.submit(rows_for(keep))
    await w.close()
    assert await count_calls(db, keep) == 3
    await pool.close()
