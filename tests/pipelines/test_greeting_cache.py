"""Greetings kept in the server process: fetched from Piper once, leading silence cut."""

from __future__ import annotations

import io
import wave

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pipeswitch.pipelines.greeting_cache import GreetingCache, trim_leading_silence


def _speech_after(rate: int, silence_secs: float, speech_secs: float = 0.2) -> bytes:
    quiet = np.zeros(int(rate * silence_secs), dtype="<i2")
    loud = np.full(int(rate * speech_secs), 4000, dtype="<i2")
    return np.concatenate([quiet, loud]).tobytes()


def test_leading_silence_is_cut_to_ten_milliseconds() -> None:
    for rate in (8000, 16000):
        out = trim_leading_silence(_speech_after(rate, 0.05), rate)
        x = np.frombuffer(out, dtype="<i2")
        first_loud = int(np.flatnonzero(x > 300)[0])
        assert first_loud == int(rate * 0.01)
        assert len(x) == int(rate * 0.01) + int(rate * 0.2)


def test_audio_without_speech_or_with_little_lead_is_kept_whole() -> None:
    silent = bytes(1600)
    assert trim_leading_silence(silent, 8000) == silent
    short_lead = _speech_after(8000, 0.005)
    assert trim_leading_silence(short_lead, 8000) == short_lead


def _wav(rate: int, pcm: bytes) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


@pytest.mark.asyncio
async def test_fetched_once_per_rate_then_served_from_memory() -> None:
    asked: list[tuple[str, str]] = []

    async def piper(request: web.Request) -> web.Response:
        rate = int(request.query.get("rate", "8000"))
        asked.append((request.query.get("rate", ""), (await request.json())["text"]))
        return web.Response(body=_wav(rate, _speech_after(rate, 0.05)))

    app = web.Application()
    app.router.add_post("/", piper)
    server = TestServer(app)
    await server.start_server()
    cache = GreetingCache(max_entries=2)
    u8, u16 = str(server.make_url("/?rate=8000")), str(server.make_url("/?rate=16000"))
    try:
        async with aiohttp.ClientSession() as http:
            assert cache.get(u8, "Hello.", "joe") is None
            pcm, rate = await cache.fetch(http, u8, "Hello.", "joe")
            assert rate == 8000 and len(pcm) == 2 * (80 + 1600)  # 10 ms lead + 200 ms
            assert cache.get(u8, "Hello.", "joe") == (pcm, 8000)
            assert cache.get(u16, "Hello.", "joe") is None  # another rate, another entry
            await cache.fetch(http, u16, "Hello.", "joe")
            assert asked == [("8000", "Hello."), ("16000", "Hello.")]
            # A third greeting evicts the least recently used (8 kHz was read last: 16 kHz).
            assert cache.get(u8, "Hello.", "joe") is not None
            await cache.fetch(http, u8, "Goodbye.", "joe")
            assert len(cache) == 2
            assert cache.get(u16, "Hello.", "joe") is None
            assert cache.get(u8, "Hello.", "joe") is not None
    finally:
        await server.close()
