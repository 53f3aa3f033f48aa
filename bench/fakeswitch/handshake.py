"""URL rules and the HTTP upgrade exactly as mod_audio_stream + libwsc do them.

Why: the server must accept the real request bytes (no space after colons,
``Host:h:p`` always with the port, ``Origin:http://…``, sorted extra headers)
and the emulator must refuse the URLs the module refuses (protocol doc §3).
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeswitch.bench.fakeswitch.wsframe import PerMessageDeflate

__all__ = [
    "DEFLATE_OFFER",
    "InvalidUrl",
    "WsUrl",
    "build_upgrade_request",
    "find_header_end",
    "make_key",
    "negotiate_deflate",
    "parse_extra_headers",
    "parse_ws_url",
    "upgrade_accepted",
]

MAX_WS_URI = 4096
DEFLATE_OFFER = (
    "permessage-deflate; client_no_context_takeover; server_no_context_takeover; "
    "client_max_window_bits=9"
)
_STOI = re.compile(rb"[\t\v\f]*([+-]?[0-9]+)")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


class InvalidUrl(ValueError):
    """mod_audio_stream would answer ``-ERR`` ("invalid websocket uri")."""


@dataclass(frozen=True, slots=True)
class WsUrl:
    """What libwsc's ``setUrl`` extracts; ``target`` is the request-target."""

    url: str
    secure: bool
    host: str
    port: int
    target: str


def parse_ws_url(url: str) -> WsUrl:
    """Validate like ``validate_ws_uri`` (glue.cpp) and split like ``setUrl``.

    - ``ws://`` or ``wss://`` only (``wss`` is plaintext: libwsc is built without TLS);
    - host chars ``[A-Za-z0-9.-]`` only, non-empty (no IPv6, no ``_``);
    - ``:port`` all digits up to the next ``/``, so ``ws://h:80?a=b`` is refused;
    - default port 80/443; the port is stored in an ``unsigned short`` (wraps).
    """
    if len(url) >= MAX_WS_URI:
        raise InvalidUrl(f"URL longer than {MAX_WS_URI - 1} characters")
    if url.startswith("ws://"):
        secure, pos = False, 5
    elif url.startswith("wss://"):
        secure, pos = True, 6
    else:
        raise InvalidUrl("URL must start with ws:// or wss://")
    end = pos
    while end < len(url) and url[end] not in ":/":
        if url[end] not in _HOST_CHARS:
            raise InvalidUrl(f"invalid host character {url[end]!r}")
        end += 1
    if end == pos:
        raise InvalidUrl("empty host")
    host = url[pos:end]
    slash = url.find("/", end)
    port = 443 if secure else 80
    if end < len(url) and url[end] == ":":
        digits = url[end + 1 : slash if slash >= 0 else len(url)]
        if not digits.isdigit() or not digits.isascii():
            # Non-digits are refused by validate_ws_uri; an empty port makes
            # setUrl's std::stoi throw and leaves the client unusable.
            raise InvalidUrl(f"invalid port {digits!r}")
        value = int(digits)
        if value > 0x7FFFFFFF:
            raise InvalidUrl(f"port out of range {digits!r}")  # std::stoi out_of_range
        port = value & 0xFFFF
    target = url[slash:] if slash >= 0 else "/"
    return WsUrl(url=url, secure=secure, host=host, port=port, target=target)


def make_key() -> str:
    """``Sec-WebSocket-Key``: base64 of 16 random bytes."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def parse_extra_headers(value: Mapping[str, str] | str | None) -> dict[str, str]:
    """``STREAM_EXTRA_HEADERS``: a JSON object; only string values are used.

    A mapping is taken as already parsed. Duplicate JSON keys: the last wins
    (``std::map::operator[]``). Anything that is not a JSON object gives nothing.
    """
    if value is None:
        return {}
    if not isinstance(value, str):
        return {str(k): str(v) for k, v in value.items()}
    try:
        pairs: Any = json.loads(value, object_pairs_hook=list)
    except ValueError:
        return {}
    if not isinstance(pairs, list) or (pairs and not isinstance(pairs[0], tuple)):
        return {}
    out: dict[str, str] = {}
    for k, v in pairs:
        if isinstance(v, str):
            out[k] = v
    return out


def build_upgrade_request(
    u: WsUrl, key: str, *, offer_deflate: bool, extra_headers: Mapping[str, str]
) -> bytes:
    """The exact bytes of ``WebSocketContext::sendHandshakeRequest``."""
    lines = [
        f"GET {u.target} HTTP/1.1\r\n",
        f"Host:{u.host}:{u.port}\r\n",
        "Upgrade:websocket\r\n",
        "Connection:upgrade\r\n",
        f"Sec-WebSocket-Key:{key}\r\n",
        "Sec-WebSocket-Version:13\r\n",
    ]
    if offer_deflate:
        lines.append(f"Sec-WebSocket-Extensions:{DEFLATE_OFFER}\r\n")
    lines.append(f"Origin:http://{u.host}:{u.port}\r\n")
    # std::map<std::string, std::string> iterates in byte order of the names.
    for name in sorted(extra_headers, key=lambda s: s.encode("utf-8")):
        lines.append(f"{name}:{extra_headers[name]}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8")


def find_header_end(buf: bytes | bytearray) -> int:
    """Length of the response head including ``\\r\\n\\r\\n``, or 0 if incomplete."""
    i = buf.find(b"\r\n\r\n")
    return i + 4 if i >= 0 else 0


def upgrade_accepted(head: bytes, *, old_libwsc: bool = False) -> bool:
    """Does libwsc take this response head as a successful upgrade?

    1.1.0: contains ``HTTP/1.1 101`` anywhere and, case-insensitively,
    ``sec-websocket-accept:``; the Accept value is never checked.
    Old (4b80a30): must *start* with ``HTTP/1.1 101`` and contain the exact
    ``Sec-WebSocket-Accept:``.
    """
    if old_libwsc:
        return head.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Accept:" in head
    return b"HTTP/1.1 101" in head and b"sec-websocket-accept:" in head.lower()


def negotiate_deflate(head: bytes) -> PerMessageDeflate | None:
    """libwsc 1.1.0's parse of the response's extension line (compression requested).

    Substring matching as libwsc does it: the first ``sec-websocket-extensions:``
    line must contain ``permessage-deflate``; tokens are searched case-insensitively;
    ``*_max_window_bits`` outside 8..15 (or absent) mean 15.
    """
    low = head.lower()
    pos = low.find(b"sec-websocket-extensions:")
    if pos < 0:
        return None
    end = low.find(b"\r\n", pos)
    line = low[pos : end if end >= 0 else len(low)]
    if b"permessage-deflate" not in line:
        return None

    def bits(name: bytes) -> int:
        p = line.find(name + b"=")
        if p < 0:
            return 15
        start = stop = p + len(name) + 1
        while stop < len(line) and line[stop] not in b" ;\r\n":
            stop += 1
        # std::stoi on that token: optional blanks and sign, leading digits, junk ignored.
        m = _STOI.match(line[start:stop])
        if m is None:
            return 15
        v = int(m.group(1))
        return v if 8 <= v <= 15 else 15

    return PerMessageDeflate(
        client_no_context_takeover=b"client_no_context_takeover" in line,
        server_no_context_takeover=b"server_no_context_takeover" in line,
        client_max_window_bits=bits(b"client_max_window_bits"),
        server_max_window_bits=bits(b"server_max_window_bits"),
    )
