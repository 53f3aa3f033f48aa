"""The console's pure parts: session sealing, form reading and validation, dashboard maths."""

from __future__ import annotations

import math

from cryptography.fernet import Fernet
from multidict import MultiDict

from pipeswitch.pipelines.console import forms
from pipeswitch.pipelines.console.auth import ConsoleSession, SessionCodec, session_key
from pipeswitch.pipelines.console.dashboard import histogram_quantile, parse_numbers


def test_session_cookie_is_sealed_and_refuses_tampering_and_other_keys() -> None:
    codec = SessionCodec(session_key(Fernet.generate_key().decode()))
    s = ConsoleSession("secret-admin-token", False, "d-1", "csrf-1", "token:abc")
    value = codec.seal(s)
    assert "secret-admin-token" not in value
    assert codec.open(value) == s
    assert codec.open(value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]) is None
    assert SessionCodec(session_key("another-key")).open(value) is None
    assert codec.open("") is None and codec.open("garbage") is None
    expired = SessionCodec(session_key("k"), max_age_secs=-1)
    assert expired.open(expired.seal(s)) is None
    assert s.may_open("d-1") and not s.may_open("d-2")
    assert ConsoleSession("t", True, None, "c", "super-admin").may_open("d-2")


def _form(**over: str) -> MultiDict[str]:
    row = {
        "agent_name": "Reception",
        "agent_enabled": True,
        "pipeline": "cascade",
        "playback": "binary",
        "audio_rate": 8000,
        "audio_mix": "mono",
    }
    doc: MultiDict[str] = MultiDict()
    for k, v in forms.agent_values(row).items():
        if v is True:
            doc[k] = "on"
        elif v is not None and v is not False:
            doc[k] = str(v)
    for k, v in over.items():
        doc[k.replace("__", ".")] = v
    return doc


def test_agent_form_errors_land_next_to_their_fields() -> None:
    body, errors = forms.read_agent_form(
        _form(turns__vad_stop_secs="soon", audio_rate="12000", providers__realtime_silence_ms="5")
    )
    assert set(errors) == {"turns.vad_stop_secs", "audio_rate", "providers.realtime_silence_ms"}
    assert "multiple of 8000" in errors["audio_rate"]
    body, errors = forms.read_agent_form(_form(agent_name="", pipeline="gemini-live"))
    assert errors == {"agent_name": "required"}
    body, errors = forms.read_agent_form(_form(pipeline="openai-realtime", voice=""))
    assert not errors
    assert body["pipeline"] == "openai-realtime" and body["voice"] is None
    assert body["turns"]["vad_stop_secs"] == 0.2 and body["agent_default"] is False


def test_tools_form_reads_targets_hours_and_validates_like_the_tenant_model() -> None:
    form = MultiDict(
        {
            "tools.enabled.transfer_call": "on",
            "tools.transfer_targets": "sales: 2001 ring_group Sales team\nbilling = 2002 Accounts",
            "tools.timezone": "Europe/Prague",
            "tools.hours.mon": "08:00-12:00, 13:00-17:00",
            "tools.holidays": "2026-12-25",
        }
    )
    rows, _, errors = forms.read_tools_form(form)
    assert not errors
    on, transfer = rows["transfer_call"]
    assert on and transfer["transfer_targets"] == {
        "sales": {"destination": "2001", "kind": "ring_group", "description": "Sales team"},
        "billing": {"destination": "2002", "kind": "extension", "description": "Accounts"},
    }
    assert rows["business_hours"] == (
        False,
        {
            "timezone": "Europe/Prague",
            "business_hours": {"mon": ["08:00-12:00", "13:00-17:00"]},
            "holidays": ["2026-12-25"],
        },
    )
    shown = forms.tool_values(
        [
            {"tool_name": "transfer_call", "tool_enabled": True, "tool_settings": transfer},
            {
                "tool_name": "business_hours",
                "tool_enabled": False,
                "tool_settings": rows["business_hours"][1],
            },
        ]
    )
    assert shown["tools.enabled"] == ["transfer_call"]
    assert shown["tools.hours.mon"] == "08:00-12:00, 13:00-17:00"
    again, _, _ = forms.read_tools_form(
        MultiDict(
            {
                **{k: v for k, v in shown.items() if isinstance(v, str)},
                "tools.enabled.transfer_call": "on",
            }
        )
    )
    assert again["transfer_call"] == rows["transfer_call"]

    bad = MultiDict(
        {"tools.enabled.transfer_call": "on", "tools.hours.tue": "9-5", "tools.holidays": "xmas"}
    )
    _, _, errors = forms.read_tools_form(bad)
    assert set(errors) == {"tools.holidays"}
    _, _, errors = forms.read_tools_form(
        MultiDict({"tools.enabled.transfer_call": "on", "tools.hours.tue": "9-5"})
    )
    assert set(errors) == {"tools.hours.tue"}
    _, _, errors = forms.read_tools_form(MultiDict({"tools.enabled.transfer_call": "on"}))
    assert "transfer_targets is empty" in errors["tools.transfer_targets"]


def test_histogram_quantile_matches_promql() -> None:
    b = {0.1: 0.0, 0.5: 10.0, 1.0: 20.0, math.inf: 20.0}
    assert histogram_quantile(0.5, b) == 0.5
    assert histogram_quantile(0.75, b) == 0.75
    assert histogram_quantile(0.99, {0.5: 0.0, 1.0: 0.0, math.inf: 3.0}) == 1.0
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None


def test_dashboard_reads_only_its_tenants_series() -> None:
    text = "\n".join(
        [
            "# TYPE pipeswitch_calls_started counter",
            'pipeswitch_calls_started_total{tenant="a.example.com",pipeline="cascade"} 3.0',
            'pipeswitch_calls_started_total{tenant="b.example.com",pipeline="cascade"} 9.0',
            "# TYPE pipeswitch_calls_active gauge",
            'pipeswitch_calls_active{tenant="a.example.com",pipeline="cascade"} 1.0',
            "# TYPE pipeswitch_turn_latency_seconds histogram",
            'pipeswitch_turn_latency_seconds_bucket{tenant="a.example.com",pipeline="cascade",le="0.5"} 1.0',
            'pipeswitch_turn_latency_seconds_bucket{tenant="a.example.com",pipeline="cascade",le="1.0"} 2.0',
            'pipeswitch_turn_latency_seconds_bucket{tenant="a.example.com",pipeline="cascade",le="+Inf"} 2.0',
            'pipeswitch_turn_latency_seconds_bucket{tenant="b.example.com",pipeline="cascade",le="0.5"} 0.0',
            'pipeswitch_turn_latency_seconds_bucket{tenant="b.example.com",pipeline="cascade",le="1.0"} 0.0',
            'pipeswitch_turn_latency_seconds_bucket{tenant="b.example.com",pipeline="cascade",le="+Inf"} 50.0',
            "# TYPE pipeswitch_provider_errors counter",
            'pipeswitch_provider_errors_total{provider="DeepgramSTTService"} 2.0',
            "",
        ]
    )
    n = parse_numbers(text, "a.example.com")
    assert (n.calls_started, n.calls_active, n.turns) == (3.0, 1.0, 2.0)
    assert n.latency_p50 == 0.5 and n.latency_p99 is not None and n.latency_p99 <= 1.0
    assert n.provider_errors == {"DeepgramSTTService": 2.0}
