"""Speech-to-speech providers that never answer the handshake, or send junk mid-call.

* Connect budget: a TCP server that accepts and never says a word stands in for the
  provider (no WebSocket upgrade answer, so no ``session.created`` / setup reply).
  Within ``s2s_connect_timeout_secs`` the call must be on the cascade; a caller who
  talked into the silence hears the apology, then the cascade answers them.
* Malformed event: the emulators send a broken JSON event as a reply starts. The
  failure is logged with its reason, the call goes on on the cascade, nothing crashes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from loguru import logger

from pipeswitch.bench.emulators.gemini_live import GeminiFaults
from pipeswitch.bench.emulators.openai_realtime import RealtimeFaults
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import ProviderSettings, Tenant
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.compose import CallPipeline
from pipeswitch.pipelines.session import CallRecord
from tests.e2e.helpers import ask, open_call, wait_bot_quiet
from tests.s2s.conftest import QUESTION, S2SServed, reset_faults

pytestmark = pytest.mark.asyncio(loop_scope="session")

BUDGET = 1.5


class BlackHole:
    """Accepts TCP connections, reads whatever comes, answers nothing."""

    def __init__(self) -> None:
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._conns: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            self._conns.append(writer)
            while await reader.read(4096):
                pass

        self._server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for w in self._conns:
            w.close()
        if self._server is not None:
            self._server.close()


@dataclass
class Silent:
    app: Pipeswitch
    hole: BlackHole
    kept: dict[str, tuple[CallRecord, CallPipeline]]

    def url(self, domain: str, uuid: str) -> str:
        return f"ws://127.0.0.1:{self.app.port}/fs/{uuid}?rate=8000&mix=mono&domain={domain}"


def _silent_tenants() -> StaticTenantLoader:
    # No greeting: the caller talks at once, into the provider's silence.
    budget = {"s2s_connect_timeout_secs": BUDGET}
    return StaticTenantLoader(
        [
            Tenant(name="default"),
            Tenant(
                name="rt-hole.test",
                pipeline="openai-realtime",
                playback="binary",
                first_message=None,
                # Local turns: Silero hears the caller even with no provider session.
                providers=ProviderSettings(turn_detection="local", **budget),  # type: ignore[arg-type]
            ),
            Tenant(
                name="el-hole.test",
                pipeline="elevenlabs-agent",
                playback="binary",
                first_message=None,
                providers=ProviderSettings(elevenlabs_agent_id="agent_hole", **budget),  # type: ignore[arg-type]
            ),
        ],
        default="default",
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def silent(s2s: S2SServed) -> AsyncIterator[Silent]:
    hole = BlackHole()
    port = await hole.start()
    endpoints = dataclasses.replace(
        s2s.app.endpoints,
        openai_realtime_url=f"ws://127.0.0.1:{port}/v1/realtime",
        elevenlabs_url=f"ws://127.0.0.1:{port}",
        elevenlabs_api_key="emulated",
    )
    settings = Settings(host="127.0.0.1", port=0, providers="emulated", idle_timeout_secs=30)
    app = Pipeswitch(
        settings, loader=_silent_tenants(), default_tenant="default", endpoints=endpoints
    )
    await app.start()
    kept: dict[str, tuple[CallRecord, CallPipeline]] = {}

    async def hook(rec: CallRecord, cp: CallPipeline) -> None:
        kept[rec.call.call_uuid] = (rec, cp)

    assert app.sessions is not None
    app.sessions.finished_hooks.append(hook)
    try:
        yield Silent(app, hole, kept)
    finally:
        await app.stop(drain_secs=1.0)
        await hole.stop()


class LogLines:
    """Warnings and errors logged while the block runs (loguru)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._id: int | None = None

    def __enter__(self) -> LogLines:
        self._id = logger.add(lambda m: self.lines.append(str(m)), level="WARNING")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._id is not None:
            logger.remove(self._id)


async def _finished(kept: dict[str, Any], uuid: str) -> tuple[CallRecord, CallPipeline]:
    for _ in range(250):
        if uuid in kept:
            return kept[uuid]
        await asyncio.sleep(0.02)
    raise AssertionError(f"call {uuid} never finished")


@pytest.mark.parametrize(
    ("domain", "apology"),
    [
        # OpenAI with local turns: Silero heard the caller talk into the silence.
        ("rt-hole.test", True),
        # ElevenLabs: its server VAD is the only turn detector, so no turn was lost.
        ("el-hole.test", False),
    ],
)
async def test_silent_handshake_falls_back_within_the_budget(
    silent: Silent, s2s: S2SServed, domain: str, apology: bool
) -> None:
    uuid = f"hole-{domain[:2]}"
    speech = await s2s.speech(QUESTION, 8000)
    chat = s2s.emu.openai
    n_chat = len(chat.requests)
    accepted = silent.hole.accepted
    with LogLines() as logs:
        stream = await open_call(silent.url(domain, uuid), 8000, "binary")
        opened = time.monotonic()
        try:
            # The caller talks at once; the provider is still "connecting".
            end, heard = await ask(stream, speech, 8000, timeout_s=BUDGET + 8.0)
            assert heard is not None, "the caller heard nothing after the budget"
            assert heard - opened < BUDGET + 6.0  # the apology (Piper) after the budget
            await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=15.0)
        finally:
            await stream.hangup()
        rec, cp = await _finished(silent.kept, uuid)
    assert silent.hole.accepted > accepted, "the provider was never dialled"
    fb = cp.parts["llm"].fallback  # type: ignore[attr-defined]
    assert fb is not None and len(fb.events) == 1
    event = fb.events[0]
    # The watch's budget or the service's own connect timeout (set to the budget) decides.
    assert any(k in event.reason for k in ("no provider session", "connect failed")), event.reason
    assert event.apologized is apology
    assert event.switch_secs is not None and event.switch_secs < 5.0
    assert any(
        "speech-to-speech provider failed" in line and event.reason[:30] in line
        for line in logs.lines
    ), logs.lines
    assert not any("Traceback" in line for line in logs.lines)
    if not apology:
        # The cascade's STT heard the caller and its LLM answered them.
        assert len(chat.requests) > n_chat
    del rec


async def _malformed_call(s2s: S2SServed, domain: str, uuid: str) -> tuple[list[str], Any, float]:
    """A call whose provider breaks as its first reply starts; returns the log lines,
    the fallback and how much bot audio the caller heard after their question."""
    kept: dict[str, tuple[CallRecord, CallPipeline]] = {}

    async def hook(rec: CallRecord, cp: CallPipeline) -> None:
        kept[rec.call.call_uuid] = (rec, cp)

    assert s2s.app.sessions is not None
    s2s.app.sessions.finished_hooks.append(hook)
    speech = await s2s.speech(QUESTION, 8000)
    try:
        with LogLines() as logs:
            stream = await open_call(s2s.url(domain, 8000, uuid), 8000, "binary")
            try:
                await wait_bot_quiet(stream, timeout_s=10.0)
                end, _ = await ask(stream, speech, 8000, timeout_s=10.0)
                # Whatever comes next (the cascade's apology, or the provider again after
                # a reconnect, or the cascade after the reply budget), within 20 s.
                deadline = time.monotonic() + 20.0
                heard = 0.0
                while heard < 0.5 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    _, frames = stream.played_audio()
                    heard = 0.02 * sum(1 for t, voiced in frames if voiced and t > end)
            finally:
                await stream.hangup()
            _, cp = await _finished(kept, uuid)
    finally:
        reset_faults(s2s)
        s2s.app.sessions.finished_hooks.remove(hook)
    return logs.lines, cp.parts["llm"].fallback, heard  # type: ignore[attr-defined]


def _assert_went_on(logs: list[str], fb: Any, heard: float) -> None:
    """Logged with its reason, switched to the cascade, the caller heard it go on."""
    assert heard >= 0.5, f"the caller heard {heard:.2f}s after the malformed event"
    assert fb is not None and len(fb.events) == 1
    event = fb.events[0]
    assert event.reason, "a failure without a reason"
    assert any(
        "speech-to-speech provider failed" in line and event.reason[:30] in line for line in logs
    ), logs
    # The caller's turn had begun: the cascade apologized, and its audio left the socket.
    assert event.apologized and event.switch_secs is not None
    assert heard >= 0.5, f"the caller heard {heard:.2f}s after the malformed event"
    assert not any("Traceback" in line for line in logs)


async def test_openai_malformed_event_mid_call_is_logged_and_the_call_goes_on(
    s2s: S2SServed,
) -> None:
    s2s.realtime.set_faults(RealtimeFaults(malformed_on_response=1, count=1))
    logs, fb, heard = await _malformed_call(s2s, "rt-binary.test", "rt-malformed")
    _assert_went_on(logs, fb, heard)
    reason = fb.events[0].reason
    assert "OpenAI Realtime" in reason and ("JSON" in reason or "Expecting" in reason), reason


async def test_gemini_malformed_event_mid_call_is_logged_and_the_call_goes_on(
    s2s: S2SServed,
) -> None:
    """Pipecat's Gemini service counts a message it cannot parse as a connection error
    (logged with the parser's reason) and resumes the session; the caller's turn is
    lost with it, so the reply budget then moves the call to the cascade."""
    s2s.gemini.set_faults(GeminiFaults(malformed_on_turn=1, count=1))
    n = len(s2s.gemini.sessions)
    logs, fb, heard = await _malformed_call(s2s, "gm-binary.test", "gm-malformed")
    assert any("Failed to parse response" in line for line in logs), logs
    assert len(s2s.gemini.sessions) >= n + 2, "no reconnect after the malformed message"
    _assert_went_on(logs, fb, heard)
    assert "no reply" in fb.events[0].reason
