"""HTML for the console: plain server-rendered pages, escaped at every interpolation.

No template engine and nothing from the internet: one stylesheet and a few scripts served
from the package (``static/``); the Content-Security-Policy allows nothing else.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from pipeswitch.pipelines.console.forms import SECTIONS, TOOL_NAMES, WEEKDAYS, Field

Json = dict[str, Any]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; media-src 'self' blob:; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def layout(
    title: str,
    body: str,
    *,
    user: str = "",
    csrf: str = "",
    domain: str = "",
    active: str = "",
    super_admin: bool = False,
    scripts: Iterable[str] = (),
    status: int = 200,
) -> web.Response:
    """A whole page: header, the domain's navigation, the body."""
    nav = ""
    if domain:
        items = [
            ("", "Dashboard"),
            ("agents", "Agents"),
            ("calls", "Calls"),
            ("talk", "Talk to the agent"),
        ]
        links = "".join(
            f'<a href="/console/d/{esc(domain)}/{p}"'
            f"{' class=active' if p == active else ''}>{esc(label)}</a>"
            for p, label in items
        )
        nav = f'<nav class="domain"><span class="dom">{esc(domain)}</span>{links}</nav>'
    who = ""
    if user:
        domains = '<a href="/console/domains">All domains</a>' if super_admin else ""
        who = (
            f'<div class="who">{domains}<span>{esc(user)}</span>'
            f'<form method="post" action="/console/logout">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
            f'<button type="submit" class="link">Log out</button></form></div>'
        )
    js = "".join(f'<script src="/console/static/{esc(s)}" defer></script>' for s in scripts)
    doc = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} - Pipeswitch console</title>"
        '<link rel="stylesheet" href="/console/static/console.css">'
        f'{js}</head><body><header><a class="brand" href="/console/">Pipeswitch</a>{nav}{who}'
        f"</header><main><h1>{esc(title)}</h1>{body}</main></body></html>"
    )
    return web.Response(text=doc, content_type="text/html", status=status)


def table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escape them when building rows)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="empty">nothing yet</td></tr>'
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def hidden_csrf(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(csrf)}">'


def _err(errors: dict[str, str], name: str) -> str:
    msg = errors.get(name)
    return f'<span class="error" data-for="{esc(name)}">{esc(msg)}</span>' if msg else ""


def field_html(f: Field, value: Any, errors: dict[str, str]) -> str:
    """One labelled input with its validation message beside it."""
    fid = "f-" + f.name.replace(".", "-")
    bad = " invalid" if f.name in errors else ""
    attrs = f'id="{fid}" name="{esc(f.name)}"'
    if f.kind == "textarea":
        control = f'<textarea {attrs} rows="4" class="{bad}">{esc(value)}</textarea>'
    elif f.kind == "select":
        choices = list(f.choices)
        cur = "" if value is None else str(value)
        if cur not in choices:
            choices.append(cur)
        opts = "".join(
            f'<option value="{esc(c)}"{" selected" if c == cur else ""}>{esc(c or "-")}</option>'
            for c in choices
        )
        control = f'<select {attrs} class="{bad}">{opts}</select>'
    elif f.kind == "check":
        checked = " checked" if value else ""
        control = f'<input type="checkbox" {attrs}{checked}>'
    else:
        control = f'<input type="text" {attrs} value="{esc(value)}" class="{bad}">'
    hint = f'<small class="hint">{esc(f.help)}</small>' if f.help else ""
    return (
        f'<div class="field{bad}"><label for="{fid}">{esc(f.label)}</label>'
        f"{control}{hint}{_err(errors, f.name)}</div>"
    )


def agent_form(
    action: str, csrf: str, values: Json, tools: Json, errors: dict[str, str], message: str = ""
) -> str:
    """The whole agent editor: agent columns by section, then the tools."""
    parts = [f'<form method="post" action="{esc(action)}" class="editor" id="agent-form">']
    parts.append(hidden_csrf(csrf))
    if message:
        parts.append(f'<p class="notice" id="saved">{esc(message)}</p>')
    if errors:
        parts.append(
            f'<p class="error-summary">Not saved: {len(errors)} field(s) need attention.</p>'
        )
    if "_form" in errors:
        parts.append(f'<p class="error">{esc(errors["_form"])}</p>')
    for title, fields in SECTIONS:
        parts.append(f"<fieldset><legend>{esc(title)}</legend>")
        parts.extend(field_html(f, values.get(f.name), errors) for f in fields)
        parts.append("</fieldset>")
    parts.append(tools_html(tools, errors))
    parts.append('<div class="actions"><button type="submit" id="save">Save</button></div>')
    parts.append("</form>")
    return "".join(parts)


def tools_html(v: Json, errors: dict[str, str]) -> str:
    enabled = set(v.get("tools.enabled") or [])
    checks = "".join(
        f'<label class="check"><input type="checkbox" name="tools.enabled.{t}"'
        f"{' checked' if t in enabled else ''}> {esc(t)}</label>"
        for t in TOOL_NAMES
    )
    hours = "".join(
        f'<div class="field day"><label for="f-hours-{d}">{d}</label>'
        f'<input type="text" id="f-hours-{d}" name="tools.hours.{d}"'
        f' value="{esc(v.get(f"tools.hours.{d}"))}" placeholder="09:00-12:30, 13:30-17:00">'
        f"{_err(errors, f'tools.hours.{d}')}</div>"
        for d in WEEKDAYS
    )
    return (
        "<fieldset><legend>Tools</legend>"
        f'<div class="field">{checks}{_err(errors, "tools.enabled")}</div>'
        '<div class="field"><label for="f-targets">Transfer targets</label>'
        f'<textarea id="f-targets" name="tools.transfer_targets" rows="3"'
        f' placeholder="sales: 2001 ring_group Sales team">'
        f"{esc(v.get('tools.transfer_targets'))}</textarea>"
        '<small class="hint">one per line: name: destination [extension|ring_group|queue|'
        "voicemail] [description]</small>"
        f"{_err(errors, 'tools.transfer_targets')}</div>"
        '<div class="field"><label for="f-context">Dialplan context</label>'
        f'<input type="text" id="f-context" name="tools.dialplan_context"'
        f' value="{esc(v.get("tools.dialplan_context"))}" placeholder="(the domain name)">'
        f"{_err(errors, 'tools.dialplan_context')}</div>"
        '<div class="field"><label for="f-timezone">Time zone</label>'
        f'<input type="text" id="f-timezone" name="tools.timezone"'
        f' value="{esc(v.get("tools.timezone"))}">{_err(errors, "tools.timezone")}</div>'
        f'<div class="hours"><span class="label">Business hours</span>{hours}</div>'
        '<div class="field"><label for="f-holidays">Holidays</label>'
        f'<input type="text" id="f-holidays" name="tools.holidays"'
        f' value="{esc(v.get("tools.holidays"))}" placeholder="2026-12-25, 2026-12-26">'
        f"{_err(errors, 'tools.holidays')}</div></fieldset>"
    )


def ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0f} ms"


def secs(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f} s"
