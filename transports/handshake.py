"""Reaps connections that never finish their HTTP request (slow-loris upgrades).

aiohttp's server waits for a request's headers for as long as its keep-alive timeout
(75 s), silently, so a peer trickling an upgrade request one byte at a time holds a
socket, a task and a parser for over a minute each. FreeSWITCH's libwsc sends its whole
upgrade request at once (and gives the 101 only 1 s), so a request whose headers are not
complete within ``handshake_timeout_secs`` (5 s) is not a call: the watchdog closes it,
logs the peer and the reason, and counts it in ``pipeswitch_handshakes_reaped_total``.
It also bounds the connections one peer may hold waiting (over 1 s) for their first
request (``handshake_max_per_peer``): the oldest beyond the bound are closed.

The server's middleware marks a connection once a request reached a handler; a sweep
(every ``timeout / 5`` s, at most 1 s) closes unmarked connections older than the
timeout. Nothing runs per frame: after the upgrade a call's connection is marked and
never looked at again. A keep-alive connection that went idle after a request is left to
aiohttp's own keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from loguru import logger

from pipeswitch.transports import metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _peer(conn: RequestHandler) -> str:
    peer: Any = conn.peername
    if isinstance(peer, tuple):
        return str(peer[0])
    return str(peer or "-")


class HandshakeWatchdog:
    """Closes connections whose first request's headers are late, or one peer's excess."""

    def __init__(self, timeout_secs: float, max_per_peer: int) -> None:
        self.timeout_secs = timeout_secs
        self.max_per_peer = max_per_peer
        # A burst of healthy upgrades from one switch is never "excess": only connections
        # waiting this long count towards the per-peer bound.
        self.grace_secs = min(1.0, timeout_secs)
        self.reaped: dict[str, int] = defaultdict(int)
        # aiohttp's RequestHandler has __slots__ and no weak references: these hold the
        # connections strongly and each sweep drops those the server no longer has.
        self._seen: dict[RequestHandler, float] = {}
        self._done: set[RequestHandler] = set()
        self._server: web.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A request reached the app: its connection has finished a handshake."""
        conn = request.protocol
        if isinstance(conn, RequestHandler):
            self._done.add(conn)
        return await handler(request)

    def watch(self, server: web.Server | None) -> None:
        """Start sweeping the runner's connections (``runner.server`` after ``setup()``)."""
        if server is None or self.timeout_secs <= 0 or self._task is not None:
            return
        self._server = server
        self._task = asyncio.get_running_loop().create_task(self._run(), name="handshake-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        every = min(1.0, self.timeout_secs / 5)
        while True:
            await asyncio.sleep(every)
            try:
                self.sweep(time.monotonic())
            except Exception as exc:  # the watchdog must not die with one odd connection
                logger.bind(call="-", tenant="-").warning("handshake watchdog: {}", exc)

    def sweep(self, now: float) -> int:
        """Close late or excess pre-request connections; how many were closed."""
        if self._server is None:
            return 0
        waiting: dict[str, list[tuple[float, RequestHandler]]] = defaultdict(list)
        closed = 0
        live = self._server.connections
        if len(self._seen) + len(self._done) > len(live):
            keep = set(live)
            self._done &= keep
            self._seen = {c: t for c, t in self._seen.items() if c in keep}
        for conn in live:
            if conn in self._done or conn.transport is None:
                continue
            since = self._seen.setdefault(conn, now)
            if now - since >= self.timeout_secs:
                self._reap(conn, "headers not complete", now - since)
                closed += 1
            elif now - since >= self.grace_secs:  # libwsc itself gives up after 1 s
                waiting[_peer(conn)].append((since, conn))
        for conns in waiting.values():
            if len(conns) > self.max_per_peer:
                conns.sort(key=lambda c: c[0])
                for since, conn in conns[: len(conns) - self.max_per_peer]:
                    self._reap(conn, "too many connections before a request", now - since)
                    closed += 1
        return closed

    def _reap(self, conn: RequestHandler, reason: str, age: float) -> None:
        peer = _peer(conn)
        self.reaped[reason] += 1
        metrics.handshake_reaped(reason)
        logger.bind(call="-", tenant="-").warning(
            "closed a connection from {} before any request: {} (open {:.1f}s, timeout {:.0f}s)",
            peer,
            reason,
            age,
            self.timeout_secs,
        )
        self._seen.pop(conn, None)
        conn.force_close()
