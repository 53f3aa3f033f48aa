"""A tiny raw-socket WebSocket server for the emulator tests.

Why raw: the tests check the exact bytes the emulator writes (request,
frame headers, masks) and need to send broken frames on purpose, which a
WebSocket library would refuse to do.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from pipeswitch.bench.fakeswitch.wsframe import mask_payload

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_for(request: bytes) -> str:
    """``Sec-WebSocket-Accept`` for the key in ``request``."""
    for line in request.split(b"\r\n"):
        if line.lower().startswith(b"sec-websocket-key:"):
            key = line.split(b":", 1)[1].strip().decode()
            return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    raise ValueError("no key")


def server_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """An unmasked server frame (``rsv`` is the 3-bit RSV field)."""
    b0 = (0x80 if fin else 0) | (rsv & 7) << 4 | opcode
    n = len(payload)
    if n <= 125:
        head = bytes((b0, n))
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", b0, 126, n)
    else:
        head = struct.pack("!BBQ", b0, 127, n)
    return head + payload


@dataclass
class ClientFrame:
    """One frame as the client put it on the wire (unmasked payload kept too)."""

    t: float
    b0: int
    b1: int
    header: bytes
    mask: bytes
    payload: bytes
    masked_payload: bytes

    @property
    def opcode(self) -> int:
        return self.b0 & 0x0F

    @property
    def raw(self) -> bytes:
        return self.header + self.mask + self.masked_payload


@dataclass
class ServerConn:
    """One accepted connection: the request, the frames, and send helpers."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    accepted_at: float
    request: bytes = b""
    request_at: float = 0.0
    frames: list[ClientFrame] = field(default_factory=list)
    eof_at: float | None = None
    closed_by_server_at: float | None = None
    sent_close: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> None:
        if opcode == 0x8:
            self.sent_close = True
        self.writer.write(server_frame(opcode, payload, fin=fin, rsv=rsv))

    def send_text(self, text: str) -> None:
        self.send(0x1, text.encode())

    def close_tcp(self) -> None:
        if not self.writer.is_closing():
            self.closed_by_server_at = time.monotonic()
            self.writer.close()

    def of(self, opcode: int) -> list[ClientFrame]:
        return [f for f in self.frames if f.opcode == opcode]

    async def wait(self, pred: Callable[[ServerConn], bool], timeout_s: float = 3.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred(self):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("condition not met")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


class FakeServer:
    """Accepts emulator connections; answers the upgrade (optionally late or wrong)."""

    def __init__(
        self,
        *,
        upgrade_delay: float = 0.0,
        respond: bool = True,
        response: bytes | None = None,
        echo_close: bool = True,
        close_tcp_after_close: bool = True,
        handler: Callable[[ServerConn], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.upgrade_delay = upgrade_delay
        self.respond = respond
        self.response = response
        self.echo_close = echo_close
        self.close_tcp_after_close = close_tcp_after_close
        self.handler = handler
        self.conns: list[ServerConn] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._new_conn = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self.conns:
            c.close_tcp()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def url(self, path: str = "/fs/test?domain=default") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def conn(self, timeout_s: float = 3.0) -> ServerConn:
        if not self.conns:
            await asyncio.wait_for(self._new_conn.wait(), timeout_s)
        return self.conns[0]

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = ServerConn(reader, writer, time.monotonic())
        self.conns.append(conn)
        self._new_conn.set()
        try:
            await self._serve(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)

    async def _serve(self, conn: ServerConn) -> None:
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            chunk = await conn.reader.read(4096)
            if not chunk:
                conn.eof_at = time.monotonic()
                conn.changed.set()
                return
            buf += chunk
        end = buf.index(b"\r\n\r\n") + 4
        conn.request, conn.request_at = bytes(buf[:end]), time.monotonic()
        del buf[:end]
        conn.changed.set()
        if not self.respond:
            await conn.reader.read()  # hold the connection, say nothing
            conn.eof_at = time.monotonic()
            conn.changed.set()
            return
        if self.upgrade_delay:
            await asyncio.sleep(self.upgrade_delay)
        resp = (
            self.response
            or (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept_for(conn.request)}\r\n\r\n"
            ).encode()
        )
        conn.writer.write(resp)
        if self.handler is not None:
            h = asyncio.create_task(self.handler(conn))
            self._tasks.add(h)
            h.add_done_callback(self._tasks.discard)
        await self._frames(conn, buf)

    async def _frames(self, conn: ServerConn, buf: bytearray) -> None:
        while True:
            while True:
                f = _parse_client_frame(buf)
                if f is None:
                    break
                conn.frames.append(f)
                conn.changed.set()
                if f.opcode == 0x8:
                    if not conn.sent_close and self.echo_close:
                        conn.send(0x8, f.payload)
                    if self.close_tcp_after_close:
                        await conn.writer.drain()
                        conn.close_tcp()
                        return
            chunk = await conn.reader.read(65536)
            if not chunk:
                conn.eof_at = time.monotonic()
                conn.changed.set()
                conn.close_tcp()
                return
            buf += chunk


def _parse_client_frame(buf: bytearray) -> ClientFrame | None:
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    n = b1 & 0x7F
    h = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, h = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, h = struct.unpack("!Q", buf[2:10])[0], 10
    m = 4 if b1 & 0x80 else 0
    if len(buf) < h + m + n:
        return None
    header = bytes(buf[:h])
    mask = bytes(buf[h : h + m])
    masked = bytes(buf[h + m : h + m + n])
    payload = mask_payload(masked, mask) if m else masked
    del buf[: h + m + n]
    return ClientFrame(time.monotonic(), b0, b1, header, mask, payload, masked)
