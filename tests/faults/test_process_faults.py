"""A worker process killed mid-call: its calls see their socket close (FreeSWITCH can fall
back), the other worker's calls go on, and the parent starts a replacement worker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import wave
from pathlib import Path

import psutil
import pytest

from pipeswitch.bench.fakeswitch.stream import (
    EVENT_DISCONNECT,
    EVENT_ERROR,
    ConnState,
    FakeSwitchStream,
)
from tests.cli.server_proc import ServeProcess, free_port
from tests.e2e.helpers import ask, open_call, wait_bot_quiet

QUESTION_WAV = Path(__file__).parent.parent / "fixtures" / "question_8k.wav"


def workers_of(parent: int) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(parent).children()
        if "pipeswitch.pipelines.cli" in " ".join(p.cmdline())
    ]


def calls_on(proc: psutil.Process, port: int) -> int:
    return sum(
        1
        for c in proc.net_connections("tcp")
        if c.status == "ESTABLISHED" and c.laddr and c.laddr.port == port
    )


async def wait_for(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.mark.slow
async def test_worker_killed_mid_call(tmp_path: Path) -> None:
    with wave.open(str(QUESTION_WAV)) as w:
        speech = w.readframes(w.getnframes())
    port = free_port()
    serve = ServeProcess(port, tmp_path / "serve.log", "--providers", "emulated", "--workers", "2")
    streams: list[FakeSwitchStream] = []
    try:
        await asyncio.to_thread(serve.wait_ready, 120.0)
        assert await wait_for(lambda: len(workers_of(serve.proc.pid)) == 2, 30)
        assert await wait_for(
            lambda: all(
                any(c.status == "LISTEN" for c in p.net_connections("tcp"))
                for p in workers_of(serve.proc.pid)
            ),
            60,
        ), serve.log()
        # Calls until each worker holds one (the kernel spreads connections, SO_REUSEPORT).
        owner: dict[int, FakeSwitchStream] = {}
        for i in range(12):
            before = {p.pid: calls_on(p, port) for p in workers_of(serve.proc.pid)}
            url = f"ws://127.0.0.1:{port}/fs/kill-{i}?domain=default&rate=8000&mix=mono"
            s = await open_call(url, 8000, "json-stream")
            streams.append(s)
            await asyncio.sleep(0.3)
            after = {p.pid: calls_on(p, port) for p in workers_of(serve.proc.pid)}
            grew = [pid for pid in after if after[pid] > before.get(pid, 0)]
            if len(grew) == 1 and grew[0] not in owner:
                owner[grew[0]] = s
            if len(owner) == 2:
                break
        assert len(owner) == 2, f"both workers should hold a call: {owner}"
        (victim, victim_call), (survivor, survivor_call) = list(owner.items())
        await wait_bot_quiet(survivor_call, timeout_s=10.0)

        os.kill(victim, signal.SIGKILL)
        # The killed worker's call: TCP closes at once; libwsc reports it, the dialplan falls back.
        assert await wait_for(lambda: victim_call.state is not ConnState.OPEN, 5.0)
        assert any(e.name in (EVENT_DISCONNECT, EVENT_ERROR) for e in victim_call.events), [
            e.name for e in victim_call.events
        ]
        # The other worker's call goes on: the next question is answered.
        _, answer = await ask(survivor_call, speech, 8000, timeout_s=10.0)
        assert answer is not None, "the surviving worker's call was affected"
        assert survivor_call.state is ConnState.OPEN
        # A new worker takes the dead one's place and answers calls.
        assert await wait_for(
            lambda: (
                len(workers_of(serve.proc.pid)) == 2
                and victim not in [p.pid for p in workers_of(serve.proc.pid)]
            ),
            30,
        ), serve.log()
        assert "its calls were lost; started worker" in serve.log()
    finally:
        for s in streams:
            await s.hangup()
        serve.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(serve.proc.wait, 60)
