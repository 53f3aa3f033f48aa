"""Serving an emulator on its own port: the start-up every WebSocket emulator shares."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from aiohttp import web

F_contra = TypeVar("F_contra", contravariant=True)
F = TypeVar("F")


class ServableEmulator(Protocol):
    """An emulator that mounts its routes on an app and can hang up on every client."""

    def add_routes(self, app: web.Application) -> None:
        """Mount the provider's endpoints (and the ``/_emulator`` admin routes)."""
        ...

    async def close_all(self) -> None:
        """Close every live connection (the server is shutting down)."""
        ...


class AdministeredEmulator(Protocol[F_contra]):
    """An emulator whose recordings and faults the ``/_emulator`` admin routes drive."""

    def clear(self) -> None:
        """Forget what was recorded (live connections keep working)."""
        ...

    def set_faults(self, faults: F_contra) -> None:
        """Replace the faults for what comes next."""
        ...


def add_admin_routes(
    app: web.Application,
    emu: AdministeredEmulator[F],
    faults: Callable[..., F],
    listing: str,
    snapshot: Callable[[], dict[str, Any]],
) -> None:
    """Mount the admin trio every emulator serves, so a separate process can be driven.

    ``GET /_emulator/<listing>`` returns ``snapshot()``; ``POST /_emulator/reset`` clears the
    records and the faults; ``POST /_emulator/faults`` sets ``faults(**body)``.
    """

    async def _listing(_request: web.Request) -> web.Response:
        return web.json_response(snapshot())

    async def _reset(_request: web.Request) -> web.Response:
        emu.clear()
        emu.set_faults(faults())
        return web.json_response({"ok": True})

    async def _faults(request: web.Request) -> web.Response:
        emu.set_faults(faults(**(await request.json())))
        return web.json_response({"ok": True})

    app.router.add_get(f"/_emulator/{listing}", _listing)
    app.router.add_post("/_emulator/reset", _reset)
    app.router.add_post("/_emulator/faults", _faults)


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
