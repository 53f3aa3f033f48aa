"""FakeSwitchStream on the wire: handshake, frames, cadence, ordering, close, errors."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import time
import zlib

import numpy as np
import pytest

from pipeswitch.bench.fakeswitch.records import EVENT_CONNECT, EVENT_DISCONNECT, EVENT_ERROR
from pipeswitch.bench.fakeswitch.stream import ConnState, FakeSwitchStream, StreamConfig
from pipeswitch.bench.fakeswitch.wsframe import mask_payload
from tests.fakeswitch.wsserver import FakeServer, ServerConn

BIN, TEXT, CLOSE, PING, PONG = 0x2, 0x1, 0x8, 0x9, 0xA


def tone(seconds: float, rate: int, amp: int = 8000, hz: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def error_body(code: int, message: str) -> str:
    return json.dumps(
        {"status": "error", "message": {"code": code, "error": message}}, separators=(",", ":")
    )


async def n_frames(conn: ServerConn, opcode: int, n: int, timeout_s: float = 2.0) -> None:
    await conn.wait(lambda c: len(c.of(opcode)) >= n, timeout_s)


# ---------------------------------------------------------------- handshake


async def test_upgrade_request_bytes_are_exact() -> None:
    async with FakeServer() as srv:
        cfg = StreamConfig(
            url=srv.url("/fs/abc?domain=default&rate=8000"),
            extra_headers='{"X-Token":"t1","Authorization":"Bearer xyz"}',
        )
        async with FakeSwitchStream(cfg) as s:
            assert await s.wait_connected()
            c = await srv.conn()
            m = re.search(rb"Sec-WebSocket-Key:([A-Za-z0-9+/=]+)\r\n", c.request)
            assert m is not None and len(base64.b64decode(m.group(1))) == 16
            hp = f"127.0.0.1:{srv.port}".encode()
            assert c.request == (
                b"GET /fs/abc?domain=default&rate=8000 HTTP/1.1\r\n"
                b"Host:" + hp + b"\r\n"
                b"Upgrade:websocket\r\n"
                b"Connection:upgrade\r\n"
                b"Sec-WebSocket-Key:" + m.group(1) + b"\r\n"
                b"Sec-WebSocket-Version:13\r\n"
                b"Origin:http://" + hp + b"\r\n"
                b"Authorization:Bearer xyz\r\n"
                b"X-Token:t1\r\n"
                b"\r\n"
            )
            assert s.request_bytes == c.request
            assert s.upgrade_s is not None and s.upgrade_s < 0.5


async def test_deflate_offer_and_negotiated_compression() -> None:
    # libwsc never checks the Accept value, so a fixed response will do.
    resp = (
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n"
    )
    async with FakeServer(response=resp) as srv:
        cfg = StreamConfig(url=srv.url(), offer_deflate=True, metadata="meta")
        async with FakeSwitchStream(cfg) as s:
            assert await s.wait_connected()
            c = await srv.conn()
            await n_frames(c, BIN, 3)
            c.send(0x1, _deflate(b'{"type":"x"}'), rsv=4)
            ev = await s.wait_event("mod_audio_stream::json")
    assert (
        b"Sec-WebSocket-Extensions:permessage-deflate; client_no_context_takeover; "
        b"server_no_context_takeover; client_max_window_bits=9\r\nOrigin:" in c.request
    )
    assert c.of(TEXT)[0].b0 == 0xC1 and c.of(BIN)[0].b0 == 0xC2  # RSV1 on every data frame
    inflated = zlib.decompressobj(-15).decompress(c.of(BIN)[0].payload + b"\x00\x00\xff\xff")
    assert inflated == bytes(320)
    assert c.of(CLOSE)[0].b0 == 0x88  # control frames are never compressed
    assert ev.raw == '{"type":"x"}'


async def test_deflate_offered_but_refused_stays_plain() -> None:
    async with (
        FakeServer() as srv,
        FakeSwitchStream(StreamConfig(url=srv.url(), offer_deflate=True)),
    ):
        c = await srv.conn()
        await n_frames(c, BIN, 2)
    assert {f.b0 for f in c.of(BIN)} == {0x82}


def _deflate(data: bytes) -> bytes:
    co = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (co.compress(data) + co.flush(zlib.Z_SYNC_FLUSH))[:-4]


# ---------------------------------------------------------------- frames and cadence


@pytest.mark.parametrize(
    ("rate", "mix", "size", "head"),
    [
        (8000, "mono", 320, "82fe0140"),
        (16000, "mono", 640, "82fe0280"),
        (8000, "stereo", 640, "82fe0280"),
    ],
)
async def test_frame_sizes(rate: int, mix: str, size: int, head: str) -> None:
    async with FakeServer() as srv:
        cfg = StreamConfig(url=srv.url(), rate=rate, mix=mix)  # type: ignore[arg-type]
        async with FakeSwitchStream(cfg) as s:
            s.queue_caller_audio(np.full(rate // 5, 1000, dtype="<i2").tobytes())
            if mix == "stereo":
                s.play_pcm(np.full(rate // 5, 2000, dtype="<i2").tobytes(), rate)
            c = await srv.conn()
            await n_frames(c, BIN, 3)
        f = c.of(BIN)[0]
        assert f.header.hex() == head and len(f.payload) == size
        assert f.b1 & 0x80 and len(f.mask) == 4
        assert f.masked_payload == mask_payload(f.payload, f.mask)
        pcm = np.frombuffer(f.payload, dtype="<i2")
        if mix == "stereo":
            assert (pcm[0::2] == 1000).all() and (pcm[1::2] == 2000).all()  # L=caller, R=played
        else:
            assert (pcm == 1000).all()


async def test_20ms_cadence_and_first_frames_back_to_back() -> None:
    async with FakeServer() as srv, FakeSwitchStream(StreamConfig(url=srv.url())) as s:
        await asyncio.sleep(0.62)
        sent = list(s.sent_frames)
        assert s.started_at is not None
        t0 = s.started_at
    t = np.array([f.t for f in sent])
    assert 29 <= len(t) <= 31  # one frame per 20 ms tick since start
    assert t[1] - t[0] < 0.005  # ticks 1 and 2 leave together (first bug read on tick 2)
    assert 0.038 <= t[0] - t0 <= 0.05
    steady = np.diff(t[2:])
    assert abs(steady.mean() - 0.020) < 0.001
    cap = np.array([f.captured_at for f in sent])
    assert np.allclose(np.diff(cap), 0.020)  # absolute schedule, no drift


async def test_buffer_size_aggregates_frames() -> None:
    async with (
        FakeServer() as srv,
        FakeSwitchStream(StreamConfig(url=srv.url(), buffer_ms=100)) as s,
    ):
        c = await srv.conn()
        await n_frames(c, BIN, 2, timeout_s=1.0)
        assert s.state is ConnState.OPEN
    assert [len(f.payload) for f in c.of(BIN)[:2]] == [1600, 1600]
    assert 0.08 < c.of(BIN)[1].t - c.of(BIN)[0].t < 0.12


async def test_voiced_flags_come_from_the_caller_source() -> None:
    async with FakeServer() as srv, FakeSwitchStream(StreamConfig(url=srv.url())) as s:
        s.queue_caller_silence(0.1)
        s.queue_caller_audio(tone(0.2, 8000))
        await s.wait_caller_drained(timeout_s=1.0)
        await asyncio.sleep(0.1)
    voiced = [f for f in s.sent_frames if f.voiced]
    assert len(voiced) == 10
    segs = s.voiced_segments()
    assert len(segs) == 1 and segs[0][1] == s.last_voiced_sent_at() == voiced[-1].t


# ---------------------------------------------------------------- ordering


async def test_frames_queued_during_a_slow_101_are_flushed_before_the_metadata() -> None:
    async with (
        FakeServer(upgrade_delay=0.2) as srv,
        FakeSwitchStream(StreamConfig(url=srv.url(), metadata='{"k":"v"}')) as s,
    ):
        c = await srv.conn()
        await n_frames(c, TEXT, 1)
        await n_frames(c, BIN, 12)
        ev = await s.wait_event(EVENT_CONNECT)
    ops = [f.opcode for f in c.frames]
    first_text = ops.index(TEXT)
    assert 8 <= first_text <= 11 and set(ops[:first_text]) == {BIN}
    assert c.frames[first_text].payload == b'{"k":"v"}'
    burst = [f.t for f in c.frames[: first_text + 1]]
    assert burst[-1] - burst[0] < 0.01  # one burst at the upgrade
    assert s.sent_log[first_text].t <= ev.t  # ::connect fires after the metadata


async def test_metadata_first_ordering() -> None:
    async with FakeServer(upgrade_delay=0.2) as srv:
        cfg = StreamConfig(url=srv.url(), metadata="hello", ordering="metadata-first")
        async with FakeSwitchStream(cfg):
            c = await srv.conn()
            await n_frames(c, BIN, 9)
    ops = [f.opcode for f in c.frames]
    assert ops[0] == TEXT and ops[1:9] == [BIN] * 8


async def test_fast_101_sends_metadata_first() -> None:
    async with (
        FakeServer() as srv,
        FakeSwitchStream(StreamConfig(url=srv.url(), metadata="m")) as s,
    ):
        c = await srv.conn()
        await n_frames(c, BIN, 2)
    # Exactly the frames captured before the 101 precede the metadata: none when the
    # 101 is fast (the usual case), a few when a loaded machine delays it.
    assert s.upgraded_at is not None
    queued = sum(1 for f in s.sent_frames if f.captured_at < s.upgraded_at)
    first_text = next(i for i, f in enumerate(c.frames) if f.opcode == TEXT)
    assert first_text == queued


# ---------------------------------------------------------------- connection failures


async def test_no_101_within_1s_is_error_10_timeout() -> None:
    async with (
        FakeServer(respond=False) as srv,
        FakeSwitchStream(StreamConfig(url=srv.url(), metadata="m")) as s,
    ):
        ev = await s.wait_event(EVENT_ERROR, timeout_s=2.0)
        assert s.started_at is not None
        assert 0.95 <= ev.t - s.started_at <= 1.3
        assert ev.raw == error_body(10, "Timeout")
        assert s.state is ConnState.FAILED
        c = await srv.conn()
        await c.wait(lambda c: c.eof_at is not None, 1.0)  # TCP dropped
    assert c.frames == []
    assert [e.name for e in s.events] == [EVENT_ERROR]


async def test_connection_refused_is_error_6() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with FakeSwitchStream(StreamConfig(url=f"ws://127.0.0.1:{port}/x")) as s:
        assert not await s.wait_connected()
    assert s.events[-1].raw == error_body(6, "Connection refused (system error 111)")


@pytest.mark.parametrize(
    ("response", "libwsc", "ok"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "1.1.0", False),
        (b"HTTP/1.1 101 Switching\r\nsec-websocket-accept: nope\r\n\r\n", "1.1.0", True),
        (b"HTTP/1.1 101 Switching\r\nsec-websocket-accept: nope\r\n\r\n", "old", False),
    ],
)
async def test_upgrade_response_rules(response: bytes, libwsc: str, ok: bool) -> None:
    async with FakeServer(response=response) as srv:
        cfg = StreamConfig(url=srv.url(), libwsc=libwsc)  # type: ignore[arg-type]
        async with FakeSwitchStream(cfg) as s:
            assert await s.wait_connected() is ok
    if not ok:
        assert s.events[-1].raw == error_body(6, "WebSocket upgrade failed")


# ---------------------------------------------------------------- closing


async def test_server_close_is_echoed_and_fires_disconnect() -> None:
    async with FakeServer() as srv, FakeSwitchStream(StreamConfig(url=srv.url())) as s:
        c = await srv.conn()
        await n_frames(c, BIN, 3)
        c.send(CLOSE, b"\x03\xe8server done")
        ev = await s.wait_event(EVENT_DISCONNECT)
        await c.wait(lambda c: len(c.of(CLOSE)) == 1)
        await asyncio.sleep(0.1)
        assert s.send_text("late") is True  # +OK, but nothing goes out
        rec = await s.hangup()
    assert ev.raw == '{"status":"disconnected","message":{"code":1000,"reason":"server done"}}'
    echo = c.of(CLOSE)[0]
    assert echo.payload == b"\x03\xe8server done"
    assert c.frames[-1] is echo  # no audio (or anything) after the echo
    assert [e.name for e in s.events] == [EVENT_CONNECT, EVENT_DISCONNECT]
    assert rec.initiator == "server" and rec.server_closed_tcp


async def test_invalid_server_close_code_is_answered_with_1002() -> None:
    async with FakeServer() as srv, FakeSwitchStream(StreamConfig(url=srv.url())) as s:
        c = await srv.conn()
        c.send(CLOSE, b"\x03\xf4restart")  # 1012: unknown to libwsc
        ev = await s.wait_event(EVENT_DISCONNECT)
        await c.wait(lambda c: len(c.of(CLOSE)) == 1)
    assert c.of(CLOSE)[0].payload == b"\x03\xea"
    assert ev.body["message"] == {"code": 1002, "reason": ""}


async def test_hangup_sends_normal_closure_and_records_server_tcp_close() -> None:
    async with FakeServer() as srv:
        s = FakeSwitchStream(StreamConfig(url=srv.url()))
        await s.start()
        c = await srv.conn()
        await n_frames(c, BIN, 2)
        rec = await s.hangup()
    close = c.of(CLOSE)[0]
    assert close.header == bytes.fromhex("8890")
    assert close.payload == b"\x03\xe8Normal closure"
    assert close.masked_payload == mask_payload(close.payload, close.mask)
    assert c.frames[-1] is close
    assert rec.server_close_code == 1000  # the echo was seen (libwsc ignores it)
    assert rec.server_closed_tcp
    assert rec.server_eof_after_close_s is not None and rec.server_eof_after_close_s < 0.2
    assert [e.name for e in s.events] == [EVENT_CONNECT]  # no ::disconnect on hangup


async def test_hangup_gives_up_after_1s_when_the_server_keeps_tcp_open() -> None:
    async with FakeServer(close_tcp_after_close=False) as srv:
        s = FakeSwitchStream(StreamConfig(url=srv.url()))
        await s.start()
        assert await s.wait_connected()
        rec = await s.hangup()
    assert not rec.server_closed_tcp
    assert rec.close_sent_at is not None and rec.tcp_closed_at is not None
    assert 0.95 <= rec.tcp_closed_at - rec.close_sent_at <= 1.2


async def test_stop_with_text_sends_only_argv2_then_close() -> None:
    async with FakeServer() as srv:
        s = FakeSwitchStream(StreamConfig(url=srv.url()))
        await s.start()
        assert await s.wait_connected()
        await s.stop('{"final": "bye"}')
        c = await srv.conn()
    assert [f.opcode for f in c.frames[-2:]] == [TEXT, CLOSE]
    assert c.frames[-2].payload == b'{"final":'


async def test_abnormal_eof_is_error_1() -> None:
    async with FakeServer() as srv, FakeSwitchStream(StreamConfig(url=srv.url())) as s:
        c = await srv.conn()
        await n_frames(c, BIN, 1)
        c.close_tcp()
        ev = await s.wait_event(EVENT_ERROR)
    assert ev.raw == error_body(1, "Connection closed without WebSocket CLOSE (abnormal EOF)")
    assert s.close_record.initiator == "eof"


@pytest.mark.parametrize(
    ("frame", "code", "message"),
    [
        (
            bytes.fromhex("8102C328"),
            1007,
            "WebSocket invalid UTF-8 (1007): Invalid UTF-8 in text message",
        ),
        (
            bytes.fromhex("81850102030449677f686e"),
            1002,
            "WebSocket protocol error (1002): Masked frame from server",
        ),
    ],
)
async def test_protocol_error_sends_close_and_error_11(
    frame: bytes, code: int, message: str
) -> None:
    async with FakeServer() as srv, FakeSwitchStream(StreamConfig(url=srv.url())) as s:
        c = await srv.conn()
        await n_frames(c, BIN, 1)
        c.send_raw(frame)
        ev = await s.wait_event(EVENT_ERROR)
        await c.wait(lambda c: len(c.of(CLOSE)) == 1)
        await asyncio.sleep(0.06)
    assert ev.raw == error_body(11, message)
    close = c.of(CLOSE)[0]
    assert close.payload[:2] == code.to_bytes(2, "big")
    assert close.payload[2:].decode() == message.split(": ", 1)[1]
    assert c.frames[-1] is close  # the bug is closed: no more audio
    assert s.close_record.server_closed_tcp


# ---------------------------------------------------------------- control and API


async def test_ping_pong_and_heartbeat() -> None:
    async with (
        FakeServer() as srv,
        FakeSwitchStream(StreamConfig(url=srv.url(), heartbeat_s=0.15)),
    ):
        c = await srv.conn()
        await n_frames(c, BIN, 1)
        c.send(PING, b"abc")
        await n_frames(c, PONG, 1)
        await n_frames(c, PING, 1)
    assert c.of(PONG)[0].payload == b"abc"
    ping = c.of(PING)[0]
    assert ping.header == bytes.fromhex("8984") and ping.payload == b"ping"


async def test_send_text_split_like_the_fs_api() -> None:
    async with FakeServer() as srv, FakeSwitchStream(StreamConfig(url=srv.url())) as s:
        assert await s.wait_connected()
        assert s.send_text('{"a": 1}')
        assert s.send_text('{"a": 1}', api_split=False)
        assert not s.send_text("   ")
        c = await srv.conn()
        await n_frames(c, TEXT, 2)
    assert [f.payload for f in c.of(TEXT)] == [b'{"a":', b'{"a": 1}']


async def test_pause_sends_nothing_and_resume_restarts() -> None:
    async with FakeServer() as srv, FakeSwitchStream(StreamConfig(url=srv.url())) as s:
        c = await srv.conn()
        await n_frames(c, BIN, 2)
        s.pause()
        n = len(c.of(BIN))
        await asyncio.sleep(0.15)
        assert len(c.of(BIN)) <= n + 1
        s.resume()
        t_resume = time.monotonic()
        await n_frames(c, BIN, n + 3)
    assert c.of(BIN)[-1].t > t_resume


async def test_mixed_needs_the_write_leg_and_clips() -> None:
    async with (
        FakeServer() as srv,
        FakeSwitchStream(StreamConfig(url=srv.url(), mix="mixed")) as s,
    ):
        s.queue_caller_audio(np.full(8000, 30000, dtype="<i2").tobytes())
        await asyncio.sleep(0.15)
        c = await srv.conn()
        assert c.of(BIN) == []  # nothing played to the caller: no frames at all
        s.play_pcm(np.full(1600, 10000, dtype="<i2").tobytes(), 8000)
        await n_frames(c, BIN, 3)
    pcm = np.frombuffer(c.of(BIN)[0].payload, dtype="<i2")
    assert (pcm == 32767).all()


async def test_hangup_while_connecting_puts_nothing_on_the_wire() -> None:
    async with FakeServer(respond=False) as srv:
        s = FakeSwitchStream(StreamConfig(url=srv.url(), metadata="m"))
        await s.start()
        c = await srv.conn()
        await c.wait(lambda c: bool(c.request))
        t = time.monotonic()
        await s.stop("bye")
        assert time.monotonic() - t < 0.2
        await c.wait(lambda c: c.eof_at is not None, 1.0)
    assert c.frames == [] and s.events == [] and s.state is ConnState.CLOSED


async def test_hangup_after_server_close_waits_for_the_server_eof() -> None:
    async with FakeServer(close_tcp_after_close=False) as srv:
        s = FakeSwitchStream(StreamConfig(url=srv.url(), close_eof_cap_s=0.3))
        await s.start()
        c = await srv.conn()
        await n_frames(c, BIN, 1)
        c.send(CLOSE, b"\x03\xe8bye")
        await s.wait_event(EVENT_DISCONNECT)
        t = time.monotonic()
        rec = await s.hangup()  # real libwsc would wait for ever here
        assert 0.28 <= time.monotonic() - t <= 0.6
    assert rec.initiator == "server" and not rec.server_closed_tcp
    assert c.frames[-1].opcode == CLOSE  # hangup put nothing more on the wire
