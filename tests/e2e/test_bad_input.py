"""Bad input never hurts the server or another call; every case is logged with a reason."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest

from pipeswitch.bench.fakeswitch.handshake import build_upgrade_request, make_key, parse_ws_url
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def raw_upgrade(
    served: Served, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection upgraded with FreeSWITCH's exact request bytes."""
    url = parse_ws_url(f"ws://127.0.0.1:{served.app.port}{path}")
    reader, writer = await asyncio.open_connection("127.0.0.1", served.app.port)
    writer.write(build_upgrade_request(url, make_key(), offer_deflate=False, extra_headers={}))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def ws(served: Served, path: str) -> aiohttp.ClientWebSocketResponse:
    return await served.http.ws_connect(f"ws://127.0.0.1:{served.app.port}{path}", max_msg_size=0)


async def closed_with(sock: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> int | None:
    async with asyncio.timeout(timeout):
        async for _ in sock:
            pass
    return sock.close_code


async def bad_clients(served: Served) -> dict[str, int | None]:
    codes: dict[str, int | None] = {}
    # Unknown tenant and a bad URL: refused after the upgrade, with a close code and reason.
    codes["unknown_tenant"] = await closed_with(
        await ws(served, "/fs/bad-1?domain=stranger.example.org")
    )
    codes["bad_rate"] = await closed_with(await ws(served, "/fs/bad-2?rate=44100"))
    # A 1 MB binary frame: over the message limit -> 1009, this call only.
    s = await ws(served, "/fs/bad-3?domain=default")
    await s.send_bytes(os.urandom(1_000_000))
    codes["huge_frame"] = await closed_with(s)
    # Odd lengths, random audio, invalid JSON, oversized metadata: logged, call carries on.
    s = await ws(served, "/fs/bad-4?domain=default")
    await s.send_str('{"uuid": "bad-4"')  # invalid JSON metadata: kept as raw text
    for n in (1, 3, 321, 999, 4097):
        await s.send_bytes(os.urandom(n))
    await s.send_str("{not json at all")
    await s.send_str('{"meta":"' + "x" * 9000 + '"}')
    await s.send_str('{"event":"dtmf","digit":"X"}')
    await asyncio.sleep(0.5)
    assert not s.closed, "odd input must not end the call"
    await s.close()
    codes["odd_input"] = s.close_code
    # Garbage instead of WebSocket framing: protocol error -> 1002 for this call only.
    reader, writer = await raw_upgrade(served, "/fs/bad-5?domain=default")
    writer.write(os.urandom(64) + b"\xff" * 16)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5.0)  # server closes the connection
    codes["garbage_framing"] = (
        int.from_bytes(data[2:4], "big") if len(data) >= 4 and data[0] == 0x88 else -1
    )
    writer.close()
    # Abrupt TCP close mid-call (no CLOSE frame).
    reader, writer = await raw_upgrade(served, "/fs/bad-6?domain=default")
    await asyncio.sleep(0.3)
    writer.transport.abort()
    codes["abrupt_close"] = 0
    return codes


async def test_bad_input_is_isolated_and_logged(served: Served, log_lines: list[str]) -> None:
    speech = await served.speech(QUESTION, 8000)

    async def healthy_call() -> float | None:
        stream = await open_call(served.url(uuid="healthy-neighbour"), 8000, "json-stream")
        try:
            await wait_bot_quiet(stream, timeout_s=10.0)
            await asyncio.sleep(1.0)  # let the bad clients hit the server meanwhile
            _, answer = await ask(stream, speech, 8000, timeout_s=10.0)
            return answer
        finally:
            await stream.hangup()

    healthy, codes = await asyncio.gather(healthy_call(), bad_clients(served))
    assert healthy is not None, "the healthy call was affected"
    assert codes["unknown_tenant"] == 1008
    assert codes["bad_rate"] == 1008
    assert codes["huge_frame"] == 1009
    assert codes["garbage_framing"] in (1002, 1007, -1)

    async with served.http.get(f"http://127.0.0.1:{served.app.port}/health") as r:
        assert r.status == 200
    for _ in range(50):  # every refused or broken call is cleaned up
        if served.app.server and served.app.server.stats.calls_active == 0:
            break
        await asyncio.sleep(0.1)
    assert served.app.server is not None and served.app.server.stats.calls_active == 0

    text = "\n".join(log_lines)
    for reason in (
        "unknown tenant domain 'stranger.example.org'",
        "rate 44100 is not a multiple of 8000",
        "websocket error",  # the 1 MB frame and the garbage framing
        "not a multiple of 2",  # odd-length audio
        "is not JSON",
        "exceeds 8192 bytes",
        "dtmf event with invalid digit",
    ):
        assert reason in text, f"no log line says {reason!r}"


async def test_ready_and_health(served: Served) -> None:
    # One call of its own, so the counters below do not depend on which tests ran first.
    stream = await open_call(served.url(uuid="health-1"), 8000, "json-stream")
    await stream.hangup()
    async with served.http.get(f"http://127.0.0.1:{served.app.port}/ready") as r:
        assert r.status == 200 and (await r.json())["ready"] is True
    async with served.http.get(f"http://127.0.0.1:{served.app.port}/metrics.json") as r:
        body = await r.json()
        assert body["calls_total"] >= 1 and body["upgrade_ms_p99"] is not None
    # A plain GET on a call path is not an upgrade.
    async with served.http.get(f"http://127.0.0.1:{served.app.port}/fs/x") as r:
        assert r.status == 426
