"""The port probe: only the workers of one ``serve --workers N`` may share a port."""

from __future__ import annotations

import socket

import pytest
from pydantic import SecretStr

from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.startup import (
    PortInUse,
    StartupError,
    check_port_free,
    check_provider_keys,
)


def _listener(reuse_port: bool, port: int = 0) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


@pytest.mark.parametrize("reuse_port", [False, True], ids=["single-serve", "workers"])
def test_a_taken_port_is_refused_whoever_holds_it(reuse_port: bool) -> None:
    first = _listener(reuse_port)
    port = first.getsockname()[1]
    try:
        # Workers share the port among themselves (SO_REUSEPORT) ...
        if reuse_port:
            sibling = _listener(True, port)
            sibling.close()
        # ... but the probe of any other serve fails, with one line naming the port.
        with pytest.raises(PortInUse) as info:
            check_port_free("127.0.0.1", port)
        assert str(port) in str(info.value) and "\n" not in str(info.value)
    finally:
        first.close()
    check_port_free("127.0.0.1", port)  # free again (TIME_WAIT does not count)


def test_bad_listen_address_is_a_startup_error() -> None:
    with pytest.raises(StartupError):
        check_port_free("no-such-host.invalid", 8080)


def test_keys_are_checked_per_provider_the_tenants_use() -> None:
    local_stt = Tenant.model_validate({"name": "a.example", "providers": {"stt": "whisper-local"}})
    settings = Settings(providers="real", groq_api_key=SecretStr("k"))
    check_provider_keys(settings, [local_stt])  # Groq only: its key is there
    with pytest.raises(StartupError, match="PIPESWITCH_DEEPGRAM_API_KEY is not set"):
        check_provider_keys(settings, [local_stt, Tenant(name="b.example")])
    check_provider_keys(Settings(providers="emulated"), [Tenant(name="b.example")])


def test_speech_to_speech_tenants_need_their_provider_key() -> None:
    keys = {"deepgram_api_key": "d", "groq_api_key": "g"}
    settings = Settings(providers="real", **keys)  # type: ignore[arg-type]
    with pytest.raises(StartupError, match="PIPESWITCH_OPENAI_API_KEY.*rt.example"):
        check_provider_keys(settings, [Tenant(name="rt.example", pipeline="openai-realtime")])
    with pytest.raises(StartupError, match="PIPESWITCH_GOOGLE_API_KEY"):
        check_provider_keys(settings, [Tenant(name="gl.example", pipeline="gemini-live")])
    with pytest.raises(StartupError, match="PIPESWITCH_ELEVENLABS_API_KEY"):
        check_provider_keys(settings, [Tenant(name="el.example", pipeline="elevenlabs-agent")])
