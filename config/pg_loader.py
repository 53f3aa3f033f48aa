"""Tenants from FusionPBX's PostgreSQL database (``v_domains`` + ``v_voice_*``).

The WebSocket upgrade never waits on this loader (the server upgrades first), and a call for a
domain already in the cache is served with two dict lookups, no I/O. The cache is kept current
by ``LISTEN pipeswitch_tenant``: a trigger on every voice table (and on ``v_domains``) sends the
changed ``domain_uuid``, and that one domain is re-read - the next call sees the change within
milliseconds. While PostgreSQL is unreachable the cache keeps serving the domains it has, and a
background task reconnects (with backoff) and re-reads everything it may have missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from loguru import logger
from pydantic import ValidationError

from pipeswitch.config.db import SecretBox, connect, create_pool
from pipeswitch.config.tenant_store import TenantStore
from pipeswitch.config.tenants import Tenant

NOTIFY_CHANNEL = "pipeswitch_tenant"
# key_ref may only name deployment secrets meant for tenants: a domain admin must not be able to
# point a provider key at PIPESWITCH_SECRETS_KEY or the database password.
KEY_REF_PREFIX = "PIPESWITCH_KEY_"
# Unknown domains remembered (each costs one indexed query otherwise).
MAX_NEGATIVE = 10_000


@dataclass
class DomainEntry:
    """One domain's agents as tenants, and its destination routes."""

    domain_uuid: str
    name: str
    default: Tenant | None
    agents: dict[str, Tenant] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)  # destination -> agent uuid


def normalize_destination(dest: str) -> str:
    """``+4420555`` and ``4420555`` are the same DID (FreeSWITCH hands either form over)."""
    return dest.strip().lstrip("+")


def _enabled(value: Any) -> bool:
    """FusionPBX stores ``domain_enabled`` as text ('true'/'false') or boolean."""
    return str(value).lower() in ("true", "t", "1", "yes", "on")


def build_entry(
    domain: asyncpg.Record,
    settings: asyncpg.Record | None,
    agents: list[asyncpg.Record],
    routes: list[asyncpg.Record],
    tools: list[asyncpg.Record],
    creds: list[asyncpg.Record],
    box: SecretBox,
) -> DomainEntry:
    """Rows of one domain -> its tenants (one per agent). Raises on invalid configuration."""
    duid = str(domain["domain_uuid"])
    name = str(domain["domain_name"] or "").lower()
    domain_on = _enabled(domain["domain_enabled"])
    access: dict[str, Any] = {}
    limit = None
    if settings is not None:
        domain_on = domain_on and bool(settings["voice_domain_enabled"])
        if settings["signing_secret_enc"]:
            access["signing_secret"] = box.decrypt(settings["signing_secret_enc"])
        if settings["stream_token_hash"]:
            access["token_sha256"] = settings["stream_token_hash"]
        limit = settings["max_concurrent_calls"]
    keys: dict[str, str] = {}
    for c in creds:
        if c["api_key_enc"]:
            keys[c["provider"]] = box.decrypt(c["api_key_enc"])
        elif c["key_ref"]:
            ref = str(c["key_ref"])
            value = os.environ.get(ref, "") if ref.startswith(KEY_REF_PREFIX) else ""
            if value:
                keys[c["provider"]] = value
            else:
                logger.bind(tenant=name).warning(
                    "credential {} refers to {} which is unset or not a {}* variable",
                    c["provider"],
                    ref,
                    KEY_REF_PREFIX,
                )
    tools_by_agent: dict[str, dict[str, Any]] = {}
    for t in tools:
        tdoc = tools_by_agent.setdefault(str(t["voice_agent_uuid"]), {"enabled": []})
        if t["tool_enabled"]:
            tdoc["enabled"].append(t["tool_name"])
        tdoc.update(t["tool_settings"] or {})
    entry = DomainEntry(domain_uuid=duid, name=name, default=None)
    for a in agents:
        auid = str(a["voice_agent_uuid"])
        doc: dict[str, Any] = {
            "name": name,
            "domain_uuid": duid,
            "agent_uuid": auid,
            "agent_name": a["agent_name"],
            "first_message": a["first_message"],
            "language": a["language"],
            "pipeline": a["pipeline"],
            "providers": a["providers"] or {},
            "turns": a["turns"] or {},
            "playback": a["playback"],
            "audio_rate": a["audio_rate"],
            "audio_mix": a["audio_mix"],
            "enabled": domain_on and bool(a["agent_enabled"]),
            "access": access,
            "max_concurrent_calls": limit,
            "provider_keys": keys,
            "tools": tools_by_agent.get(auid, {}),
        }
        if a["system_prompt"]:
            doc["system_prompt"] = a["system_prompt"]
        if a["voice"]:
            doc["voice"] = a["voice"]
        if a["max_call_secs"]:
            doc["max_call_secs"] = a["max_call_secs"]
        tenant = Tenant.model_validate(doc)
        entry.agents[auid] = tenant
        if a["agent_default"] or entry.default is None:
            entry.default = tenant
    for r in routes:
        if r["route_enabled"]:
            entry.routes[normalize_destination(str(r["destination"]))] = str(r["voice_agent_uuid"])
    return entry


class PgTenantLoader:
    """:class:`~pipeswitch.config.loaders.TenantLoader` over PostgreSQL, cached, live-updated."""

    def __init__(
        self,
        dsn: str,
        box: SecretBox,
        *,
        pool: asyncpg.Pool | None = None,
        negative_ttl_secs: float = 5.0,
        refresh_secs: float = 300.0,
    ) -> None:
        self._dsn = dsn
        self._pool = pool
        self._own_pool = pool is None
        self._store: TenantStore | None = TenantStore(pool, box) if pool is not None else None
        self._box = box
        self._negative_ttl = negative_ttl_secs
        self._refresh_secs = refresh_secs
        self._entries: dict[str, DomainEntry] = {}  # domain_uuid -> entry
        self._keys: dict[str, str] = {}  # lower(domain name) and uuid -> domain_uuid
        self._negative: dict[str, float] = {}  # key -> monotonic expiry
        self._locks: dict[str, asyncio.Lock] = {}
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self.listening = asyncio.Event()
        # Called with each domain read or re-read (e.g. to pre-synthesize a changed greeting).
        self.on_refresh: list[Callable[[DomainEntry], None]] = []
        self.stats = {"hits": 0, "misses": 0, "refreshes": 0, "refresh_errors": 0}

    # Keeps its own live cache (NOTIFY-invalidated): TenantResolver must not cache it again.
    self_caching = True

    @property
    def store(self) -> TenantStore:
        """Data access over this loader's pool (valid after start())."""
        assert self._store is not None, "start() first"
        return self._store

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "start() first"
        return self._pool

    # --- TenantLoader ----------------------------------------------------------------------

    async def load(self, key: str) -> Tenant | None:
        """Cached: no I/O. A miss reads the domain once (after the upgrade, never before)."""
        key = key.strip().lower()
        duid = self._keys.get(key)
        if duid is not None:
            entry = self._entries.get(duid)
            if entry is not None:
                self.stats["hits"] += 1
                return entry.default
        expiry = self._negative.get(key)
        if expiry is not None and expiry > time.monotonic():
            return None
        self.stats["misses"] += 1
        domain = await self.store.find_domain(key)
        if domain is None:
            if len(self._negative) >= MAX_NEGATIVE:  # junk domains from the network: bounded
                self._negative.clear()
            self._negative[key] = time.monotonic() + self._negative_ttl
            return None
        entry = await self._refresh(str(domain["domain_uuid"]))
        return entry.default if entry else None

    async def load_route(self, tenant: Tenant, destination: str) -> Tenant | None:
        """The agent routed for ``destination`` in the tenant's domain (cache only)."""
        entry = self._entries.get(tenant.domain_uuid or "")
        if entry is None:
            return None
        auid = entry.routes.get(normalize_destination(destination))
        return entry.agents.get(auid) if auid else None

    def tenants(self) -> list[Tenant]:
        """Every cached agent (start-up warm-up: greeting synthesis)."""
        return [t for e in self._entries.values() for t in e.agents.values()]

    # --- cache maintenance -----------------------------------------------------------------

    async def _refresh(self, duid: str) -> DomainEntry | None:
        """Re-read one domain; serialized per domain so a later change always lands last."""
        lock = self._locks.setdefault(duid, asyncio.Lock())
        async with lock:
            uid = uuidlib.UUID(duid)
            async with self.pool.acquire() as conn:
                store = TenantStore(conn, self._box)
                domain = await store.find_domain(duid)
                if domain is None:
                    self._drop(duid)
                    return None
                entry = build_entry(
                    domain,
                    await store.domain_settings(uid),
                    await store.list_agents(uid),
                    await store.list_routes(uid),
                    await store.list_tools(uid),
                    await store.credential_rows(uid),
                    self._box,
                )
            self._drop(duid)
            self._entries[duid] = entry
            self._keys[duid] = duid
            if entry.name:
                self._keys[entry.name] = duid
            self.stats["refreshes"] += 1
            for callback in self.on_refresh:
                callback(entry)
            return entry

    def _drop(self, duid: str) -> None:
        old = self._entries.pop(duid, None)
        if old is not None:
            self._keys.pop(old.name, None)
        self._keys.pop(duid, None)

    async def _refresh_logged(self, duid: str) -> None:
        try:
            await self._refresh(duid)
        except (ValidationError, ValueError) as exc:
            self._drop(duid)  # configuration now invalid: refuse rather than serve stale
            logger.error("domain {} configuration is invalid, calls refused: {}", duid, exc)
        except Exception as exc:
            self.stats["refresh_errors"] += 1
            logger.warning("refresh of domain {} failed (cache kept): {}", duid, exc)

    async def refresh_all(self) -> None:
        """Re-read every cached domain and every domain with agents (catch-up after an outage)."""
        duids = set(self._entries)
        duids.update(str(r["domain_uuid"]) for r in await self.store.all_domains())
        self._negative.clear()
        for duid in duids:
            await self._refresh_logged(duid)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._negative.clear()  # a new or renamed domain may now answer a cached miss
        if payload in self._locks:  # a domain this process has read (or is reading)
            task = asyncio.ensure_future(self._refresh_logged(payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Warm the cache and start listening; never fails on a database outage."""
        if self._pool is None:
            # min_size=0: creating the pool opens no connection, so start-up survives an outage.
            self._pool = await create_pool(self._dsn, min_size=0)
            self._store = TenantStore(self._pool, self._box)
        # LISTEN first, then read: a change committed in between is either in the read or
        # heard as a NOTIFY - never lost.
        self._listener = asyncio.ensure_future(self._listen_forever())
        try:
            await asyncio.wait_for(self.listening.wait(), 10.0)
        except TimeoutError:
            logger.error("tenant database unreachable at start-up; retrying in the background")

    async def _listen_forever(self) -> None:
        backoff = 0.2
        first = True
        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await connect(self._dsn)
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                # (Re)read everything: changes before the LISTEN were never notified to us.
                await self.refresh_all()
                if not first:
                    logger.info("tenant change listener reconnected; cache re-read")
                first = False
                backoff = 0.2
                self.listening.set()
                while not lost.is_set() and not self._stopping.is_set():
                    stop_or_lost = [
                        asyncio.ensure_future(lost.wait()),
                        asyncio.ensure_future(self._stopping.wait()),
                    ]
                    done, pending = await asyncio.wait(
                        stop_or_lost, timeout=self._refresh_secs, return_when="FIRST_COMPLETED"
                    )
                    for p in pending:
                        p.cancel()
                    if not done:  # periodic safety net, in case a NOTIFY was lost
                        await self.refresh_all()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("tenant change listener down ({}); retry in {:.1f}s", exc, backoff)
            finally:
                self.listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 1.0)
                    if not conn.is_closed():
                        conn.terminate()
            if self._stopping.is_set():
                break
            first = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, 5.0)

    async def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        for t in list(self._tasks):
            t.cancel()
        if self._own_pool and self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 3.0)
            self._pool.terminate()
