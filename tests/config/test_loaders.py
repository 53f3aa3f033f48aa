"""Tenant configuration: file formats, validation, resolution rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeswitch.config.loaders import (
    ConfigError,
    TenantNotFound,
    TenantResolver,
    builtin_loader,
    load_tenant_file,
)

TOML = """
default_tenant = "pbx.example.com"
[[tenants]]
name = "pbx.example.com"
domain_uuid = "6f1c3a52-8d0e-4f8e-9a55-2d0c0c5f2b11"
first_message = "Riverside Dental, how can I help?"
playback = "binary"
audio_rate = 16000
[tenants.providers]
llm_model = "llama-3.1-8b-instant"

[[tenants]]
name = "Other.Example.COM"
enabled = false
"""


def test_toml_and_yaml_load_the_same(tmp_path: Path) -> None:
    t = tmp_path / "tenants.toml"
    t.write_text(TOML)
    y = tmp_path / "tenants.yaml"
    y.write_text(
        "default_tenant: pbx.example.com\n"
        "tenants:\n"
        "  - name: pbx.example.com\n"
        "    domain_uuid: 6f1c3a52-8d0e-4f8e-9a55-2d0c0c5f2b11\n"
        "    first_message: Riverside Dental, how can I help?\n"
        "    playback: binary\n"
        "    audio_rate: 16000\n"
        "    providers: {llm_model: llama-3.1-8b-instant}\n"
    )
    a, b = load_tenant_file(t), load_tenant_file(y)
    assert a.default == b.default == "pbx.example.com"
    ta = next(x for x in a.all() if x.name == "pbx.example.com")
    tb = b.all()[0]
    assert ta == tb
    assert ta.playback == "binary" and ta.audio_rate == 16000
    assert ta.providers.llm_model == "llama-3.1-8b-instant"


async def test_resolution_by_name_uuid_default_and_refusals(tmp_path: Path) -> None:
    t = tmp_path / "tenants.toml"
    t.write_text(TOML)
    loader = load_tenant_file(t)
    r = TenantResolver(loader, default=loader.default)
    assert (await r.resolve("PBX.example.com")).name == "pbx.example.com"
    assert (await r.resolve("6f1c3a52-8d0e-4f8e-9a55-2d0c0c5f2b11")).name == "pbx.example.com"
    assert (await r.resolve(None)).name == "pbx.example.com"
    assert (await r.resolve("default")).name == "pbx.example.com"
    with pytest.raises(TenantNotFound, match="unknown"):
        await r.resolve("stranger.example.org")
    with pytest.raises(TenantNotFound, match="disabled"):
        await r.resolve("other.example.com")


async def test_builtin_default_answers_only_default_or_absent_domain() -> None:
    loader = builtin_loader()
    r = TenantResolver(loader, default=loader.default)
    assert (await r.resolve(None)).name == "default"
    assert (await r.resolve("default")).name == "default"
    with pytest.raises(TenantNotFound):
        await r.resolve("pbx.example.com")


def test_invalid_tenant_values_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tenants]]\nname = "x.example"\naudio_rate = 44100\n')
    with pytest.raises(ConfigError, match="audio_rate"):
        load_tenant_file(bad)
    bad.write_text('[[tenants]]\nname = "x.example"\nplayback = "mp3"\n')
    with pytest.raises(ConfigError, match="playback"):
        load_tenant_file(bad)
    bad.write_text('default_tenant = "nope"\n[[tenants]]\nname = "x.example"\n')
    with pytest.raises(ConfigError, match="default_tenant"):
        load_tenant_file(bad)
