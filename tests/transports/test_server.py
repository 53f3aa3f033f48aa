"""The WebSocket server in-process: routes, refusals and call supervision, with a fake handler.

No pipeline, no providers: the handler is a stand-in that records what the
server handed it, so each refusal path and the handler's failure are checked
on the wire, the way FreeSWITCH would see them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from pipeswitch.config.loaders import StaticTenantLoader, TenantResolver
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.transports.call_info import CallInfo
from pipeswitch.transports.server import CLOSE_INTERNAL, CLOSE_POLICY, CLOSE_TRY_AGAIN, CallServer
from pipeswitch.transports.transport import FreeSwitchCallTransport

pytestmark = pytest.mark.asyncio(loop_scope="session")


class FakeHandler:
    """Holds each call until the test releases it; can be told to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[CallInfo, Tenant, FreeSwitchCallTransport]] = []
        self.release = asyncio.Event()
        self.fail = False

    async def run_call(
        self, call: CallInfo, tenant: Tenant, transport: FreeSwitchCallTransport
    ) -> None:
        self.calls.append((call, tenant, transport))
        if self.fail:
            raise RuntimeError("handler bug")
        await self.release.wait()


class Harness:
    def __init__(self, server: CallServer, handler: FakeHandler, test_server: TestServer) -> None:
        self.server = server
        self.handler = handler
        self.test_server = test_server

    def url(self, path: str) -> str:
        return str(self.test_server.make_url(path))


@pytest_asyncio.fixture(loop_scope="session")
async def harness() -> AsyncIterator[Harness]:
    loader = StaticTenantLoader(
        [Tenant(name="default"), Tenant(name="pbx.example.com", playback="binary")],
        default="default",
    )
    settings = Settings(host="127.0.0.1", port=0, max_calls=2)
    handler = FakeHandler()
    server = CallServer(settings, TenantResolver(loader, default="default"), handler)
    ts = TestServer(server.app())
    await ts.start_server()
    try:
        yield Harness(server, handler, ts)
    finally:
        handler.release.set()
        await ts.close()


async def _refused(h: Harness, path: str) -> tuple[int | None, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(h.url(path), autoclose=False) as ws,
    ):
        msg = await asyncio.wait_for(ws.receive(), 5.0)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        return ws.close_code, str(msg.extra or "")


async def test_health_and_ready(harness: Harness) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(harness.url("/health")) as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with http.get(harness.url("/ready")) as r:
            assert r.status == 200
        harness.server.draining = True
        try:
            async with http.get(harness.url("/ready")) as r:
                assert r.status == 503
        finally:
            harness.server.draining = False


async def test_plain_get_on_a_call_path_asks_for_an_upgrade(harness: Harness) -> None:
    async with aiohttp.ClientSession() as http, http.get(harness.url("/fs/abc")) as r:
        assert r.status == 426


async def test_unknown_tenant_is_refused_with_a_reason(harness: Harness) -> None:
    code, reason = await _refused(harness, "/fs/call-1?domain=nobody.example.com&rate=8000")
    assert code == CLOSE_POLICY and "nobody.example.com" in reason
    assert harness.server.stats.refused["unknown_tenant"] >= 1
    assert not harness.handler.calls


async def test_bad_rate_is_refused(harness: Harness) -> None:
    code, reason = await _refused(harness, "/fs/call-2?domain=default&rate=44100")
    assert code == CLOSE_POLICY and "rate" in reason


async def test_a_call_gets_its_tenant_and_transport(harness: Harness) -> None:
    h = harness
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(h.url("/fs/call-3?domain=pbx.example.com&rate=16000&mix=mono")) as ws,
    ):
        for _ in range(100):
            if h.handler.calls:
                break
            await asyncio.sleep(0.01)
        call, tenant, transport = h.handler.calls[-1]
        assert call.call_uuid == "call-3" and tenant.name == "pbx.example.com"
        assert transport.serializer.stream_rate == 16000
        assert transport.serializer.dialect_name == "binary"
        assert h.server.stats.calls_active == 1
        await ws.close()
    h.handler.release.set()
    for _ in range(100):
        if h.server.stats.calls_active == 0:
            break
        await asyncio.sleep(0.01)
    assert h.server.stats.calls_active == 0
    h.handler.release.clear()
    h.handler.calls.clear()


async def test_over_capacity_is_try_again_later(harness: Harness) -> None:
    h = harness
    async with aiohttp.ClientSession() as http:
        held: list[Any] = []
        try:
            for i in range(2):  # max_calls=2
                held.append(await http.ws_connect(h.url(f"/fs/hold-{i}?domain=default")))
            for _ in range(100):
                if h.server.stats.calls_active == 2:
                    break
                await asyncio.sleep(0.01)
            code, reason = await _refused(h, "/fs/one-too-many?domain=default")
            assert code == CLOSE_TRY_AGAIN and "capacity" in reason
        finally:
            h.handler.release.set()
            for ws in held:
                await ws.close()
    h.handler.release.clear()
    h.handler.calls.clear()


async def test_a_failing_handler_closes_with_internal_error(harness: Harness) -> None:
    h = harness
    h.handler.fail = True
    try:
        code, reason = await _refused(h, "/fs/boom?domain=default")
    finally:
        h.handler.fail = False
    assert code == CLOSE_INTERNAL and reason == "internal error"
    for _ in range(100):
        if h.server.stats.calls_active == 0:
            break
        await asyncio.sleep(0.01)
    assert h.server.stats.calls_active == 0
