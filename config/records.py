"""Call records and transcripts to PostgreSQL: batched, off the audio path, retried.

A finished call is handed over with :meth:`RecordWriter.submit` - a non-blocking append to an
in-memory buffer. One background task writes the buffer in batches (one transaction per batch,
idempotent inserts, so a batch retried after an ambiguous failure is not written twice). When
PostgreSQL is unreachable the buffer keeps the calls and the task retries with backoff; the
buffer is bounded (``max_pending_calls``) and a call that does not fit is dropped and counted,
never blocking a live call. :meth:`close` flushes what is left on graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid as uuidlib
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from loguru import logger

from pipeswitch.config.tenant_store import TenantStore

Json = dict[str, Any]

# Errors that say nothing about the rows: the database is away or busy, so retry later.
_TRANSIENT = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,
)


@dataclass
class CallRows:
    """One finished call as rows: the call, its turns, the messages it took."""

    call: Json
    turns: list[Json] = field(default_factory=list)
    messages: list[Json] = field(default_factory=list)


@dataclass
class RecordStats:
    calls_written: int = 0
    turns_written: int = 0
    messages_written: int = 0
    calls_dropped: int = 0  # buffer full
    calls_rejected: int = 0  # PostgreSQL refused the rows themselves
    write_failures: int = 0
    batches: int = 0


def call_rows(
    *,
    domain_uuid: str,
    call_uuid: str,
    agent_uuid: str | None,
    caller: str | None,
    destination: str | None,
    instance: str,
    started_wall: float,
    ended_wall: float,
    end_reason: str,
    metadata: Json | None,
    turns: list[Json],
    messages: list[Json],
) -> CallRows:
    """Rows for one call; ``turns`` items: role, text, and optionally heard_text, latency_ms,
    interrupted, started_at/ended_at (epoch seconds)."""

    def ts(v: float | None) -> datetime | None:
        return None if v is None else datetime.fromtimestamp(v, UTC)

    vcu = uuidlib.uuid4()
    duid = uuidlib.UUID(domain_uuid)
    call = {
        "voice_call_uuid": vcu,
        "domain_uuid": duid,
        "voice_agent_uuid": uuidlib.UUID(agent_uuid) if agent_uuid else None,
        "call_uuid": call_uuid,
        "caller": caller,
        "destination": destination,
        "instance": instance,
        "start_stamp": ts(started_wall),
        "end_stamp": ts(ended_wall),
        "duration_secs": max(0.0, ended_wall - started_wall),
        "end_reason": end_reason,
        "turn_count": sum(1 for t in turns if t["role"] == "user"),
        "metadata": metadata,
    }
    trows = [
        {
            "domain_uuid": duid,
            "voice_call_uuid": vcu,
            "turn_index": i,
            "role": t["role"],
            "turn_text": t.get("text", ""),
            "heard_text": t.get("heard_text"),
            "started_at": ts(t.get("started_at")),
            "ended_at": ts(t.get("ended_at")),
            "latency_ms": t.get("latency_ms"),
            "interrupted": bool(t.get("interrupted", False)),
        }
        for i, t in enumerate(turns)
    ]
    mrows = [
        {
            "voice_message_uuid": uuidlib.uuid4(),
            "domain_uuid": duid,
            "voice_call_uuid": vcu,
            "caller_name": m.get("name") or m.get("caller_name"),
            "caller_number": m.get("number") or m.get("caller_number") or caller,
            "reason": m.get("reason"),
            "message_text": m.get("message") or m.get("text"),
        }
        for m in messages
    ]
    return CallRows(call, trows, mrows)


class RecordWriter:
    """Buffers finished calls and writes them in batches from one background task."""

    def __init__(
        self,
        store: TenantStore,
        *,
        batch_calls: int = 100,
        interval_secs: float = 0.25,
        max_pending_calls: int = 10_000,
    ) -> None:
        self.store = store
        self.batch_calls = batch_calls
        self.interval = interval_secs
        self.max_pending = max_pending_calls
        self._pending: deque[CallRows] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing_since: float | None = None
        self.stats = RecordStats()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, rows: CallRows) -> bool:
        """Queue one call (never blocks, never raises). False = dropped: the buffer is full."""
        if len(self._pending) >= self.max_pending:
            self.stats.calls_dropped += 1
            if self.stats.calls_dropped == 1 or self.stats.calls_dropped % 1000 == 0:
                logger.error(
                    "call record buffer full ({} calls): dropped {} so far",
                    self.max_pending,
                    self.stats.calls_dropped,
                )
            return False
        self._pending.append(rows)
        if len(self._pending) >= self.batch_calls:
            self._wake.set()
        return True

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            if not self._pending:
                if self._closing:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                self._wake.clear()
                continue
            ok = await self.flush_once()
            if ok:
                backoff = 0.2
                continue
            await asyncio.sleep(backoff)  # close() bounds this with its timeout
            backoff = min(backoff * 2, 5.0)

    async def flush_once(self) -> bool:
        """Write up to one batch; False when PostgreSQL refused it (the batch stays queued)."""
        batch = [self._pending[i] for i in range(min(self.batch_calls, len(self._pending)))]
        if not batch:
            return True
        calls = [b.call for b in batch]
        turns = [t for b in batch for t in b.turns]
        msgs = [m for b in batch for m in b.messages]
        try:
            await self.store.write_records(calls, turns, msgs)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, _TRANSIENT):
                return self._failed(exc)
            # PostgreSQL refused the data itself (a domain or agent deleted meanwhile...): a
            # retry would fail for ever and hold up every later call. Write one by one and
            # drop only the calls that cannot be written.
            try:
                await self._write_one_by_one(batch, exc)
            except Exception as again:  # the database went away meanwhile
                return self._failed(again)
            return True
        except Exception as exc:
            return self._failed(exc)
        self._written(batch)
        return True

    async def _write_one_by_one(self, batch: list[CallRows], first: BaseException) -> None:
        for rows in batch:
            try:
                await self.store.write_records([rows.call], rows.turns, rows.messages)
            except asyncpg.PostgresError as exc:
                if isinstance(exc, _TRANSIENT):
                    raise
                self.stats.calls_rejected += 1
                logger.bind(call=rows.call.get("call_uuid", "-")).error(
                    "call record rejected by PostgreSQL, dropped: {}", exc
                )
                self._pending.remove(rows)
                continue
            self._written([rows])
        logger.warning("a batch of call records was written call by call after: {}", first)

    def _failed(self, exc: BaseException) -> bool:
        self.stats.write_failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            logger.warning(
                "call records not written ({}); {} calls buffered, retrying",
                exc,
                len(self._pending),
            )
        return False

    def _written(self, batch: list[CallRows]) -> None:
        for rows in batch:
            self._pending.remove(rows)
        calls = [b.call for b in batch]
        turns = sum(len(b.turns) for b in batch)
        msgs = sum(len(b.messages) for b in batch)
        if self._failing_since is not None:
            logger.info(
                "call records written again after {:.1f}s of failures",
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        self.stats.batches += 1
        self.stats.calls_written += len(calls)
        self.stats.turns_written += turns
        self.stats.messages_written += msgs

    async def close(self, timeout_secs: float = 5.0) -> None:
        """Flush what is buffered (graceful shutdown), giving up after ``timeout_secs``."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_secs)
        except TimeoutError:
            self._task.cancel()
            logger.error(
                "shutdown: {} call records could not be written (PostgreSQL unreachable)",
                len(self._pending),
            )
