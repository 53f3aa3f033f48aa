"""A Piper reply cut mid-body is resumed: the caller hears the whole reply, once.

Through the FreeSWITCH emulator, the real Piper server behind the bench's fault proxy,
and the real, unmodified ``PiperHttpTTSService``: the proxy closes a TTS response after
~0.5 s of audio. The sentence is asked again (the same server, then the tenant's fallback
Piper) and only the audio not yet played is delivered. Checked on the wire: every
sentence's audio (Piper's own bytes for it) arrives whole and exactly once, the gap is
short, and the conversation context holds the reply the caller heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import numpy as np
import pytest_asyncio
from aiohttp import web

from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream
from pipeswitch.bench.faults import TtsFaultProxy
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import ProviderSettings, Tenant
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.piper_client import best_join, wav_pcm
from pipeswitch.pipelines.services import tts_session
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet

DEAD_AIR_S = 2.0
FALLBACK = "tts-fallback.test"


def _lines(log_lines: list[str], uuid: str, text: str) -> list[str]:
    return [line for line in log_lines if uuid in line and text in line]


@pytest_asyncio.fixture(loop_scope="session")
async def proxied(served: Served) -> AsyncIterator[tuple[Pipeswitch, TtsFaultProxy]]:
    """A server whose Piper sits behind the fault proxy; one tenant has the direct Piper
    as its fallback."""
    proxy = TtsFaultProxy(served.app.endpoints.piper_url.removesuffix("/tts"))
    url = await proxy.start()
    tenants = [
        Tenant(name="default"),
        Tenant(
            name=FALLBACK,
            providers=ProviderSettings(tts_fallback_url=served.app.endpoints.piper_url),
        ),
    ]
    settings = Settings(host="127.0.0.1", port=0, providers="emulated", idle_timeout_secs=30)
    app = Pipeswitch(
        settings,
        loader=StaticTenantLoader(tenants, default="default"),
        default_tenant="default",
        endpoints=replace(served.app.endpoints, piper_url=f"{url}/tts"),
    )
    await app.start()
    try:
        yield app, proxy
    finally:
        await app.stop(drain_secs=1.0)
        await proxy.stop()


def _longest_silence(stream: FakeSwitchStream, t: float) -> float:
    """The longest run of silent 20 ms ticks the caller heard inside the reply after ``t``."""
    _, ticks = stream.played_audio()
    voiced = [at for at, loud in ticks if at >= t and loud]
    gaps = [b - a for a, b in zip(voiced, voiced[1:], strict=False)]
    return max(gaps, default=0.0)


def _after(stream: FakeSwitchStream, t: float) -> bytes:
    """Bot audio received on the wire at or after ``t``."""
    audio, chunks = stream.received_audio()
    pos = 0
    for c in chunks:
        if c.t >= t:
            break
        pos += c.nbytes
    return audio[pos:]


async def _piper(served: Served, text: str) -> bytes:
    """Piper's own PCM for ``text`` at 8 kHz (the server's cache: the bytes it sent)."""
    url = served.app.endpoints.piper_for_rate(8000)
    async with served.http.post(
        url, json={"text": text, "voice": Tenant(name="default").voice}
    ) as r:
        r.raise_for_status()
        return wav_pcm(await r.read())[0]


async def _faulted_turn(
    served: Served,
    app: Pipeswitch,
    proxy: TtsFaultProxy,
    uuid: str,
    domain: str,
    drop_limit: int | None,
    kind: str = "drop",
) -> tuple[list[str], bytes, float]:
    """Ask with the proxy cutting TTS bodies; (sentences sent to Piper, wire audio of the
    reply, seconds to the first bot audio)."""
    speech = await served.speech(QUESTION, 8000)
    stream = await open_call(
        f"ws://127.0.0.1:{app.port}/fs/{uuid}?domain={domain}&rate=8000", 8000, "json-stream"
    )
    chat = served.emu.openai
    try:
        await wait_bot_quiet(stream, quiet_s=1.0)
        n_texts, n_chat = len(proxy.texts), len(chat.requests)
        proxy.drops, proxy.drop_limit = 0, drop_limit
        proxy.kind, proxy.armed = kind, True
        end, heard = await ask(stream, speech, 8000, timeout_s=8.0)
        assert heard is not None and heard - end <= DEAD_AIR_S, "dead air with the TTS dropping"
        await wait_bot_quiet(stream, quiet_s=1.5, timeout_s=15.0)
        proxy.armed = False
        texts = list(dict.fromkeys(t for at, t in proxy.texts[n_texts:] if at >= end and t))
        reply = _after(stream, end)
        # A pause between sentences or at a comma is ~0.2-0.4 s of Piper's own silence.
        gap = _longest_silence(stream, end)
        assert gap < 0.8, f"a {gap:.2f} s gap inside the reply"
        replies = [r.reply_text for r in chat.requests[n_chat:] if r.reply_text]
        assert replies, "the LLM never answered the faulted turn"
        # The next turn's context holds the faulted turn's reply: what the caller heard.
        m = len(chat.requests)
        _, again = await ask(stream, speech, 8000, timeout_s=8.0)
        assert again is not None, "the next turn was not answered"
        await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=10.0)
        said = [
            str(msg.get("content", ""))
            for r in chat.requests[m:]
            for msg in r.messages
            if msg.get("role") == "assistant"
        ]
        assert any(" ".join(replies[-1].split()) in " ".join(s.split()) for s in said), (
            "the reply the caller heard is not in the conversation context"
        )
        assert stream.close_record.server_close_at is None, "the call was dropped"
    finally:
        proxy.armed, proxy.drop_limit = False, None
        with contextlib.suppress(Exception):
            await stream.hangup()
    return texts, reply, heard - end


async def _assert_heard_whole(served: Served, texts: list[str], reply: bytes) -> None:
    """Each sentence's audio arrived whole and once, and nothing else was added."""
    assert texts, "no sentence reached the TTS"
    total = 0
    for text in texts:
        pcm = await _piper(served, text)
        total += len(pcm)
        whole, starts = reply.count(pcm), reply.count(pcm[:1600])
        assert whole == 1, f"{text!r}: heard whole {whole} times, not once"
        assert starts == 1, f"{text!r}: its first 0.1 s heard {starts} times"
    # The pacer pads each sentence to whole 20 ms frames; anything more would be a repeat.
    assert len(reply) - total <= 320 * len(texts) + 320


async def test_tts_body_cut_once_is_resumed_from_the_same_server(
    served: Served, proxied: tuple[Pipeswitch, TtsFaultProxy], log_lines: list[str]
) -> None:
    app, proxy = proxied
    uuid = "tts-resume-same"
    texts, reply, _ = await _faulted_turn(served, app, proxy, uuid, "default", drop_limit=1)
    assert proxy.drops == 1, "the proxy did not cut one TTS body: the fault was not exercised"
    await _assert_heard_whole(served, texts, reply)
    assert _lines(log_lines, uuid, "TTS stream broke after")
    assert _lines(log_lines, uuid, "TTS resumed on the same TTS")
    assert not _lines(log_lines, uuid, "apologising")


async def test_tts_body_cut_every_time_is_resumed_from_the_fallback(
    served: Served, proxied: tuple[Pipeswitch, TtsFaultProxy], log_lines: list[str]
) -> None:
    app, proxy = proxied
    uuid = "tts-resume-fallback"
    t0 = time.monotonic()
    texts, reply, _ = await _faulted_turn(served, app, proxy, uuid, FALLBACK, drop_limit=None)
    # Each cut sentence: the first body and the same server's retry were both cut.
    assert proxy.drops >= 2
    await _assert_heard_whole(served, texts, reply)
    assert _lines(log_lines, uuid, "TTS resume on the same TTS failed")
    assert _lines(log_lines, uuid, "TTS resumed on the fallback TTS")
    assert not _lines(log_lines, uuid, "apologising")
    assert time.monotonic() - t0 < 60


async def test_malformed_tts_body_is_asked_again_not_played(
    served: Served, proxied: tuple[Pipeswitch, TtsFaultProxy], log_lines: list[str]
) -> None:
    """A 200 whose body is no WAV: Pipecat would play its bytes as noise and the sentence
    would be lost; it is asked again (the fallback, the proxy garbles every body)."""
    app, proxy = proxied
    uuid = "tts-resume-malformed"
    texts, reply, _ = await _faulted_turn(
        served, app, proxy, uuid, FALLBACK, drop_limit=None, kind="malformed"
    )
    await _assert_heard_whole(served, texts, reply)
    assert _lines(log_lines, uuid, "WavError")
    assert _lines(log_lines, uuid, "TTS resumed on the fallback TTS")


def _wav_header(rate: int) -> bytes:
    """A streamed WAV's 44-byte header (unknown sizes), as the Piper server sends it."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, 2 * rate, 2, 16)
    return b"RIFF\xff\xff\xff\xffWAVEfmt " + struct.pack("<I", 16) + fmt + b"data\xff\xff\xff\xff"


def _voiced(n: int, rng: np.random.Generator) -> np.ndarray:
    """A speech-like signal: harmonics of a gliding pitch under a syllable envelope."""
    t = np.arange(n) / 8000
    f0 = 120 + 30 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 8000
    tone = sum(np.sin(k * phase) / k for k in range(1, 8))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (6000 * env * tone + rng.normal(0, 200, n)).astype(np.int16)


def test_join_finds_the_cut_in_a_resynthesis_that_drifted() -> None:
    """A re-synthesis runs ahead or behind by tens of ms: the join lands on the same audio,
    not on the byte offset (which would repeat or skip that much)."""
    rng = np.random.default_rng(7)
    a = _voiced(32000, rng)
    cut = 12000
    tail = a[cut - 800 : cut]
    for drift in (-480, -97, 0, 215, 600):
        b = np.concatenate([_voiced(drift, rng), a]) if drift > 0 else a[-drift:]
        b = (b + rng.normal(0, 150, len(b))).astype(np.int16)  # not sample-identical
        end, r = best_join(tail, b, cut, 1600)
        assert abs(end - (cut + drift)) <= 2, (drift, end, r)
        assert r > 0.9
    # Silence (a pause) matches nothing: the byte offset is kept.
    quiet = np.zeros(800, dtype=np.int16)
    assert best_join(quiet, a, cut, 1600)[0] == cut


async def test_a_resynthesis_that_drifted_is_joined_where_the_audio_broke_off() -> None:
    """The server cuts the body after 1 s; its second synthesis is 37 ms late (Piper's
    noise): the reader gets the first second, then the new body from the same audio on,
    not from the byte offset (which would repeat 37 ms)."""
    rng = np.random.default_rng(3)
    a = _voiced(24000, rng)
    drift, cut = 297, 8000  # samples at 8 kHz
    b = (np.concatenate([_voiced(drift, rng), a]) + rng.normal(0, 150, drift + len(a))).astype(
        np.int16
    )
    header = _wav_header(8000)
    asked: list[int] = []

    async def tts(request: web.Request) -> web.StreamResponse:
        await request.read()
        asked.append(1)
        resp = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if len(asked) == 1:
            await resp.write(header + a[:cut].tobytes())
            await asyncio.sleep(0.2)  # let it reach the client, then cut the body
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write(header + b.tobytes())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/tts", tts)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as base:
            http = tts_session(base, None)
            async with http.post(f"http://127.0.0.1:{port}/tts", json={"text": "x"}) as r:
                body = b"".join([c async for c in r.content.iter_chunked(8000)])
    finally:
        await runner.cleanup()
    assert len(asked) == 2, "the sentence was not asked again"
    pcm = np.frombuffer(body[len(header) :], dtype="<i2")
    assert np.array_equal(pcm[:cut], a[:cut]), "the audio before the break changed"
    rest = pcm[cut:]
    # The join lands on the drifted copy of the next sample (within 2 samples).
    starts = [s for s in range(cut + drift - 2, cut + drift + 3) if np.array_equal(rest, b[s:])]
    assert starts, "the rest does not continue the same audio from where it broke off"


async def test_a_sentence_cut_beyond_repair_enters_the_context_as_heard(
    served: Served, proxied: tuple[Pipeswitch, TtsFaultProxy]
) -> None:
    """No fallback and every body cut: the resume fails too, so the caller hears only the
    start of each sentence. The next turn's context must hold those words, not the whole
    sentences the LLM wrote (the caller never heard them)."""
    app, proxy = proxied
    speech = await served.speech(QUESTION, 8000)
    stream = await open_call(
        f"ws://127.0.0.1:{app.port}/fs/tts-cut-heard?domain=default&rate=8000", 8000, "json-stream"
    )
    chat = served.emu.openai
    try:
        await wait_bot_quiet(stream, quiet_s=1.0)
        n_chat, n_texts = len(chat.requests), len(proxy.texts)
        proxy.drops, proxy.drop_limit, proxy.kind, proxy.armed = 0, None, "drop", True
        await ask(stream, speech, 8000, timeout_s=8.0)
        await wait_bot_quiet(stream, quiet_s=2.0, timeout_s=20.0)
        proxy.armed = False
        assert proxy.drops >= 2, "the proxy did not cut the bodies: the fault was not exercised"
        replies = [r.reply_text for r in chat.requests[n_chat:] if r.reply_text]
        assert replies, "the LLM never answered the faulted turn"
        m = len(chat.requests)
        _, again = await ask(stream, speech, 8000, timeout_s=8.0)
        assert again is not None, "the next turn was not answered"
        await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=10.0)
        said = " ".join(
            str(msg.get("content", ""))
            for msg in chat.requests[m].messages
            if msg.get("role") == "assistant"
        )
        said = " ".join(said.split())
        assert " ".join(replies[-1].split()) not in said, "a reply the caller never heard"
        # Every sentence long enough to tell (~1.3 s of speech) was cut at ~0.5 s of audio:
        # at most its first words may be in the context, never the whole of it.
        cut = {t for _, t in proxy.texts[n_texts:] if len(t) >= 20}
        assert cut, "no long sentence went to the TTS"
        assert not [t for t in cut if " ".join(t.split()) in said], said
    finally:
        proxy.armed, proxy.drop_limit = False, None
        with contextlib.suppress(Exception):
            await stream.hangup()
