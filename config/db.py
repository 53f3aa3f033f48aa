"""PostgreSQL plumbing for tenancy: connection pool, migrations, secrets at rest.

Migrations are the ``NNN_description.sql`` files of :mod:`pipeswitch.sql`, applied in name
order under a PostgreSQL advisory lock (two instances starting at once take turns) and
recorded in ``v_voice_schema_migrations``. Each file is idempotent on its own as well, so a
crash half-way through or a hand-applied file never leaves a database that migrate can't fix.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import asyncpg
from cryptography.fernet import Fernet, InvalidToken
from loguru import logger

# pg_advisory_lock key: any fixed 64-bit number unique to this application.
MIGRATION_LOCK_KEY = 0x70697065_73770001
MIGRATIONS_TABLE = "v_voice_schema_migrations"


@dataclass(frozen=True)
class Migration:
    """One migration file: its name (``001_voice_schema``), SQL text and checksum."""

    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def bundled_migrations() -> list[Migration]:
    """The migrations shipped in the package, in the order they apply."""
    out = []
    for entry in files("pipeswitch.sql").iterdir():
        if entry.name.endswith(".sql"):
            out.append(Migration(entry.name.removesuffix(".sql"), entry.read_text("utf-8")))
    return sorted(out, key=lambda m: m.name)


async def _init_connection(conn: asyncpg.Connection) -> None:
    """JSONB columns travel as Python objects, not strings."""
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 5) -> asyncpg.Pool:
    """A small pool: tenant lookups are cached and records are batched, so few connections."""
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=10,
        # Seconds a dead connection may hold a call-record flush before it is abandoned.
        timeout=5,
    )


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection (CLI commands, the LISTEN connection)."""
    conn = await asyncpg.connect(dsn, timeout=5, command_timeout=10)
    await _init_connection(conn)
    return conn


async def migrate(
    conn: asyncpg.Connection, *, dry_run: bool = False, migrations: list[Migration] | None = None
) -> list[str]:
    """Apply pending migrations; returns the names applied (or that would be, with dry_run)."""
    todo = migrations if migrations is not None else bundled_migrations()
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", MIGRATIONS_TABLE)
        applied: dict[str, str] = {}
        if exists:
            rows = await conn.fetch(f"SELECT migration_name, checksum FROM {MIGRATIONS_TABLE}")
            applied = {r["migration_name"]: r["checksum"] for r in rows}
        pending = [m for m in todo if m.name not in applied]
        for m in todo:
            if m.name in applied and applied[m.name] != m.checksum:
                logger.warning(
                    "migration {} changed since it was applied (checksum differs); not re-run",
                    m.name,
                )
        if dry_run:
            return [m.name for m in pending]
        if not exists:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
                " migration_name text PRIMARY KEY,"
                " checksum text NOT NULL,"
                " insert_date timestamptz NOT NULL DEFAULT now())"
            )
        for m in pending:
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (migration_name, checksum) VALUES ($1, $2)"
                    " ON CONFLICT (migration_name) DO NOTHING",
                    m.name,
                    m.checksum,
                )
            logger.info("migration {} applied", m.name)
        return [m.name for m in pending]
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


# --- secrets at rest ---------------------------------------------------------------------


class SecretsUnavailable(RuntimeError):
    """An encrypted value is needed but PIPESWITCH_SECRETS_KEY is unset or wrong."""


class SecretBox:
    """Fernet (AES-128-CBC + HMAC-SHA256) around provider keys and signing secrets.

    The key comes from the environment, never from the database: a database dump alone does
    not reveal a tenant's provider keys.
    """

    def __init__(self, key: str | None) -> None:
        self._fernet: Fernet | None = None
        if key:
            try:
                self._fernet = Fernet(key.encode("ascii"))
            except (ValueError, UnicodeEncodeError) as exc:
                raise SecretsUnavailable(
                    "PIPESWITCH_SECRETS_KEY is not a Fernet key (make one with "
                    "`pipeswitch admin gen-key`)"
                ) from exc

    @property
    def available(self) -> bool:
        return self._fernet is not None

    def encrypt(self, plain: str) -> str:
        if self._fernet is None:
            raise SecretsUnavailable("PIPESWITCH_SECRETS_KEY is not set: cannot store a secret")
        return self._fernet.encrypt(plain.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        if self._fernet is None:
            raise SecretsUnavailable("PIPESWITCH_SECRETS_KEY is not set: cannot read a secret")
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except InvalidToken as exc:
            raise SecretsUnavailable("a stored secret does not decrypt with this key") from exc


def generate_key() -> str:
    """A new Fernet key for PIPESWITCH_SECRETS_KEY."""
    return Fernet.generate_key().decode("ascii")


def hash_token(token: str) -> str:
    """sha256 of a token. Tokens are 256-bit random strings, so a plain hash is enough."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (admin API, static stream token)."""
    return secrets.token_urlsafe(32)


def row_dict(row: Any) -> dict[str, Any]:
    """An asyncpg record as JSON-ready data (uuids and timestamps as strings)."""
    out: dict[str, Any] = {}
    for k, v in dict(row).items():
        if v is None or isinstance(v, bool | int | float | str | dict | list):
            out[k] = v
        else:
            out[k] = v.isoformat() if hasattr(v, "isoformat") else str(v)
    return out
