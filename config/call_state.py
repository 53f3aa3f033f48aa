"""Live call state shared by every server instance: registry, per-tenant limits, transfers.

With Redis (``PIPESWITCH_REDIS_URL``) each call is a member of its tenant's sorted set scored by
its expiry, and a hash with who is serving it. Admission is one Lua script (atomic across all
instances): drop expired members, count, add - so two instances can never both take the last
slot. Scores come from Redis's own clock (``TIME``), so instances with skewed clocks agree.
Every instance refreshes its calls' expiry on a heartbeat; a crashed instance's calls expire
after ``ttl_secs`` and free their slots by themselves.

Without Redis, :class:`LocalCallState` keeps the same state in-process (one instance).

Redis unreachable: admission degrades ``open`` (answer without the limit check) or ``closed``
(refuse with 4503), as configured, logged and counted. A call admitted while Redis was down is
registered by the next heartbeat once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Protocol

import redis.asyncio as aioredis
from loguru import logger
from redis.exceptions import RedisError

from pipeswitch.config.tenants import Tenant

PREFIX = "pipeswitch:"

# KEYS[1] tenant's call set, KEYS[2] call hash; ARGV: call uuid, limit (-1 none), ttl ms,
# then field/value pairs for the hash. Returns 1 admitted, 0 over the limit.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[2])
if limit >= 0 and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
if #ARGV > 3 then redis.call('HSET', KEYS[2], unpack(ARGV, 4)) end
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""


def default_instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Admission:
    """The outcome of asking for a call slot."""

    allowed: bool
    reason: str = ""
    degraded: bool = False  # decided without the shared state (Redis unreachable)


@dataclass
class _LiveCall:
    call_uuid: str
    tenant_key: str
    fields: dict[str, str]


@dataclass
class CallStateStats:
    admitted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    degraded: int = 0
    errors: int = 0


class CallState(Protocol):
    """Where live calls are registered and limits enforced."""

    stats: CallStateStats

    async def admit(self, call_uuid: str, tenant: Tenant, info: dict[str, str]) -> Admission: ...

    async def release(self, call_uuid: str, tenant: Tenant) -> None: ...

    async def active_calls(self, tenant: Tenant) -> list[dict[str, str]]: ...

    async def set_transfer(self, call_uuid: str, state: dict[str, str]) -> None: ...

    async def get_transfer(self, call_uuid: str) -> dict[str, str]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def tenant_key(tenant: Tenant) -> str:
    """Limits count per domain (all of a domain's agents share its limit)."""
    return tenant.domain_uuid or tenant.name


class LocalCallState:
    """In-process call state: one server instance, no Redis."""

    def __init__(self, instance_id: str = "") -> None:
        self.instance_id = instance_id or default_instance_id()
        self._calls: dict[str, dict[str, dict[str, str]]] = {}
        self._transfers: dict[str, dict[str, str]] = {}
        self.stats = CallStateStats()

    async def admit(self, call_uuid: str, tenant: Tenant, info: dict[str, str]) -> Admission:
        calls = self._calls.setdefault(tenant_key(tenant), {})
        limit = tenant.max_concurrent_calls
        if limit is not None and call_uuid not in calls and len(calls) >= limit:
            self.stats.refused["tenant_limit"] += 1
            return Admission(False, f"tenant call limit reached ({limit})")
        calls[call_uuid] = {"instance": self.instance_id, **info}
        self.stats.admitted += 1
        return Admission(True)

    async def release(self, call_uuid: str, tenant: Tenant) -> None:
        self._calls.get(tenant_key(tenant), {}).pop(call_uuid, None)
        self._transfers.pop(call_uuid, None)

    async def active_calls(self, tenant: Tenant) -> list[dict[str, str]]:
        return [{"call_uuid": k, **v} for k, v in self._calls.get(tenant_key(tenant), {}).items()]

    async def set_transfer(self, call_uuid: str, state: dict[str, str]) -> None:
        self._transfers.setdefault(call_uuid, {}).update(state)

    async def get_transfer(self, call_uuid: str) -> dict[str, str]:
        return dict(self._transfers.get(call_uuid, {}))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisCallState:
    """Call state in Redis, shared by every instance and process."""

    def __init__(
        self,
        url: str,
        *,
        instance_id: str = "",
        ttl_secs: float = 30.0,
        degrade: Literal["open", "closed"] = "open",
        op_timeout_secs: float = 0.5,
        key_prefix: str = PREFIX,
    ) -> None:
        self.prefix = key_prefix
        self.instance_id = instance_id or default_instance_id()
        self.ttl_ms = int(ttl_secs * 1000)
        self.degrade = degrade
        # Short timeouts: admission sits between the upgrade and the greeting; a dead Redis
        # must cost at most op_timeout_secs per call, then degrade.
        self.redis: aioredis.Redis = aioredis.from_url(
            url,
            socket_timeout=op_timeout_secs,
            socket_connect_timeout=op_timeout_secs,
            decode_responses=True,
            health_check_interval=0,
        )
        self._admit = self.redis.register_script(_ADMIT)
        self._mine: dict[str, _LiveCall] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._down_logged = False
        # After a failure, admissions degrade at once for a while instead of each paying the
        # timeout again (a hung Redis would add op_timeout_secs to every call's set-up).
        self._skip_until = 0.0
        self.retry_after_secs = 2.0
        self.stats = CallStateStats()

    def _set_key(self, tkey: str) -> str:
        return f"{self.prefix}tenant:{tkey}:calls"

    def _call_key(self, call_uuid: str) -> str:
        return f"{self.prefix}call:{call_uuid}"

    def _transfer_key(self, call_uuid: str) -> str:
        return f"{self.prefix}transfer:{call_uuid}"

    def _unavailable(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        self._skip_until = time.monotonic() + self.retry_after_secs
        if not self._down_logged:  # once per outage, not once per call
            self._down_logged = True
            logger.error(
                "Redis unreachable during {} ({}); limits degrade {}", what, exc, self.degrade
            )

    def _reachable(self) -> None:
        self._skip_until = 0.0
        if self._down_logged:
            self._down_logged = False
            logger.info("Redis reachable again")

    async def admit(self, call_uuid: str, tenant: Tenant, info: dict[str, str]) -> Admission:
        tkey = tenant_key(tenant)
        fields = {"instance": self.instance_id, "tenant": tenant.name, "started": str(time.time())}
        fields.update(info)
        live = _LiveCall(call_uuid, tkey, fields)
        limit = tenant.max_concurrent_calls
        skipping = time.monotonic() < self._skip_until
        try:
            if skipping:
                raise ConnectionError("Redis failed moments ago; not retried yet")
            ok = await self._admit(
                keys=[self._set_key(tkey), self._call_key(call_uuid)],
                args=[call_uuid, -1 if limit is None else limit, self.ttl_ms, *_flat(fields)],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            if not skipping:
                self._unavailable("admission", exc)
            self.stats.degraded += 1
            log = logger.bind(call=call_uuid, tenant=tenant.name)
            if self.degrade == "closed":
                self.stats.refused["state_unavailable"] += 1
                log.warning("call refused: call state unavailable (limits degrade closed)")
                return Admission(False, "call state unavailable", degraded=True)
            log.warning("call admitted without limit check: Redis unreachable (degrade open)")
            self._mine[call_uuid] = live  # registered by the heartbeat once Redis is back
            self.stats.admitted += 1
            return Admission(True, degraded=True)
        self._reachable()
        if not ok:
            self.stats.refused["tenant_limit"] += 1
            return Admission(False, f"tenant call limit reached ({limit})")
        self._mine[call_uuid] = live
        self.stats.admitted += 1
        return Admission(True)

    async def release(self, call_uuid: str, tenant: Tenant) -> None:
        self._mine.pop(call_uuid, None)
        try:
            async with self.redis.pipeline(transaction=False) as p:
                p.zrem(self._set_key(tenant_key(tenant)), call_uuid)
                p.delete(self._call_key(call_uuid), self._transfer_key(call_uuid))
                await p.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._unavailable("release", exc)  # the entry expires by itself

    async def active_calls(self, tenant: Tenant) -> list[dict[str, str]]:
        """Live calls of the tenant across all instances."""
        now_ms = int(time.time() * 1000)
        members = await self.redis.zrangebyscore(self._set_key(tenant_key(tenant)), now_ms, "+inf")
        out: list[dict[str, str]] = []
        for uuid in members:
            h = await self.redis.hgetall(self._call_key(str(uuid)))
            if h:
                out.append({"call_uuid": str(uuid), **{str(k): str(v) for k, v in h.items()}})
        return out

    async def set_transfer(self, call_uuid: str, state: dict[str, str]) -> None:
        """State a transfer needs (target, announced, return context...), any instance reads it."""
        key = self._transfer_key(call_uuid)
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(key, mapping=dict(state.items()))
            p.pexpire(key, max(self.ttl_ms, 600_000))
            await p.execute()

    async def get_transfer(self, call_uuid: str) -> dict[str, str]:
        state = await self.redis.hgetall(self._transfer_key(call_uuid))
        return {str(k): str(v) for k, v in state.items()}

    async def heartbeat_once(self) -> None:
        """Push this instance's calls' expiry forward (and register calls admitted offline)."""
        if not self._mine:
            return
        async with self.redis.pipeline(transaction=False) as p:
            for live in list(self._mine.values()):
                await self._admit(
                    keys=[self._set_key(live.tenant_key), self._call_key(live.call_uuid)],
                    args=[live.call_uuid, -1, self.ttl_ms, *_flat(live.fields)],
                    client=p,
                )
            await p.execute()

    async def _beat_forever(self) -> None:
        period = self.ttl_ms / 3000.0
        while True:
            await asyncio.sleep(period)
            try:
                await self.heartbeat_once()
                self._reachable()
            except (RedisError, OSError, TimeoutError) as exc:
                self._unavailable("heartbeat", exc)

    async def start(self) -> None:
        self._heartbeat = asyncio.ensure_future(self._beat_forever())

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        with contextlib.suppress(Exception):
            await self.redis.aclose()


def _flat(fields: dict[str, str]) -> list[str]:
    out: list[str] = []
    for k, v in fields.items():
        out += [k, str(v)]
    return out


def make_call_state(
    redis_url: str | None,
    *,
    instance_id: str = "",
    degrade: Literal["open", "closed"] = "open",
    ttl_secs: float = 30.0,
) -> CallState:
    """Redis-backed when a URL is configured, in-process otherwise."""
    if redis_url:
        return RedisCallState(
            redis_url, instance_id=instance_id, degrade=degrade, ttl_secs=ttl_secs
        )
    return LocalCallState(instance_id)
