"""Sans-I/O RFC 6455 codec for the *client* side, as libwsc 1.1.0 implements it.

Why hand-written: the emulator must put exactly libwsc's bytes on the wire
(FIN=1 always, masked with a fresh key per frame, 7/16/64-bit lengths) and must
reject bad server frames exactly where libwsc's ``WebSocketReceiver::onData``
does, with the same close codes and reasons (protocol doc §4.5, §5.1, §5.2).
"""

from __future__ import annotations

import codecs
import os
import struct
import time
import zlib
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "Frame",
    "FrameParser",
    "MaskKeys",
    "Opcode",
    "PerMessageDeflate",
    "ProtocolError",
    "close_payload",
    "encode_frame",
    "mask_payload",
]


class Opcode(IntEnum):
    """WebSocket opcodes (RFC 6455 §5.2)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


_U32 = 0xFFFFFFFF


class MaskKeys:
    """libwsc's per-thread mask-key generator (a splitmix-style 32-bit mixer).

    Why: keys then look like libwsc's; a fixed ``seed`` makes test fixtures
    reproducible. The default seed is random, as libwsc's is (time ^ address).
    """

    __slots__ = ("_s",)

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little") ^ (int(time.time()) & _U32)
        self._s = (seed | 1) & _U32

    def __call__(self) -> bytes:
        self._s = (self._s + 0x9E3779B9) & _U32
        z = self._s
        z ^= z >> 16
        z = (z * 0x85EBCA6B) & _U32
        z ^= z >> 13
        z = (z * 0xC2B2AE35) & _U32
        z ^= z >> 16
        return z.to_bytes(4, "little")  # memcpy of a uint32 on x86-64


def mask_payload(payload: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` (big-int trick: ~1.5 µs per 320 B)."""
    n = len(payload)
    if n == 0:
        return b""
    stream = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


def encode_frame(
    opcode: int, payload: bytes | bytearray | memoryview, mask_key: bytes, *, rsv1: bool = False
) -> bytes:
    """One client frame exactly as libwsc's ``WebSocketContext::send`` writes it.

    Always FIN=1 and masked; ``rsv1`` marks a permessage-deflate payload.
    libwsc refuses control frames over 125 bytes; so do we (ValueError).
    """
    if len(mask_key) != 4:
        raise ValueError("mask key must be 4 bytes")
    n = len(payload)
    if opcode & 0x08 and n > 125:
        raise ValueError(f"control frame too large ({n} bytes)")
    b0 = 0x80 | (0x40 if rsv1 else 0) | (opcode & 0x0F)
    if n <= 125:
        head = bytes((b0, 0x80 | n))
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", b0, 0xFE, n)
    else:
        head = struct.pack("!BBQ", b0, 0xFF, n)
    return head + mask_key + mask_payload(payload, mask_key)


def close_payload(code: int, reason: str | bytes = b"") -> bytes:
    """CLOSE payload as libwsc builds it: 2-byte code + reason cut to 123 bytes."""
    r = reason.encode("utf-8") if isinstance(reason, str) else reason
    return struct.pack("!H", code & 0xFFFF) + r[:123]


class ProtocolError(Exception):
    """A server frame libwsc rejects; ``code`` is the CLOSE code libwsc then sends."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason

    @property
    def event_message(self) -> str:
        """The text libwsc puts in the ``mod_audio_stream::error`` event (code 11)."""
        if self.code == 1007:
            return f"WebSocket invalid UTF-8 (1007): {self.reason}"
        return f"WebSocket protocol error ({self.code}): {self.reason}"


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete server message (TEXT/BINARY, reassembled) or a control frame.

    For CLOSE, ``close_code``/``close_reason`` are what libwsc derives (and echoes):
    an invalid code, a 1-byte payload or a non-UTF-8 reason become 1002 with an
    empty reason; an empty payload becomes 1000 with an empty reason.
    """

    opcode: Opcode
    payload: bytes
    text: str | None = None
    close_code: int | None = None
    close_reason: str | None = None


class PerMessageDeflate:
    """permessage-deflate as libwsc negotiates and runs it (§3.3).

    Outgoing: a fresh deflater per message (libwsc resets it on every send),
    level 6, memLevel 8, Z_SYNC_FLUSH, trailer ``00 00 FF FF`` stripped.
    Incoming: one inflater, reset per message only with server_no_context_takeover.
    """

    def __init__(
        self,
        *,
        client_no_context_takeover: bool = False,
        server_no_context_takeover: bool = False,
        client_max_window_bits: int = 15,
        server_max_window_bits: int = 15,
        level: int = 6,
    ) -> None:
        self.client_no_context_takeover = client_no_context_takeover
        self.server_no_context_takeover = server_no_context_takeover
        self.client_max_window_bits = client_max_window_bits
        self.server_max_window_bits = server_max_window_bits
        self.level = level
        # Fail now (as libwsc's initializeCompression does) if zlib refuses the sizes.
        zlib.compressobj(level, zlib.DEFLATED, -client_max_window_bits, 8)
        self._inflater = zlib.decompressobj(-server_max_window_bits)

    def compress(self, data: bytes) -> bytes | None:
        """Deflate one message; None means "send it raw" (libwsc's fallback)."""
        co = zlib.compressobj(self.level, zlib.DEFLATED, -self.client_max_window_bits, 8)
        out = co.compress(data) + co.flush(zlib.Z_SYNC_FLUSH)
        if len(out) < 4 or not out.endswith(b"\x00\x00\xff\xff"):
            return None
        return out[:-4]

    def decompress(self, data: bytes) -> bytes:
        """Inflate one message; raises ``zlib.error`` on corrupt input."""
        if self.server_no_context_takeover:
            self._inflater = zlib.decompressobj(-self.server_max_window_bits)
        out = self._inflater.decompress(data + b"\x00\x00\xff\xff")
        if self.server_no_context_takeover:
            self._inflater = zlib.decompressobj(-self.server_max_window_bits)
        return out


_VALID_CLOSE = frozenset(c for c in range(1000, 1012) if c not in (1004, 1005, 1006))
_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def _close_fields(payload: bytes) -> tuple[int, str]:
    """libwsc ``handleCloseFrame``: the (code, reason) it echoes and reports."""
    n = len(payload)
    if n == 0:
        return 1000, ""
    if n == 1 or n > 125:
        return 1002, ""
    code = (payload[0] << 8) | payload[1]
    bad = not (code in _VALID_CLOSE or 3000 <= code <= 4999)
    reason = ""
    if n > 2:
        try:
            reason = payload[2:125].decode("utf-8")
        except UnicodeDecodeError:
            bad = True
    return (1002, "") if bad else (code, reason)


class FrameParser:
    """Incremental parser for server→client frames with libwsc's error behaviour.

    ``feed`` returns the frames completed so far. On a protocol error the frames
    before it are still returned, ``error`` is set, and the parser stops (libwsc
    tears the connection down). After a CLOSE the parser stops too: libwsc moves
    to DISCONNECTING and ``rxIsTerminating()`` makes it ignore everything else.
    """

    def __init__(self, *, deflate: PerMessageDeflate | None = None) -> None:
        self._buf = bytearray()
        self.deflate = deflate
        self.error: ProtocolError | None = None
        self.closed = False
        self._frag_opcode = 0  # 0: no fragmented message in progress
        self._frag_parts: list[bytes] = []
        self._frag_compressed = False
        self._utf8 = _utf8_decoder()
        self._frag_text: list[str] = []

    @property
    def stopped(self) -> bool:
        """True once an error or a CLOSE ended parsing."""
        return self.error is not None or self.closed

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume bytes from the socket; return the frames they complete."""
        out: list[Frame] = []
        if self.stopped:
            return out
        buf = self._buf
        buf += data
        while not self.stopped:
            avail = len(buf)
            if avail < 2:
                break
            b0, b1 = buf[0], buf[1]
            fin = bool(b0 & 0x80)
            rsv1 = bool(b0 & 0x40)
            opcode = b0 & 0x0F
            plen = b1 & 0x7F
            compression = self.deflate is not None
            # Header checks happen as soon as two bytes are there, as in libwsc.
            if (rsv1 and not compression) or (b0 & 0x30):
                self._fail(1002, "Unexpected RSV bits")
                break
            if opcode & 0x08 and not fin:
                self._fail(1002, "Control frame fragmented")
                break
            if b1 & 0x80:
                self._fail(1002, "Masked frame from server")
                break
            hlen = 2
            if plen == 126:
                if avail < 4:
                    break
                plen = (buf[2] << 8) | buf[3]
                hlen = 4
            elif plen == 127:
                if avail < 10:
                    break
                plen = int.from_bytes(buf[2:10], "big")
                hlen = 10
            if opcode & 0x08 and plen > 125:
                self._fail(1002, "Control frame payload too large")
                break
            need = hlen + plen
            if avail < need:
                break
            payload = bytes(buf[hlen:need])
            frame = self._dispatch(opcode, payload, fin, rsv1)
            if self.error is not None:
                break
            del buf[:need]
            if frame is not None:
                out.append(frame)
        return out

    def _fail(self, code: int, reason: str) -> None:
        self.error = ProtocolError(code, reason)

    def _dispatch(self, opcode: int, payload: bytes, fin: bool, rsv1: bool) -> Frame | None:
        if opcode == 0x0:
            return self._continuation(payload, fin)
        if opcode in (0x1, 0x2):
            return self._data(opcode, payload, fin, rsv1)
        if opcode == 0x8:
            code, reason = _close_fields(payload)
            self.closed = True
            return Frame(Opcode.CLOSE, payload, close_code=code, close_reason=reason)
        if opcode == 0x9:
            return Frame(Opcode.PING, payload)
        if opcode == 0xA:
            return Frame(Opcode.PONG, payload)
        self._fail(1002, "Unsupported opcode")
        return None

    def _utf8_chunk(self, chunk: bytes) -> bool:
        """Streaming UTF-8 check with libwsc's strictness at chunk ends."""
        try:
            self._frag_text.append(self._utf8.decode(chunk, False))
        except UnicodeDecodeError:
            return False
        pending = self._utf8.getstate()[0]
        # CPython waits on ED A0..BF (a surrogate lead); libwsc rejects it at once.
        return not (len(pending) >= 2 and pending[0] == 0xED and pending[1] > 0x9F)

    def _data(self, opcode: int, payload: bytes, fin: bool, rsv1: bool) -> Frame | None:
        if self._frag_opcode:
            self._fail(1002, "Received new data frame when expecting continuation frame")
            return None
        compressed = rsv1 and self.deflate is not None
        if not fin:
            self._frag_opcode = opcode
            self._frag_parts = [payload]
            self._frag_compressed = compressed
            self._frag_text = []
            self._utf8.reset()
            if opcode == 0x1 and not compressed and not self._utf8_chunk(payload):
                self._fail(1007, "Invalid UTF-8 in text message")
            return None
        if compressed:
            try:
                payload = self._inflate(payload)
            except zlib.error:
                self._fail(1007, "Decompression failed")
                return None
        if opcode == 0x2:
            return Frame(Opcode.BINARY, payload)
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(1007, "Invalid UTF-8 in text message")
            return None
        return Frame(Opcode.TEXT, payload, text=text)

    def _continuation(self, payload: bytes, fin: bool) -> Frame | None:
        if not self._frag_opcode:
            self._fail(1002, "continuation frame without initial frame")
            return None
        self._frag_parts.append(payload)
        is_text = self._frag_opcode == 0x1
        if is_text and not self._frag_compressed and not self._utf8_chunk(payload):
            self._fail(1007, "Invalid UTF-8 in text message")
            return None
        if not fin:
            return None
        message = b"".join(self._frag_parts)
        opcode, compressed = self._frag_opcode, self._frag_compressed
        self._frag_opcode = 0
        self._frag_parts = []
        if compressed:
            try:
                message = self._inflate(message)
            except zlib.error:
                self._fail(1007, "Decompression failed")
                return None
        if opcode == 0x2:
            return Frame(Opcode.BINARY, message)
        if compressed:
            try:
                text = message.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(1007, "Invalid UTF-8 in text message")
                return None
        else:
            try:
                tail = self._utf8.decode(b"", True)
            except UnicodeDecodeError:
                self._fail(1007, "Invalid UTF-8 in text message")
                return None
            text = "".join(self._frag_text) + tail
        self._frag_text = []
        return Frame(Opcode.TEXT, message, text=text)

    def _inflate(self, data: bytes) -> bytes:
        assert self.deflate is not None
        return self.deflate.decompress(data)
