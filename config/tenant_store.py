"""Every SQL statement Pipeswitch runs against the ``v_voice_*`` tables, in one place.

Each method that touches tenant data takes the ``domain_uuid`` it acts for and puts it in the
``WHERE`` clause (or the inserted row), so a tenant token can never reach another domain's
agents, credentials or transcripts - ``tests/tenancy/test_isolation.py`` checks each method.
The only cross-domain reads are :meth:`TenantStore.find_domain` / :meth:`all_domains` (to
resolve the domain itself) and :meth:`retention_policies` (for ``pipeswitch purge``).
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Sequence
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeswitch.config.db import SecretBox, hash_token, new_token, row_dict
from pipeswitch.config.tenants import (
    PipelineKind,
    PlaybackDialect,
    ProviderSettings,
    ToolSettings,
    TurnSettings,
)

Json = dict[str, Any]


class NotFound(LookupError):
    """The row does not exist in this domain (whether or not it exists in another)."""


class AgentFields(BaseModel):
    """Writable agent columns, validated with the same types the tenant model uses."""

    model_config = ConfigDict(extra="forbid")

    agent_name: str | None = Field(default=None, min_length=1, max_length=200)
    agent_default: bool | None = None
    system_prompt: str | None = None
    first_message: str | None = None
    language: str | None = None
    pipeline: PipelineKind | None = None
    providers: ProviderSettings | None = None
    turns: TurnSettings | None = None
    voice: str | None = None
    playback: PlaybackDialect | None = None
    module_build: Literal["community", "voxcom", "cloudfieldcz", "amigniter"] | None = None
    audio_rate: int | None = None
    audio_mix: Literal["mono", "mixed", "stereo"] | None = None
    max_call_secs: float | None = Field(default=None, gt=0)
    agent_enabled: bool | None = None

    @field_validator("audio_rate")
    @classmethod
    def _rate(cls, v: int | None) -> int | None:
        if v is not None and (v <= 0 or v % 8000):
            raise ValueError("audio_rate must be a positive multiple of 8000")
        return v

    def columns(self) -> Json:
        """Set fields only, JSON columns as plain dicts."""
        out: Json = {}
        for k in self.model_fields_set:
            v = getattr(self, k)
            out[k] = v.model_dump(exclude_unset=True) if isinstance(v, BaseModel) else v
        return out


_AGENT_COLS = (
    "voice_agent_uuid, domain_uuid, agent_name, agent_default, system_prompt, first_message,"
    " language, pipeline, providers, turns, voice, playback, module_build, audio_rate,"
    " audio_mix, max_call_secs, agent_enabled, insert_date, update_date"
)
_DOMAIN_SETTING_COLS = (
    "max_concurrent_calls",
    "retention_days",
    "record_audio",
    "voice_domain_enabled",
)


def _uuid(value: str | uuidlib.UUID, what: str = "uuid") -> uuidlib.UUID:
    try:
        return value if isinstance(value, uuidlib.UUID) else uuidlib.UUID(str(value))
    except ValueError as exc:
        raise NotFound(f"{what} {str(value)[:40]!r} is not a uuid") from exc


class TenantStore:
    """Domain-scoped data access over an asyncpg pool (or one connection)."""

    def __init__(self, db: asyncpg.Pool | asyncpg.Connection, box: SecretBox) -> None:
        self.db = db
        self.box = box

    # --- domains (FusionPBX's v_domains) -------------------------------------------------

    async def find_domain(self, key: str) -> asyncpg.Record | None:
        """A domain by name (case-insensitive) or uuid, as FusionPBX names it."""
        key = key.strip()
        try:
            uid = uuidlib.UUID(key)
        except ValueError:
            return await self.db.fetchrow(
                "SELECT domain_uuid, domain_name, domain_enabled::text AS domain_enabled"
                " FROM v_domains WHERE lower(domain_name) = lower($1) LIMIT 1",
                key,
            )
        return await self.db.fetchrow(
            "SELECT domain_uuid, domain_name, domain_enabled::text AS domain_enabled"
            " FROM v_domains WHERE domain_uuid = $1",
            uid,
        )

    async def all_domains(self) -> list[asyncpg.Record]:
        """Domains with at least one voice agent (start-up warm-up of the tenant cache)."""
        return await self.db.fetch(
            "SELECT d.domain_uuid, d.domain_name, d.domain_enabled::text AS domain_enabled"
            " FROM v_domains d WHERE EXISTS"
            " (SELECT 1 FROM v_voice_agents a WHERE a.domain_uuid = d.domain_uuid)"
        )

    async def domain_settings(self, domain_uuid: uuidlib.UUID) -> asyncpg.Record | None:
        return await self.db.fetchrow(
            "SELECT * FROM v_voice_domains WHERE domain_uuid = $1", domain_uuid
        )

    async def set_domain_settings(self, domain_uuid: uuidlib.UUID, fields: Json) -> Json:
        """Upsert the domain's policy row (limit, retention, audio recording, enabled)."""
        cols = {k: v for k, v in fields.items() if k in _DOMAIN_SETTING_COLS}
        if set(fields) - set(cols):
            raise ValueError(f"unknown domain settings: {sorted(set(fields) - set(cols))}")
        await self.db.execute(
            "INSERT INTO v_voice_domains (domain_uuid) VALUES ($1)"
            " ON CONFLICT (domain_uuid) DO NOTHING",
            domain_uuid,
        )
        if cols:
            sets = ", ".join(f"{k} = ${i + 2}" for i, k in enumerate(cols))
            await self.db.execute(
                f"UPDATE v_voice_domains SET {sets} WHERE domain_uuid = $1",
                domain_uuid,
                *cols.values(),
            )
        row = await self.domain_settings(domain_uuid)
        assert row is not None
        return _public_domain_settings(row)

    async def set_signing_secret(self, domain_uuid: uuidlib.UUID, secret: str | None) -> None:
        """Store (encrypted) or clear the domain's stream-signing secret."""
        enc = self.box.encrypt(secret) if secret else None
        await self.db.execute(
            "INSERT INTO v_voice_domains (domain_uuid, signing_secret_enc) VALUES ($1, $2)"
            " ON CONFLICT (domain_uuid) DO UPDATE SET signing_secret_enc = EXCLUDED.signing_secret_enc",
            domain_uuid,
            enc,
        )

    async def set_stream_token(self, domain_uuid: uuidlib.UUID, token: str | None) -> None:
        """Store the sha256 of the domain's static stream token (None clears it)."""
        h = hash_token(token) if token else None
        await self.db.execute(
            "INSERT INTO v_voice_domains (domain_uuid, stream_token_hash) VALUES ($1, $2)"
            " ON CONFLICT (domain_uuid) DO UPDATE SET stream_token_hash = EXCLUDED.stream_token_hash",
            domain_uuid,
            h,
        )

    # --- agents ----------------------------------------------------------------------------

    async def list_agents(self, domain_uuid: uuidlib.UUID) -> list[asyncpg.Record]:
        return await self.db.fetch(
            f"SELECT {_AGENT_COLS} FROM v_voice_agents WHERE domain_uuid = $1"
            " ORDER BY agent_default DESC, insert_date",
            domain_uuid,
        )

    async def get_agent(self, domain_uuid: uuidlib.UUID, agent_uuid: str) -> asyncpg.Record:
        row = await self.db.fetchrow(
            f"SELECT {_AGENT_COLS} FROM v_voice_agents"
            " WHERE domain_uuid = $1 AND voice_agent_uuid = $2",
            domain_uuid,
            _uuid(agent_uuid, "agent"),
        )
        if row is None:
            raise NotFound(f"agent {agent_uuid} not found in this domain")
        return row

    async def create_agent(self, domain_uuid: uuidlib.UUID, fields: AgentFields) -> asyncpg.Record:
        cols = fields.columns()
        if not cols.get("agent_name"):
            raise ValueError("agent_name is required")
        names = ["domain_uuid", *cols]
        params = ", ".join(f"${i + 1}" for i in range(len(names)))
        async with _tx(self.db) as conn:
            if cols.get("agent_default"):
                await conn.execute(
                    "UPDATE v_voice_agents SET agent_default = false"
                    " WHERE domain_uuid = $1 AND agent_default",
                    domain_uuid,
                )
            return await conn.fetchrow(
                f"INSERT INTO v_voice_agents ({', '.join(names)}) VALUES ({params})"
                f" RETURNING {_AGENT_COLS}",
                domain_uuid,
                *cols.values(),
            )

    async def update_agent(
        self, domain_uuid: uuidlib.UUID, agent_uuid: str, fields: AgentFields
    ) -> asyncpg.Record:
        cols = fields.columns()
        if not cols:
            return await self.get_agent(domain_uuid, agent_uuid)
        sets = ", ".join(f"{k} = ${i + 3}" for i, k in enumerate(cols))
        async with _tx(self.db) as conn:
            if cols.get("agent_default"):
                await conn.execute(
                    "UPDATE v_voice_agents SET agent_default = false"
                    " WHERE domain_uuid = $1 AND agent_default AND voice_agent_uuid <> $2",
                    domain_uuid,
                    _uuid(agent_uuid, "agent"),
                )
            row = await conn.fetchrow(
                f"UPDATE v_voice_agents SET {sets}"
                f" WHERE domain_uuid = $1 AND voice_agent_uuid = $2 RETURNING {_AGENT_COLS}",
                domain_uuid,
                _uuid(agent_uuid, "agent"),
                *cols.values(),
            )
        if row is None:
            raise NotFound(f"agent {agent_uuid} not found in this domain")
        return row

    # --- routing ---------------------------------------------------------------------------

    async def list_routes(self, domain_uuid: uuidlib.UUID) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT voice_route_uuid, domain_uuid, destination, voice_agent_uuid, route_enabled,"
            " insert_date, update_date FROM v_voice_routes WHERE domain_uuid = $1"
            " ORDER BY destination",
            domain_uuid,
        )

    async def set_route(
        self, domain_uuid: uuidlib.UUID, destination: str, agent_uuid: str, enabled: bool = True
    ) -> asyncpg.Record:
        """Route a destination (DID or extension) to one of this domain's agents."""
        await self.get_agent(domain_uuid, agent_uuid)  # the agent must be this domain's
        return await self.db.fetchrow(
            "INSERT INTO v_voice_routes (domain_uuid, destination, voice_agent_uuid, route_enabled)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (domain_uuid, destination) DO UPDATE"
            " SET voice_agent_uuid = EXCLUDED.voice_agent_uuid,"
            " route_enabled = EXCLUDED.route_enabled"
            " RETURNING voice_route_uuid, domain_uuid, destination, voice_agent_uuid,"
            " route_enabled, insert_date, update_date",
            domain_uuid,
            destination,
            _uuid(agent_uuid, "agent"),
            enabled,
        )

    async def delete_route(self, domain_uuid: uuidlib.UUID, destination: str) -> None:
        done = await self.db.execute(
            "DELETE FROM v_voice_routes WHERE domain_uuid = $1 AND destination = $2",
            domain_uuid,
            destination,
        )
        if done.endswith(" 0"):
            raise NotFound(f"no route for {destination!r} in this domain")

    # --- tools -----------------------------------------------------------------------------

    async def list_tools(
        self, domain_uuid: uuidlib.UUID, agent_uuid: str | None = None
    ) -> list[asyncpg.Record]:
        if agent_uuid is None:
            return await self.db.fetch(
                "SELECT * FROM v_voice_tools WHERE domain_uuid = $1 ORDER BY tool_name",
                domain_uuid,
            )
        return await self.db.fetch(
            "SELECT * FROM v_voice_tools WHERE domain_uuid = $1 AND voice_agent_uuid = $2"
            " ORDER BY tool_name",
            domain_uuid,
            _uuid(agent_uuid, "agent"),
        )

    async def set_tool(
        self,
        domain_uuid: uuidlib.UUID,
        agent_uuid: str,
        tool_name: str,
        settings: Json,
        enabled: bool = True,
    ) -> asyncpg.Record:
        """Enable/configure one tool for one agent (settings: transfer targets, hours...)."""
        # Validate as the tenant model will read it: a bad time zone fails here, not on a call.
        ToolSettings.model_validate({"enabled": [tool_name] if enabled else [], **settings})
        await self.get_agent(domain_uuid, agent_uuid)
        return await self.db.fetchrow(
            "INSERT INTO v_voice_tools (domain_uuid, voice_agent_uuid, tool_name, tool_settings,"
            " tool_enabled) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (voice_agent_uuid, tool_name) DO UPDATE"
            " SET tool_settings = EXCLUDED.tool_settings, tool_enabled = EXCLUDED.tool_enabled"
            " RETURNING *",
            domain_uuid,
            _uuid(agent_uuid, "agent"),
            tool_name,
            settings,
            enabled,
        )

    # --- credentials -----------------------------------------------------------------------

    async def set_credential(
        self,
        domain_uuid: uuidlib.UUID,
        provider: str,
        *,
        api_key: str | None = None,
        key_ref: str | None = None,
    ) -> None:
        """Store a provider key (encrypted) or a reference to a deployment secret by name."""
        if not api_key and not key_ref:
            raise ValueError("give api_key or key_ref")
        enc = self.box.encrypt(api_key) if api_key else None
        await self.db.execute(
            "INSERT INTO v_voice_credentials (domain_uuid, provider, api_key_enc, key_ref)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (domain_uuid, provider) DO UPDATE"
            " SET api_key_enc = EXCLUDED.api_key_enc, key_ref = EXCLUDED.key_ref",
            domain_uuid,
            provider,
            enc,
            key_ref,
        )

    async def list_credentials(self, domain_uuid: uuidlib.UUID) -> list[Json]:
        """Which providers have a key (never the key)."""
        rows = await self.db.fetch(
            "SELECT provider, key_ref, api_key_enc IS NOT NULL AS stored, update_date"
            " FROM v_voice_credentials WHERE domain_uuid = $1 ORDER BY provider",
            domain_uuid,
        )
        return [row_dict(r) for r in rows]

    async def credential_rows(self, domain_uuid: uuidlib.UUID) -> list[asyncpg.Record]:
        """Encrypted credential rows, for the tenant loader only."""
        return await self.db.fetch(
            "SELECT provider, api_key_enc, key_ref FROM v_voice_credentials WHERE domain_uuid = $1",
            domain_uuid,
        )

    # --- call records ----------------------------------------------------------------------

    async def list_calls(
        self, domain_uuid: uuidlib.UUID, *, caller: str | None = None, limit: int = 100
    ) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT * FROM v_voice_calls WHERE domain_uuid = $1"
            " AND ($2::text IS NULL OR caller = $2) ORDER BY start_stamp DESC LIMIT $3",
            domain_uuid,
            caller,
            max(1, min(limit, 1000)),
        )

    async def get_call(self, domain_uuid: uuidlib.UUID, call_uuid: str) -> asyncpg.Record:
        """A call by FreeSWITCH call uuid (or by voice_call_uuid)."""
        row = await self.db.fetchrow(
            "SELECT * FROM v_voice_calls WHERE domain_uuid = $1"
            " AND (call_uuid = $2 OR voice_call_uuid::text = $2)",
            domain_uuid,
            call_uuid,
        )
        if row is None:
            raise NotFound(f"call {call_uuid} not found in this domain")
        return row

    async def list_turns(self, domain_uuid: uuidlib.UUID, call_uuid: str) -> list[asyncpg.Record]:
        call = await self.get_call(domain_uuid, call_uuid)
        return await self.db.fetch(
            "SELECT * FROM v_voice_turns WHERE domain_uuid = $1 AND voice_call_uuid = $2"
            " ORDER BY turn_index",
            domain_uuid,
            call["voice_call_uuid"],
        )

    async def list_messages(
        self, domain_uuid: uuidlib.UUID, limit: int = 100
    ) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT * FROM v_voice_messages WHERE domain_uuid = $1"
            " ORDER BY insert_date DESC LIMIT $2",
            domain_uuid,
            max(1, min(limit, 1000)),
        )

    async def write_records(
        self, calls: Sequence[Json], turns: Sequence[Json], messages: Sequence[Json]
    ) -> None:
        """One batch of finished calls in one transaction; idempotent (a retried batch that had
        in fact committed inserts nothing twice)."""
        async with _tx(self.db) as conn:
            if calls:
                await conn.executemany(
                    "INSERT INTO v_voice_calls (voice_call_uuid, domain_uuid, voice_agent_uuid,"
                    " call_uuid, caller, destination, instance, start_stamp, end_stamp,"
                    " duration_secs, end_reason, turn_count, metadata)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                    " ON CONFLICT DO NOTHING",
                    [
                        (
                            c["voice_call_uuid"],
                            c["domain_uuid"],
                            c.get("voice_agent_uuid"),
                            c["call_uuid"],
                            c.get("caller"),
                            c.get("destination"),
                            c.get("instance"),
                            c["start_stamp"],
                            c.get("end_stamp"),
                            c.get("duration_secs"),
                            c.get("end_reason"),
                            c.get("turn_count", 0),
                            c.get("metadata"),
                        )
                        for c in calls
                    ],
                )
            if turns:
                await conn.executemany(
                    "INSERT INTO v_voice_turns (domain_uuid, voice_call_uuid, turn_index, role,"
                    " turn_text, heard_text, started_at, ended_at, latency_ms, interrupted)"
                    " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10"
                    # the call row must be this domain's: a turn can't attach across domains
                    " WHERE EXISTS (SELECT 1 FROM v_voice_calls WHERE voice_call_uuid = $2"
                    " AND domain_uuid = $1)"
                    " ON CONFLICT (voice_call_uuid, turn_index) DO NOTHING",
                    [
                        (
                            t["domain_uuid"],
                            t["voice_call_uuid"],
                            t["turn_index"],
                            t["role"],
                            t.get("turn_text", ""),
                            t.get("heard_text"),
                            t.get("started_at"),
                            t.get("ended_at"),
                            t.get("latency_ms"),
                            t.get("interrupted", False),
                        )
                        for t in turns
                    ],
                )
            if messages:
                await conn.executemany(
                    "INSERT INTO v_voice_messages (voice_message_uuid, domain_uuid,"
                    " voice_call_uuid, caller_name, caller_number, reason, message_text)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    [
                        (
                            m["voice_message_uuid"],
                            m["domain_uuid"],
                            m.get("voice_call_uuid"),
                            m.get("caller_name"),
                            m.get("caller_number"),
                            m.get("reason"),
                            m.get("message_text"),
                        )
                        for m in messages
                    ],
                )

    # --- GDPR, retention, audit ------------------------------------------------------------

    async def delete_caller_data(self, domain_uuid: uuidlib.UUID, caller: str, actor: str) -> Json:
        """Erase one caller's calls, transcripts and messages in this domain; audited."""
        async with _tx(self.db) as conn:
            # Messages first: those taken on the caller's calls would go with the calls
            # (cascade) and not be counted.
            msgs = await conn.fetchval(
                "WITH d AS (DELETE FROM v_voice_messages WHERE domain_uuid = $1"
                " AND (caller_number = $2 OR voice_call_uuid IN (SELECT voice_call_uuid"
                " FROM v_voice_calls WHERE domain_uuid = $1 AND caller = $2))"
                " RETURNING 1) SELECT count(*) FROM d",
                domain_uuid,
                caller,
            )
            calls = await conn.fetchval(
                "WITH d AS (DELETE FROM v_voice_calls WHERE domain_uuid = $1 AND caller = $2"
                " RETURNING 1) SELECT count(*) FROM d",
                domain_uuid,
                caller,
            )
            # The audit row names the request, not the number (that would keep the data).
            result = {"calls": calls, "messages": msgs, "caller_sha256": hash_token(caller)}
            await _audit(conn, domain_uuid, actor, "gdpr_delete", result)
        return result

    async def purge(self, domain_uuid: uuidlib.UUID, days: int, actor: str) -> Json:
        """Delete this domain's call records and messages older than ``days``; audited."""
        async with _tx(self.db) as conn:
            calls = await conn.fetchval(
                "WITH d AS (DELETE FROM v_voice_calls WHERE domain_uuid = $1"
                " AND start_stamp < now() - make_interval(days => $2) RETURNING 1)"
                " SELECT count(*) FROM d",
                domain_uuid,
                days,
            )
            msgs = await conn.fetchval(
                "WITH d AS (DELETE FROM v_voice_messages WHERE domain_uuid = $1"
                " AND insert_date < now() - make_interval(days => $2) RETURNING 1)"
                " SELECT count(*) FROM d",
                domain_uuid,
                days,
            )
            result = {"retention_days": days, "calls": calls, "messages": msgs}
            await _audit(conn, domain_uuid, actor, "purge", result)
        return result

    async def retention_policies(self) -> list[asyncpg.Record]:
        """Every domain with a retention period (``pipeswitch purge``)."""
        return await self.db.fetch(
            "SELECT domain_uuid, retention_days FROM v_voice_domains"
            " WHERE retention_days IS NOT NULL"
        )

    async def audit(
        self, domain_uuid: uuidlib.UUID, actor: str, action: str, details: Json
    ) -> None:
        await _audit(self.db, domain_uuid, actor, action, details)

    async def list_audit(self, domain_uuid: uuidlib.UUID, limit: int = 100) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT * FROM v_voice_audit WHERE domain_uuid = $1 ORDER BY insert_date DESC LIMIT $2",
            domain_uuid,
            max(1, min(limit, 1000)),
        )

    # --- admin tokens ----------------------------------------------------------------------

    async def create_admin_token(self, domain_uuid: uuidlib.UUID, description: str = "") -> str:
        """A new admin API token for this domain; only its hash is stored. Shown once."""
        token = new_token()
        await self.db.execute(
            "INSERT INTO v_voice_admin_tokens (domain_uuid, token_hash, token_description)"
            " VALUES ($1, $2, $3)",
            domain_uuid,
            hash_token(token),
            description,
        )
        return token

    async def domain_for_admin_token(self, token: str) -> uuidlib.UUID | None:
        """The domain an admin token belongs to (None: unknown or disabled)."""
        return await self.db.fetchval(
            "SELECT domain_uuid FROM v_voice_admin_tokens WHERE token_hash = $1 AND token_enabled",
            hash_token(token),
        )


def _public_domain_settings(row: asyncpg.Record) -> Json:
    d = row_dict(row)
    d["signing_secret_set"] = d.pop("signing_secret_enc") is not None
    d["stream_token_set"] = d.pop("stream_token_hash") is not None
    return d


async def _audit(
    db: asyncpg.Pool | asyncpg.Connection,
    domain_uuid: uuidlib.UUID,
    actor: str,
    action: str,
    details: Json,
) -> None:
    await db.execute(
        "INSERT INTO v_voice_audit (domain_uuid, actor, action, details) VALUES ($1, $2, $3, $4)",
        domain_uuid,
        actor,
        action,
        details,
    )


class _tx:
    """``async with _tx(pool_or_conn) as conn``: a transaction on a pooled or given connection."""

    def __init__(self, db: asyncpg.Pool | asyncpg.Connection) -> None:
        self._db = db
        self._conn: Any = None
        self._acquired: Any = None
        self._tr: Any = None

    async def __aenter__(self) -> Any:
        if isinstance(self._db, asyncpg.Pool):
            self._acquired = self._db.acquire()
            self._conn = await self._acquired.__aenter__()
        else:
            self._conn = self._db
        self._tr = self._conn.transaction()
        await self._tr.__aenter__()
        return self._conn

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._tr.__aexit__(*exc)
        finally:
            if self._acquired is not None:
                await self._acquired.__aexit__(*exc)
