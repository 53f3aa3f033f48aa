"""Real PostgreSQL and Redis on loopback, a database per test run, and a TCP proxy to cut.

Never skipped: if PostgreSQL or Redis is down the fixtures fail loudly (CI starts both).
"PostgreSQL down" and "Redis down" are emulated by cutting a proxy the code under test talks
through - the machine's services keep running for everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from pipeswitch.config.db import SecretBox, connect, generate_key, migrate
from pipeswitch.config.tenant_store import AgentFields, TenantStore

PG_HOST = os.environ.get("PIPESWITCH_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PIPESWITCH_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("PIPESWITCH_TEST_PG_USER", "postgres")
# Each pytest-xdist worker (gw0, gw1, ...) gets its own Redis database (1, 2, ...), so fixed
# call uuids ("c1", "during") in two tests running at once never share a key.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
REDIS_DB = int(_WORKER[2:]) % 15 + 1 if _WORKER.startswith("gw") else 0
REDIS_URL = os.environ.get("PIPESWITCH_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}")


def redis_url(port: int) -> str:
    """The worker's Redis database through ``port`` (a :class:`CuttableProxy`)."""
    return f"redis://127.0.0.1:{port}/{REDIS_DB}"


# FusionPBX's v_domains as FusionPBX creates it (the columns Pipeswitch reads).
V_DOMAINS = """
CREATE TABLE v_domains (
    domain_uuid uuid PRIMARY KEY,
    domain_parent_uuid uuid,
    domain_name text,
    domain_enabled text,
    domain_description text
)
"""


def dsn(database: str, port: int = PG_PORT) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{port}/{database}"


@dataclass
class Db:
    """The test run's database: DSN, an admin connection, the store, the secrets box."""

    name: str
    dsn: str
    conn: asyncpg.Connection
    box: SecretBox
    key: str

    @property
    def store(self) -> TenantStore:
        return TenantStore(self.conn, self.box)

    async def add_domain(self, name: str | None = None) -> uuidlib.UUID:
        """A FusionPBX domain (as FusionPBX's UI would insert it)."""
        duid = uuidlib.uuid4()
        name = name or f"d{duid.hex[:10]}.example.com"
        await self.conn.execute(
            "INSERT INTO v_domains (domain_uuid, domain_name, domain_enabled) VALUES ($1, $2, 'true')",
            duid,
            name,
        )
        return duid

    async def add_agent(self, duid: uuidlib.UUID, **fields: object) -> str:
        doc: dict[str, object] = {"agent_name": "Reception", "agent_default": True, **fields}
        row = await self.store.create_agent(duid, AgentFields.model_validate(doc))
        return str(row["voice_agent_uuid"])


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def db() -> AsyncIterator[Db]:
    """``pipeswitch_test_<pid>``: created, FusionPBX's v_domains added, migrated; dropped after."""
    # Unique per fixture instance: the console tests import this fixture too, and pytest
    # then holds two session-scoped instances at once.
    name = f"pipeswitch_test_{os.getpid()}_{uuidlib.uuid4().hex[:8]}"
    try:
        admin = await asyncpg.connect(dsn("postgres"), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT}: {exc}")
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await connect(dsn(name))
    await conn.execute(V_DOMAINS)
    await migrate(conn)
    key = generate_key()
    try:
        yield Db(name, dsn(name), conn, SecretBox(key), key)
    finally:
        await conn.close()
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def redis_ok() -> AsyncIterator[str]:
    """The Redis URL, checked to answer (fails loudly otherwise)."""
    r = aioredis.from_url(REDIS_URL, socket_timeout=2)
    try:
        await r.ping()
    except Exception as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}")
    finally:
        await r.aclose()
    yield REDIS_URL


class CuttableProxy:
    """A loopback TCP proxy: ``cut()`` drops every connection and refuses new ones (the
    service looks down), ``restore()`` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        with contextlib.suppress(Exception):
            w.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        self._writers.update((cw, sw))
        tasks = [
            asyncio.ensure_future(self._pipe(cr, sw)),
            asyncio.ensure_future(self._pipe(sr, cw)),
        ]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)
        self._writers.difference_update((cw, sw))

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()
        for t in list(self._tasks):
            t.cancel()


@pytest_asyncio.fixture(loop_scope="session")
async def pg_proxy() -> AsyncIterator[CuttableProxy]:
    p = CuttableProxy(PG_HOST, PG_PORT)
    await p.start()
    yield p
    await p.close()


@pytest_asyncio.fixture(loop_scope="session")
async def redis_proxy(redis_ok: str) -> AsyncIterator[CuttableProxy]:
    p = CuttableProxy("127.0.0.1", 6379)
    await p.start()
    yield p
    await p.close()
