"""``pipeswitch call``: a refused call says why and exits 2; Ctrl-C is quiet; no stray WAV."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from pipeswitch.bench.fakeswitch.cli import add_call_arguments, run_call
from tests.cli.server_proc import free_port

QUESTION = Path(__file__).parents[1] / "fixtures" / "question_8k.wav"


async def _refuse(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    if "hold" in request.path:  # a call that is up but never answers
        async for _ in ws:
            pass
        return ws
    await ws.close(code=1008, message=b"unknown tenant domain 'nope.example'")
    return ws


@pytest_asyncio.fixture(loop_scope="session")
async def refusing_server() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/{tail:.*}", _refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_call_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.asyncio(loop_scope="session")
async def test_refused_call_shows_code_and_reason_and_exits_2(
    refusing_server: int,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    rc = await run_call(
        _args(
            "--url",
            f"ws://127.0.0.1:{refusing_server}/fs/{{uuid}}?domain=nope.example",
            "--wav",
            str(QUESTION),
        )
    )
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("pipeswitch call: call refused: close 1008"), err
    assert "unknown tenant domain 'nope.example'" in err[-1]
    assert elapsed < 5.0, f"a refused call took {elapsed:.1f}s"
    assert list(tmp_path.iterdir()) == [], "no WAV unless --out is given"


@pytest.mark.asyncio(loop_scope="session")
async def test_nothing_listening_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc = await run_call(
        _args("--url", f"ws://127.0.0.1:{free_port()}/fs/x", "--wav", str(QUESTION))
    )
    assert rc == 2
    assert "no connection" in capsys.readouterr().err


@pytest.mark.asyncio(loop_scope="session")
async def test_ctrl_c_ends_quietly(refusing_server: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeswitch.pipelines.cli",
        "call",
        "--url",
        f"ws://127.0.0.1:{refusing_server}/fs/hold",
        "--wav",
        str(QUESTION),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(4.0)  # connected and waiting for an answer
    proc.send_signal(signal.SIGINT)
    _, err_b = await asyncio.wait_for(proc.communicate(), 15)
    err = err_b.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
