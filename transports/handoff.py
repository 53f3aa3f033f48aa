"""Even calls across ``serve --workers N``: a busy worker hands a new connection to the least busy.

With SO_REUSEPORT the kernel picks a worker by a hash of the connection's addresses, not by
load: at 40-60 calls on two workers the bench saw splits of 22/26, 27/21, 31/40 and 29/19,
and the busier worker sets the ceiling (its loop lags first, its callers hear the
underruns). Here each worker publishes how many connections it serves in a table the
workers share (one int per worker in a small file, mapped), and when it accepts a
connection while it serves ``MARGIN`` or more connections than the least busy sibling, it
passes the socket, before reading a byte of it, over a Unix datagram socket
(``SCM_RIGHTS``) to that sibling, which serves it as if it had accepted it. The peer's
bytes wait in the kernel; nothing is read twice. A hand-over that cannot be made (the
sibling is gone, its queue is full) leaves the connection with the worker that accepted it.

Only the accept is balanced: a call never moves once its socket is served.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import mmap
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from loguru import logger

# ``<directory>:<index>:<workers>``, set by the parent for each worker.
BALANCE_ENV = "PIPESWITCH_WORKER_BALANCE"
# Hand a connection over only when this worker serves this many more than the least busy
# (with 1, two workers with one call between them would pass every new one back and forth).
MARGIN = 2
# How often a worker republishes its count (connections that closed); every accept and
# every adoption publishes at once.
PUBLISH_SECS = 0.1
# A slot no worker is serving from (not started, draining, dead): never picked.
GONE = 1 << 30
_SLOT = 4  # bytes per worker in the table (a C int)


def table_path(directory: str) -> str:
    """The shared table of connection counts."""
    return os.path.join(directory, "load")


def socket_path(directory: str, index: int) -> str:
    """Worker ``index``'s hand-over socket."""
    return os.path.join(directory, f"w{index}.sock")


def create_balance_dir(workers: int) -> str:
    """The parent's part: a private directory with a table of ``workers`` GONE slots."""
    directory = tempfile.mkdtemp(prefix="pipeswitch-workers-")
    with open(table_path(directory), "wb") as f:
        f.write(GONE.to_bytes(_SLOT, "little", signed=True) * workers)
    return directory


def mark_gone(directory: str, index: int) -> None:
    """The parent's part: a dead worker takes no hand-overs (its successor clears this)."""
    with contextlib.suppress(OSError), open(table_path(directory), "r+b") as f:
        f.seek(index * _SLOT)
        f.write(GONE.to_bytes(_SLOT, "little", signed=True))


def balance_env(directory: str, index: int, workers: int) -> str:
    """The value of :data:`BALANCE_ENV` for worker ``index``."""
    return f"{directory}:{index}:{workers}"


@dataclass(frozen=True, slots=True)
class BalanceConfig:
    """Where this worker's table and sockets are, and which slot is its own."""

    directory: str
    index: int
    workers: int

    @classmethod
    def from_env(cls, environ: Any = os.environ) -> BalanceConfig | None:
        """The parent's setting, or None (a single server, or a parent without balancing)."""
        raw = environ.get(BALANCE_ENV)
        if not raw:
            return None
        directory, index, workers = raw.rsplit(":", 2)
        return cls(directory, int(index), int(workers))


class ConnectionBalancer:
    """One worker's side: publishes its load, hands connections over, adopts its share."""

    def __init__(self, config: BalanceConfig) -> None:
        """Map the table and bind this worker's hand-over socket."""
        self.config = config
        self.handed_off = 0  # connections passed to a sibling
        self.adopted = 0  # connections a sibling passed here
        self.kept = 0  # hand-overs that could not be made (served here instead)
        with open(table_path(config.directory), "r+b") as f:
            self._map = mmap.mmap(f.fileno(), config.workers * _SLOT)
        self._loads = memoryview(self._map).cast("i")
        path = socket_path(config.directory, config.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a predecessor's (a worker that died)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.setblocking(False)
        self._server: web.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._adopting: set[asyncio.Task[Any]] = set()

    # -- the table ----------------------------------------------------------------

    def load(self) -> int:
        """Connections this worker serves (HTTP and WebSocket, open now)."""
        return len(self._server.connections) if self._server is not None else 0

    def publish(self) -> None:
        """Write this worker's count into its slot."""
        self._loads[self.config.index] = self.load()

    def _tick(self) -> None:
        self.publish()
        assert self._loop is not None
        self._timer = self._loop.call_later(PUBLISH_SECS, self._tick)

    def pick(self) -> int | None:
        """The sibling a new connection should go to, or None to serve it here."""
        loads, me = self._loads, self.config.index
        mine = self.load()
        best, least = me, mine
        for i in range(self.config.workers):
            if i != me and loads[i] < least:
                best, least = i, loads[i]
        if best == me or mine - least < MARGIN:
            return None
        # Count it there now: connections accepted before the sibling republishes must see
        # it busier (its next publish replaces this estimate with its own count).
        loads[best] = least + 1
        return best

    # -- accept side ----------------------------------------------------------------

    def protocol_factory(self, factory: Callable[[], asyncio.BaseProtocol]) -> Callable[[], Any]:
        """A ``create_server`` factory: each accepted connection is served or handed over."""
        return lambda: _Gate(self, factory)

    def hand_off(self, target: int, sock: socket.socket) -> bool:
        """Pass ``sock`` to worker ``target``; False if that cannot be done now."""
        try:
            # (socket.send_fds ignores its address argument on Python 3.11.)
            self._sock.sendmsg(
                [b"c"],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))],
                0,
                socket_path(self.config.directory, target),
            )
        except OSError as exc:  # the sibling is gone or its queue is full: serve it here
            self.kept += 1
            logger.debug("worker {}: hand-over to {} failed ({})", self.config.index, target, exc)
            return False
        self.handed_off += 1
        return True

    # -- adopting side ------------------------------------------------------------

    def start(self, server: web.Server) -> None:
        """Serve handed-over connections with ``server``; start publishing."""
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._on_handoff)
        self._tick()

    def _on_handoff(self) -> None:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(self._sock, 16, 8)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("worker {}: hand-over socket: {}", self.config.index, exc)
                return
            for fd in fds:
                self._adopt(fd)

    def _adopt(self, fd: int) -> None:
        assert self._loop is not None and self._server is not None
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            logger.warning("worker {}: handed an unusable socket: {}", self.config.index, exc)
            return
        sock.setblocking(False)
        task = self._loop.create_task(self._serve(sock))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def _serve(self, sock: socket.socket) -> None:
        assert self._loop is not None and self._server is not None
        try:
            await self._loop.connect_accepted_socket(self._server, sock)
        except OSError as exc:  # the peer left while in flight
            sock.close()
            logger.debug("worker {}: adopted socket closed: {}", self.config.index, exc)
            return
        self.adopted += 1
        self.publish()

    def stop(self) -> None:
        """Take no more hand-overs (draining): mark the slot gone, close the socket."""
        if self._sock.fileno() < 0:
            return  # stopped already (draining, then closing)
        self._loads[self.config.index] = GONE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
            if not self._loop.is_closed():
                # Sockets already on their way here are served (a draining server refuses
                # them with 4503): closing the queue would reset them instead.
                self._on_handoff()
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(self.config.directory, self.config.index))


class _Gate(asyncio.Protocol):
    """The first protocol of an accepted connection: hand it over, or give it to aiohttp."""

    def __init__(
        self, balancer: ConnectionBalancer, factory: Callable[[], asyncio.BaseProtocol]
    ) -> None:
        self._balancer = balancer
        self._factory = factory

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance here.
        tr = cast(asyncio.Transport, transport)
        b = self._balancer
        target = b.pick()
        if target is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None and b.hand_off(target, sock):
                # Only this process's descriptor closes: the sibling holds its own, and
                # nothing was read from the socket.
                tr.abort()
                return
        proto = self._factory()
        tr.set_protocol(proto)
        proto.connection_made(tr)
        b.publish()


class BalancedSite(web.TCPSite):
    """``TCPSite(reuse_port=True)`` whose accepted connections go through the balancer."""

    def __init__(
        self, runner: web.BaseRunner, host: str | None, port: int, balancer: ConnectionBalancer
    ) -> None:
        """Listen on ``host:port`` shared with the sibling workers."""
        super().__init__(runner, host, port, reuse_port=True)
        self._balancer = balancer

    async def start(self) -> None:
        """Bind, and serve through the balancer (handed-over connections too)."""
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._balancer.protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=True,
        )
        self._balancer.start(server)
