"""A small client for the Piper HTTP server: one place that reads its WAV replies.

The Piper server streams a WAV whose header declares unknown sizes
(``0xFFFFFFFF``), so the standard library's ``wave`` module refuses it; this
parser walks the RIFF chunks instead of assuming a 44-byte header.
"""

from __future__ import annotations

import struct

import aiohttp


class WavError(ValueError):
    """Bytes that are not a 16-bit PCM WAV this code can play."""


def wav_pcm(data: bytes) -> tuple[bytes, int]:
    """``(pcm, sample_rate)`` of a mono 16-bit WAV (a streamed one included)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError("not a RIFF/WAVE file")
    pos = 12
    rate = 0
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if chunk == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise WavError("truncated fmt chunk")
            fmt, channels, rate = struct.unpack("<HHI", data[body : body + 8])
            bits = struct.unpack("<H", data[body + 14 : body + 16])[0]
            if fmt != 1 or channels != 1 or bits != 16:
                raise WavError(f"need mono 16-bit PCM, got format={fmt} ch={channels} bits={bits}")
        elif chunk == b"data":
            if not rate:
                raise WavError("data chunk before fmt chunk")
            end = len(data) if size == 0xFFFFFFFF else min(len(data), body + size)
            pcm = data[body:end]
            return pcm[: len(pcm) - len(pcm) % 2], rate
        pos = body + size + (size & 1)
    raise WavError("no data chunk")


async def synthesize(
    http: aiohttp.ClientSession,
    url: str,
    text: str,
    *,
    voice: str | None = None,
    timeout_secs: float = 10.0,
) -> tuple[bytes, int]:
    """``(pcm, sample_rate)`` of ``text`` from the Piper server at ``url`` (with ``?rate=``)."""
    async with http.post(
        url,
        json={"text": text, "voice": voice},
        timeout=aiohttp.ClientTimeout(total=timeout_secs),
    ) as r:
        r.raise_for_status()
        return wav_pcm(await r.read())
