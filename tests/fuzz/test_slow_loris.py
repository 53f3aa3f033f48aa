"""Slow-loris sockets are reaped before the upgrade (transports/handshake.py).

A live server (Piper for real, providers emulated) with a 3 s handshake timeout and a
bound of 20 waiting connections per peer. 50 sockets trickle an upgrade request 7 bytes
every 0.3 s (it would take ~9 s to finish) while a healthy call talks: each is closed
by the server between 3 s and 3 s + one sweep, counted and logged with its peer; the call
is answered; afterwards no task, call-port socket or descriptor is left. 70 silent
sockets from one peer: the 10 beyond the bound are closed after the 1 s grace, the rest
at the timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio

from pipeswitch.bench.emulators.runner import EmulatorConfig, run_emulators
from pipeswitch.bench.fakeswitch.handshake import build_upgrade_request, make_key, parse_ws_url
from pipeswitch.config.settings import Settings
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.emulated import endpoints_for
from tests.conftest import QUESTION, Served, make_tenants
from tests.e2e.helpers import ask, open_call, wait_bot_quiet
from tests.fuzz.test_wire_fuzz import fd_kinds

TIMEOUT = 3.0
PER_PEER = 60


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def reaping() -> AsyncIterator[Served]:
    cfg = EmulatorConfig(llm_script="office", stt_script="office", seed=1)
    async with run_emulators(cfg) as emu:
        settings = Settings(
            host="127.0.0.1",
            port=0,
            providers="emulated",
            idle_timeout_secs=30,
            handshake_timeout_secs=TIMEOUT,
            handshake_max_per_peer=PER_PEER,
        )
        app = Pipeswitch(
            settings, loader=make_tenants(), default_tenant="default", endpoints=endpoints_for(emu)
        )
        await app.start()
        async with aiohttp.ClientSession() as http:
            try:
                yield Served(app, emu, http)
            finally:
                await app.stop(drain_secs=2.0)


async def closed_after(reader: asyncio.StreamReader, limit: float) -> float | None:
    """Seconds until the server closes the socket (EOF or reset), None if it stays open."""
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(reader.read(), limit)
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - t0


async def slow_loris(port: int, n: int) -> tuple[float | None, bytes]:
    """Trickle an upgrade request; when the server closed it, from the first byte."""
    url = parse_ws_url(f"ws://127.0.0.1:{port}/fs/loris-{n}?domain=default&rate=8000")
    req = build_upgrade_request(url, make_key(), offer_deflate=False, extra_headers={})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    got = b""
    try:
        for i in range(0, len(req) - 2, 7):  # never the final CRLF
            if reader.at_eof():
                break
            writer.write(req[i : min(i + 7, len(req) - 2)])
            try:
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.3)
        try:
            got = await asyncio.wait_for(reader.read(), TIMEOUT + 3.0)
        except TimeoutError:
            return None, got
        except ConnectionError:
            pass
        return time.monotonic() - t0, got
    finally:
        writer.transport.abort()


async def settle(served: Served, tasks0: int) -> None:
    deadline = time.monotonic() + 20.0  # a call's teardown on a loaded box
    while time.monotonic() < deadline:
        assert served.app.server is not None
        if served.app.server.stats.calls_active == 0 and len(asyncio.all_tasks()) <= tasks0:
            return
        await asyncio.sleep(0.2)


async def test_slow_loris_reaped_while_a_call_is_answered(
    reaping: Served, log_lines: list[str]
) -> None:
    served = reaping
    assert served.app.server is not None
    port = served.app.port
    speech = await served.speech(QUESTION, 8000)

    async def healthy_call() -> float:
        stream = await open_call(served.url(uuid="loris-healthy"), 8000, "json-stream")
        try:
            await wait_bot_quiet(stream, timeout_s=10.0)
            end, answer = await ask(stream, speech, 8000, timeout_s=10.0)
            assert answer is not None, "the healthy call got no answer next to slow-loris sockets"
            return answer - end
        finally:
            await stream.hangup()

    await healthy_call()  # warm: the first call builds what later calls reuse
    await asyncio.sleep(0.5)
    tasks0, kinds0 = len(asyncio.all_tasks()), fd_kinds(port)
    reaped0 = served.app.server.handshakes.reaped["headers not complete"]

    latency, lorises = await asyncio.gather(
        healthy_call(), asyncio.gather(*(slow_loris(port, n) for n in range(50)))
    )
    closed = [t for t, _ in lorises]
    assert all(t is not None for t in closed), f"sockets left open: {closed}"
    times = [t for t in closed if t is not None]
    # Reaped, not answered: no HTTP status line came back, and not before the timeout.
    assert all(got == b"" for _, got in lorises), [g for _, g in lorises if g][:3]
    assert min(times) >= TIMEOUT - 0.1, times
    assert max(times) <= TIMEOUT + 2.0, times  # one sweep (<= 0.6 s) plus a loaded box
    assert latency < 5.0
    reaped = served.app.server.handshakes.reaped["headers not complete"] - reaped0
    assert reaped == 50, reaped

    await settle(served, tasks0)
    await asyncio.sleep(0.5)
    tasks1, kinds1 = len(asyncio.all_tasks()), fd_kinds(port)
    left = Counter(t.get_coro().__qualname__ for t in asyncio.all_tasks())  # type: ignore[union-attr]
    assert tasks1 <= tasks0, f"tasks leaked: {tasks0} -> {tasks1}: {left.most_common(8)}"
    assert kinds1["tcp call port"] == 0, f"call sockets left open: {kinds1}"
    grown = {k: n for k, n in (kinds1 - kinds0).items() if k not in ("socket", "tcp provider pool")}
    assert not grown, f"descriptors leaked: {grown}"

    text = "\n".join(log_lines)
    assert "closed a connection from 127.0.0.1 before any request: headers not complete" in text
    async with served.http.get(f"http://127.0.0.1:{port}/metrics") as r:
        body = await r.text()
    assert 'pipeswitch_handshakes_reaped_total{reason="headers not complete"}' in body


async def test_one_peer_holds_a_bounded_number_of_waiting_sockets(reaping: Served) -> None:
    served = reaping
    assert served.app.server is not None
    port = served.app.port
    socks = [await asyncio.open_connection("127.0.0.1", port) for _ in range(PER_PEER + 10)]
    try:
        waits = await asyncio.gather(*(closed_after(r, TIMEOUT + 3.0) for r, _ in socks))
    finally:
        for _, w in socks:
            w.transport.abort()
    assert all(t is not None for t in waits), waits
    early = sorted(t for t in waits if t is not None and t < TIMEOUT - 0.5)
    # The 10 oldest beyond the bound go after the grace (1 s) plus a sweep or two.
    assert len(early) == 10, sorted(w for w in waits if w is not None)
    assert all(1.0 <= t <= 2.5 for t in early), early
    async with served.http.get(f"http://127.0.0.1:{port}/health") as r:
        assert r.status == 200  # a request on a fresh connection is never counted
