"""Calls through the FreeSWITCH emulator with its event socket: every module build heard,
barge-in, DTMF into the LLM context, hangup both ways, ESL lost and restored mid-call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from pipeswitch.bench.emulators.scripts import LLM_SCRIPTS
from pipeswitch.bench.fakeswitch.esl import Channel, FakeSwitchEsl, recommended_variables
from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.processors.dtmf import DTMF_PREFIX
from tests.conftest import BARGE_IN, QUESTION, Served
from tests.e2e.helpers import PLAYBACK_FOR_DIALECT

pytestmark = pytest.mark.asyncio(loop_scope="session")

DIALECTS = ("file", "json-stream", "binary")


@dataclass
class EslServed:
    """A Pipeswitch server with ESL on, against the emulated switch (shares ``served``'s
    Piper and provider emulators)."""

    app: Pipeswitch
    fs: FakeSwitchEsl
    base: Served

    def url(self, uuid: str, domain: str, rate: int = 8000) -> str:
        return f"ws://127.0.0.1:{self.app.port}/fs/{uuid}?domain={domain}&rate={rate}&mix=mono"

    async def call(self, uuid: str, dialect: str, domain: str | None = None) -> Channel:
        build = PLAYBACK_FOR_DIALECT[dialect]
        ch = await self.fs.start_call(
            self.url(uuid, domain or f"{dialect}.esl"),
            call_uuid=uuid,
            build=build,  # type: ignore[arg-type]
            variables=recommended_variables(build),  # type: ignore[arg-type]
        )
        assert ch.stream is not None
        assert await ch.stream.wait_connected(3.0)
        return ch


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def esl_served(served: Served) -> AsyncIterator[EslServed]:
    fs = FakeSwitchEsl(password="pbx-secret")
    await fs.start()
    tenants = [Tenant(name=f"{d}.esl", playback=d) for d in DIALECTS]  # type: ignore[arg-type]
    tenants.append(Tenant(name="limit.esl", playback="file", max_call_secs=3.0))
    # No greeting: for tests that need no bot audio before the caller acts (faster).
    tenants += [Tenant(name=f"{d}.quiet", playback=d, first_message=None) for d in DIALECTS]  # type: ignore[arg-type]
    settings = Settings(
        host="127.0.0.1",
        port=0,
        providers="emulated",
        idle_timeout_secs=30,
        esl_enabled=True,
        esl_port=fs.port,
        esl_password="pbx-secret",  # type: ignore[arg-type]
    )
    app = Pipeswitch(
        settings,
        loader=StaticTenantLoader(tenants, default="file.esl"),
        default_tenant="file.esl",
        endpoints=served.app.endpoints,
    )
    await app.start()
    assert app.esl is not None and await app.esl.wait_connected(3.0)
    try:
        yield EslServed(app, fs, served)
    finally:
        await app.stop(drain_secs=1.0)
        await fs.stop()


def heard_after(stream: FakeSwitchStream, t: float) -> float | None:
    """First non-silent frame the caller heard at or after ``t``."""
    return stream.first_bot_audio_played_after(t)


async def wait_heard(stream: FakeSwitchStream, after: float, timeout_s: float) -> float | None:
    """First frame the caller heard at or after ``after``, waiting up to ``timeout_s``."""
    return await stream.wait_bot_audio_after(after, timeout_s, played=True)


async def wait_quiet(stream: FakeSwitchStream, quiet_s: float = 0.6, timeout_s: float = 12) -> None:
    """Until the caller has heard nothing for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        _, frames = stream.played_audio()
        last = next((t for t, v in reversed(frames) if v), None)
        if time.monotonic() - (last if last is not None else t0) > quiet_s:
            return
        await asyncio.sleep(0.05)


async def speak(served: Served, stream: FakeSwitchStream, text: str) -> float:
    """The caller says ``text``; returns when the last voiced frame left."""
    pcm = await served.speech(text, 8000)
    stream.queue_caller_audio(pcm)
    stream.queue_caller_silence(0.3)
    await stream.wait_caller_drained(timeout_s=len(pcm) / 16000 + 3)
    end = stream.last_voiced_sent_at()
    assert end is not None
    return end


async def until(pred: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return False


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_caller_hears_greeting_and_reply_on_every_build(
    esl_served: EslServed, dialect: str
) -> None:
    uuid = f"hear-{dialect}"
    ch = await esl_served.call(uuid, dialect)
    st = ch.stream
    assert st is not None
    try:
        t0 = st.started_at or time.monotonic()
        assert await wait_heard(st, t0, 5.0) is not None, "greeting not heard"
        await wait_quiet(st)
        end = await speak(esl_served.base, st, QUESTION)
        heard = await wait_heard(st, end, 8.0)
        assert heard is not None, f"reply not heard on {ch.build}"
        if dialect == "file":
            assert ch.played_files, "community build: nothing played over ESL"
        assert ch.hazards == []
    finally:
        await esl_served.fs.hangup(uuid)


async def test_file_barge_in_breaks_playback_and_drops_stale_files(
    esl_served: EslServed,
) -> None:
    chat = esl_served.base.emu.openai
    saved = chat.script
    chat.script = LLM_SCRIPTS["long"]  # type: ignore[assignment]
    uuid = "barge-file"
    ch = await esl_served.call(uuid, "file", domain="file.quiet")
    st = ch.stream
    assert st is not None
    try:
        await wait_quiet(st)
        end = await speak(esl_served.base, st, QUESTION)
        assert await wait_heard(st, end, 8.0) is not None
        await asyncio.sleep(1.0)  # the long reply is playing
        interrupt = await esl_served.base.speech(BARGE_IN, 8000)
        st.queue_caller_audio(interrupt)
        st.queue_caller_silence(0.5)
        assert await until(lambda: bool(ch.breaks), 3.0), "no uuid_break"
        t_break = ch.breaks[0]
        await asyncio.sleep(0.4)
        _, frames = st.played_audio()
        # Silent from ~25 ms after the break (0.15 s allowed: a loaded CI loop lags) until
        # the answer to the barge-in, which comes after the caller's sentence.
        after = [
            round(t - t_break, 3) for t, v in frames if v and t_break + 0.15 < t < t_break + 0.5
        ]
        assert after == [], f"the interrupted reply kept playing (s after the break): {after}"
        assert any(c.command == f"api uuid_break {uuid} all" for c in esl_served.fs.commands)
    finally:
        chat.script = saved
        await esl_served.fs.hangup(uuid)


async def test_dtmf_reaches_the_pipeline_and_the_llm_context(esl_served: EslServed) -> None:
    chat = esl_served.base.emu.openai
    uuid = "dtmf-esl"
    ch = await esl_served.call(uuid, "json-stream", domain="json-stream.quiet")
    assert ch.stream is not None
    n = len(chat.requests)
    try:
        await asyncio.sleep(0.3)
        esl_served.fs.inject_dtmf(uuid, "4")
        esl_served.fs.inject_dtmf(uuid, "2")
        esl_served.fs.inject_dtmf(uuid, "#")
        # Relayed over the socket as well by a dialplan: counted once.
        ch.stream.send_text('{"event":"dtmf","digit":"#"}', api_split=False)

        def asked() -> bool:
            return any(
                DTMF_PREFIX.strip() in str(m.get("content"))
                for r in chat.requests[n:]
                for m in r.messages
            )

        assert await until(asked, 6.0), [r.messages for r in chat.requests[n:]]
        texts = [
            str(m.get("content"))
            for r in chat.requests[n:]
            for m in r.messages
            if DTMF_PREFIX.strip() in str(m.get("content"))
        ]
        assert texts[0].endswith("42#"), texts
    finally:
        await esl_served.fs.hangup(uuid)


@pytest.mark.parametrize("linger", [False, True])
async def test_caller_hangup_ends_everything(esl_served: EslServed, linger: bool) -> None:
    dg = esl_served.base.emu.deepgram
    uuid = f"hang-{linger}"
    t_start = time.monotonic()
    ch = await esl_served.call(uuid, "file", domain="file.quiet")
    sessions = esl_served.app.sessions
    assert sessions is not None

    def stt_streams() -> list[object]:
        return [r for r in dg.streams if r.opened_at >= t_start]

    assert await until(lambda: uuid in sessions.active and bool(stt_streams()), 5.0)
    t0 = time.monotonic()
    await esl_served.fs.caller_hangup(uuid, close_stream=not linger)
    assert await until(lambda: uuid not in sessions.active, 2.0), "pipeline still running"
    ended = time.monotonic() - t0
    assert await until(
        lambda: all(r.closed_at is not None for r in stt_streams()),  # type: ignore[attr-defined]
        2.0,
    ), "STT socket left open"
    assert ended < 1.5

    def call_tasks() -> list[str]:  # the emulator's own tasks are named fs-*
        names = [t.get_name() for t in asyncio.all_tasks() if not t.done()]
        return [n for n in names if uuid in n and not n.startswith("fs-")]

    assert await until(lambda: not call_tasks(), 2.0), call_tasks()
    st = ch.stream
    assert st is not None
    if linger:
        # The module never closed its socket: Pipeswitch closed it itself.
        assert await until(lambda: st.close_record.server_close_at is not None, 3.0)
        assert st.close_record.initiator == "server"
    await st.aclose()


async def test_a_hangup_before_the_pipeline_runs_ends_the_call(esl_served: EslServed) -> None:
    """A real FreeSWITCH fires CHANNEL_HANGUP 0-3 ms after the hangup: a caller who hangs up
    as the stream connects is gone before the call's pipeline is built. The module's socket
    lingers here (as a stuck one does), so only that event can end the call."""
    server = esl_served.app.server
    sessions = esl_served.app.sessions
    assert server is not None and sessions is not None
    uuid = "hang-early"
    ch = await esl_served.call(uuid, "binary")
    await esl_served.fs.caller_hangup(uuid, close_stream=False)
    assert uuid not in sessions.active, "the hangup should come before the pipeline runs"
    assert await until(lambda: server.stats.calls_active == 0, 3.0), (
        f"the call did not end: {server.stats.calls_active} active, {list(sessions.active)}"
    )
    assert ch.stream is not None
    await ch.stream.aclose()


async def test_bot_ends_the_call_then_uuid_kill(esl_served: EslServed) -> None:
    uuid = "limit-kill"
    ch = await esl_served.call(uuid, "file", domain="limit.esl")
    st = ch.stream
    assert st is not None
    assert await until(lambda: not ch.up, 8.0), "channel not hung up after the call limit"
    assert ch.hangup_cause == "NORMAL_CLEARING"
    kill = [c for c in esl_served.fs.commands if c.command.startswith(f"bgapi uuid_kill {uuid}")]
    assert kill, "no uuid_kill"
    # The stream was closed by Pipeswitch first (what was playing drained), then the
    # channel killed - after the last audio the caller heard, not in the middle of it.
    assert st.close_record.server_close_at is not None
    assert st.close_record.server_close_at <= kill[0].t
    _, frames = st.played_audio()
    last_heard = max(t for t, v in frames if v)
    assert last_heard <= kill[0].t + 0.03


async def test_esl_lost_and_restored_mid_call(esl_served: EslServed) -> None:
    esl = esl_served.app.esl
    assert esl is not None
    uuid = "esl-outage"
    ch = await esl_served.call(uuid, "file", domain="file.quiet")
    st = ch.stream
    assert st is not None
    sessions = esl_served.app.sessions
    assert sessions is not None
    try:
        await asyncio.sleep(0.3)
        end = await speak(esl_served.base, st, QUESTION)
        # ESL goes away while the reply is being made: its files cannot be played.
        t_down = time.monotonic()
        outage = asyncio.ensure_future(esl_served.fs.outage(1.5))
        await asyncio.sleep(0.1)
        assert not esl.connected
        await outage
        t_up = time.monotonic()
        assert await esl.wait_connected(3.0)
        assert heard_after(st, t_down) is None or heard_after(st, t_down) >= t_up  # type: ignore[operator]
        assert uuid in sessions.active, "the call did not survive the outage"
        await wait_quiet(st, timeout_s=8)
        end = await speak(esl_served.base, st, QUESTION)
        assert await wait_heard(st, end, 8.0) is not None, "not heard after ESL came back"
    finally:
        await esl_served.fs.hangup(uuid)
    assert await until(lambda: uuid not in sessions.active, 2.0)


async def test_a_transferred_call_is_not_hung_up_when_its_pipeline_ends(
    esl_served: EslServed,
) -> None:
    esl = esl_served.app.esl
    assert esl is not None
    uuid = "limit-transfer"
    ch = await esl_served.call(uuid, "file", domain="limit.esl")
    await esl.transfer(uuid, "1001", "XML", "limit.esl")
    assert ch.transfers == [("1001", "XML", "limit.esl")]
    sessions = esl_served.app.sessions
    assert sessions is not None
    assert await until(lambda: uuid not in sessions.active, 8.0)
    await asyncio.sleep(0.5)
    assert ch.up, "the transferred caller was hung up"
    assert not any(c.command.startswith(f"bgapi uuid_kill {uuid}") for c in esl_served.fs.commands)
    await esl_served.fs.hangup(uuid)


@pytest.mark.parametrize("buffer_ms", ["20", "40", "60", "80"])
async def test_voxcom_hangup_mid_reply_deadlocks_only_without_the_cure(
    esl_served: EslServed, buffer_ms: str
) -> None:
    """§15: with voxcom's default 20 ms buffer, Pipeswitch's 20 ms lead can block
    injectRawAudio at hangup (the channel sticks and never closes the socket); with
    STREAM_BUFFER_SIZE=40 a hangup mid-reply is clean, and so with longer buffers, whose
    extra length the lead takes (60 ms: 40 ms lead). Either way Pipeswitch's call
    ends: a real FreeSWITCH fires CHANNEL_HANGUP before it closes the media bugs, and
    only the COMPLETE never comes from a stuck channel (seen on 1.10.12, 1 in 4-6
    hangups mid-reply without the cure)."""
    uuid = f"vox-hang-{buffer_ms}"
    variables = recommended_variables("voxcom")
    variables["STREAM_BUFFER_SIZE"] = buffer_ms
    ch = await esl_served.fs.start_call(
        esl_served.url(uuid, "json-stream.esl"), call_uuid=uuid, build="voxcom", variables=variables
    )
    st = ch.stream
    assert st is not None and await st.wait_connected(3.0)
    sessions = esl_served.app.sessions
    assert sessions is not None
    # The greeting is playing and the pipeline runs: hang up the moment a hangup would
    # deadlock, if it can.
    assert await wait_heard(st, st.started_at or 0.0, 5.0) is not None
    assert await until(lambda: uuid in sessions.active, 5.0)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and not st.hangup_would_deadlock:
        await asyncio.sleep(0.001)
    await esl_served.fs.caller_hangup(uuid)
    server = esl_served.app.server
    assert server is not None
    if buffer_ms == "20":
        assert ch.stuck and any("deadlock" in h for h in ch.hazards)
        # The switch cannot lock a channel whose hangup began: to ESL it is gone.
        assert await esl_served.fs.execute_api(f"uuid_exists {uuid}") == "false"
        # At once: no waiting for the CLOSE reply a stuck module never sends (2 s, once).
        assert await until(lambda: server.stats.calls_active == 0, 1.5), (
            "a stuck channel's call must end on CHANNEL_HANGUP "
            f"({server.stats.calls_active} active, {list(sessions.active)})"
        )
        assert st.close_record.close_sent_at is None, "a stuck module closes nothing"
        assert ch.stuck, "the switch's side stays stuck whatever the server does"
        await esl_served.fs.kill_switch_channel(uuid)  # as on the real one
    else:
        assert not ch.stuck and ch.hazards == []
        # The lead followed the buffer: the server filled it, never more.
        assert st.playout.buffer.high_water == 16 * int(buffer_ms), st.playout.buffer.high_water
    assert await until(lambda: server.stats.calls_active == 0, 2.0), (
        f"the call did not end: {server.stats.calls_active} active, {list(sessions.active)}"
    )
