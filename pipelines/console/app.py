"""The web console at ``/console``: log in with an admin token, configure the domain's
agents, talk to them from the browser, read the calls, watch the numbers.

A sibling aiohttp application mounted on the call server (next to ``/admin``). Every page
and every call is scoped to the logged-in domain twice over: the console refuses a domain
that is not the session's (403 before any data is read), and what it reads and writes goes
through the admin API with the admin's own token, which refuses it again.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import aiohttp
import asyncpg
from aiohttp import web
from loguru import logger

import pipeswitch.pipelines.console.forms as forms
from pipeswitch.config.loaders import TenantNotFound
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenant_store import TenantStore
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.console.admin_client import AdminClient, AdminError, loopback_base
from pipeswitch.pipelines.console.auth import (
    COOKIE,
    PRE_COOKIE,
    ConsoleSession,
    SessionCodec,
    new_csrf,
    same_token,
    session_key,
    token_sha256,
)
from pipeswitch.pipelines.console.dashboard import domain_numbers
from pipeswitch.pipelines.console.live import BROWSER_RATE, BrowserCalls
from pipeswitch.pipelines.console.pages import (
    CSP,
    agent_form,
    esc,
    hidden_csrf,
    layout,
    ms,
    secs,
    table,
)
from pipeswitch.transports.call_info import parse_call_request
from pipeswitch.transports.server import CallServer

if TYPE_CHECKING:
    from pipeswitch.pipelines.app import Pipeswitch

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Console:
    """The console's state: where the store, the call server and the admin API are."""

    def __init__(
        self,
        settings: Settings,
        store_of: Callable[[], TenantStore | None],
        server_of: Callable[[], CallServer | None],
        tenants_of: Callable[[], list[Tenant]],
    ) -> None:
        self.settings = settings
        self.store_of = store_of
        self.server_of = server_of
        self.tenants_of = tenants_of
        key = settings.secrets_key.get_secret_value() if settings.secrets_key else None
        self.codec = SessionCodec(session_key(key))
        tok = settings.admin_token.get_secret_value() if settings.admin_token else ""
        self._super_hash = token_sha256(tok) if tok else None
        self.calls = BrowserCalls()
        self._http: aiohttp.ClientSession | None = None

    # --- plumbing ----------------------------------------------------------------------

    async def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    async def close(self, _: web.Application) -> None:
        if self._http is not None:
            await self._http.close()

    def store(self) -> TenantStore:
        store = self.store_of()
        if store is None:
            raise web.HTTPServiceUnavailable(text="tenant database not configured")
        return store

    def session(self, request: web.Request) -> ConsoleSession | None:
        return self.codec.open(request.cookies.get(COOKIE))

    def require(self, request: web.Request) -> ConsoleSession:
        s = self.session(request)
        if s is None:
            raise web.HTTPSeeOther(f"/console/login?next={quote(request.path_qs)}")
        return s

    async def check_post(self, request: web.Request, s: ConsoleSession) -> Any:
        """The form of a POST, after the CSRF token and the Origin are checked."""
        _same_origin(request)
        form = await request.post()
        if not same_token(str(form.get("csrf", "")), s.csrf):
            raise web.HTTPForbidden(text="CSRF token missing or wrong; reload the page")
        return form

    async def domain_of(self, request: web.Request, s: ConsoleSession) -> tuple[str, str]:
        """(name, uuid) of the domain in the URL, if this session may open it (else 403)."""
        key = request.match_info["domain"]
        row = await self.store().find_domain(key)
        if row is None or not s.may_open(str(row["domain_uuid"])):
            # Same answer for a missing and a foreign domain: nothing is learnt either way.
            logger.warning("console: {} refused domain {!r}", s.actor, key[:80])
            raise _forbidden()
        return str(row["domain_name"]), str(row["domain_uuid"])

    async def client(self, request: web.Request, s: ConsoleSession, domain: str) -> AdminClient:
        return AdminClient(await self.http(), loopback_base(request), s.token, domain)

    def page(self, s: ConsoleSession, domain: str, title: str, body: str, **kw: Any) -> Any:
        return layout(
            title,
            body,
            user=s.actor,
            csrf=s.csrf,
            domain=domain,
            super_admin=s.super_admin,
            **kw,
        )

    # --- login -------------------------------------------------------------------------

    async def login_form(
        self, request: web.Request, error: str = "", nxt: str = ""
    ) -> web.Response:
        pre = new_csrf()
        nxt = nxt or request.query.get("next", "")
        msg = f'<p class="error" id="login-error">{esc(error)}</p>' if error else ""
        body = (
            f'{msg}<form method="post" action="/console/login" class="login">'
            f'<input type="hidden" name="csrf" value="{pre}">'
            f'<input type="hidden" name="next" value="{esc(nxt)}">'
            '<div class="field"><label for="token">Admin token</label>'
            '<input type="password" id="token" name="token" autocomplete="off" autofocus></div>'
            '<p class="hint">A domain admin token (<code>pipeswitch admin token</code>) opens '
            "that domain; the super-admin token opens every domain.</p>"
            '<button type="submit" id="login">Log in</button></form>'
        )
        resp = layout("Log in", body, status=401 if error else 200)
        resp.set_cookie(PRE_COOKIE, pre, **self._cookie_flags(request, 600))
        return resp

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        if self.session(request) is not None:
            raise web.HTTPSeeOther("/console/")
        return await self.login_form(request)

    async def login(self, request: web.Request) -> web.StreamResponse:
        _same_origin(request)
        form = await request.post()
        if not same_token(str(form.get("csrf", "")), request.cookies.get(PRE_COOKIE)):
            return await self.login_form(
                request, "The login form expired; try again.", str(form.get("next", ""))
            )
        token = str(form.get("token", "")).strip()
        got = token_sha256(token) if token else ""
        is_super = bool(got) and self._super_hash is not None
        is_super = is_super and hmac.compare_digest(got, self._super_hash or "")
        domain_uuid = None
        if token and not is_super:
            duid = await self.store().domain_for_admin_token(token)
            domain_uuid = str(duid) if duid is not None else None
        if not is_super and domain_uuid is None:
            await asyncio.sleep(0.5)  # blunt guessing a little; tokens are 256-bit anyway
            logger.warning("console: login refused from {}", request.remote)
            return await self.login_form(
                request, "Unknown or disabled token.", str(form.get("next", ""))
            )
        actor = "super-admin" if is_super else f"token:{got[:12]}"
        s = ConsoleSession(token, is_super, domain_uuid, new_csrf(), actor)
        logger.info("console: {} logged in", actor)
        nxt = str(form.get("next", ""))
        target = nxt if nxt.startswith("/console/") and "//" not in nxt else "/console/"
        resp = web.HTTPSeeOther(target)
        resp.set_cookie(COOKIE, self.codec.seal(s), **self._cookie_flags(request, None))
        resp.del_cookie(PRE_COOKIE, path="/console")
        raise resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        s = self.require(request)
        await self.check_post(request, s)
        resp = web.HTTPSeeOther("/console/login")
        resp.del_cookie(COOKIE, path="/console")
        raise resp

    def _cookie_flags(self, request: web.Request, max_age: int | None) -> Json:
        secure = request.secure or request.headers.get("X-Forwarded-Proto") == "https"
        flags: Json = {
            "path": "/console",
            "httponly": True,
            "samesite": "Strict",
            "secure": secure,
        }
        if max_age is not None:
            flags["max_age"] = max_age
        return flags

    # --- navigation --------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.StreamResponse:
        s = self.require(request)
        if s.super_admin:
            raise web.HTTPSeeOther("/console/domains")
        row = await self.store().find_domain(s.domain_uuid or "")
        if row is None:
            raise _forbidden()
        raise web.HTTPSeeOther(f"/console/d/{quote(str(row['domain_name']))}/")

    async def domains(self, request: web.Request) -> web.StreamResponse:
        s = self.require(request)
        if not s.super_admin:
            raise web.HTTPSeeOther("/console/")
        rows = await self.store().all_domains()
        cells = [
            [
                f'<a href="/console/d/{esc(quote(str(r["domain_name"])))}/">'
                f"{esc(r['domain_name'])}</a>",
                esc(r["domain_uuid"]),
                esc(r["domain_enabled"]),
            ]
            for r in sorted(rows, key=lambda r: str(r["domain_name"]))
        ]
        body = (
            "<p>Domains with at least one voice agent. Open another by name:</p>"
            '<form method="get" action="/console/open" class="inline">'
            '<input type="text" name="domain" placeholder="pbx.example.com">'
            '<button type="submit">Open</button></form>'
            + table(["Domain", "uuid", "Enabled"], cells, "domains")
        )
        return layout("Domains", body, user=s.actor, csrf=s.csrf, super_admin=True)

    async def open_domain(self, request: web.Request) -> web.StreamResponse:
        self.require(request)
        name = request.query.get("domain", "").strip()
        raise web.HTTPSeeOther(f"/console/d/{quote(name, safe='')}/" if name else "/console/")

    # --- dashboard ---------------------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        s = self.require(request)
        name, _ = await self.domain_of(request, s)
        api = await self.client(request, s, name)
        n = await domain_numbers(name)
        calls = await api.get("/calls?limit=1000")
        today = datetime.now(UTC).date().isoformat()
        today_calls = [c for c in calls if str(c.get("start_stamp", "")).startswith(today)]
        tiles = [
            ("Calls active", f"{n.calls_active:.0f}", "tile-active"),
            ("Calls today", str(len(today_calls)), "tile-today"),
            ("Calls since start", f"{n.calls_started:.0f}", "tile-started"),
            ("Turns measured", f"{n.turns:.0f}", "tile-turns"),
            ("Turn latency p50", ms(_ms(n.latency_p50)), "tile-p50"),
            ("p95", ms(_ms(n.latency_p95)), "tile-p95"),
            ("p99", ms(_ms(n.latency_p99)), "tile-p99"),
            ("Greeting p50", ms(_ms(n.greeting_p50)), "tile-greeting"),
        ]
        html_tiles = "".join(
            f'<div class="tile" id="{i}"><span class="v">{esc(v)}</span>'
            f'<span class="k">{esc(k)}</span></div>'
            for k, v, i in tiles
        )
        failed = [[esc(k), f"{v:.0f}"] for k, v in sorted(n.calls_failed.items())]
        refused = [[esc(k), f"{v:.0f}"] for k, v in sorted(n.calls_refused.items())]
        providers = sorted(set(n.provider_errors) | set(n.provider_ttfb_p50))
        prov_rows = [
            [
                esc(p),
                f"{n.provider_errors.get(p, 0):.0f}",
                ms(_ms(n.provider_ttfb_p50.get(p))),
            ]
            for p in providers
        ]
        body = (
            f'<section class="tiles">{html_tiles}</section>'
            '<p class="hint">From this server\'s <code>/metrics</code> (summed over its '
            "workers, since it started); calls today from the call records.</p>"
            '<div class="cols"><section><h2>Calls failed</h2>'
            + table(["Reason", "Calls"], failed)
            + "</section><section><h2>Calls refused</h2>"
            + table(["Reason", "Calls"], refused)
            + "</section></div><section><h2>Providers (all domains on this server)</h2>"
            + table(["Provider", "Errors", "TTFB p50"], prov_rows, "providers")
            + "</section>"
        )
        return self.page(s, name, "Dashboard", body, active="")

    # --- agents ------------------------------------------------------------------------

    async def agents(self, request: web.Request) -> web.StreamResponse:
        s = self.require(request)
        name, _ = await self.domain_of(request, s)
        api = await self.client(request, s, name)
        error = ""
        if request.method == "POST":
            form = await self.check_post(request, s)
            agent_name = str(form.get("agent_name", "")).strip()
            try:
                row = await api.request(
                    "POST", "/agents", {"agent_name": agent_name, "agent_default": False}
                )
                raise web.HTTPSeeOther(f"/console/d/{quote(name)}/agents/{row['voice_agent_uuid']}")
            except AdminError as exc:
                error = _admin_message(exc)
        rows = await api.get("/agents")
        cells = [
            [
                f'<a href="/console/d/{esc(quote(name))}/agents/{esc(a["voice_agent_uuid"])}">'
                f"{esc(a['agent_name'])}</a>",
                "default" if a.get("agent_default") else "",
                esc(a.get("pipeline")),
                esc(a.get("playback")),
                "yes" if a.get("agent_enabled") else "no",
                f'<a href="/console/d/{esc(quote(name))}/talk?agent='
                f'{esc(a["voice_agent_uuid"])}">talk</a>',
            ]
            for a in rows
        ]
        err = f'<p class="error">{esc(error)}</p>' if error else ""
        body = (
            table(["Agent", "", "Pipeline", "Playback", "Enabled", ""], cells, "agents")
            + f'<h2>New agent</h2>{err}<form method="post" class="inline">'
            + hidden_csrf(s.csrf)
            + '<input type="text" name="agent_name" placeholder="Reception">'
            '<button type="submit">Create</button></form>'
        )
        return self.page(s, name, "Agents", body, active="agents")

    async def agent(self, request: web.Request) -> web.StreamResponse:
        s = self.require(request)
        name, _ = await self.domain_of(request, s)
        api = await self.client(request, s, name)
        agent_id = request.match_info["agent"]
        path = f"/agents/{api.seg(agent_id)}"
        try:
            row = await api.get(path)
            tool_rows = await api.get(path + "/tools")
        except AdminError as exc:
            if exc.status in (400, 404):
                raise web.HTTPNotFound(text="no such agent in this domain") from None
            raise
        values, tools = forms.agent_values(row), forms.tool_values(tool_rows)
        errors: dict[str, str] = {}
        message = ""
        status = 200
        if request.method == "POST":
            form = await self.check_post(request, s)
            body, errors = forms.read_agent_form(form)
            tool_changes, shown, tool_errors = forms.read_tools_form(form)
            errors.update(tool_errors)
            values = {**values, **{f.name: _shown(f, form) for f in forms.AGENT_FIELDS}}
            tools = shown
            if not errors:
                existing = {r["tool_name"] for r in tool_rows}
                try:
                    await api.request("PATCH", path, body)
                    for tool, (on, settings) in tool_changes.items():
                        if on or tool in existing or _has_data(settings):
                            await api.request(
                                "PUT",
                                f"{path}/tools/{tool}",
                                {"enabled": on, "settings": settings},
                            )
                except AdminError as exc:
                    errors = forms.errors_by_field(exc.details) or {"_form": _admin_message(exc)}
            if errors:
                status = 400
            else:
                message = "Saved. The next call uses it."
                row = await api.get(path)
                values = forms.agent_values(row)
                tools = forms.tool_values(await api.get(path + "/tools"))
        action = f"/console/d/{quote(name)}/agents/{quote(agent_id)}"
        form_html = agent_form(action, s.csrf, values, tools, errors, message)
        talk = (
            f'<p><a class="button" href="/console/d/{esc(quote(name))}/talk?agent='
            f'{esc(agent_id)}">Talk to this agent</a></p>'
        )
        resp = self.page(
            s, name, f"Agent: {values.get('agent_name') or ''}", talk + form_html, active="agents"
        )
        resp.set_status(status)
        return resp

    # --- calls -------------------------------------------------------------------------

    async def calls_page(self, request: web.Request) -> web.StreamResponse:
        s = self.require(request)
        name, _ = await self.domain_of(request, s)
        api = await self.client(request, s, name)
        caller = request.query.get("caller", "").strip()
        q = "?limit=50" + (f"&caller={quote(caller)}" if caller else "")
        calls = await api.get("/calls" + q)
        sem = asyncio.Semaphore(8)

        async def detail(c: Json) -> Json:
            async with sem:
                try:
                    return dict(await api.get(f"/calls/{api.seg(str(c['voice_call_uuid']))}"))
                except AdminError:
                    return {**c, "turns": []}

        details = await asyncio.gather(*(detail(c) for c in calls))
        rows = []
        for c in details:
            lat = [t["latency_ms"] for t in c.get("turns", []) if t.get("latency_ms") is not None]
            link = f"/console/d/{quote(name)}/calls/{c['voice_call_uuid']}"
            rows.append(
                [
                    f'<a href="{esc(link)}">{esc(_when(c.get("start_stamp")))}</a>',
                    esc(c.get("caller") or "-"),
                    secs(c.get("duration_secs")),
                    esc(c.get("end_reason") or ""),
                    esc(c.get("turn_count", 0)),
                    ms(median(lat) if lat else None),
                ]
            )
        body = (
            '<form method="get" class="inline"><input type="text" name="caller" '
            f'placeholder="caller number" value="{esc(caller)}">'
            "<button type=submit>Filter</button></form>"
            + table(
                ["Time (UTC)", "Caller", "Duration", "End reason", "Turns", "p50 latency"],
                rows,
                "calls",
            )
        )
        return self.page(s, name, "Calls", body, active="calls")

    async def call_page(self, request: web.Request) -> web.StreamResponse:
        s = self.require(request)
        name, _ = await self.domain_of(request, s)
        api = await self.client(request, s, name)
        try:
            c = await api.get(f"/calls/{api.seg(request.match_info['call'])}")
        except AdminError as exc:
            if exc.status == 404:
                raise web.HTTPNotFound(text="no such call in this domain") from None
            raise
        lines = []
        for t in c.get("turns", []):
            role = str(t.get("role", ""))
            text = str(t.get("turn_text") or "")
            heard = t.get("heard_text")
            if not text.strip() and not heard:
                continue  # an empty context entry (a reply that never started)
            if role == "assistant" and (t.get("interrupted") or (heard and heard != text)):
                heard = str(heard or "")
                rest = text[len(heard) :] if text.startswith(heard) else text
                said = (
                    f'<span class="heard">{esc(heard)}</span>'
                    f'<span class="cut" title="not heard: barge-in">{esc(rest)}</span>'
                    '<span class="tag">barge-in</span>'
                )
            else:
                said = esc(text)
            lat = (
                f'<span class="lat">{ms(t.get("latency_ms"))}</span>'
                if t.get("latency_ms") is not None
                else ""
            )
            who = "Caller" if role == "user" else "Agent"
            lines.append(f'<li class="turn {esc(role)}"><b>{who}</b> {said}{lat}</li>')
        caller = str(c.get("caller") or "")
        facts = table(
            ["Start (UTC)", "Caller", "Destination", "Duration", "End reason", "Turns"],
            [
                [
                    esc(_when(c.get("start_stamp"))),
                    esc(caller or "-"),
                    esc(c.get("destination") or "-"),
                    secs(c.get("duration_secs")),
                    esc(c.get("end_reason") or ""),
                    esc(c.get("turn_count")),
                ]
            ],
        )
        gdpr = ""
        if caller:
            gdpr = (
                f'<form method="post" action="/console/d/{esc(quote(name))}/gdpr-delete" '
                'class="danger" id="gdpr-form">'
                + hidden_csrf(s.csrf)
                + f'<input type="hidden" name="caller" value="{esc(caller)}">'
                f"<p>Erase every call, transcript and message of caller <b>{esc(caller)}</b> "
                "in this domain (GDPR request; audited).</p>"
                '<label><input type="checkbox" name="confirm" required> I am sure</label> '
                '<button type="submit" id="gdpr-delete">Delete caller data</button></form>'
            )
        body = (
            facts
            + '<h2>Transcript</h2><ol class="transcript">'
            + ("".join(lines) or '<li class="empty">no turns recorded</li>')
            + "</ol>"
            + '<p class="hint">Struck-through words were generated but not heard: the caller '
            "barged in.</p>" + gdpr
        )
        return self.page(s, name, "Call", body, active="calls")

    async def gdpr_delete(self, request: web.Request) -> web.StreamResponse:
        s = self.require(request)
        name, _ = await self.domain_of(request, s)
        form = await self.check_post(request, s)
        caller = str(form.get("caller", "")).strip()
        if not caller or form.get("confirm") is None:
            raise web.HTTPBadRequest(text="caller and confirmation required")
        api = await self.client(request, s, name)
        result = await api.request("POST", "/gdpr-delete", {"caller": caller})
        body = (
            f'<p class="notice" id="gdpr-result">Deleted {esc(result.get("calls"))} call(s) '
            f"and {esc(result.get('messages'))} message(s) of that caller. The audit log "
            "keeps only a hash of the number.</p>"
            f'<p><a href="/console/d/{esc(quote(name))}/calls">Back to the calls</a></p>'
        )
        return self.page(s, name, "Caller data deleted", body, active="calls")

    # --- talk --------------------------------------------------------------------------

    async def talk(self, request: web.Request) -> web.StreamResponse:
        s = self.require(request)
        name, _ = await self.domain_of(request, s)
        api = await self.client(request, s, name)
        agents = await api.get("/agents")
        chosen = request.query.get("agent", "")
        opts = "".join(
            f'<option value="{esc(a["voice_agent_uuid"])}"'
            f"{' selected' if str(a['voice_agent_uuid']) == chosen else ''}>"
            f"{esc(a['agent_name'])}{' (default)' if a.get('agent_default') else ''}</option>"
            for a in agents
        )
        ws_path = f"/console/d/{quote(name)}/call"
        body = (
            f'<div id="talk" data-ws="{esc(ws_path)}" data-csrf="{esc(s.csrf)}" '
            f'data-rate="{BROWSER_RATE}">'
            f'<p><label for="agent">Agent</label> <select id="agent">{opts}</select> '
            '<button type="button" id="call">Call</button> '
            '<button type="button" id="hangup" disabled>Hang up</button> '
            '<span id="state" class="state">idle</span></p>'
            '<p class="hint">Your microphone goes to the agent\'s real pipeline as 16 kHz '
            "PCM over a WebSocket - the way FreeSWITCH's mod_audio_stream sends a phone "
            "call (binary playback dialect). Speak; interrupt the agent to barge in.</p>"
            '<div class="meters"><span>mic <meter id="mic" min="0" max="1" value="0"></meter>'
            '</span> <span>agent <meter id="spk" min="0" max="1" value="0"></meter></span>'
            '</div><div class="cols"><section><h2>Transcript</h2>'
            '<ol id="transcript" class="transcript live"></ol></section>'
            '<section><h2>Turn latency</h2><p class="hint">End of your speech to the '
            "agent's first audio: the server's measure (the same observer as phone calls) "
            "and this page's own.</p>"
            '<table id="latency"><thead><tr><th>Turn</th><th>Server</th><th>Page</th></tr>'
            "</thead><tbody></tbody></table></section></div></div>"
        )
        return self.page(s, name, "Talk to the agent", body, active="talk", scripts=["talk.js"])

    async def call_socket(self, request: web.Request) -> web.StreamResponse:
        """A browser call: checks, then the call server's own call path."""
        t0 = time.monotonic()
        s = self.session(request)
        if s is None:
            raise web.HTTPUnauthorized(text="log in first")
        _same_origin(request)
        if not same_token(request.query.get("csrf"), s.csrf):
            raise web.HTTPForbidden(text="CSRF token missing or wrong")
        name, duid = await self.domain_of(request, s)
        server = self.server_of()
        if server is None or not server.accepting():
            raise web.HTTPServiceUnavailable(text="not taking calls right now")
        tenant = await self._tenant_for(server, name, duid, request.query.get("agent", ""))
        # The browser speaks the binary build's dialect at 16 kHz, whatever FreeSWITCH uses.
        tenant = tenant.model_copy(update={"playback": "binary", "audio_rate": BROWSER_RATE})
        call_uuid = f"console-{uuidlib.uuid4()}"
        query = urlencode(
            {
                "domain": name,
                "rate": str(BROWSER_RATE),
                "mix": "mono",
                "caller": f"console:{s.actor}",
                "destination": "console",
            }
        )
        call = parse_call_request(f"/console/{call_uuid}", query)
        ws = web.WebSocketResponse(
            autoping=True,
            compress=False,
            max_msg_size=self.settings.max_message_bytes,
            heartbeat=None,
        )
        if not ws.can_prepare(request).ok:
            raise web.HTTPUpgradeRequired(text="WebSocket upgrade expected")
        await ws.prepare(request)
        log = logger.bind(call=call_uuid, tenant=tenant.name)
        log.info("console: browser call by {}", s.actor)
        self.calls.add(call_uuid, ws)
        try:
            await ws.send_str(f'{{"type":"console.call","call_uuid":"{call_uuid}"}}')
            await server.serve_call(ws, call, tenant, log, t0)
        finally:
            self.calls.remove(call_uuid)
        return ws

    async def _tenant_for(self, server: CallServer, name: str, duid: str, agent: str) -> Tenant:
        """The domain's default agent (as a phone call resolves it) or the chosen one."""
        if agent:
            for t in self.tenants_of():
                if t.agent_uuid == agent and t.domain_uuid == duid:
                    if not t.enabled:
                        raise web.HTTPConflict(text="this agent is disabled")
                    return t
        try:
            tenant = await server.resolver.resolve(name)
        except TenantNotFound as exc:
            raise web.HTTPConflict(text=str(exc)) from None
        if agent and tenant.agent_uuid != agent:
            raise web.HTTPNotFound(text="no such agent in this domain")
        return tenant


def _shown(f: forms.Field, form: Any) -> Any:
    """What the admin typed, to show again next to the error."""
    if f.kind == "check":
        return form.get(f.name) is not None
    return form.get(f.name, "")


def _has_data(settings: Json) -> bool:
    """Tool settings worth keeping even while the tool is off (hours, targets)."""
    return any(v for k, v in settings.items() if not (k == "timezone" and v == "UTC"))


def _ms(secs_value: float | None) -> float | None:
    return None if secs_value is None else secs_value * 1000.0


def _when(stamp: Any) -> str:
    return str(stamp or "")[:19].replace("T", " ")


def _admin_message(exc: AdminError) -> str:
    if exc.details:
        return "; ".join(str(d.get("msg", "")) for d in exc.details)
    return exc.message


def _forbidden() -> web.HTTPForbidden:
    return web.HTTPForbidden(
        text=(
            "<!doctype html><title>Forbidden</title><h1>Forbidden</h1>"
            "<p>This domain is not yours to open. <a href=/console/>Back</a></p>"
        ),
        content_type="text/html",
    )


def _same_origin(request: web.Request) -> None:
    """A browser always sends Origin on POSTs and WebSocket upgrades: it must be us."""
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser; the CSRF token is still required
        return
    host = request.headers.get("X-Forwarded-Host") or request.host
    if origin.split("://", 1)[-1].rstrip("/") != host:
        logger.warning("console: cross-origin request from {!r} refused", origin[:100])
        raise web.HTTPForbidden(text="cross-origin request refused")


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except AdminError as exc:  # the admin API said no (or is unwell): show it, not a 500
        logger.warning("console: admin API {} for {}", exc, request.path)
        resp = layout("Error", f'<p class="error">{esc(exc.message)}</p>', status=exc.status)
    except (OSError, asyncpg.PostgresError) as exc:  # PostgreSQL away: the calls go on
        logger.warning("console: database unavailable for {}: {}", request.path, exc)
        resp = layout("Unavailable", "<p>The tenant database is not reachable.</p>", status=503)
    if not resp.prepared:
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        if not request.path.startswith("/console/static/"):
            resp.headers.setdefault("Cache-Control", "no-store")
    return resp


def static_dir() -> Path:
    return Path(str(files("pipeswitch.pipelines.console") / "static"))


def console_app(console: Console) -> web.Application:
    """The /console sub-application."""
    app = web.Application(middlewares=[_headers])
    r = app.router
    r.add_get("/", console.home)
    r.add_get("/login", console.login_page)
    r.add_post("/login", console.login)
    r.add_post("/logout", console.logout)
    r.add_get("/domains", console.domains)
    r.add_get("/open", console.open_domain)
    r.add_get("/d/{domain}/", console.dashboard)
    r.add_get("/d/{domain}/agents", console.agents)
    r.add_post("/d/{domain}/agents", console.agents)
    r.add_get("/d/{domain}/agents/{agent}", console.agent)
    r.add_post("/d/{domain}/agents/{agent}", console.agent)
    r.add_get("/d/{domain}/calls", console.calls_page)
    r.add_get("/d/{domain}/calls/{call}", console.call_page)
    r.add_post("/d/{domain}/gdpr-delete", console.gdpr_delete)
    r.add_get("/d/{domain}/talk", console.talk)
    r.add_get("/d/{domain}/call", console.call_socket)
    r.add_static("/static/", static_dir(), append_version=False)
    app.on_cleanup.append(console.close)
    return app


def mount_console(ps: Pipeswitch) -> web.Application:
    """The console sub-application for a started server (tenants in PostgreSQL).

    Registers the browser calls' side channel with the call controller, so the page gets
    its call's transcript and turn latency.
    """

    def tenants() -> list[Tenant]:
        loader = ps.tenancy.loader
        return loader.tenants() if loader is not None else []

    console = Console(ps.settings, lambda: ps.tenancy.store, lambda: ps.server, tenants)
    if ps.sessions is not None:
        ps.sessions.observer_factories.append(console.calls.observers)
    return console_app(console)
