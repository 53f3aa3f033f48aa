"""The web console in a real headless Chromium: log in, scoping, the agent editor reaching
the next emulated call, a browser call with a fake microphone, the call records, GDPR delete.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import BrowserContext, Page

from pipeswitch.config.records import call_rows
from tests.conftest import QUESTION
from tests.console.conftest import SUPER_TOKEN, ConsoleServer, login
from tests.e2e.helpers import ask, open_call, wait_for_bot_audio

pytestmark = pytest.mark.asyncio(loop_scope="session")

NEW_PROMPT = "You are the receptionist of Riverside Dental; mention the console edit."
NEW_MODEL = "console-edited-model"


async def shot(page: Page, folder: Path, name: str) -> None:
    await page.screenshot(path=str(folder / f"{name}.png"), full_page=False)


async def session_cookie(context: BrowserContext) -> dict[str, str]:
    return {c["name"]: c["value"] for c in await context.cookies() if c["name"] == "ps_console"}


async def test_login_and_every_page_scoped_to_the_domain(
    console: ConsoleServer, context: BrowserContext, shots: Path
) -> None:
    base, a, b = console.base, console.a, console.b
    page = await context.new_page()
    await page.goto(f"{base}/console/d/{a.name}/agents")
    assert "/console/login" in page.url, "no session: the login page"
    await shot(page, shots, "login")
    await page.fill("#token", "not-a-token")
    await page.click("#login")
    assert "Unknown or disabled token" in await page.inner_text("#login-error")

    await page.fill("#token", a.token)
    await page.click("#login")
    await page.wait_for_load_state("domcontentloaded")
    assert page.url.endswith(f"/console/d/{a.name}/agents"), page.url  # back where it was going
    cookie = next(c for c in await context.cookies() if c["name"] == "ps_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert a.token not in cookie["value"], "the token must not be readable in the cookie"

    # Domain B, by name or by uuid, through every page: refused before anything is read.
    for key in (b.name, str(b.uuid)):
        for path in ("/", "/agents", f"/agents/{b.agent}", "/calls", "/talk"):
            resp = await page.goto(f"{base}/console/d/{key}{path}")
            assert resp is not None and resp.status == 403, (key, path)
    # B's agent through A's own domain: the admin API does not find it there.
    resp = await page.goto(f"{base}/console/d/{a.name}/agents/{b.agent}")
    assert resp is not None and resp.status == 404
    # B's browser call: refused before the upgrade.
    await page.goto(f"{base}/console/d/{a.name}/talk")
    csrf = await page.get_attribute("#talk", "data-csrf")
    async with aiohttp.ClientSession(cookies=await session_cookie(context)) as http:
        for domain in (b.name, a.name):
            url = f"{base}/console/d/{domain}/call?csrf={csrf}"
            try:
                async with http.ws_connect(url) as ws:
                    opened = await asyncio.wait_for(ws.receive(), 5.0)
                    assert domain == a.name, "B's call must not open"
                    assert json.loads(opened.data)["type"] == "console.call"
            except aiohttp.WSServerHandshakeError as exc:
                assert domain == b.name and exc.status == 403
        # A's own call without the page's CSRF token: refused too.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{base}/console/d/{a.name}/call?csrf=wrong")
        assert refused.value.status == 403
    # A POST without the CSRF token (a cross-site form) changes nothing.
    r = await page.request.post(f"{base}/console/d/{a.name}/agents", form={"agent_name": "X"})
    assert r.status == 403
    agents = await console.db.store.list_agents(a.uuid)
    assert [x["agent_name"] for x in agents] == ["Riverside reception"]

    # The super-admin sees every domain.
    sup = await context.browser.new_context()  # type: ignore[union-attr]
    try:
        p2 = await sup.new_page()
        await login(p2, base, SUPER_TOKEN)
        assert p2.url.endswith("/console/domains")
        listed = await p2.inner_text("table.domains")
        assert a.name in listed and b.name in listed
        await shot(p2, shots, "domains")
        resp = await p2.goto(f"{base}/console/d/{b.name}/agents")
        assert resp is not None and resp.status == 200
        assert "Hillview reception" in await p2.inner_text("table.agents")
    finally:
        await sup.close()


async def test_agent_edit_is_validated_and_reaches_the_next_emulated_call(
    console: ConsoleServer, context: BrowserContext, shots: Path
) -> None:
    base, a = console.base, console.a
    page = await context.new_page()
    await login(page, base, a.token)
    await page.goto(f"{base}/console/d/{a.name}/agents")
    await shot(page, shots, "agents")
    await page.click("table.agents a >> text=Riverside reception")
    # Bad values: shown next to their fields, nothing saved.
    await page.fill('[name="turns.vad_stop_secs"]', "soon")
    await page.fill('[name="tools.timezone"]', "Mars/Olympus")
    await page.check('[name="tools.enabled.transfer_call"]')
    await page.fill('[name="system_prompt"]', NEW_PROMPT)
    async with page.expect_navigation() as nav:
        await page.click("#save")
    resp = await nav.value
    assert resp is not None and resp.status == 400
    assert "valid number" in await page.inner_text('.error[data-for="turns.vad_stop_secs"]')
    assert "unknown time zone" in await page.inner_text('.error[data-for="tools.timezone"]')
    assert await page.input_value('[name="system_prompt"]') == NEW_PROMPT  # kept for fixing
    await shot(page, shots, "agent-editor-errors")
    row = await console.db.store.get_agent(a.uuid, a.agent)
    assert row["system_prompt"] != NEW_PROMPT

    # Fixed: saved, and the tools with it.
    await page.fill('[name="turns.vad_stop_secs"]', "0.25")
    await page.fill('[name="tools.timezone"]', "Europe/Prague")
    await page.fill('[name="tools.transfer_targets"]', "front desk: 2001 ring_group Front desk")
    await page.fill('[name="tools.hours.mon"]', "08:00-12:00, 13:00-17:00")
    await page.fill('[name="providers.llm_model"]', NEW_MODEL)
    async with page.expect_navigation():
        await page.click("#save")
    errors = await page.eval_on_selector_all(
        ".error", "els => els.map(e => (e.dataset.for || '') + ': ' + e.textContent)"
    )
    assert not errors, errors
    assert "Saved" in await page.inner_text("#saved")
    await page.evaluate("window.scrollTo(0, 0)")
    await shot(page, shots, "agent-editor")
    row = await console.db.store.get_agent(a.uuid, a.agent)
    assert row["system_prompt"] == NEW_PROMPT and row["turns"]["vad_stop_secs"] == 0.25
    tools = {t["tool_name"]: t for t in await console.db.store.list_tools(a.uuid, a.agent)}
    assert tools["transfer_call"]["tool_enabled"]
    assert tools["transfer_call"]["tool_settings"]["transfer_targets"]["front desk"] == {
        "destination": "2001",
        "kind": "ring_group",
        "description": "Front desk",
    }
    assert tools["business_hours"]["tool_settings"]["timezone"] == "Europe/Prague"

    # The live reload: the server's tenant cache has it within a second...
    loader = console.app.tenancy.loader
    assert loader is not None
    t0 = time.monotonic()
    while True:
        tenant = next(t for t in loader.tenants() if t.agent_uuid == a.agent)
        if tenant.system_prompt == NEW_PROMPT:
            break
        assert time.monotonic() - t0 < 1.0, "the change did not reach the tenant cache in 1 s"
        await asyncio.sleep(0.02)
    assert tenant.providers.llm_model == NEW_MODEL
    assert "front desk" in tenant.tools.transfer_targets
    # ...and the next call FreeSWITCH places uses it: the LLM gets the new prompt and model.
    llm = console.served.emu.openai
    before = len(llm.requests)
    url = f"ws://127.0.0.1:{console.app.port}/fs/{uuidlib.uuid4()}?domain={a.name}&rate=8000"
    stream = await open_call(url + "&mix=mono&caller=%2B15550100", 8000, "json-stream")
    try:
        assert await wait_for_bot_audio(stream, 0.0, timeout_s=6.0) is not None, "no greeting"
        speech = await console.served.speech(QUESTION, 8000)
        _, reply = await ask(stream, speech, 8000)
        assert reply is not None, "no reply"
    finally:
        await stream.hangup()
    new = llm.requests[before:]
    assert new, "the call made no LLM request"
    system = " ".join(str(m.get("content")) for m in new[0].messages if m.get("role") == "system")
    assert NEW_PROMPT in system and new[0].model == NEW_MODEL
    # The phone call lands in the domain's records (written as the call ends).
    listed = ""
    for _ in range(50):
        await page.goto(f"{base}/console/d/{a.name}/calls")
        listed = await page.inner_text("table.calls")
        if "+15550100" in listed:
            break
        await asyncio.sleep(0.1)
    assert "+15550100" in listed, listed


async def test_browser_call_with_fake_microphone_then_records_and_gdpr_delete(
    console: ConsoleServer, context: BrowserContext, shots: Path
) -> None:
    base, a = console.base, console.a
    page = await context.new_page()
    logs: list[str] = []
    page.on("console", lambda m: logs.append(m.text))
    await login(page, base, a.token)
    await page.goto(f"{base}/console/d/{a.name}/talk")
    await page.click("#call")
    try:
        await page.wait_for_function(
            "() => { const c = window.pipeswitchCall;"
            " return c.turns.some(t => t.server != null && t.page != null) && c.botVoiced > 50"
            " && document.querySelector('#transcript li.user')"
            " && document.querySelectorAll('#transcript li.assistant').length >= 2; }",
            timeout=25_000,
        )
    except Exception as exc:
        state: Any = await page.evaluate("() => window.pipeswitchCall")
        raise AssertionError(f"browser call did not complete a turn: {state} {logs[-5:]}") from exc
    await shot(page, shots, "talk")
    call: Any = await page.evaluate("() => window.pipeswitchCall")
    call_uuid = await page.get_attribute("#talk", "data-call")
    user_text = await page.inner_text("#transcript li.user")
    assert user_text.strip() != "You"
    first = next(t for t in call["turns"] if t["server"] is not None)
    print(
        f"\nbrowser call {call_uuid}: turn latency server {first['server']} ms "
        f"(end of speech -> first bot audio, Pipecat UserBotLatencyObserver), "
        f"page {first['page']:.0f} ms (last voiced mic frame sent -> first voiced bot "
        f"frame received); bot frames {call['botFrames']} ({call['botVoiced']} voiced), "
        f"clearAudio {call['clears']}"
    )
    assert 0 < first["server"] < 5000
    assert call["playedLevel"] > 0.01, "the reply never reached the page's audio output"
    # The question came while the greeting played: the server sent clearAudio and the page
    # flushed its queue. (Whether the greeting's audio had all been sent by then depends on
    # the machine's load; when it had not, the page shows it cut.)
    assert call["clears"] >= 1 and any(e["type"] == "clearAudio" for e in call["events"])
    for cut in [e for e in call["events"] if e["type"] == "console.bot" and e["interrupted"]]:
        assert len(cut["heard"]) < len(cut["text"])
    await page.click("#hangup")
    await page.wait_for_function("() => window.pipeswitchCall.state.startsWith('ended')")

    # The call landed in the records like a phone call's: listed, with its transcript.
    row = None
    for _ in range(100):
        row = await console.db.conn.fetchrow(
            "SELECT * FROM v_voice_calls WHERE domain_uuid = $1 AND call_uuid = $2",
            a.uuid,
            call_uuid,
        )
        if row:
            break
        await asyncio.sleep(0.05)
    assert row is not None, "the browser call's record did not land"
    assert str(row["caller"]).startswith("console:") and row["turn_count"] >= 1
    await page.goto(f"{base}/console/d/{a.name}/calls")
    listed = await page.inner_text("table.calls")
    assert str(row["caller"]) in listed
    await shot(page, shots, "calls")
    await page.click(f'table.calls a[href$="{row["voice_call_uuid"]}"]')
    assert "Caller" in await page.inner_text("ol.transcript")
    await shot(page, shots, "call-transcript")

    # GDPR delete of that caller, from the call's page, through the admin API.
    theirs = await console.db.conn.fetchval(
        "SELECT count(*) FROM v_voice_calls WHERE domain_uuid = $1 AND caller = $2",
        a.uuid,
        row["caller"],
    )
    await page.check('#gdpr-form [name="confirm"]')
    await page.click("#gdpr-delete")
    assert f"Deleted {theirs} call(s)" in await page.inner_text("#gdpr-result")
    gone = await console.db.conn.fetchval(
        "SELECT count(*) FROM v_voice_calls WHERE domain_uuid = $1 AND caller = $2",
        a.uuid,
        row["caller"],
    )
    assert gone == 0
    audit = await console.db.store.list_audit(a.uuid)
    assert audit[0]["action"] == "gdpr_delete"

    # The dashboard: the same numbers /metrics has for this domain.
    await page.goto(f"{base}/console/d/{a.name}/")
    started = int(await page.inner_text("#tile-started .v"))
    assert started >= 2  # the emulated phone call and the browser call
    assert await page.inner_text("#tile-p50 .v") != "-"
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as r:
        text = await r.text()
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("pipeswitch_calls_started_total{") and f'tenant="{a.name}"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) == started
    await shot(page, shots, "dashboard")


async def _http_login(http: aiohttp.ClientSession, base: str, token: str) -> str:
    """Log in like the form does; returns the page's CSRF token for later POSTs."""
    async with http.get(f"{base}/console/login") as r:
        page = await r.text()
    pre = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    async with http.post(f"{base}/console/login", data={"csrf": pre, "token": token}) as r:
        assert r.status == 200, await r.text()
        page = await r.text()
    return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]


async def test_forged_requests_refused_and_barge_in_cut_marked_in_the_transcript(
    console: ConsoleServer,
) -> None:
    base, a = console.base, console.a
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        # A login POST without the login form's own token (login CSRF): refused.
        async with http.post(f"{base}/console/login", data={"token": a.token}) as r:
            assert r.status == 401 and "expired" in await r.text()
        csrf = await _http_login(http, base, a.token)
        # A right token from another site's page: refused by Origin.
        async with http.post(
            f"{base}/console/d/{a.name}/agents",
            data={"csrf": csrf, "agent_name": "Evil"},
            headers={"Origin": "http://evil.example"},
        ) as r:
            assert r.status == 403
        names = [x["agent_name"] for x in await console.db.store.list_agents(a.uuid)]
        assert "Evil" not in names

        # A call whose reply the caller cut: heard words plain, the rest struck through.
        now = time.time()
        rows = call_rows(
            domain_uuid=str(a.uuid),
            call_uuid=f"cut-{uuidlib.uuid4()}",
            agent_uuid=a.agent,
            caller="+15550199",
            destination="100",
            instance="test",
            started_wall=now - 20,
            ended_wall=now - 5,
            end_reason="caller closed (1000)",
            metadata=None,
            turns=[
                {"role": "user", "text": "Are you open on Saturday?"},
                {
                    "role": "assistant",
                    "text": "On Saturdays we open at nine and close at noon.",
                    "heard_text": "On Saturdays we open",
                    "interrupted": True,
                    "latency_ms": 512.0,
                },
            ],
            messages=[],
        )
        await console.db.store.write_records([rows.call], rows.turns, [])
        vcu = rows.call["voice_call_uuid"]
        async with http.get(f"{base}/console/d/{a.name}/calls/{vcu}") as r:
            assert r.status == 200
            page = await r.text()
        assert '<span class="heard">On Saturdays we open</span>' in page
        assert (
            '<span class="cut" title="not heard: barge-in"> at nine and close at noon.</span>'
            in page
        )
        assert "512 ms" in page
        # Domain B's admin cannot read it, by the console or by the API.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await _http_login(http, base, console.b.token)
        async with http.get(f"{base}/console/d/{a.name}/calls/{vcu}") as r:
            assert r.status == 403
        async with http.get(
            f"{base}/admin/domains/{a.name}/calls/{vcu}",
            headers={"Authorization": f"Bearer {console.b.token}"},
        ) as r:
            assert r.status == 403
