"""Admin HTTP API: per-route tenant isolation, tokens, validation, audit, OpenAPI."""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from pipeswitch.config.db import create_pool
from pipeswitch.config.records import call_rows
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenant_store import TenantStore
from pipeswitch.pipelines.admin_api import ROUTES, admin_app
from tests.tenancy.conftest import Db

pytestmark = pytest.mark.asyncio(loop_scope="session")
SUPER = "super-admin-token-for-tests"


@dataclass
class Api:
    base: str
    http: aiohttp.ClientSession
    store: TenantStore
    a: uuidlib.UUID
    b: uuidlib.UUID
    a_token: str
    b_ids: dict[str, str]

    async def call(
        self, method: str, path: str, token: str | None, body: Any = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.base + path, headers=headers, json=body) as r:
            return r.status, await r.json()


@pytest_asyncio.fixture(loop_scope="session")
async def api(db: Db) -> AsyncIterator[Api]:
    pool = await create_pool(db.dsn)
    store = TenantStore(pool, db.box)
    a, b = await db.add_domain(), await db.add_domain()
    b_agent = await db.add_agent(b, system_prompt="B's prompt")
    await db.store.set_route(b, "1000", b_agent)
    b_call = f"call-{uuidlib.uuid4()}"
    rows = call_rows(
        domain_uuid=str(b), call_uuid=b_call, agent_uuid=b_agent, caller="+1555", destination="1000",
        instance="t", started_wall=time.time() - 5, ended_wall=time.time(), end_reason="x",
        metadata=None, turns=[{"role": "user", "text": "B's private words"}], messages=[],
    )  # fmt: skip
    await store.write_records([rows.call], rows.turns, rows.messages)
    a_token = await store.create_admin_token(a)
    server = TestServer(admin_app(lambda: store, Settings(admin_token=SecretStr(SUPER))))
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        yield Api(
            f"http://127.0.0.1:{server.port}",
            http,
            store,
            a,
            b,
            a_token,
            {"agent": b_agent, "call": b_call, "destination": "1000", "tool": "end_call",
             "provider": "groq"},
        )  # fmt: skip
    await server.close()
    await pool.close()


def fill(path: str, ids: dict[str, str]) -> str:
    for k, v in ids.items():
        path = path.replace("{" + k + "}", v)
    return path


async def test_openapi_lists_every_route(api: Api) -> None:
    status, doc = await api.call("GET", "/openapi.json", None)
    assert status == 200 and doc["openapi"].startswith("3.")
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert ops == {(r.method, "/admin/domains/{domain}" + r.path) for r in ROUTES}
    assert "Agent" in doc["components"]["schemas"]


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_a_domain_token_never_reaches_another_domain(api: Api, route: Any) -> None:
    path = f"/domains/{api.b}" + fill(route.path, api.b_ids)
    status, body = await api.call(
        route.method, path, api.a_token, {"caller": "+1555", "agent_uuid": api.b_ids["agent"]}
    )
    assert status == 403, (route.path, body)
    assert "B's" not in str(body)
    # And by the domain's name rather than its uuid: the same answer.
    name = (await api.store.find_domain(str(api.b)))["domain_name"]  # type: ignore[index]
    status, _ = await api.call(
        route.method, f"/domains/{name}" + fill(route.path, api.b_ids), api.a_token, {}
    )
    assert status == 403


async def test_tokens(api: Api) -> None:
    assert (await api.call("GET", f"/domains/{api.a}/agents", None))[0] == 401
    assert (await api.call("GET", f"/domains/{api.a}/agents", "nope"))[0] == 401
    assert (await api.call("GET", f"/domains/{api.b}/agents", SUPER))[0] == 200
    assert (await api.call("GET", "/domains/nobody.example.com/agents", SUPER))[0] == 404
    assert (await api.call("GET", "/domains/nobody.example.com/agents", api.a_token))[0] == 403
    # Super-admin-only routes, with the domain's own token:
    assert (
        await api.call(
            "PUT", f"/domains/{api.a}/settings", api.a_token, {"max_concurrent_calls": 99}
        )
    )[0] == 403
    assert (await api.call("POST", f"/domains/{api.a}/admin-tokens", api.a_token, {}))[0] == 403


async def test_domain_admin_configures_its_agent_end_to_end(api: Api) -> None:
    d, tok = f"/domains/{api.a}", api.a_token
    status, agent = await api.call(
        "POST", d + "/agents", tok,
        {"agent_name": "Front desk", "agent_default": True, "first_message": "Hi!", "playback": "binary"},
    )  # fmt: skip
    assert status == 200 and agent["domain_uuid"] == str(api.a)
    aid = agent["voice_agent_uuid"]
    status, err = await api.call("PATCH", f"{d}/agents/{aid}", tok, {"playback": "mp3"})
    assert status == 400 and err["details"][0]["loc"] == ["playback"]
    status, upd = await api.call("PATCH", f"{d}/agents/{aid}", tok, {"system_prompt": "Be brief."})
    assert status == 200 and upd["system_prompt"] == "Be brief."
    assert (await api.call("PUT", f"{d}/routes/2000", tok, {"agent_uuid": aid}))[0] == 200
    assert (await api.call("PUT", f"{d}/routes/2001", tok, {"agent_uuid": api.b_ids["agent"]}))[
        0
    ] == 404
    status, tool = await api.call(
        "PUT", f"{d}/agents/{aid}/tools/transfer_call", tok,
        {"settings": {"transfer_targets": {"sales": {"destination": "2001"}}}},
    )  # fmt: skip
    assert status == 200 and tool["tool_name"] == "transfer_call"
    status, bad = await api.call(
        "PUT",
        f"{d}/agents/{aid}/tools/business_hours",
        tok,
        {"settings": {"timezone": "Mars/Base"}},
    )
    assert status == 400 and "Mars/Base" in str(bad)
    assert (await api.call("PUT", f"{d}/credentials/groq", tok, {"api_key": "gsk-a"}))[0] == 200
    status, creds = await api.call("GET", f"{d}/credentials", tok)
    assert creds[0]["provider"] == "groq" and "gsk-a" not in str(creds)
    status, secret = await api.call("POST", f"{d}/stream-secret", tok)
    assert status == 200 and len(secret["signing_secret"]) > 30
    assert (await api.call("POST", f"{d}/agents/{aid}/disable", tok))[1]["agent_enabled"] is False
    assert (await api.call("DELETE", f"{d}/routes/2000", tok))[0] == 200
    assert (await api.call("GET", f"{d}/calls", tok)) == (200, [])
    status, out = await api.call("POST", f"{d}/gdpr-delete", tok, {"caller": "+1555"})
    assert status == 200 and out["calls"] == 0
    status, audit = await api.call("GET", f"{d}/audit", tok)
    actions = {a["action"] for a in audit}
    assert {"agent_create", "agent_update", "route_set", "tool_set", "credential_set",
            "stream_secret_rotate", "agent_disable", "route_delete", "gdpr_delete"} <= actions  # fmt: skip
    assert all(a["actor"].startswith("token:") for a in audit)


async def test_super_admin_reads_calls_and_runs_gdpr_delete(api: Api) -> None:
    d = f"/domains/{api.b}"
    status, call = await api.call("GET", f"{d}/calls/{api.b_ids['call']}", SUPER)
    assert status == 200 and call["turns"][0]["turn_text"] == "B's private words"
    status, _ = await api.call("PUT", f"{d}/settings", SUPER, {"max_concurrent_calls": 5})
    assert status == 200
    assert (await api.call("PUT", f"{d}/settings", SUPER, {"domain_uuid": str(api.a)}))[0] == 400
    status, out = await api.call("POST", f"{d}/gdpr-delete", SUPER, {"caller": "+1555"})
    assert status == 200 and out["calls"] == 1
    assert (await api.call("GET", f"{d}/calls/{api.b_ids['call']}", SUPER))[0] == 404
