"""The embedded offline default: a spoken question answered with no keys and no network."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jiwer
import pytest
import pytest_asyncio

from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant, TurnSettings
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.compose import CallPipeline
from pipeswitch.pipelines.local.models import set_offline_env
from pipeswitch.pipelines.piper_client import wav_pcm
from pipeswitch.pipelines.session import CallRecord
from tests.conftest import trim_silence
from tests.e2e.helpers import is_speech_like, wait_bot_quiet, wait_for_bot_audio

# Async tests run on the session loop (asyncio_mode = "auto", asyncio_default_test_loop_scope);
# a module-wide asyncio mark would also mark the sync demo test below.
pytestmark = [pytest.mark.local_models]

QUESTION = "I would like to book an appointment for tomorrow afternoon."


def normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).strip()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def offline_app() -> AsyncIterator[Pipeswitch]:
    set_offline_env()
    # The turn watchdog off: on a CPU shared with other tests the local LLM can take longer
    # than the holding phrase's 3 s, and this test times the reply itself, not the hold
    # (the watchdog has its own tests; the demo test below runs the default tenant).
    tenant = Tenant(name="default", turns=TurnSettings(watchdog_secs=0))
    app = Pipeswitch(
        Settings(host="127.0.0.1", port=0, providers="local"),
        loader=StaticTenantLoader([tenant], default="default"),
        default_tenant="default",
    )
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def test_offline_call_understands_and_answers(offline_app: Pipeswitch) -> None:
    app = offline_app
    assert app.sessions is not None
    done: asyncio.Future[CallRecord] = asyncio.get_running_loop().create_future()

    async def finished(rec: CallRecord, _: CallPipeline) -> None:
        if not done.done():
            done.set_result(rec)

    app.sessions.finished_hooks.append(finished)
    url = app.endpoints.piper_for_rate(8000)
    async with aiohttp.ClientSession() as http, http.post(url, json={"text": QUESTION}) as r:
        question = trim_silence(wav_pcm(await r.read())[0])
    stream = FakeSwitchStream(
        StreamConfig(
            url=f"ws://127.0.0.1:{app.port}/fs/offline-1?rate=8000", rate=8000, playback="voxcom"
        )
    )
    await stream.start()
    assert await stream.wait_connected(3.0)
    try:
        assert await wait_for_bot_audio(stream, 0.0, 5.0) is not None, "no greeting"
        await wait_bot_quiet(stream, timeout_s=15.0)
        stream.queue_caller_audio(question)
        stream.queue_caller_silence(0.3)
        await stream.wait_caller_drained(timeout_s=15.0)
        end = stream.last_voiced_sent_at()
        assert end is not None
        answer = await wait_for_bot_audio(stream, end, 20.0)
        assert answer is not None, "no spoken answer"
        await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=30.0)
    finally:
        await stream.hangup()
    rec = await asyncio.wait_for(done, 15.0)
    app.sessions.finished_hooks.remove(finished)

    said = " ".join(str(m["content"]) for m in rec.messages if m.get("role") == "user")
    wer = jiwer.wer(normalize(QUESTION), normalize(said))
    assert wer <= 0.10, f"caller transcript {said!r} (WER {wer:.2f})"
    replies = [str(m["content"]) for m in rec.messages if m.get("role") == "assistant"][1:]
    assert replies and re.search(r"[A-Za-z]{3,}", replies[-1]), f"no English reply: {rec.messages}"
    pcm, rx = stream.received_audio()
    offset = sum(a.nbytes for a in rx if a.t <= end)
    assert is_speech_like(pcm[offset:], 8000)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is not installed")
def test_demo_runs_with_network_unreachable(tmp_path: Path) -> None:
    """`pipeswitch demo` in a fresh network namespace: only loopback, no route anywhere."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.decode()[:200]}")
    out = tmp_path / "reply.wav"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = (
        "ip link set lo up && "
        f"{sys.executable} -c 'import socket; socket.create_connection((\"1.1.1.1\", 443), 2)' "
        "2>/dev/null && exit 99; "
        f"exec {sys.executable} -m pipeswitch.pipelines.cli demo --out {out}"
    )
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode != 99, "the namespace could reach the internet"
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["bot_replied"] and summary["caller_said"]
    assert out.stat().st_size > 8000
