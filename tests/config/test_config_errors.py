"""Configuration mistakes are one line naming the file, the place and the problem.

Each case is what an operator gets wrong in a tenants file; ``pipeswitch serve`` prints the
same line and exits 2 (tests/cli/test_cli.py runs it as a process).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeswitch.config.loaders import (
    ConfigError,
    StaticTenantLoader,
    TenantNotFound,
    TenantResolver,
    load_tenant_file,
)
from pipeswitch.config.tenants import Tenant

CASES = [
    ("bad.toml", '[[tenants]\nname = "x"\n', ["line 1", "invalid TOML"]),
    ("bad.yaml", "tenants:\n  - name: x\n   bad: [\n", ["line 3", "invalid YAML"]),
    (
        "unknown.toml",
        '[[tenants]]\nname = "x.example"\nplaybak = "binary"\n',
        ["line 3: tenants[0] (x.example): playbak: unknown key"],
    ),
    (
        "nested.toml",
        '[[tenants]]\nname = "x.example"\n[tenants.turns]\nvad_stop = 1\n',
        ["line 4: tenants[0] (x.example): turns.vad_stop: unknown key"],
    ),
    (
        "value.toml",
        '[[tenants]]\nname = "x.example"\naudio_rate = 44100\n',
        ["line 3: tenants[0] (x.example): audio_rate:", "multiple of 8000"],
    ),
    (
        "type.yaml",
        "tenants:\n  - name: x.example\n    max_call_secs: soon\n",
        ["line 3: tenants[0] (x.example): max_call_secs:", "number"],
    ),
    ("empty.toml", "", ["empty"]),
    ("blank.yaml", "# nothing yet\n", ["empty"]),
    ("none.toml", 'default_tenant = "x"\n', ["no tenants"]),
    (
        "dup.toml",
        '[[tenants]]\nname = "a.example"\n[[tenants]]\nname = "A.example"\n',
        ["tenants[1]", "duplicate tenant 'a.example'"],
    ),
    ("top.toml", "tenant = []\n", ["unknown top-level key 'tenant'"]),
    (
        "default.toml",
        'default_tenant = "nope"\n[[tenants]]\nname = "x.example"\n',
        ["default_tenant 'nope'"],
    ),
    ("tenants.ini", "[x]\n", ["unknown file type"]),
    (
        "second.toml",
        '[[tenants]]\nname = "a.example"\n\n[[tenants]]\nname = "b.example"\n'
        'providers = {llm = "nope"}\n',
        ["line 6: tenants[1] (b.example): providers.llm:"],
    ),
    (
        "second.yaml",
        "tenants:\n  - name: a.example\n  - name: b.example\n    turns:\n      vad_stop: 1\n",
        ["line 5: tenants[1] (b.example): turns.vad_stop: unknown key"],
    ),
]


@pytest.mark.parametrize(("name", "text", "expect"), CASES, ids=[c[0] for c in CASES])
def test_config_error_is_one_line_naming_file_and_place(
    tmp_path: Path, name: str, text: str, expect: list[str]
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_tenant_file(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    for part in expect:
        assert part in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_tenant_file(tmp_path / "nope.toml")


async def test_answer_any_domain_maps_unknown_domains_to_the_default_loudly() -> None:
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    try:
        loader = StaticTenantLoader(
            [Tenant(name="default"), Tenant(name="other.example")], default="default"
        )
        strict = TenantResolver(loader, default="default")
        with pytest.raises(TenantNotFound):
            await strict.resolve("192.168.1.10")
        assert not lines
        lenient = TenantResolver(loader, default="default", answer_any_domain=True)
        assert (await lenient.resolve("192.168.1.10")).name == "default"
        assert (await lenient.resolve("other.example")).name == "other.example"
        assert any("'192.168.1.10'" in ln and "default" in ln for ln in lines), lines
        # Without a default tenant there is nothing to map to: still refused.
        none = TenantResolver(loader, default=None, answer_any_domain=True)
        with pytest.raises(TenantNotFound):
            await none.resolve("192.168.1.10")
    finally:
        logger.remove(sink)


@pytest.mark.parametrize(
    ("providers", "why"),
    [
        ({"llm_fallback": "groq"}, "same provider and model"),
        ({"stt": "whisper-local", "stt_fallback_url": "wss://x"}, "Deepgram endpoint"),
    ],
)
def test_fallbacks_that_cannot_help_are_refused(providers: dict[str, str], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Tenant(name="t", providers=providers)  # type: ignore[arg-type]


def test_a_fallback_llm_of_the_same_provider_needs_another_model() -> None:
    t = Tenant(name="t", providers={"llm_fallback": "groq", "llm_fallback_model": "m2"})  # type: ignore[arg-type]
    assert t.providers.llm_fallback == "groq"
