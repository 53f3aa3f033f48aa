"""Connections handed from a busy worker to the least busy one (SCM_RIGHTS), on both loops.

Two "workers" run in one process here, each an aiohttp server on its own port with its own
balancer over one shared table: which port a client dials is which worker accepts, so the
tests choose who is busy. The hand-over itself is the real one (a Unix datagram socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pipeswitch.pipelines.event_loop import uvloop_available
from pipeswitch.transports.handoff import (
    GONE,
    MARGIN,
    BalanceConfig,
    BalancedSite,
    ConnectionBalancer,
    balance_env,
    create_balance_dir,
    mark_gone,
    socket_path,
)

LOOPS = ["asyncio"] + (["uvloop"] if uvloop_available() else [])


def run_on(kind: str, coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    factory = None
    if kind == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro())


class Worker:
    def __init__(self, directory: str, index: int, workers: int) -> None:
        self.index = index
        self.balancer = ConnectionBalancer(BalanceConfig(directory, index, workers))
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        async def hello(_: web.Request) -> web.Response:
            return web.Response(text=f"w{self.index}")

        async def ws(request: web.Request) -> web.WebSocketResponse:
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            async for msg in sock:
                await sock.send_str(f"w{self.index}:{msg.data}")
            return sock

        app = web.Application()
        app.router.add_get("/", hello)
        app.router.add_get("/ws", ws)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = BalancedSite(self.runner, "127.0.0.1", 0, self.balancer)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        self.balancer.stop()
        if self.runner is not None:
            await self.runner.cleanup()


@contextlib.asynccontextmanager
async def workers(n: int = 2) -> AsyncIterator[list[Worker]]:
    directory = create_balance_dir(n)
    ws = [Worker(directory, i, n) for i in range(n)]
    try:
        for w in ws:
            await w.start()
        yield ws
    finally:
        for w in ws:
            await w.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def holding(port: int, n: int) -> AsyncIterator[None]:
    """``n`` connections the worker on ``port`` serves and keeps (HTTP keep-alive after one
    request) for the duration."""
    writers = []
    try:
        for _ in range(n):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            writers.append(w)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await r.readuntil(b"\r\n\r\n")
            await r.readexactly(2)
        yield
    finally:
        for w in writers:
            w.close()


async def get_raw(port: int) -> bytes:
    """Connect and send the request at once: its bytes wait in the kernel before accept."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data


@pytest.mark.parametrize("loop", LOOPS)
def test_a_busy_worker_hands_new_connections_to_the_least_busy(loop: str) -> None:
    async def main() -> None:
        async with workers() as (w0, w1), holding(w0.port, MARGIN):
            await asyncio.sleep(0.05)
            assert w0.balancer.load() == MARGIN
            # Accepted by w0 (the port it listens on), served by w1 with its bytes intact.
            assert (await get_raw(w0.port)).endswith(b"w1")
            assert (w0.balancer.handed_off, w1.balancer.adopted) == (1, 1)

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_handed_over_websocket_call_is_served_whole(loop: str) -> None:
    async def main() -> None:
        async with workers() as (w0, w1), holding(w0.port, MARGIN):
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(f"http://127.0.0.1:{w0.port}/ws") as ws,
            ):
                for k in range(3):
                    await ws.send_str(str(k))
                    assert (await ws.receive()).data == f"w1:{k}"
            assert w1.balancer.adopted == 1

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_balanced_workers_serve_their_own_while_within_the_margin(loop: str) -> None:
    async def main() -> None:
        async with workers() as (w0, w1), holding(w0.port, MARGIN - 1):
            assert (await get_raw(w0.port)).endswith(b"w0")
            assert w0.balancer.handed_off == 0

    run_on(loop, main)


def test_a_gone_sibling_is_never_picked_and_a_failed_hand_over_keeps_the_call() -> None:
    async def main() -> None:
        async with workers() as (w0, w1), holding(w0.port, MARGIN):
            mark_gone(w1.balancer.config.directory, 1)
            w1.balancer._timer.cancel()  # type: ignore[union-attr]  # its publishes would revive it
            assert w0.balancer.pick() is None
            assert (await get_raw(w0.port)).endswith(b"w0")
            # A slot that looks idle but whose worker has no socket (died, not yet marked).
            w1.balancer._loads[1] = 0
            os.unlink(socket_path(w1.balancer.config.directory, 1))
            assert (await get_raw(w0.port)).endswith(b"w0")
            assert w0.balancer.kept == 1 and w0.balancer.handed_off == 0

    run_on("asyncio", main)


def test_a_draining_worker_takes_no_more_hand_overs() -> None:
    async def main() -> None:
        async with workers() as (w0, w1):
            w1.balancer.stop()
            assert w1.balancer._loads[1] == GONE
            async with holding(w0.port, MARGIN + 1):
                assert w0.balancer.pick() is None

    run_on("asyncio", main)


def test_config_from_env() -> None:
    assert BalanceConfig.from_env({}) is None
    env = {"PIPESWITCH_WORKER_BALANCE": balance_env("/tmp/x:y", 1, 3)}
    assert BalanceConfig.from_env(env) == BalanceConfig("/tmp/x:y", 1, 3)


def test_table_starts_gone_for_every_worker() -> None:
    directory = create_balance_dir(3)
    try:
        b = ConnectionBalancer(BalanceConfig(directory, 0, 3))
        assert list(b._loads) == [GONE, GONE, GONE]
        b.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_sockets_queued_when_a_worker_stops_are_served_not_reset() -> None:
    async def main() -> None:
        async with workers() as (w0, w1):
            loop = asyncio.get_running_loop()
            loop.remove_reader(w1.balancer._sock.fileno())  # w1 is too busy to read its queue
            async with holding(w0.port, MARGIN):
                pending = asyncio.ensure_future(get_raw(w0.port))
                for _ in range(100):
                    if w0.balancer.handed_off:
                        break
                    await asyncio.sleep(0.01)
                assert w0.balancer.handed_off == 1 and w1.balancer.adopted == 0
                w1.balancer.stop()  # draining: the socket in its queue is still served
                assert (await pending).endswith(b"w1")

    run_on("asyncio", main)
