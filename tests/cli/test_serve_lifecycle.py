"""``pipeswitch serve`` as an operator runs it: one server per port, and shutdown that ends.

A real subprocess with emulated providers (and real Piper), an emulated FreeSWITCH call,
and real signals.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import pytest

from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig
from tests.cli.server_proc import ServeProcess, free_port, pipeswitch, ready_status

pytestmark = pytest.mark.asyncio(loop_scope="session")

DRAIN = 1.5


async def _call(port: int, uuid: str, domain: str = "default") -> FakeSwitchStream:
    stream = FakeSwitchStream(
        StreamConfig(
            url=f"ws://127.0.0.1:{port}/fs/{uuid}?domain={domain}&rate=8000&mix=mono",
            rate=8000,
            playback="voxcom",
        )
    )
    await stream.start()
    return stream


async def _wait(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


async def test_second_serve_refused_then_sigterm_drains_says_goodbye_and_exits(
    tmp_path: Path,
) -> None:
    port = free_port()
    server = ServeProcess(
        port,
        tmp_path / "serve.log",
        "--providers",
        "emulated",
        env={
            "PIPESWITCH_DRAIN_TIMEOUT_SECS": str(DRAIN),
            # As the README's quick start runs it for the shipped dialplan.
            "PIPESWITCH_DEFAULT_TENANT_ANSWERS_ANY_DOMAIN": "true",
        },
    )
    try:
        await asyncio.to_thread(server.wait_ready)

        # A second server on the same port: one line, exit 2, and the first keeps serving.
        second = await asyncio.to_thread(
            pipeswitch, "serve", "--host", "127.0.0.1", "--port", str(port)
        )
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "already in use" in err[0] and str(port) in err[0]
        assert "Traceback" not in second.stderr
        assert ready_status(port) == 200

        # The shipped dialplan sends the channel's domain_name (here an IP address).
        call = await _call(port, "drain-call", domain="192.168.1.10")
        assert await call.wait_connected(5.0)
        # The greeting plays, then the caller says nothing: the call would stay up.
        assert await _wait(lambda: call.last_bot_audio_at() is not None, 15.0)
        await asyncio.sleep(1.0)

        t_sig = time.monotonic()
        server.signal(signal.SIGTERM)
        # Stop accepting at once: /ready 503, a new call refused with 4503.
        assert await _wait(lambda: ready_status(port) == 503, 1.0)
        late = await _call(port, "late-call")
        await _wait(lambda: late.close_record.server_close_code is not None, 3.0)
        assert late.close_record.server_close_code == 4503
        await late.aclose()

        # After the drain timeout the bot says goodbye, then closes the call normally.
        assert await _wait(lambda: call.close_record.server_close_code is not None, DRAIN + 4)
        assert call.close_record.server_close_code == 1000
        goodbye = call.first_bot_audio_received_after(t_sig + DRAIN - 0.2)
        assert goodbye is not None, "no goodbye audio after the drain timeout"
        rc = await asyncio.to_thread(server.proc.wait, DRAIN + 8)
        elapsed = time.monotonic() - t_sig
        assert rc == 0, server.log()
        await call.aclose()
        log = server.log()
        assert "ended 1 calls at shutdown" in log, log[-3000:]
        # As an operator installs it, the server runs on uvloop (pipelines/event_loop.py).
        assert re.search(r"listening on .*event loop: uvloop \d", log), log[:3000]
        # Loud about answering any domain: at start-up, and per call with the call's uuid.
        assert re.search(r"WARNING .*ANSWERS_ANY_DOMAIN is on", log), log[:3000]
        assert re.search(r"WARNING +drain-call default .*'192\.168\.1\.10' matches no tenant", log)
        # The bound: the server's own clock from the signal to the end of its cleanup (the
        # wall clock here adds interpreter exit and this machine's scheduling).
        m = re.search(r"stopped ([0-9.]+)s after the signal", log)
        assert m is not None, log[-3000:]
        assert float(m.group(1)) < DRAIN + 2.0, m.group(0)
        assert elapsed < DRAIN + 6.0, f"exit took {elapsed:.1f}s"
    finally:
        server.close()


async def test_second_signal_ends_now(tmp_path: Path) -> None:
    port = free_port()
    server = ServeProcess(
        port,
        tmp_path / "serve.log",
        "--providers",
        "emulated",
        # The same lifecycle on asyncio's own loop (the fallback where uvloop is missing).
        env={"PIPESWITCH_DRAIN_TIMEOUT_SECS": "60", "PIPESWITCH_EVENT_LOOP": "asyncio"},
    )
    try:
        await asyncio.to_thread(server.wait_ready)
        assert "event loop: asyncio)" in server.log()
        call = await _call(port, "impatient")
        assert await call.wait_connected(5.0)
        await asyncio.sleep(0.5)
        server.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert server.proc.poll() is None, "the first signal must wait for the call"
        t_second = time.monotonic()
        server.signal(signal.SIGINT)
        rc = await asyncio.to_thread(server.proc.wait, 10)
        assert rc == 0, server.log()
        assert time.monotonic() - t_second < 3.0
        assert await _wait(lambda: call.close_record.server_close_code is not None, 2.0)
        await call.aclose()
    finally:
        server.close()
