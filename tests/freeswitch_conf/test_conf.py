"""freeswitch-conf is what an admin copies into a switch: every XML file must parse and
have FreeSWITCH's dialplan structure, each build's variant must set what that build needs
(and nothing that breaks it), and the docs may only name files that exist.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[2] / "freeswitch-conf"
XML_FILES = sorted(CONF.rglob("*.xml"))
DIALPLANS = sorted((CONF / "dialplan").glob("*.xml"))
STREAMING = ("community", "voxcom", "cloudfieldcz")


def actions(path: Path) -> list[tuple[str, str]]:
    """(application, data) of every action and anti-action, in document order."""
    root = ET.parse(path).getroot()
    return [
        (a.get("application", ""), a.get("data", ""))
        for a in root.iter()
        if a.tag in ("action", "anti-action")
    ]


def sets(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for app, data in actions(path):
        if app == "set" and "=" in data:
            k, _, v = data.partition("=")
            out[k] = v
    return out


def extensions(path: Path) -> list[ET.Element]:
    root = ET.parse(path).getroot()
    return list(root.iter("extension"))


def test_there_is_a_variant_per_build() -> None:
    names = {p.stem for p in DIALPLANS}
    assert names >= {f"pipeswitch_{b}" for b in (*STREAMING, "unicast", "turn_based")}


@pytest.mark.parametrize("path", XML_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_xml_parses_with_the_dialplan_structure(path: Path) -> None:
    root = ET.parse(path).getroot()
    if root.tag == "configuration":
        return  # autoload_configs file (checked below)
    assert root.tag in ("include", "extension", "context"), root.tag
    exts = extensions(path)
    assert exts, "no extension"
    for ext in exts:
        assert ext.get("name"), "extension without a name"
        conditions = ext.findall("condition")
        assert conditions, f"{ext.get('name')}: no condition"
        for cond in conditions:
            assert cond.get("field") and cond.get("expression") is not None
            re.compile(cond.get("expression", ""))
            for child in cond:
                assert child.tag in ("action", "anti-action"), child.tag
                assert child.get("application"), "action without an application"
        # Only the last condition may carry actions (FreeSWITCH ANDs the conditions).
        assert all(not list(c) for c in conditions[:-1])


@pytest.mark.parametrize("build", STREAMING)
def test_streaming_variant_starts_checks_and_parks(build: str) -> None:
    path = CONF / "dialplan" / f"pipeswitch_{build}.xml"
    v = sets(path)
    assert v["STREAM_MESSAGE_DEFLATE"] == "true" and v["STREAM_HEART_BEAT"] == "0"
    assert v["pipeswitch_fallback"] and v["pipeswitch_host"]
    start = v["pipeswitch_result"]
    m = re.search(r"uuid_audio_stream\(\$\{uuid\} start (ws://\S+) (\w+) (\w+)\)", start)
    assert m, start
    url, mix, rate_arg = m.groups()
    assert "/fs/${uuid}?" in url and "domain=${domain_name}" in url
    assert mix == "mono" and "mix=mono" in url
    rate = {"8k": 8000, "16k": 16000}[rate_arg]
    assert f"rate={rate}" in url
    apps = [a for a, _ in actions(path)]
    # answer before the stream, the check extension parks or falls back.
    assert apps.index("answer") < apps.index("transfer")
    names = {e.get("name") for e in extensions(path)}
    assert {"pipeswitch_started", "pipeswitch_return"} <= names
    started = next(e for e in extensions(path) if e.get("name") == "pipeswitch_started")
    last = started.findall("condition")[-1]
    assert last.get("field") == "${pipeswitch_result}"
    assert [a.get("application") for a in last.findall("action")] == ["park"]
    assert "transfer" in [a.get("application") for a in last.findall("anti-action")]


def test_build_rules() -> None:
    community = sets(CONF / "dialplan" / "pipeswitch_community.xml")
    voxcom = sets(CONF / "dialplan" / "pipeswitch_voxcom.xml")
    cloudfield = sets(CONF / "dialplan" / "pipeswitch_cloudfieldcz.xml")
    assert voxcom["STREAM_BUFFER_SIZE"] == "40"  # 20 deadlocks on hangup
    assert "send_silence_when_idle" not in voxcom  # interleaves with the module's audio
    assert cloudfield["send_silence_when_idle"] == "-1"  # otherwise nothing is heard
    assert "send_silence_when_idle" not in community
    # cloudfieldcz replaces other audio while streaming: no playback between start and park.
    apps = [a for a, _ in actions(CONF / "dialplan" / "pipeswitch_cloudfieldcz.xml")]
    assert not {"playback", "say", "speak", "gentones"} & set(apps)


def test_unicast_variant() -> None:
    path = CONF / "dialplan" / "pipeswitch_unicast.xml"
    acts = actions(path)
    curl = [d for a, d in acts if a == "curl"]
    assert len(curl) == 1 and "/unicast/${uuid}?domain=${domain_name}" in curl[0]
    assert curl[0].endswith(" post") and "fallback=${pipeswitch_fallback}" in curl[0]
    started = next(e for e in extensions(path) if e.get("name") == "pipeswitch_unicast_started")
    last = started.findall("condition")[-1]
    assert last.get("field") == "${curl_response_code}" and last.get("expression") == "^200$"
    assert [a.get("application") for a in last.findall("action")] == ["park"]
    assert "uuid_audio_stream" not in path.read_text()


def test_turn_based_variant_runs_the_script() -> None:
    acts = actions(CONF / "dialplan" / "pipeswitch_turn_based.xml")
    assert ("lua", "pipeswitch_turn_based.lua") in acts
    assert (CONF / "pipeswitch_turn_based.lua").exists()
    lua = (CONF / "pipeswitch_turn_based.lua").read_text()
    for needle in ("recordFile", "/turn/", "X-Pipeswitch-", "transfer", "hangup", "fallback"):
        assert needle.lower() in lua.lower(), needle


def test_event_socket_listens_on_loopback_with_an_acl() -> None:
    root = ET.parse(CONF / "event_socket.conf.xml").getroot()
    assert root.tag == "configuration" and root.get("name") == "event_socket.conf"
    params = {p.get("name"): p.get("value") for p in root.iter("param")}
    assert params["listen-ip"] == "127.0.0.1"
    assert params["apply-inbound-acl"]
    assert params["password"] != "ClueCon"


def test_docs_name_only_files_that_exist() -> None:
    here = {p.name for p in CONF.rglob("*") if p.is_file()}
    for doc in [CONF / "README.md", CONF / "FUSIONPBX.md", *DIALPLANS, *CONF.glob("*.lua")]:
        text = doc.read_text()
        for name in re.findall(r"(?<![\w.-])([\w.-]+\.(?:xml|lua|csv))\b", text):
            if name in ("event_socket.conf.xml", "lua.conf.xml", "acl.conf.xml"):
                continue  # FreeSWITCH's own config files (ours is event_socket.conf.xml)
            assert name in here, f"{doc.name} names {name}, which is not in freeswitch-conf"
        assert ".md" not in re.sub(r"FUSIONPBX\.md|README\.md", "", text), doc.name


def test_lua_scripts_look_like_lua() -> None:
    # No Lua interpreter in CI: balanced blocks and no Lua 5.3-only operators.
    for path in CONF.glob("*.lua"):
        code = re.sub(r"--[^\n]*", "", path.read_text())
        code = re.sub(r"'[^'\n]*'|\"(?:[^\"\\\n]|\\.)*\"", "''", code)
        opens = len(re.findall(r"\b(function|if|for|while|do)\b", code))
        # `for`/`while` open with `do`: count `do` once per loop.
        loops = len(re.findall(r"\b(for|while)\b", code))
        ends = len(re.findall(r"\bend\b", code))
        assert opens - loops == ends, f"{path.name}: {opens - loops} blocks, {ends} ends"
        assert "//" not in code, f"{path.name}: integer division needs Lua 5.3"
