"""Admin HTTP API (JSON) at ``/admin``: a PBX admin configures agents without SQL.

Two kinds of bearer token: the super-admin token (``PIPESWITCH_ADMIN_TOKEN``, every domain,
domain policy and token issuing) and per-domain tokens (``v_voice_admin_tokens``, sha256 at
rest) that only ever reach their own domain: the domain in the path is resolved, and a domain
token for another domain gets 403 before any query runs. Every change is written to the audit
log. The route table below is also the OpenAPI description (``GET /admin/openapi.json``).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web
from loguru import logger
from pydantic import ValidationError

from pipeswitch.config.call_state import CallState
from pipeswitch.config.db import new_token, row_dict
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenant_store import AgentFields, NotFound, TenantStore
from pipeswitch.config.tenants import Tenant

Json = dict[str, Any]


@dataclass(frozen=True)
class Caller:
    """Who is calling the API, and for which domain."""

    actor: str
    super_admin: bool
    domain_uuid: uuidlib.UUID
    store: TenantStore
    state: CallState | None = None


Handler = Callable[[web.Request, Caller], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # relative to /admin/domains/{domain}
    handler: Handler
    summary: str
    super_admin: bool = False
    body: str | None = None  # name of the request schema in the OpenAPI document


def _json_error(status: int, message: str, **extra: Any) -> web.HTTPException:
    cls = {
        400: web.HTTPBadRequest,
        401: web.HTTPUnauthorized,
        403: web.HTTPForbidden,
        404: web.HTTPNotFound,
        409: web.HTTPConflict,
        503: web.HTTPServiceUnavailable,
    }[status]
    return cls(
        text=web.json_response({"error": message, **extra}).text, content_type="application/json"
    )


async def _body(request: web.Request) -> Json:
    try:
        data = await request.json()
    except ValueError:
        raise _json_error(400, "body must be a JSON object") from None
    if not isinstance(data, dict):
        raise _json_error(400, "body must be a JSON object")
    return data


def _rows(rows: list[asyncpg.Record]) -> list[Json]:
    return [row_dict(r) for r in rows]


# --- handlers ----------------------------------------------------------------------------


async def list_agents(r: web.Request, c: Caller) -> Any:
    return _rows(await c.store.list_agents(c.domain_uuid))


async def get_agent(r: web.Request, c: Caller) -> Any:
    return row_dict(await c.store.get_agent(c.domain_uuid, r.match_info["agent"]))


async def create_agent(r: web.Request, c: Caller) -> Any:
    fields = AgentFields.model_validate(await _body(r))
    row = await c.store.create_agent(c.domain_uuid, fields)
    await c.store.audit(
        c.domain_uuid, c.actor, "agent_create", {"agent": str(row["voice_agent_uuid"])}
    )
    return row_dict(row)


async def update_agent(r: web.Request, c: Caller) -> Any:
    fields = AgentFields.model_validate(await _body(r))
    row = await c.store.update_agent(c.domain_uuid, r.match_info["agent"], fields)
    await c.store.audit(
        c.domain_uuid,
        c.actor,
        "agent_update",
        {"agent": r.match_info["agent"], "fields": sorted(fields.model_fields_set)},
    )
    return row_dict(row)


async def disable_agent(r: web.Request, c: Caller) -> Any:
    fields = AgentFields(agent_enabled=False)
    row = await c.store.update_agent(c.domain_uuid, r.match_info["agent"], fields)
    await c.store.audit(c.domain_uuid, c.actor, "agent_disable", {"agent": r.match_info["agent"]})
    return row_dict(row)


async def list_routes(r: web.Request, c: Caller) -> Any:
    return _rows(await c.store.list_routes(c.domain_uuid))


async def set_route(r: web.Request, c: Caller) -> Any:
    body = await _body(r)
    if not isinstance(body.get("agent_uuid"), str):
        raise _json_error(400, "agent_uuid is required")
    row = await c.store.set_route(
        c.domain_uuid,
        r.match_info["destination"],
        body["agent_uuid"],
        bool(body.get("enabled", True)),
    )
    await c.store.audit(c.domain_uuid, c.actor, "route_set", row_dict(row))
    return row_dict(row)


async def delete_route(r: web.Request, c: Caller) -> Any:
    await c.store.delete_route(c.domain_uuid, r.match_info["destination"])
    await c.store.audit(
        c.domain_uuid, c.actor, "route_delete", {"destination": r.match_info["destination"]}
    )
    return {"deleted": r.match_info["destination"]}


async def list_tools(r: web.Request, c: Caller) -> Any:
    return _rows(await c.store.list_tools(c.domain_uuid, r.match_info["agent"]))


async def set_tool(r: web.Request, c: Caller) -> Any:
    body = await _body(r)
    settings = body.get("settings", {})
    if not isinstance(settings, dict):
        raise _json_error(400, "settings must be an object")
    row = await c.store.set_tool(
        c.domain_uuid,
        r.match_info["agent"],
        r.match_info["tool"],
        settings,
        bool(body.get("enabled", True)),
    )
    await c.store.audit(
        c.domain_uuid,
        c.actor,
        "tool_set",
        {"agent": r.match_info["agent"], "tool": r.match_info["tool"]},
    )
    return row_dict(row)


async def list_credentials(r: web.Request, c: Caller) -> Any:
    return await c.store.list_credentials(c.domain_uuid)


async def set_credential(r: web.Request, c: Caller) -> Any:
    body = await _body(r)
    await c.store.set_credential(
        c.domain_uuid,
        r.match_info["provider"],
        api_key=body.get("api_key"),
        key_ref=body.get("key_ref"),
    )
    await c.store.audit(
        c.domain_uuid, c.actor, "credential_set", {"provider": r.match_info["provider"]}
    )
    return {"provider": r.match_info["provider"], "stored": True}


async def list_calls(r: web.Request, c: Caller) -> Any:
    limit = int(r.query.get("limit", "100")) if r.query.get("limit", "100").isdigit() else 100
    return _rows(await c.store.list_calls(c.domain_uuid, caller=r.query.get("caller"), limit=limit))


async def get_call(r: web.Request, c: Caller) -> Any:
    call = row_dict(await c.store.get_call(c.domain_uuid, r.match_info["call"]))
    call["turns"] = _rows(await c.store.list_turns(c.domain_uuid, r.match_info["call"]))
    return call


async def live_calls(r: web.Request, c: Caller) -> Any:
    """The domain's calls up right now, on every instance (the Redis registry)."""
    if c.state is None:
        raise _json_error(503, "no call state in this process")
    probe = Tenant(name="domain", domain_uuid=str(c.domain_uuid))  # only its key is used
    return await c.state.active_calls(probe)


async def list_messages(r: web.Request, c: Caller) -> Any:
    return _rows(await c.store.list_messages(c.domain_uuid))


async def gdpr_delete(r: web.Request, c: Caller) -> Any:
    body = await _body(r)
    caller = body.get("caller")
    if not isinstance(caller, str) or not caller:
        raise _json_error(400, "caller (the caller's number) is required")
    return await c.store.delete_caller_data(c.domain_uuid, caller, c.actor)


async def list_audit(r: web.Request, c: Caller) -> Any:
    return _rows(await c.store.list_audit(c.domain_uuid))


async def new_stream_secret(r: web.Request, c: Caller) -> Any:
    value = new_token()
    await c.store.set_signing_secret(c.domain_uuid, value)
    await c.store.audit(c.domain_uuid, c.actor, "stream_secret_rotate", {})
    return {"signing_secret": value, "note": "shown once; set it in the dialplan"}


async def new_stream_token(r: web.Request, c: Caller) -> Any:
    value = new_token()
    await c.store.set_stream_token(c.domain_uuid, value)
    await c.store.audit(c.domain_uuid, c.actor, "stream_token_rotate", {})
    return {"stream_token": value, "note": "shown once; only its hash is stored"}


async def set_settings(r: web.Request, c: Caller) -> Any:
    out = await c.store.set_domain_settings(c.domain_uuid, await _body(r))
    await c.store.audit(
        c.domain_uuid,
        c.actor,
        "domain_settings",
        {k: v for k, v in out.items() if k.endswith(("calls", "days", "audio", "enabled"))},
    )
    return out


async def new_admin_token(r: web.Request, c: Caller) -> Any:
    body = await _body(r) if r.can_read_body else {}
    token = await c.store.create_admin_token(c.domain_uuid, str(body.get("description", "")))
    await c.store.audit(c.domain_uuid, c.actor, "admin_token_create", {})
    return {"token": token, "note": "shown once; only its hash is stored"}


ROUTES: list[Route] = [
    Route("GET", "/agents", list_agents, "List the domain's agents"),
    Route("POST", "/agents", create_agent, "Create an agent", body="Agent"),
    Route("GET", "/agents/{agent}", get_agent, "Read one agent"),
    Route("PATCH", "/agents/{agent}", update_agent, "Update an agent", body="Agent"),
    Route("POST", "/agents/{agent}/disable", disable_agent, "Disable an agent"),
    Route("GET", "/agents/{agent}/tools", list_tools, "List an agent's tools"),
    Route("PUT", "/agents/{agent}/tools/{tool}", set_tool, "Enable/configure a tool", body="Tool"),
    Route("GET", "/routes", list_routes, "List destination routes"),
    Route(
        "PUT", "/routes/{destination}", set_route, "Route a destination to an agent", body="Route"
    ),
    Route("DELETE", "/routes/{destination}", delete_route, "Delete a route"),
    Route("GET", "/credentials", list_credentials, "Which providers have a key (never the key)"),
    Route(
        "PUT", "/credentials/{provider}", set_credential, "Store a provider key", body="Credential"
    ),
    Route("GET", "/calls", list_calls, "Call records (?caller=&limit=)"),
    Route("GET", "/calls/{call}", get_call, "One call with its transcript"),
    Route("GET", "/messages", list_messages, "Messages taken"),
    Route("GET", "/live-calls", live_calls, "Calls up now, on every instance"),
    Route("POST", "/gdpr-delete", gdpr_delete, "Delete one caller's data", body="GdprDelete"),
    Route("GET", "/audit", list_audit, "Audit log"),
    Route("POST", "/stream-secret", new_stream_secret, "Rotate the stream signing secret"),
    Route("POST", "/stream-token", new_stream_token, "Rotate the static stream token"),
    Route(
        "PUT",
        "/settings",
        set_settings,
        "Domain limits/retention",
        super_admin=True,
        body="DomainSettings",
    ),
    Route("POST", "/admin-tokens", new_admin_token, "Issue a domain admin token", super_admin=True),
]

PREFIX = "/domains/{domain}"


def openapi_document() -> Json:
    """OpenAPI 3.1 description of the admin API (generated from :data:`ROUTES`)."""
    paths: Json = {}
    for rt in ROUTES:
        full = "/admin" + PREFIX + rt.path
        params = [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in _path_params(full)
        ]
        op: Json = {
            "summary": rt.summary,
            "parameters": params,
            "security": [{"bearer": []}],
            "responses": {
                "200": {"description": "JSON result"},
                "400": {"description": "invalid input"},
                "401": {"description": "no or unknown token"},
                "403": {"description": "token not valid for this domain or action"},
                "404": {"description": "not found in this domain"},
            },
        }
        if rt.super_admin:
            op["description"] = "super-admin token only"
        if rt.body:
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{rt.body}"}}
                },
            }
        paths.setdefault(full, {})[rt.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Pipeswitch admin API", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Agent": AgentFields.model_json_schema(),
                "Route": {
                    "type": "object",
                    "required": ["agent_uuid"],
                    "properties": {
                        "agent_uuid": {"type": "string", "format": "uuid"},
                        "enabled": {"type": "boolean"},
                    },
                },
                "Tool": {
                    "type": "object",
                    "properties": {"settings": {"type": "object"}, "enabled": {"type": "boolean"}},
                },
                "Credential": {
                    "type": "object",
                    "properties": {"api_key": {"type": "string"}, "key_ref": {"type": "string"}},
                },
                "GdprDelete": {
                    "type": "object",
                    "required": ["caller"],
                    "properties": {"caller": {"type": "string"}},
                },
                "DomainSettings": {
                    "type": "object",
                    "properties": {
                        "max_concurrent_calls": {"type": ["integer", "null"]},
                        "retention_days": {"type": ["integer", "null"]},
                        "record_audio": {"type": "boolean"},
                        "voice_domain_enabled": {"type": "boolean"},
                    },
                },
            },
        },
    }


def _path_params(path: str) -> list[str]:
    return [seg[1:-1] for seg in path.split("/") if seg.startswith("{") and seg.endswith("}")]


def admin_app(
    store_of: Callable[[], TenantStore | None],
    settings: Settings,
    call_state: CallState | None = None,
) -> web.Application:
    """The /admin sub-application."""
    super_hash = (
        hashlib.sha256(settings.admin_token.get_secret_value().encode()).hexdigest()
        if settings.admin_token is not None and settings.admin_token.get_secret_value()
        else None
    )

    async def authorize(request: web.Request, rt: Route) -> Caller:
        store = store_of()
        if store is None:
            raise _json_error(503, "tenant database not configured")
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token:
            raise _json_error(401, "bearer token required")
        got = hashlib.sha256(token.encode()).hexdigest()
        is_super = super_hash is not None and hmac.compare_digest(got, super_hash)
        token_domain = None if is_super else await store.domain_for_admin_token(token)
        if not is_super and token_domain is None:
            raise _json_error(401, "unknown token")
        domain = await store.find_domain(request.match_info["domain"])
        if domain is None:
            # A domain token learns nothing about other domains: same answer as a foreign one.
            if not is_super:
                raise _json_error(403, "token not valid for this domain")
            raise _json_error(404, "no such domain")
        duid = domain["domain_uuid"]
        if not is_super and duid != token_domain:
            raise _json_error(403, "token not valid for this domain")
        if rt.super_admin and not is_super:
            raise _json_error(403, "super-admin token required")
        actor = "super-admin" if is_super else f"token:{got[:12]}"
        return Caller(actor, is_super, duid, store, call_state)

    def endpoint(rt: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            caller = await authorize(request, rt)
            try:
                result = await rt.handler(request, caller)
            except ValidationError as exc:
                raise _json_error(
                    400,
                    "invalid input",
                    details=exc.errors(include_url=False, include_context=False),
                ) from None
            except NotFound as exc:
                raise _json_error(404, str(exc)) from None
            except asyncpg.UniqueViolationError as exc:
                raise _json_error(409, f"already exists: {exc.detail or exc}") from None
            except (ValueError, asyncpg.DataError) as exc:
                raise _json_error(400, str(exc)) from None
            except web.HTTPException:
                raise
            except Exception as exc:
                logger.exception("admin API {} {} failed: {}", rt.method, rt.path, exc)
                raise _json_error(503, "database error") from None
            return web.json_response(result)

        return handle

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    app = web.Application()
    app.router.add_get("/openapi.json", openapi)
    for rt in ROUTES:
        app.router.add_route(rt.method, PREFIX + rt.path, endpoint(rt))
    return app
