"""Junk on the wire through a live server: a few hundred hostile connections (random and
huge binary, invalid UTF-8, bad JSON, > 8 KB metadata, truncated and bogus frames,
interleavings, abrupt closes, slow-loris upgrades, idle sockets) while one healthy call
talks. No crash, no leaked task or file descriptor, each upgraded case logged with its
call id, and the healthy call answered in its normal time.

The cases are drawn from a seeded ``random.Random`` (printed on failure) rather than
Hypothesis: each one is a real socket against a shared server, and shrinking across a
live server's state would not be meaningful. Hypothesis drives the sans-I/O suite.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil

from pipeswitch.bench.fakeswitch.handshake import build_upgrade_request, make_key, parse_ws_url
from pipeswitch.bench.fakeswitch.wsframe import (
    FrameParser,
    Opcode,
    ProtocolError,
    close_payload,
    encode_frame,
)
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet

CASES = int(os.environ.get("PIPESWITCH_WIRE_FUZZ_CASES", "160"))
SEED = int(os.environ.get("PIPESWITCH_WIRE_FUZZ_SEED", str(int(time.time()) % 100_000)))
KINDS = (
    "binary_junk",
    "huge_binary",
    "invalid_utf8",
    "bad_json",
    "big_metadata",
    "truncated_frame",
    "bogus_frames",
    "interleave",
    "abrupt_close",
    "slow_loris",
    "idle_tcp",
    "garbage_request",
)
UPGRADED = {"binary_junk", "huge_binary", "invalid_utf8", "bad_json", "big_metadata"} | {
    "truncated_frame",
    "bogus_frames",
    "interleave",
    "abrupt_close",
}


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_kinds(server_port: int) -> Counter[str]:
    """Descriptors by kind; TCP sockets split into those of the call port and the rest.

    The server's HTTP client keeps idle keep-alive connections to the providers (Piper,
    emulators) for 60 s: a pool, bounded, not a leak. Every socket on the call port,
    either end, must be gone.
    """
    out: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[os.readlink(f"/proc/self/fd/{fd}").split(":")[0]] += 1
        except OSError:
            pass
    for c in psutil.Process().net_connections("tcp"):
        ports = {c.laddr.port if c.laddr else 0, c.raddr.port if c.raddr else 0}
        if c.status == "LISTEN":
            out["tcp listen"] += 1
        elif server_port in ports:
            out["tcp call port"] += 1
        else:
            out["tcp provider pool"] += 1
    return out


@dataclass
class Case:
    kind: str
    uuid: str
    domain: str
    rng: random.Random
    outcome: str = ""
    notes: list[str] = field(default_factory=list)


def key() -> bytes:
    return os.urandom(4)


def frame(op: int, payload: bytes) -> bytes:
    return encode_frame(op, payload, key())


async def upgraded(served: Served, case: Case) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = parse_ws_url(
        f"ws://127.0.0.1:{served.app.port}/fs/{case.uuid}?domain={case.domain}&rate=8000"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", served.app.port)
    writer.write(build_upgrade_request(url, make_key(), offer_deflate=False, extra_headers={}))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    assert head.startswith(b"HTTP/1.1 101"), head[:40]
    return reader, writer


async def finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, case: Case) -> None:
    """Send CLOSE (if still open) and read until the server closes TCP; note its close code."""
    try:
        writer.write(frame(Opcode.CLOSE, close_payload(1000, "bye")))
        await writer.drain()
    except (ConnectionError, RuntimeError):
        pass
    try:
        data = await asyncio.wait_for(reader.read(), 5.0)
        closes = [f.close_code for f in FrameParser().feed(data) if f.opcode is Opcode.CLOSE]
        case.outcome = f"close {closes[0]}" if closes else "eof"
    except (TimeoutError, ConnectionError, ProtocolError) as exc:
        case.outcome = f"no close: {type(exc).__name__}"
    finally:
        writer.transport.abort()


async def run_case(served: Served, case: Case) -> None:
    r = case.rng
    k = case.kind
    if k == "idle_tcp":
        _, w = await asyncio.open_connection("127.0.0.1", served.app.port)
        await asyncio.sleep(r.uniform(0.5, 2.0))
        w.transport.abort()
        case.outcome = "held"
        return
    if k in ("slow_loris", "garbage_request"):
        url = parse_ws_url(f"ws://127.0.0.1:{served.app.port}/fs/{case.uuid}?domain=default")
        req = build_upgrade_request(url, make_key(), offer_deflate=False, extra_headers={})
        if k == "garbage_request":
            req = os.urandom(r.randint(1, 3000)) + b"\r\n\r\n"
        rd, w = await asyncio.open_connection("127.0.0.1", served.app.port)
        upto = len(req) if k == "garbage_request" else r.randint(1, len(req) - 1)
        for i in range(0, upto, 7 if k == "slow_loris" else len(req)):
            w.write(req[i : min(i + 7, upto) if k == "slow_loris" else upto])
            await w.drain()
            if k == "slow_loris":
                await asyncio.sleep(0.05)
        try:
            got = await asyncio.wait_for(rd.read(200), 0.5)
            case.outcome = got.split(b"\r\n", 1)[0].decode("latin-1") or "eof"
        except TimeoutError:
            case.outcome = "waiting"
        w.transport.abort()
        return
    reader, writer = await upgraded(served, case)
    if k == "abrupt_close":
        for _ in range(r.randint(0, 20)):
            writer.write(frame(Opcode.BINARY, os.urandom(320)))
        await writer.drain()
        await asyncio.sleep(r.uniform(0, 0.3))
        writer.transport.abort()
        case.outcome = "aborted"
        return
    if k == "truncated_frame":
        full = frame(Opcode.BINARY, os.urandom(r.randint(200, 5000)))
        writer.write(full[: r.randint(1, len(full) - 1)])
        await writer.drain()
        await asyncio.sleep(r.uniform(0, 0.2))
        writer.transport.abort()
        case.outcome = "cut"
        return
    msgs: list[bytes] = []
    if k == "binary_junk":
        msgs = [
            frame(Opcode.BINARY, os.urandom(r.randint(0, 2000))) for _ in range(r.randint(1, 30))
        ]
    elif k == "huge_binary":
        msgs = [frame(Opcode.BINARY, os.urandom(r.choice([65_536, 600_000])))]
    elif k == "invalid_utf8":
        msgs = [frame(Opcode.TEXT, b'{"x":"' + bytes([0xC3, 0x28, 0xFF]) + b'"}')]
    elif k == "bad_json":
        msgs = [frame(Opcode.TEXT, b"{bad json " + os.urandom(8).hex().encode()) for _ in range(3)]
    elif k == "big_metadata":
        msgs = [frame(Opcode.TEXT, b'{"m":"' + b"x" * r.randint(8200, 60_000) + b'"}')]
    elif k == "bogus_frames":
        bogus = [
            bytes([0x83, 0x80]) + key(),  # reserved opcode
            bytes([0x02, 0x85]) + key() + b"12345",  # fragment start ...
            bytes([0x80 | 0x09, 0x80 | 126]) + b"\x00\x80" + key() + b"x" * 128,  # control > 125
            bytes([0x82, 0x05]) + b"hello",  # unmasked client frame
            bytes([0xC2, 0x80]) + key(),  # RSV1 without permessage-deflate
        ]
        msgs = [r.choice(bogus)]
    elif k == "interleave":
        for _ in range(r.randint(2, 40)):
            pick = r.random()
            if pick < 0.5:
                msgs.append(frame(Opcode.BINARY, os.urandom(r.randint(0, 700))))
            elif pick < 0.8:
                msgs.append(
                    frame(
                        Opcode.TEXT,
                        r.choice(
                            [
                                b"{}",
                                b"[1]",
                                b'{"event":"dtmf","digit":"7"}',
                                b"hi",
                                b'{"event":"dtmf"}',
                            ]
                        ),
                    )
                )
            else:
                msgs.append(frame(Opcode.PING, os.urandom(r.randint(0, 125))))
    for m in msgs:
        try:
            writer.write(m)
            await writer.drain()
        except (ConnectionError, RuntimeError):
            break
        if r.random() < 0.3:
            await asyncio.sleep(0.01)
    await finish(reader, writer, case)


async def test_junk_connections_hurt_nobody(served: Served, log_lines: list[str]) -> None:
    rng = random.Random(SEED)
    speech = await served.speech(QUESTION, 8000)

    async def healthy_call(uuid: str) -> list[float]:
        stream = await open_call(served.url(uuid=uuid), 8000, "json-stream")
        latencies: list[float] = []
        try:
            await wait_bot_quiet(stream, timeout_s=10.0)
            for _ in range(2):
                end, answer = await ask(stream, speech, 8000, timeout_s=10.0)
                assert answer is not None, f"healthy call {uuid} got no answer (seed {SEED})"
                latencies.append(answer - end)
                await wait_bot_quiet(stream, timeout_s=10.0)
        finally:
            await stream.hangup()
        return latencies

    alone = await healthy_call("fuzz-baseline")
    await asyncio.sleep(0.5)
    port = served.app.port
    tasks0, fds0, kinds0 = len(asyncio.all_tasks()), fds(), fd_kinds(port)

    cases = [
        Case(
            kind=rng.choice(KINDS),
            uuid=f"fz-{SEED}-{i}",
            domain="default" if rng.random() < 0.25 else f"junk{i}.invalid",
            rng=random.Random(rng.random()),
        )
        for i in range(CASES)
    ]
    gate = asyncio.Semaphore(12)

    async def guarded(case: Case) -> None:
        async with gate:
            try:
                await asyncio.wait_for(run_case(served, case), 15.0)
            except Exception as exc:  # the client side may see resets: record, never hide
                case.outcome = case.outcome or f"client {type(exc).__name__}"

    t0 = time.monotonic()
    busy, _ = await asyncio.gather(
        healthy_call("fuzz-healthy"), asyncio.gather(*(guarded(c) for c in cases))
    )
    elapsed = time.monotonic() - t0

    # Everything the junk opened is gone: calls, tasks, descriptors.
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        assert served.app.server is not None
        if served.app.server.stats.calls_active == 0 and len(asyncio.all_tasks()) <= tasks0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    tasks1, fds1, kinds1 = len(asyncio.all_tasks()), fds(), fd_kinds(port)
    outcomes = Counter(f"{c.kind}: {c.outcome.split(':')[0]}" for c in cases)
    print(
        f"wire fuzz seed={SEED}: {len(cases)} cases in {elapsed:.1f}s; tasks {tasks0}->{tasks1}, "
        f"fds {fds0}->{fds1}; healthy alone {alone}, under junk {busy}"
    )
    for k, n in sorted(outcomes.items()):
        print(f"  {n:4d}  {k}")
    assert served.app.server is not None and served.app.server.stats.calls_active == 0
    assert tasks1 <= tasks0, f"tasks leaked: {tasks0} -> {tasks1} (seed {SEED})"
    grown = kinds1 - kinds0
    print(f"  descriptors now: {dict(kinds1)}; grown: {dict(grown)}")
    assert kinds1["tcp call port"] == 0, f"call sockets left open: {kinds1} (seed {SEED})"
    leaked = {k: n for k, n in grown.items() if k not in ("socket", "tcp provider pool")}
    assert not leaked, f"descriptors leaked: {leaked} (seed {SEED})"
    pool_growth = grown["tcp provider pool"]
    assert grown["socket"] <= pool_growth <= 32, f"unbounded provider pool? {grown}"
    async with served.http.get(f"http://127.0.0.1:{served.app.port}/health") as r:
        assert r.status == 200
    # Normal latency: within twice the same call alone, with a floor for a loaded CI box
    # (the junk's cost shows as a multiple, the machine's noise as an offset).
    assert max(busy) <= max(3.0, 2 * max(alone)), (alone, busy)

    # Every upgraded case left a log line bound to its call id.
    text = "\n".join(log_lines)
    missing = [c.uuid for c in cases if c.kind in UPGRADED and f"'call': '{c.uuid}'" not in text]
    assert not missing, f"{len(missing)} cases left no log line, e.g. {missing[:3]} (seed {SEED})"
