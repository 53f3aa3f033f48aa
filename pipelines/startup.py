"""Start-up checks that need no Pipecat: ``pipeswitch serve`` runs them before the heavy imports.

Each failure is a :class:`StartupError` whose message is one line for the operator (the CLI
prints it and exits 2): the port is taken, a key a tenant needs is missing.
"""

from __future__ import annotations

import errno
import socket

from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant


class StartupError(RuntimeError):
    """The server cannot start as configured; the message is one line for the operator."""


class PortInUse(StartupError):
    """Another process (not a sibling worker of this ``serve``) listens on the port."""


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` without SO_REUSEPORT and let go: :class:`PortInUse` if taken.

    The server itself binds with SO_REUSEPORT so ``serve --workers N`` can share the port;
    the kernel would also let an unrelated second ``serve`` (same user) join the group and
    split calls with it. A plain bind fails against any listener, reuse-port or not, so
    every ``serve`` that is not a worker of a parent probes first. SO_REUSEADDR keeps a
    just-stopped server's TIME_WAIT sockets from failing the probe.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc}") from None
    for family, type_, proto, _, addr in infos:
        with socket.socket(family, type_, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(
                        f"port {port} on {host} is already in use (another pipeswitch serve?); "
                        "stop it or choose another --port"
                    ) from None
                raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


# Which setting each cloud provider needs with --providers real (env var = PIPESWITCH_<NAME>).
_PROVIDER_KEYS = {
    "deepgram": "deepgram_api_key",
    "groq": "groq_api_key",
    "openai": "openai_api_key",
    "google": "google_api_key",
    "elevenlabs": "elevenlabs_api_key",
}
# Speech-to-speech kinds and the provider each talks to (their cascade fallback needs the
# cascade's keys as well).
_S2S_PROVIDER = {
    "openai-realtime": "openai",
    "gemini-live": "google",
    "elevenlabs-agent": "elevenlabs",
}


def required_keys(tenants: list[Tenant]) -> dict[str, list[str]]:
    """Setting name -> tenants that need it, for the cloud providers these tenants use."""
    need: dict[str, list[str]] = {}
    for t in tenants:
        p = t.providers
        used = []
        if p.stt.startswith("deepgram"):
            used.append("deepgram")
        if p.llm != "local":
            used.append(p.llm)
        if t.pipeline in _S2S_PROVIDER:
            used.append(_S2S_PROVIDER[t.pipeline])
        for provider in used:
            need.setdefault(_PROVIDER_KEYS[provider], []).append(t.name)
    return need


def check_provider_keys(settings: Settings, tenants: list[Tenant]) -> None:
    """With real providers, every key a loaded tenant needs must be set (StartupError)."""
    if settings.providers != "real":
        return
    for name, users in required_keys(tenants).items():
        if not getattr(settings, name).get_secret_value():
            raise StartupError(
                f"--providers real: PIPESWITCH_{name.upper()} is not set "
                f"(needed by tenant {', '.join(sorted(users))})"
            )
