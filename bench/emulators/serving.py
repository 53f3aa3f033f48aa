"""Serving an emulator on its own port: the start-up every WebSocket emulator shares."""

from __future__ import annotations

import ssl
from typing import Protocol

from aiohttp import web


class ServableEmulator(Protocol):
    """An emulator that mounts its routes on an app and can hang up on every client."""

    def add_routes(self, app: web.Application) -> None:
        """Mount the provider's endpoints (and the ``/_emulator`` admin routes)."""
        ...

    async def close_all(self) -> None:
        """Close every live connection (the server is shutting down)."""
        ...


async def serve_emulator(
    emu: ServableEmulator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, int]:
    """Start ``emu`` on its own runner (TLS with ``ssl_context``); returns (runner, port).

    Port 0 takes a free one. Shutting the runner down closes live connections first,
    so a test's clean-up never waits on a client that keeps its socket open.
    """
    app = web.Application()
    emu.add_routes(app)

    async def _shutdown(_app: web.Application) -> None:
        await emu.close_all()

    app.on_shutdown.append(_shutdown)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
    await site.start()
    return runner, int(runner.addresses[0][1])
