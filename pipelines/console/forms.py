"""The agent editor's fields: how each is shown, read back from a form, and validated.

Field names are the model's own dotted paths (``providers.llm``, ``turns.vad_stop_secs``), so
a pydantic error's ``loc`` names the field it belongs next to. Values are validated with the
same models the admin API and the tenant loader use (:class:`AgentFields`,
:class:`ToolSettings`) before anything is saved, so an agent is never half-saved.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeswitch.config.tenant_store import AgentFields
from pipeswitch.config.tenants import (
    PIPELINE_KINDS,
    ProviderSettings,
    ToolSettings,
    TurnSettings,
)

Json = dict[str, Any]


@dataclass(frozen=True)
class Field:
    """One editor field: ``kind`` is text | textarea | select | number | int | check."""

    name: str
    label: str
    kind: str = "text"
    choices: tuple[str, ...] = ()
    optional: bool = False  # empty input -> None (else: left unset)
    help: str = ""


SECTIONS: list[tuple[str, list[Field]]] = [
    (
        "Agent",
        [
            Field("agent_name", "Name"),
            Field("agent_enabled", "Enabled", "check"),
            Field("agent_default", "Domain default (answers unrouted calls)", "check"),
            Field("system_prompt", "Prompt", "textarea"),
            Field("first_message", "First message", "textarea", optional=True),
            Field("language", "Language", optional=True, help="e.g. en, de, cs"),
            Field(
                "voice",
                "Voice",
                optional=True,
                help="Piper voice, e.g. en_US-joe-medium (empty: the default voice)",
            ),
            Field("max_call_secs", "Call time limit (s)", "number", optional=True),
        ],
    ),
    (
        "Pipeline and providers",
        [
            Field("pipeline", "Pipeline kind", "select", PIPELINE_KINDS),
            Field("providers.stt", "Speech-to-text", "select", ("deepgram", "whisper-local")),
            Field("providers.stt_model", "STT model"),
            Field("providers.llm", "LLM", "select", ("groq", "openai", "local")),
            Field("providers.llm_model", "LLM model"),
            Field(
                "providers.llm_reasoning_effort",
                "Reasoning effort",
                "select",
                ("", "low", "medium", "high"),
                optional=True,
            ),
            Field("providers.llm_temperature", "Temperature", "number", optional=True),
            Field("providers.llm_max_tokens", "Max tokens", "int", optional=True),
            Field("providers.realtime_model", "Speech-to-speech model", optional=True),
            Field("providers.realtime_voice", "Speech-to-speech voice", optional=True),
            Field(
                "providers.turn_detection",
                "Speech-to-speech turn detection",
                "select",
                ("server", "local"),
            ),
            Field("providers.realtime_silence_ms", "Server VAD silence (ms)", "int"),
            Field("providers.s2s_fallback", "Fall back to the cascade", "check"),
            Field("providers.elevenlabs_agent_id", "ElevenLabs agent id", optional=True),
        ],
    ),
    (
        "Playback (FreeSWITCH)",
        [
            Field("playback", "Playback dialect", "select", ("json-stream", "binary", "file")),
            Field(
                "module_build",
                "mod_audio_stream build",
                "select",
                ("", "community", "voxcom", "cloudfieldcz", "amigniter"),
                optional=True,
            ),
            Field("audio_rate", "Sample rate (Hz)", "select", ("8000", "16000", "24000")),
            Field("audio_mix", "Mix", "select", ("mono", "mixed", "stereo")),
        ],
    ),
    (
        "Turn-taking",
        [
            Field("turns.vad_stop_secs", "Silence that ends speech (s)", "number"),
            Field("turns.vad_start_secs", "Speech that starts a turn (s)", "number"),
            Field("turns.vad_confidence", "VAD confidence", "number"),
            Field("turns.complete_wait_secs", "Wait after a complete sentence (s)", "number"),
            Field("turns.incomplete_wait_secs", "Wait after an unfinished one (s)", "number"),
            Field("turns.stt_timeout_secs", "Give up on the final transcript (s)", "number"),
            Field("turns.barge_in_min_secs", "Speech that interrupts the bot (s)", "number"),
            Field("turns.echo_guard", "Echo guard (speech-to-speech)", "check"),
        ],
    ),
]

AGENT_FIELDS = [f for _, fields in SECTIONS for f in fields]
TOOL_NAMES = ("transfer_call", "end_call", "send_dtmf", "take_message", "business_hours")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
TRANSFER_KINDS = ("extension", "ring_group", "queue", "voicemail")


def agent_values(agent: Json) -> Json:
    """An agent row (admin API JSON) as flat dotted field values, model defaults filled in."""
    subs = {
        "providers": _lenient(ProviderSettings, agent.get("providers")),
        "turns": _lenient(TurnSettings, agent.get("turns")),
    }
    out: Json = {}
    for f in AGENT_FIELDS:
        top, _, sub = f.name.partition(".")
        out[f.name] = subs[top].get(sub) if sub else agent.get(top)
    return out


def _lenient(model: type[BaseModel], stored: Any) -> Json:
    """The stored JSON over the model's defaults (a stored value the model now rejects is
    still shown, so the admin can see and fix it)."""
    defaults = model().model_dump()
    return {**defaults, **(stored if isinstance(stored, dict) else {})}


def read_agent_form(form: Any) -> tuple[Json, dict[str, str]]:
    """Form fields -> an AgentFields body; errors by field name (nothing is saved then)."""
    body: Json = {}
    errors: dict[str, str] = {}
    for f in AGENT_FIELDS:
        raw = form.get(f.name)
        value: Any
        if f.kind == "check":
            value = raw is not None
        else:
            text = str(raw or "")
            if f.kind != "textarea":
                text = text.strip()
            if not text.strip():
                if f.optional:
                    value = None
                elif f.kind == "textarea":
                    value = ""
                else:
                    errors[f.name] = "required"
                    continue
            elif f.kind == "number":
                value = _number(text, float)
            elif f.kind == "int" or f.name == "audio_rate":
                value = _number(text, int)
            else:
                value = text
        top, _, sub = f.name.partition(".")
        if sub:
            body.setdefault(top, {})[sub] = value
        else:
            body[top] = value
    try:
        AgentFields.model_validate(body)
    except ValidationError as exc:
        for name, msg in errors_by_field(exc.errors(include_url=False)).items():
            errors.setdefault(name, msg)
    return body, errors


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        return text  # let the model say what is wrong with it, next to the field


def errors_by_field(details: Sequence[Mapping[str, Any]], prefix: str = "") -> dict[str, str]:
    """pydantic errors (or the admin API's ``details``) -> message by form field name."""
    out: dict[str, str] = {}
    for d in details:
        loc = [str(p) for p in d.get("loc", ()) if not str(p).isdigit()]
        name = prefix + ".".join(loc[:2]) if loc else prefix.rstrip(".") or "_form"
        msg = str(d.get("msg", "invalid")).removeprefix("Value error, ")
        out.setdefault(name, msg)
    return out


# --- tools -------------------------------------------------------------------------------

_TARGET_RE = re.compile(r"^\s*([^:=]+?)\s*[:=]\s*(\S+)(?:\s+(\S+))?(?:\s+(.*))?$")


def tool_values(rows: list[Json]) -> Json:
    """The agent's tool rows (admin API JSON) merged the way the tenant loader merges them."""
    enabled = [r["tool_name"] for r in rows if r.get("tool_enabled")]
    merged: Json = {}
    for r in rows:
        merged.update(r.get("tool_settings") or {})
    targets = merged.get("transfer_targets") or {}
    lines = []
    for name, t in targets.items():
        line = f"{name}: {t.get('destination', '')} {t.get('kind', 'extension')}"
        if t.get("description"):
            line += f" {t['description']}"
        lines.append(line)
    hours = merged.get("business_hours") or {}
    out: Json = {
        "tools.enabled": enabled,
        "tools.transfer_targets": "\n".join(lines),
        "tools.dialplan_context": merged.get("dialplan_context") or "",
        "tools.timezone": merged.get("timezone") or "UTC",
        "tools.holidays": ", ".join(str(h) for h in merged.get("holidays") or []),
    }
    for day in WEEKDAYS:
        out[f"tools.hours.{day}"] = ", ".join(hours.get(day, []))
    return out


def read_tools_form(form: Any) -> tuple[dict[str, tuple[bool, Json]], Json, dict[str, str]]:
    """Tool inputs -> per-tool (enabled, settings) rows as the admin API stores them, the
    values to show again, and errors by field (validated with :class:`ToolSettings`)."""
    errors: dict[str, str] = {}
    enabled = [t for t in TOOL_NAMES if form.get(f"tools.enabled.{t}") is not None]
    targets: Json = {}
    for n, line in enumerate(str(form.get("tools.transfer_targets", "")).splitlines(), 1):
        if not line.strip():
            continue
        m = _TARGET_RE.match(line)
        if m is None:
            errors["tools.transfer_targets"] = (
                f"line {n}: write 'name: destination [kind] [description]'"
            )
            continue
        kind = m[3] or "extension"
        desc = m[4] or ""
        if kind not in TRANSFER_KINDS:  # no kind given: the rest is the description
            desc, kind = f"{kind} {desc}".strip(), "extension"
        targets[m[1]] = {"destination": m[2], "kind": kind, "description": desc}
    hours: Json = {}
    for day in WEEKDAYS:
        text = str(form.get(f"tools.hours.{day}", "")).strip()
        if text:
            hours[day] = [r.strip() for r in text.split(",") if r.strip()]
    holidays: list[str] = []
    for h in str(form.get("tools.holidays", "")).replace(";", ",").split(","):
        if h.strip():
            try:
                holidays.append(date.fromisoformat(h.strip()).isoformat())
            except ValueError:
                errors["tools.holidays"] = f"{h.strip()!r} is not a date like 2026-12-25"
    transfer: Json = {"transfer_targets": targets}
    context = str(form.get("tools.dialplan_context", "")).strip()
    if context:
        transfer["dialplan_context"] = context
    hours_doc: Json = {
        "timezone": str(form.get("tools.timezone", "")).strip() or "UTC",
        "business_hours": hours,
        "holidays": holidays,
    }
    settings_of: dict[str, Json] = {
        "transfer_call": transfer,
        "business_hours": hours_doc,
    }
    shown = {
        "tools.enabled": enabled,
        "tools.transfer_targets": str(form.get("tools.transfer_targets", "")),
        "tools.dialplan_context": context,
        "tools.timezone": hours_doc["timezone"],
        "tools.holidays": str(form.get("tools.holidays", "")),
        **{f"tools.hours.{d}": str(form.get(f"tools.hours.{d}", "")) for d in WEEKDAYS},
    }
    if not errors:
        try:
            ToolSettings.model_validate({"enabled": enabled, **transfer, **hours_doc})
        except ValidationError as exc:
            for name, msg in errors_by_field(exc.errors(include_url=False)).items():
                errors[_tool_field(name, msg)] = msg
    rows = {t: (t in enabled, settings_of.get(t, {})) for t in TOOL_NAMES}
    return rows, shown, errors


def _tool_field(name: str, msg: str) -> str:
    """A ToolSettings error location -> the editor input it belongs next to."""
    top, _, sub = name.partition(".")
    if top == "business_hours":
        day = sub if sub in WEEKDAYS else msg.split(":", 1)[0].strip()  # "tue: '9-5' is not..."
        return f"tools.hours.{day}" if day in WEEKDAYS else "tools.hours.mon"
    if top in ("transfer_targets", "timezone", "holidays", "dialplan_context", "enabled"):
        return f"tools.{top}"
    return "tools.transfer_targets" if top in ("", "_form") else f"tools.{top}"
