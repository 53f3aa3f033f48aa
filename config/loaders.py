"""Tenant loaders: where tenant configuration comes from.

The server asks a :class:`TenantResolver` *after* the WebSocket upgrade, never
before (FreeSWITCH's libwsc gives the upgrade 1 s). Loaders are swappable: a
file today, PostgreSQL (FusionPBX ``v_voice_*`` tables) behind the same
interface tomorrow.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml
from loguru import logger

from pipeswitch.config.tenants import DEFAULT_TENANT_NAME, Tenant, builtin_default_tenant


class TenantNotFound(LookupError):
    """No enabled tenant matches the call's domain."""


class TenantLoader(Protocol):
    """A source of tenants, looked up by domain name or ``domain_uuid``."""

    async def load(self, key: str) -> Tenant | None:
        """Return the tenant for ``key`` (a domain name or uuid), or None."""
        ...


class StaticTenantLoader:
    """Tenants held in memory: the built-in default, a parsed file, or tests."""

    def __init__(self, tenants: list[Tenant], default: str | None = None) -> None:
        self._by_key: dict[str, Tenant] = {}
        for t in tenants:
            self._by_key[t.name] = t
            if t.domain_uuid:
                self._by_key[t.domain_uuid] = t
        self.default = default

    async def load(self, key: str) -> Tenant | None:
        """Look a tenant up by name or uuid (case-insensitive names)."""
        return self._by_key.get(key.lower())

    def all(self) -> list[Tenant]:
        """Every distinct tenant (for start-up warm-up such as greeting synthesis)."""
        return list({id(t): t for t in self._by_key.values()}.values())


def parse_tenant_document(doc: Mapping[str, Any]) -> StaticTenantLoader:
    """Build a loader from a parsed TOML/YAML document.

    Format::

        default_tenant = "default"      # optional: answers calls with no/unknown domain
        [[tenants]]
        name = "pbx.example.com"
        ...
    """
    raw = doc.get("tenants", [])
    if not isinstance(raw, list):
        raise ValueError("'tenants' must be a list of tables")
    tenants = [Tenant.model_validate(item) for item in raw]
    default = doc.get("default_tenant")
    if default is not None and not any(t.name == str(default).lower() for t in tenants):
        raise ValueError(f"default_tenant {default!r} is not defined")
    return StaticTenantLoader(tenants, default=str(default).lower() if default else None)


def load_tenant_file(path: Path) -> StaticTenantLoader:
    """Read tenants from a ``.toml`` or ``.yaml``/``.yml`` file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        doc = yaml.safe_load(text) or {}
    else:
        doc = tomllib.loads(text)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: top level must be a table/mapping")
    return parse_tenant_document(doc)


def builtin_loader() -> StaticTenantLoader:
    """No configuration: one tenant, ``default``, answering domain-less calls."""
    return StaticTenantLoader([builtin_default_tenant()], default=DEFAULT_TENANT_NAME)


class TenantResolver:
    """Resolves a call's domain to a tenant, with a small TTL cache.

    Calls with no domain go to the configured default tenant; calls for an
    unknown domain are refused (:class:`TenantNotFound`) - a wrong dialplan
    must not silently land on someone else's agent.
    """

    def __init__(
        self, loader: TenantLoader, default: str | None = None, ttl_secs: float = 30.0
    ) -> None:
        self._loader = loader
        self._default = default
        self._ttl = ttl_secs
        self._cache: dict[str, tuple[float, Tenant | None]] = {}
        self._inflight: dict[str, asyncio.Future[Tenant | None]] = {}

    async def resolve(self, domain: str | None) -> Tenant:
        """Return the tenant for a call, or raise :class:`TenantNotFound` with a reason."""
        key = (domain or "").strip().lower()
        if not key:
            if not self._default:
                raise TenantNotFound("call has no domain and no default tenant is configured")
            key = self._default
        tenant = await self._cached(key)
        if tenant is None and key == DEFAULT_TENANT_NAME and self._default:
            tenant = await self._cached(self._default)
        if tenant is None:
            raise TenantNotFound(f"unknown tenant domain {key!r}")
        if not tenant.enabled:
            raise TenantNotFound(f"tenant {tenant.name!r} is disabled")
        return tenant

    async def _cached(self, key: str) -> Tenant | None:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit and hit[0] > now:
            return hit[1]
        fut = self._inflight.get(key)
        if fut is not None:  # coalesce concurrent lookups of the same domain
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            tenant = await self._loader.load(key)
        except Exception as exc:
            logger.error("tenant lookup for {} failed: {}", key, exc)
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        else:
            self._cache[key] = (now + self._ttl, tenant)
            fut.set_result(tenant)
            return tenant
        finally:
            self._inflight.pop(key, None)
