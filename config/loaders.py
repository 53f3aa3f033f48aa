"""Tenant loaders: where tenant configuration comes from.

The server asks a :class:`TenantResolver` *after* the WebSocket upgrade, never
before (FreeSWITCH's libwsc gives the upgrade 1 s). Loaders are swappable: a
file today, PostgreSQL (FusionPBX ``v_voice_*`` tables) behind the same
interface tomorrow.
"""

from __future__ import annotations

import asyncio
import re
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml
from loguru import logger
from pydantic import ValidationError

from pipeswitch.config.tenants import DEFAULT_TENANT_NAME, Tenant, builtin_default_tenant


class TenantNotFound(LookupError):
    """No enabled tenant matches the call's domain."""


class TenantLoader(Protocol):
    """A source of tenants, looked up by domain name or ``domain_uuid``."""

    async def load(self, key: str) -> Tenant | None:
        """Return the tenant for ``key`` (a domain name or uuid), or None."""
        ...


@runtime_checkable
class RoutingTenantLoader(Protocol):
    """A loader that also routes a domain's destinations (DIDs, extensions) to agents."""

    async def load_route(self, tenant: Tenant, destination: str) -> Tenant | None:
        """The agent answering ``destination`` in ``tenant``'s domain, or None (default agent)."""
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


class ConfigError(ValueError):
    """A tenant file cannot be used; the message is one line naming file, place and problem."""


_TOP_LEVEL_KEYS = ("tenants", "default_tenant")


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(tenant)"


Locator = Callable[[tuple[int | str, ...]], int | None]


def _validation_problem(exc: ValidationError) -> tuple[tuple[int | str, ...], str]:
    """The first problem pydantic found: its field path, and ``field: what is wrong``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    what = str(first.get("msg", "invalid value")).replace("\n", " ").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        what = "unknown key"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return loc, f"{_field_path(loc)}: {what}{more}"


def parse_tenant_document(
    doc: Mapping[str, Any], source: str = "<tenants>", locate: Locator | None = None
) -> StaticTenantLoader:
    """Build a loader from a parsed TOML/YAML document; :class:`ConfigError` when unusable.

    Format::

        default_tenant = "pbx.example.com"  # optional: answers calls that carry no domain
        [[tenants]]
        name = "pbx.example.com"
        ...

    A call whose domain matches no tenant is refused (close 1008), default or not, unless
    the deployment sets ``PIPESWITCH_DEFAULT_TENANT_ANSWERS_ANY_DOMAIN``.
    """
    unknown = sorted(str(k) for k in doc if k not in _TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key {unknown[0]!r} (allowed: {', '.join(_TOP_LEVEL_KEYS)})"
        )
    raw = doc.get("tenants", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: 'tenants' must be a list of tables ([[tenants]])")
    if not raw:
        raise ConfigError(f"{source}: no tenants defined (add at least one [[tenants]] table)")
    tenants: list[Tenant] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        label = f"tenants[{i}]"
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            label += f" ({item['name']})"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{source}: {label}: must be a table, got {type(item).__name__}")
        try:
            tenant = Tenant.model_validate(item)
        except ValidationError as exc:
            loc, problem = _validation_problem(exc)
            line = locate(("tenants", i, *loc)) if locate is not None else None
            place = f"line {line}: " if line is not None else ""
            raise ConfigError(f"{source}: {place}{label}: {problem}") from None
        for key in (tenant.name, tenant.domain_uuid):
            if key is None:
                continue
            if key in seen:
                raise ConfigError(
                    f"{source}: {label}: duplicate tenant {key!r} (also tenants[{seen[key]}])"
                )
            seen[key] = i
        tenants.append(tenant)
    default = doc.get("default_tenant")
    if default is not None and not any(t.name == str(default).lower() for t in tenants):
        raise ConfigError(f"{source}: default_tenant {default!r} is not one of the tenants")
    return StaticTenantLoader(tenants, default=str(default).lower() if default else None)


def _parse_text(path: Path, text: str) -> Any:
    """TOML or YAML by suffix; syntax errors become one line with the line number."""
    if path.suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f"line {mark.line + 1}: " if mark is not None else ""
            raise ConfigError(f"{path}: {line}invalid YAML: {exc.problem or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if path.suffix != ".toml":
        raise ConfigError(f"{path}: unknown file type (use .toml, .yaml or .yml)")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends "(at line L, column C)"; put the place first, as the rest do.
        msg = str(exc)
        place = ""
        if "(at line " in msg:
            msg, _, tail = msg.rpartition(" (at ")
            place = tail.rstrip(")") + ": "
        raise ConfigError(f"{path}: {place}invalid TOML: {msg}") from None


def load_tenant_file(path: Path) -> StaticTenantLoader:
    """Read tenants from a ``.toml`` or ``.yaml``/``.yml`` file; :class:`ConfigError` if unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if not text.strip():
        raise ConfigError(f"{path}: the file is empty (define at least one [[tenants]] table)")
    doc = _parse_text(path, text)
    if doc is None:
        raise ConfigError(f"{path}: the file is empty (define at least one [[tenants]] table)")
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a table/mapping")
    locate = _yaml_locator(text) if path.suffix in (".yaml", ".yml") else _toml_locator(text)
    return parse_tenant_document(doc, str(path), locate)


def _yaml_locator(text: str) -> Locator:
    """Line of a field in a YAML document, from the composed node tree."""

    def locate(path: tuple[int | str, ...]) -> int | None:
        try:
            node: Any = yaml.compose(text)
        except yaml.YAMLError:
            return None
        line = None
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if key.value == str(part):
                        line, node = key.start_mark.line + 1, value
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if part >= len(node.value):
                    return line
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    return locate


_TOML_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
_TOML_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")


def _toml_locator(text: str) -> Locator:
    """Line of ``tenants[i].a.b`` in a TOML file: tomllib keeps no positions, so read the
    ``[[tenants]]`` blocks and their ``[tenants.x]`` tables (inline tables: their line)."""
    lines = text.splitlines()
    starts = [n for n, ln in enumerate(lines) if re.match(r"^\s*\[\[\s*tenants\s*\]\]", ln)]

    def locate(path: tuple[int | str, ...]) -> int | None:
        if len(path) < 3 or path[0] != "tenants" or not isinstance(path[1], int):
            return None
        i = path[1]
        if i >= len(starts):
            return None
        end = starts[i + 1] if i + 1 < len(starts) else len(lines)
        keys = [str(p) for p in path[2:]]
        table, found = "tenants", None
        for n in range(starts[i] + 1, end):
            head = _TOML_TABLE.match(lines[n])
            if head:
                table = head.group(1)
                continue
            key = _TOML_KEY.match(lines[n])
            if key is None:
                continue
            where = table.split(".")[1:] + [key.group(1)]
            if where == keys:
                return n + 1
            if keys[: len(where)] == where and found is None:
                found = n + 1  # an inline table holding the field
        return found

    return locate


def builtin_loader() -> StaticTenantLoader:
    """No configuration: one tenant, ``default``, answering domain-less calls."""
    return StaticTenantLoader([builtin_default_tenant()], default=DEFAULT_TENANT_NAME)


class TenantResolver:
    """Resolves a call's domain to a tenant, with a small TTL cache.

    Calls with no domain go to the configured default tenant; calls for an
    unknown domain are refused (:class:`TenantNotFound`) - a wrong dialplan
    must not silently land on someone else's agent. ``answer_any_domain``
    (a fresh single-tenant install) sends unknown domains to the default
    tenant instead, with a WARNING per call naming the domain.
    """

    def __init__(
        self,
        loader: TenantLoader,
        default: str | None = None,
        ttl_secs: float = 30.0,
        *,
        answer_any_domain: bool = False,
    ) -> None:
        self._loader = loader
        if getattr(loader, "self_caching", False):
            # A live cache of its own (PostgreSQL + NOTIFY): a TTL here would hide changes.
            ttl_secs = 0.0
        self._default = default
        self._any_domain = answer_any_domain and bool(default)
        self._ttl = ttl_secs
        self._cache: dict[str, tuple[float, Tenant | None]] = {}
        self._inflight: dict[str, asyncio.Future[Tenant | None]] = {}

    async def resolve(self, domain: str | None, destination: str | None = None) -> Tenant:
        """Return the tenant for a call, or raise :class:`TenantNotFound` with a reason.

        With a routing loader (PostgreSQL), ``destination`` picks the domain's routed agent.
        """
        key = (domain or "").strip().lower()
        if not key:
            if not self._default:
                raise TenantNotFound("call has no domain and no default tenant is configured")
            key = self._default
        tenant = await self._cached(key)
        if tenant is None and key == DEFAULT_TENANT_NAME and self._default:
            tenant = await self._cached(self._default)
        if tenant is None and self._any_domain and self._default:
            tenant = await self._cached(self._default)
            if tenant is not None:
                logger.bind(tenant=tenant.name).warning(
                    "domain {!r} matches no tenant; answered by the default tenant {!r} "
                    "(PIPESWITCH_DEFAULT_TENANT_ANSWERS_ANY_DOMAIN)",
                    key,
                    tenant.name,
                )
        if tenant is None:
            raise TenantNotFound(f"unknown tenant domain {key!r}")
        if destination and isinstance(self._loader, RoutingTenantLoader):
            tenant = await self._loader.load_route(tenant, destination) or tenant
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
            if self._ttl > 0:  # (a self-caching loader: random domains must not grow this)
                self._cache[key] = (now + self._ttl, tenant)
            fut.set_result(tenant)
            return tenant
        finally:
            self._inflight.pop(key, None)
