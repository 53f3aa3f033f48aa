"""Call identity from the WebSocket URL.

mod_audio_stream may send its metadata TEXT frame *after* the first audio
frames (libwsc flushes audio queued while connecting first), and it does not
carry the stream's rate or channel layout in-band. So the dialplan puts them in
the URL: ``ws://host:port/fs/{call_uuid}?domain=...&rate=8000&mix=mono``.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl

Mix = Literal["mono", "mixed", "stereo"]
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_STREAM_RATE = 64000


class BadCallRequest(ValueError):
    """The URL cannot describe a call (bad rate, mix, ...)."""


@dataclass(frozen=True, slots=True)
class CallInfo:
    """Who is calling, for which tenant, and how the audio is framed."""

    call_uuid: str
    domain: str | None
    rate: int | None
    mix: Mix | None
    caller: str | None = None
    destination: str | None = None
    path: str = "/"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        """Stereo streams interleave read (caller) and write (playback) legs."""
        return 2 if self.mix == "stereo" else 1


def parse_call_request(path: str, query_string: str) -> CallInfo:
    """Extract the call identity from a request target; any path is accepted.

    The call uuid is the ``uuid`` query field, else the last path segment when it
    looks like an id, else a fresh uuid (so a bare ``ws://host:port/`` still works).
    """
    query: dict[str, str] = {}
    for k, v in parse_qsl(query_string, keep_blank_values=True):
        query.setdefault(k.lower(), v)

    call_uuid = query.pop("uuid", "") or query.pop("call_uuid", "")
    if not call_uuid:
        last = path.rstrip("/").rsplit("/", 1)[-1]
        call_uuid = last if _SAFE_ID.match(last) and last not in ("fs", "ws", "stream") else ""
    if call_uuid and not _SAFE_ID.match(call_uuid):
        raise BadCallRequest(f"call uuid {call_uuid[:40]!r} has unsafe characters")
    call_uuid = call_uuid or str(uuidlib.uuid4())

    rate: int | None = None
    raw_rate = query.pop("rate", "").strip().lower()
    if raw_rate:
        rate = {"8k": 8000, "16k": 16000}.get(raw_rate)
        if rate is None:
            if not raw_rate.isdigit():
                raise BadCallRequest(f"rate {raw_rate[:20]!r} is not a number")
            rate = int(raw_rate)
        if rate <= 0 or rate % 8000 or rate > MAX_STREAM_RATE:
            raise BadCallRequest(f"rate {rate} is not a multiple of 8000 up to {MAX_STREAM_RATE}")

    mix: Mix | None = None
    raw_mix = query.pop("mix", "").strip()
    if raw_mix:
        if raw_mix not in ("mono", "mixed", "stereo"):
            raise BadCallRequest(f"mix {raw_mix[:20]!r} is not mono, mixed or stereo")
        mix = raw_mix  # type: ignore[assignment]

    domain = query.pop("domain", "") or query.pop("domain_name", "") or query.pop("domain_uuid", "")
    return CallInfo(
        call_uuid=call_uuid,
        domain=domain.strip() or None,
        rate=rate,
        mix=mix,
        caller=query.pop("caller", None) or query.pop("ani", None),
        destination=query.pop("destination", None) or query.pop("dni", None),
        path=path,
        extra=query,
    )
