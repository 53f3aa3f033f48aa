"""Tenant isolation, query by query: domain A's scope never reads or changes domain B's rows.

Every public method of TenantStore must appear in COVERED (checked below), so a new query
cannot land without an isolation test.
"""

from __future__ import annotations

import inspect
import time
import uuid as uuidlib
from dataclasses import dataclass

import pytest
import pytest_asyncio

from pipeswitch.config.records import call_rows
from pipeswitch.config.tenant_store import AgentFields, NotFound, TenantStore
from tests.tenancy.conftest import Db

pytestmark = pytest.mark.asyncio(loop_scope="session")

COVERED = {
    "find_domain", "all_domains", "domain_settings", "set_domain_settings", "set_signing_secret",
    "set_stream_token", "list_agents", "get_agent", "create_agent", "update_agent", "list_routes",
    "set_route", "delete_route", "list_tools", "set_tool", "set_credential", "list_credentials",
    "credential_rows", "list_calls", "get_call", "list_turns", "list_messages", "write_records",
    "delete_caller_data", "purge", "retention_policies", "audit", "list_audit",
    "create_admin_token", "domain_for_admin_token",
}  # fmt: skip


async def test_every_store_method_has_an_isolation_test() -> None:
    public = {
        n for n, f in inspect.getmembers(TenantStore, inspect.iscoroutinefunction)
        if not n.startswith("_")
    }  # fmt: skip
    assert public == COVERED


@dataclass
class Two:
    store: TenantStore
    a: uuidlib.UUID
    b: uuidlib.UUID
    b_agent: str
    b_call: str
    b_token: str


@pytest_asyncio.fixture(loop_scope="session")
async def two(db: Db) -> Two:
    a, b = await db.add_domain(), await db.add_domain()
    await db.add_agent(a, agent_name="A-agent")
    b_agent = await db.add_agent(b, agent_name="B-agent", system_prompt="B's secret prompt")
    s = db.store
    await s.set_route(b, "1000", b_agent)
    await s.set_tool(b, b_agent, "end_call", {})
    await s.set_credential(b, "groq", api_key="b-groq-key")
    await s.set_domain_settings(b, {"max_concurrent_calls": 3, "retention_days": 30})
    await s.set_signing_secret(b, "b-secret")
    await s.set_stream_token(b, "b-token")
    b_call = f"call-{uuidlib.uuid4()}"
    now = time.time()
    rows = call_rows(
        domain_uuid=str(b), call_uuid=b_call, agent_uuid=b_agent, caller="+15550001",
        destination="1000", instance="t", started_wall=now - 100 * 86400,
        ended_wall=now - 100 * 86400 + 60, end_reason="hangup", metadata=None,
        turns=[{"role": "user", "text": "my card number is 1234"}, {"role": "assistant", "text": "ok"}],
        messages=[{"name": "Bob", "number": "+15550001", "reason": "call back"}],
    )  # fmt: skip
    await s.write_records([rows.call], rows.turns, rows.messages)
    await s.audit(b, "test", "b_action", {})
    b_token = await s.create_admin_token(b, "b admin")
    return Two(s, a, b, b_agent, b_call, b_token)


async def test_domain_lookups(two: Two) -> None:
    s = two.store
    row = await s.find_domain(str(two.b))
    assert row is not None and row["domain_uuid"] == two.b
    by_name = await s.find_domain(row["domain_name"].upper())
    assert by_name is not None and by_name["domain_uuid"] == two.b
    assert await s.find_domain("nobody.example.com") is None
    assert {two.a, two.b} <= {r["domain_uuid"] for r in await s.all_domains()}
    assert two.b in {r["domain_uuid"] for r in await s.retention_policies()}
    assert two.a not in {r["domain_uuid"] for r in await s.retention_policies()}


async def test_domain_settings_and_secrets_stay_in_their_domain(two: Two) -> None:
    s = two.store
    assert await s.domain_settings(two.a) is None
    out = await s.set_domain_settings(two.a, {"max_concurrent_calls": 1})
    assert out["domain_uuid"] == str(two.a) and "signing_secret_enc" not in out
    await s.set_signing_secret(two.a, "a-secret")
    await s.set_stream_token(two.a, "a-token")
    b = await s.domain_settings(two.b)
    assert b is not None and b["max_concurrent_calls"] == 3
    assert s.box.decrypt(b["signing_secret_enc"]) == "b-secret"
    assert b["signing_secret_enc"] != "b-secret"  # encrypted at rest
    with pytest.raises(ValueError):
        await s.set_domain_settings(two.a, {"domain_uuid": str(two.b)})


async def test_agents(two: Two) -> None:
    s = two.store
    assert [r["agent_name"] for r in await s.list_agents(two.a)] == ["A-agent"]
    with pytest.raises(NotFound):
        await s.get_agent(two.a, two.b_agent)
    with pytest.raises(NotFound):
        await s.update_agent(two.a, two.b_agent, AgentFields(system_prompt="stolen"))
    created = await s.create_agent(two.a, AgentFields(agent_name="A2"))
    assert created["domain_uuid"] == two.a
    b = await s.get_agent(two.b, two.b_agent)
    assert b["system_prompt"] == "B's secret prompt"


async def test_routes(two: Two) -> None:
    s = two.store
    assert await s.list_routes(two.a) == []
    with pytest.raises(NotFound):
        await s.set_route(two.a, "2000", two.b_agent)  # cannot route to another domain's agent
    with pytest.raises(NotFound):
        await s.delete_route(two.a, "1000")
    assert [r["destination"] for r in await s.list_routes(two.b)] == ["1000"]


async def test_tools(two: Two) -> None:
    s = two.store
    assert await s.list_tools(two.a) == []
    assert await s.list_tools(two.a, two.b_agent) == []
    with pytest.raises(NotFound):
        await s.set_tool(two.a, two.b_agent, "end_call", {})
    assert len(await s.list_tools(two.b, two.b_agent)) == 1


async def test_credentials(two: Two) -> None:
    s = two.store
    assert await s.list_credentials(two.a) == []
    assert await s.credential_rows(two.a) == []
    await s.set_credential(two.a, "groq", api_key="a-groq-key")
    rows = await s.credential_rows(two.b)
    assert [s.box.decrypt(r["api_key_enc"]) for r in rows] == ["b-groq-key"]
    listed = await s.list_credentials(two.b)
    assert listed[0]["provider"] == "groq" and "b-groq-key" not in str(listed)


async def test_calls_turns_messages(two: Two) -> None:
    s = two.store
    assert await s.list_calls(two.a) == []
    with pytest.raises(NotFound):
        await s.get_call(two.a, two.b_call)
    with pytest.raises(NotFound):
        await s.list_turns(two.a, two.b_call)
    assert await s.list_messages(two.a) == []
    assert len(await s.list_turns(two.b, two.b_call)) == 2
    assert len(await s.list_messages(two.b)) == 1


async def test_write_records_cannot_attach_turns_across_domains(two: Two) -> None:
    s = two.store
    b_call = await s.get_call(two.b, two.b_call)
    forged = {
        "domain_uuid": two.a,
        "voice_call_uuid": b_call["voice_call_uuid"],
        "turn_index": 99,
        "role": "user",
        "turn_text": "forged",
    }
    await s.write_records([], [forged], [])
    assert len(await s.list_turns(two.b, two.b_call)) == 2


async def test_gdpr_delete_and_purge_are_scoped_and_audited(two: Two) -> None:
    s = two.store
    out = await s.delete_caller_data(two.a, "+15550001", "test")
    assert out["calls"] == 0 and out["messages"] == 0
    assert "+15550001" not in str(out)  # the audit never keeps the number it erased
    purged = await s.purge(two.a, 1, "test")
    assert purged["calls"] == 0
    assert len(await s.list_calls(two.b)) == 1
    assert {r["action"] for r in await s.list_audit(two.a)} == {"gdpr_delete", "purge"}
    assert "b_action" in {r["action"] for r in await s.list_audit(two.b)}
    # B's own retention (30 days) removes its 100-day-old call; the turns go with it.
    purged = await s.purge(two.b, 30, "test")
    assert purged == {"retention_days": 30, "calls": 1, "messages": 0}
    assert await s.list_calls(two.b) == []


async def test_gdpr_delete_removes_one_callers_data(two: Two) -> None:
    s = two.store
    out = await s.delete_caller_data(two.b, "+15550001", "test")
    assert out["calls"] == 1 and out["messages"] == 1
    assert await s.list_calls(two.b) == [] and await s.list_messages(two.b) == []
    assert "gdpr_delete" in {r["action"] for r in await s.list_audit(two.b)}


async def test_admin_tokens(two: Two) -> None:
    s = two.store
    assert await s.domain_for_admin_token(two.b_token) == two.b
    a_token = await s.create_admin_token(two.a)
    assert await s.domain_for_admin_token(a_token) == two.a
    assert await s.domain_for_admin_token("not-a-token") is None
    stored = await s.db.fetchval(
        "SELECT count(*) FROM v_voice_admin_tokens WHERE token_hash = $1 OR token_hash = $2",
        a_token,
        two.b_token,
    )
    assert stored == 0  # only hashes at rest
