"""Plumbing shared by the local inference server processes.

Each server is started as ``python -m pipeswitch.pipelines.local.<server>`` and reports readiness with
a single JSON line on stdout (``{"ready": true, "port": N}``). Everything else (logs, and
anything a native library prints) goes to stderr, so stdout is claimed at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, Protocol

from aiohttp import web
from loguru import logger

API_KEY_ENV = "PIPESWITCH_LOCAL_API_KEY"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def configure_logging(name: str, level: str = "INFO") -> None:
    """Loguru to stderr, tagged with the server name."""
    logger.remove()
    logger.add(
        sys.stderr,
        level=level.upper(),
        format="{time:HH:mm:ss.SSS} | {level: <7} | " + name + " | {message}",
        backtrace=False,
        diagnose=False,
    )


def claim_stdout() -> IO[str]:
    """Reserve the real stdout for the ready line; route fd 1 to stderr.

    Native libraries (llama.cpp, onnxruntime) may write to fd 1; this keeps the
    supervisor's line protocol clean.
    """
    sys.stdout.flush()
    ready_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(ready_fd, "w", buffering=1)


def print_ready(out: IO[str], port: int) -> None:
    """Write the single ready line the supervisor waits for."""
    out.write(json.dumps({"ready": True, "port": port}) + "\n")
    out.flush()


def require_loopback(host: str) -> str:
    """Refuse to bind anything but a loopback address (these servers have no TLS)."""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise SystemExit(f"refusing to listen on non-loopback host {host!r}; use 127.0.0.1")
    return host


def resolve_api_key(cli_value: str | None) -> str | None:
    """API key from ``--api-key``, else ``$PIPESWITCH_LOCAL_API_KEY`` (preferred: not in ``ps``)."""
    return cli_value or os.environ.get(API_KEY_ENV) or None


def bearer_auth_middleware(api_key: str, public_paths: frozenset[str]) -> Any:
    """aiohttp middleware enforcing ``Authorization: Bearer <api_key>`` (constant-time)."""
    expected = api_key.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public_paths:
            return await handler(request)
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token or not hmac.compare_digest(token.encode(), expected):
            return web.json_response(
                {
                    "error": {
                        "message": "invalid or missing API key",
                        "type": "invalid_request_error",
                    }
                },
                status=401,
            )
        return await handler(request)

    return middleware


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux ``/proc``; 0.0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class LatencyStat:
    """Count / total / last / max of a latency in seconds, for JSON metrics."""

    __slots__ = ("count", "last", "max", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.last = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.last = seconds
        self.max = max(self.max, seconds)

    def as_dict(self) -> dict[str, float | int]:
        mean = self.total / self.count if self.count else 0.0
        return {
            "count": self.count,
            "mean_s": round(mean, 4),
            "last_s": round(self.last, 4),
            "max_s": round(self.max, 4),
        }


def run_main(name: str, main: Callable[[], None]) -> None:
    """Run a server's ``main``; expected start-up failures exit 2 with one clear line."""
    from pipeswitch.pipelines.local.models import LocalModelsMissingError, ModelIntegrityError

    try:
        main()
    except (LocalModelsMissingError, ModelIntegrityError, FileNotFoundError) as exc:
        logger.error(f"{name} cannot start: {exc}")
        sys.stderr.flush()
        raise SystemExit(2) from None


async def _watch_parent(stop: asyncio.Event) -> None:
    """Stop when stdin reaches EOF (the supervisor died or closed our pipe)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (OSError, ValueError):
        return
    while await reader.read(4096):
        pass
    logger.warning("stdin closed (parent gone); shutting down")
    stop.set()


async def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    ready_out: IO[str],
    watch_parent: bool = False,
    started_at: float | None = None,
) -> None:
    """Run ``app`` until SIGTERM/SIGINT (or parent EOF), printing the ready line once bound."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host=host, port=port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_parent(stop)) if watch_parent else None
    if started_at is not None:
        logger.info(
            f"listening on http://{host}:{bound} (start-up {time.monotonic() - started_at:.2f}s, "
            f"RSS {rss_mb():.0f} MiB)"
        )
    print_ready(ready_out, bound)
    try:
        await stop.wait()
    finally:
        logger.info("shutting down")
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await runner.cleanup()


class ServerArgs(Protocol):
    """What every model server's parsed CLI config carries for serving."""

    host: str
    port: int
    watch_parent: bool


def run_server(app: web.Application, cfg: ServerArgs, ready_out: IO[str], started: float) -> None:
    """Serve ``app`` as configured until stopped (the shared tail of every server's main)."""
    asyncio.run(
        serve(
            app,
            host=cfg.host,
            port=cfg.port,
            ready_out=ready_out,
            watch_parent=cfg.watch_parent,
            started_at=started,
        )
    )
