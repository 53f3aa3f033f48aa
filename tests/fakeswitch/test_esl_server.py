"""The ESL half of the FreeSWITCH emulator, driven by the real ESL client and raw bytes."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

from pipeswitch.bench.fakeswitch.esl import FakeSwitchEsl, recommended_variables
from pipeswitch.processors.tools import EslCallActions
from pipeswitch.transports.call_control import (
    EVENT_CHANNEL_HANGUP,
    EVENT_CHANNEL_HANGUP_COMPLETE,
    EVENT_DTMF,
    MAS_PLAY,
    CallControl,
    CallControlUnavailable,
    CallEvent,
    CommandFailed,
)
from pipeswitch.transports.esl import EslClient, EslMessage, EslParser, parse_event_plain
from tests.fakeswitch.wsserver import FakeServer

pytestmark = pytest.mark.asyncio(loop_scope="session")


def tone(secs: float, rate: int = 8000, amp: int = 8000) -> bytes:
    t = np.arange(int(secs * rate)) / rate
    return (amp * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()


def stream_audio(pcm: bytes, rate: int = 8000, seq: int = 0) -> str:
    b64 = base64.b64encode(pcm).decode()
    return (
        f'{{"type":"streamAudio","data":{{"audioDataType":"raw","sampleRate":{rate},'
        f'"seq":{seq},"audioData":"{b64}"}}}}'
    )


@pytest_asyncio.fixture(loop_scope="session")
async def fs() -> AsyncIterator[FakeSwitchEsl]:
    async with FakeSwitchEsl(password="s3cret") as fs:
        yield fs


@pytest_asyncio.fixture(loop_scope="session")
async def esl(fs: FakeSwitchEsl) -> AsyncIterator[EslClient]:
    client = EslClient("127.0.0.1", fs.port, "s3cret", backoff_initial=0.05)
    await client.start()
    assert await client.wait_connected(3.0)
    yield client
    await client.close()


async def test_raw_protocol_login_api_and_disconnect_notice(fs: FakeSwitchEsl) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fs.port)
    p = EslParser()

    async def read_msgs(n: int) -> list[EslMessage]:
        got: list[EslMessage] = []
        while len(got) < n:
            got.extend(p.feed(await asyncio.wait_for(reader.read(65536), 2)))
        return got

    (auth,) = await read_msgs(1)
    assert auth.content_type == "auth/request"
    writer.write(b"api status\n\n")  # before auth
    (r,) = await read_msgs(1)
    assert not r.ok
    writer.write(b"auth s3cret\n\n")
    (r,) = await read_msgs(1)
    assert r.reply_text == "+OK accepted"
    writer.write(b"event plain BACKGROUND_JOB\n\napi status\n\n")
    sub, api = await read_msgs(2)
    assert sub.reply_text == "+OK event listener enabled plain"
    assert api.content_type == "api/response" and b"FreeSWITCH" in api.body
    writer.write(b"bgapi uuid_exists nope\nJob-UUID: j-1\n\n")
    reply, job = await read_msgs(2)
    assert reply.reply_text == "+OK Job-UUID: j-1" and reply.headers["Job-UUID"] == "j-1"
    ev = parse_event_plain(job.body)
    assert ev.name == "BACKGROUND_JOB" and ev.headers["Job-UUID"] == "j-1"
    assert ev.body == "false"
    writer.write(b"exit\n\n")
    bye, notice = await read_msgs(2)
    assert notice.content_type == "text/disconnect-notice"
    assert await reader.read() == b""
    writer.close()


async def test_wrong_password_is_refused_and_never_logged(fs: FakeSwitchEsl) -> None:
    client = EslClient("127.0.0.1", fs.port, "wrong-pw-xyz", backoff_initial=0.05)
    await client.start()
    assert not await client.wait_connected(0.5)
    assert client.stats.auth_failures >= 1
    assert "wrong-pw-xyz" not in repr(client)
    assert all("wrong-pw-xyz" not in c.command for c in fs.commands)
    with pytest.raises(CallControlUnavailable):
        await client.api("status")
    await client.close()


async def test_client_implements_call_control(esl: EslClient) -> None:
    assert isinstance(esl, CallControl)
    assert "FreeSWITCH" in await esl.api("status")
    assert await esl.bgapi("uuid_exists nobody") == "false"
    with pytest.raises(CommandFailed, match="No such channel"):
        await esl.api("uuid_break nobody all")
    with pytest.raises(CommandFailed, match="No such channel"):
        await esl.hangup("nobody")
    with pytest.raises(CommandFailed, match="invalid session id"):
        await esl.play_file("nobody", "/tmp/x.r8")


async def test_playback_is_heard_gapless_and_break_silences(
    fs: FakeSwitchEsl, esl: EslClient
) -> None:
    async with FakeServer() as ws:
        ch = await fs.start_call(ws.url("/fs/play1"), call_uuid="play1")
        st = ch.stream
        assert st is not None
        plays: list[CallEvent] = []
        unsub = esl.subscribe("play1", plays.append)
        conn = await ws.conn()
        t_sent = time.monotonic()
        conn.send_text(stream_audio(tone(0.5), seq=0))
        conn.send_text(stream_audio(tone(0.5), seq=1))
        deadline = time.monotonic() + 2
        while len([e for e in plays if e.kind == MAS_PLAY]) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        files = [e for e in plays if e.kind == MAS_PLAY]
        assert len(files) == 2
        for e in files:  # what the bridge does with each ::play
            await esl.play_file("play1", e.body.split('"file":"')[1].split('"')[0])
        await asyncio.sleep(0.6)
        first = st.first_bot_audio_played_after(t_sent)
        assert first is not None
        assert 0.03 < first - t_sent < 0.2  # ~60 ms on a real FreeSWITCH
        _, frames = st.played_audio()
        voiced = [t for t, v in frames if v and t >= first]
        assert len(voiced) >= 25  # both files, back to back (0.6 s of 1 s elapsed)
        gaps = np.diff(voiced)
        assert gaps.max() < 0.03, "gap between queued files"
        t_break = time.monotonic()
        await esl.break_playback("play1")
        await asyncio.sleep(0.15)
        _, frames = st.played_audio()
        after = [t for t, v in frames if v and t > t_break + 0.05]
        assert after == [], "still playing after uuid_break all"
        assert fs.channels["play1"].breaks
        unsub()
        await fs.hangup("play1")


async def test_dtmf_and_hangup_events_reach_subscribers(fs: FakeSwitchEsl, esl: EslClient) -> None:
    async with FakeServer() as ws:
        await fs.start_call(ws.url("/fs/dtmf1"), call_uuid="dtmf1")
        got: list[CallEvent] = []
        esl.subscribe("dtmf1", got.append)
        other: list[CallEvent] = []
        esl.subscribe("someone-else", other.append)
        await ws.conn()
        fs.inject_dtmf("dtmf1", "#")
        fs.inject_dtmf("dtmf1", "5")
        await fs.caller_hangup("dtmf1")
        deadline = time.monotonic() + 2
        while len(got) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert [e.dtmf_digit for e in got if e.name == EVENT_DTMF] == ["#", "5"]
        # As FreeSWITCH fires them: CHANNEL_HANGUP when the hangup starts, then COMPLETE.
        assert [e.name for e in got[2:]] == [EVENT_CHANNEL_HANGUP, EVENT_CHANNEL_HANGUP_COMPLETE]
        assert all(e.hangup_cause == "NORMAL_CLEARING" for e in got[2:])
        assert other == []


async def test_kill_transfer_send_dtmf_issue_the_commands(
    fs: FakeSwitchEsl, esl: EslClient
) -> None:
    async with FakeServer() as ws:
        ch = await fs.start_call(ws.url("/fs/ctl1"), call_uuid="ctl1")
        await ws.conn()
        await esl.transfer("ctl1", "1001", "XML", "pbx.example.com")
        await esl.send_dtmf("ctl1", "12#")
        assert ch.transfers == [("1001", "XML", "pbx.example.com")]
        assert ch.dtmf_sent == ["12#"]
        with pytest.raises(ValueError):
            await esl.transfer("ctl1", "1001 XML default\n\napi shutdown")
        await esl.hangup("ctl1", "NORMAL_CLEARING")
        deadline = time.monotonic() + 2
        while ch.up and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not ch.up and ch.hangup_cause == "NORMAL_CLEARING"
        assert ch.stream is not None and ch.stream.close_record.initiator == "local"


async def test_esl_lost_fails_fast_then_reconnects(fs: FakeSwitchEsl) -> None:
    client = EslClient("127.0.0.1", fs.port, "s3cret", backoff_initial=0.05, backoff_max=0.2)
    await client.start()
    assert await client.wait_connected(3.0)
    outage = asyncio.ensure_future(fs.outage(0.5))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    with pytest.raises(CallControlUnavailable):
        await client.api("status")
    assert time.monotonic() - t0 < 0.05, "a command while down must fail at once"
    await outage
    assert await client.wait_connected(3.0)
    assert "FreeSWITCH" in await client.api("status")
    assert client.stats.connects == 2
    await client.close()


async def test_call_that_ended_during_an_outage_gets_a_hangup_event(fs: FakeSwitchEsl) -> None:
    client = EslClient("127.0.0.1", fs.port, "s3cret", backoff_initial=0.05, backoff_max=0.2)
    await client.start()
    assert await client.wait_connected(3.0)
    async with FakeServer() as ws:
        await fs.start_call(ws.url("/fs/gone1"), call_uuid="gone1")
        got: list[CallEvent] = []
        client.subscribe("gone1", got.append)
        await ws.conn()
        fs.drop_clients()
        await asyncio.sleep(0.01)
        await fs.hangup("gone1")  # fired while nobody listens
        deadline = time.monotonic() + 3
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert got and got[0].name == EVENT_CHANNEL_HANGUP_COMPLETE
    await client.close()


async def test_a_call_on_another_switch_is_not_ended_on_reconnect(fs: FakeSwitchEsl) -> None:
    """A fleet: the stream came from a FreeSWITCH this client is not connected to."""
    client = EslClient("127.0.0.1", fs.port, "s3cret", backoff_initial=0.05, backoff_max=0.2)
    await client.start()
    assert await client.wait_connected(3.0)
    got: list[CallEvent] = []
    client.subscribe("on-another-switch", got.append)
    fs.drop_clients()
    await asyncio.sleep(0.5)  # reconnected and checked its calls
    assert client.connected and not got
    await client.close()


@pytest.mark.parametrize("buffer_ms,stuck", [(20, True), ("40", False)])
async def test_voxcom_hangup_deadlock_is_detectable_and_cured(
    fs: FakeSwitchEsl, esl: EslClient, buffer_ms: int | str, stuck: bool
) -> None:
    """§15: voxcom's injectRawAudio blocks with audio queued; hangup then never completes."""
    variables = recommended_variables("voxcom")
    variables["STREAM_BUFFER_SIZE"] = str(buffer_ms)
    uuid = f"vox-{buffer_ms}"
    got: list[str] = []
    esl.subscribe(uuid, lambda ev: got.append(ev.name) if ev.name.startswith("CHANNEL_") else None)
    async with FakeServer() as ws:
        ch = await fs.start_call(
            ws.url(f"/fs/{uuid}"), call_uuid=uuid, build="voxcom", variables=variables
        )
        conn = await ws.conn()
        st = ch.stream
        assert st is not None

        async def server_with_20ms_lead() -> None:
            """Like Pipeswitch's json-stream: 20 ms messages, one ahead of real time."""
            conn.send_text(stream_audio(tone(0.02), seq=0))
            for i in range(1, 40):
                conn.send_text(stream_audio(tone(0.02), seq=i))
                await asyncio.sleep(0.02)

        sender = asyncio.ensure_future(server_with_20ms_lead())
        # Hang up the moment bot audio blocks the module's receive thread, if it ever does.
        while not sender.done() and not st.hangup_would_deadlock:
            await asyncio.sleep(0.001)
        await fs.hangup(uuid)
        sender.cancel()
        assert ch.stuck is stuck
        assert any("deadlock" in h for h in ch.hazards) is stuck
        # The hangup's start is announced either way; a stuck channel never completes it.
        want = (
            [EVENT_CHANNEL_HANGUP]
            if stuck
            else [EVENT_CHANNEL_HANGUP, EVENT_CHANNEL_HANGUP_COMPLETE]
        )
        deadline = time.monotonic() + 1.0
        while len(got) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert got == want
        if stuck:
            # Seen on FreeSWITCH 1.10.12: a channel whose hangup began cannot be located
            # (uuid_exists false, uuid_* "No such channel") though `show channels` lists it.
            assert await fs.execute_api(f"uuid_exists {uuid}") == "false"
            assert (await fs.execute_api(f"uuid_kill {uuid}")).startswith("-ERR No such channel")
            await fs.kill_switch_channel(uuid)  # the only way out, as on a real switch


async def test_cloudfieldcz_needs_send_silence_when_idle(fs: FakeSwitchEsl) -> None:
    async with FakeServer() as ws:
        bad = await fs.start_call(ws.url("/fs/cf-bad"), call_uuid="cf-bad", build="cloudfieldcz")
        good = await fs.start_call(
            ws.url("/fs/cf-good"),
            call_uuid="cf-good",
            build="cloudfieldcz",
            variables=recommended_variables("cloudfieldcz"),
        )
        await ws.conn()
        deadline = time.monotonic() + 3
        while len(ws.conns) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        for c in ws.conns:
            c.send(2, tone(0.3))
        await asyncio.sleep(0.4)
        assert bad.stream is not None and good.stream is not None
        heard = {}
        for ch in (bad, good):
            assert ch.stream is not None
            heard[ch.uuid] = ch.stream.first_bot_audio_played_after(t0)
        assert heard["cf-good"] is not None
        assert heard["cf-bad"] is None
        assert any("send_silence_when_idle" in h for h in bad.hazards)
        await fs.hangup("cf-bad")
        await fs.hangup("cf-good")


async def test_only_subscribed_calls_events_cross_the_wire(
    fs: FakeSwitchEsl, esl: EslClient
) -> None:
    async with FakeServer() as ws:
        await fs.start_call(ws.url("/fs/f-mine"), call_uuid="f-mine")
        await fs.start_call(ws.url("/fs/f-other"), call_uuid="f-other")
        got: list[CallEvent] = []
        unsubscribe = esl.subscribe("f-mine", got.append)
        await asyncio.sleep(0.1)  # the filter is in
        n, mine = esl.stats.events, len(got)
        fs.inject_dtmf("f-other", "1")
        fs.inject_dtmf("f-mine", "2")
        deadline = time.monotonic() + 2
        while not any(e.name == EVENT_DTMF for e in got) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert [e.dtmf_digit for e in got if e.name == EVENT_DTMF] == ["2"]
        # Every event that reached this process was one of this call's.
        assert esl.stats.events - n == len(got) - mine, "another call's event came through"
        unsubscribe()
        await asyncio.sleep(0.05)
        n = esl.stats.events
        fs.inject_dtmf("f-mine", "3")
        await asyncio.sleep(0.1)
        assert esl.stats.events == n
        await fs.hangup("f-mine")
        await fs.hangup("f-other")


async def test_uuid_audio_stream_over_esl(fs: FakeSwitchEsl, esl: EslClient) -> None:
    async with FakeServer() as ws:
        ch = fs.new_channel("mas-1", variables=recommended_variables("community"))
        with pytest.raises(CommandFailed, match="no bug"):
            await esl.api("uuid_audio_stream mas-1 send_text hi")
        reply = await esl.api(f"uuid_audio_stream mas-1 start {ws.url('/fs/mas-1')} mono 8k")
        assert reply.startswith("+OK")
        conn = await ws.conn()
        with pytest.raises(CommandFailed, match="already attached"):
            await esl.api(f"uuid_audio_stream mas-1 start {ws.url('/fs/mas-1')} mono 8k")
        assert await esl.api('uuid_audio_stream mas-1 send_text {"event":"dtmf","digit":"5"}')
        await conn.wait(lambda c: bool(c.of(0x1)))
        assert conn.of(0x1)[0].payload == b'{"event":"dtmf","digit":"5"}'
        await esl.bgapi("uuid_audio_stream mas-1 stop")
        assert ch.stream is not None and ch.stream.close_record.initiator == "local"
        await fs.hangup("mas-1")


async def test_transfer_ends_when_a_stuck_channel_hangs_up(
    fs: FakeSwitchEsl, esl: EslClient
) -> None:
    """The caller hangs up while the transfer rings and the voxcom module sticks in its
    cleanup: CHANNEL_HANGUP is all the switch sends (as FreeSWITCH 1.10.12 did), and the
    transfer must report the hangup at once, not wait out the ring time."""
    variables = recommended_variables("voxcom")
    variables["STREAM_BUFFER_SIZE"] = "20"
    uuid = "vox-xfer-stuck"
    async with FakeServer() as ws:
        ch = await fs.start_call(
            ws.url(f"/fs/{uuid}"), call_uuid=uuid, build="voxcom", variables=variables
        )
        conn = await ws.conn()
        st = ch.stream
        assert st is not None
        actions = EslCallActions(esl, uuid)
        transfer = asyncio.ensure_future(actions.transfer("1001", "default", ring_secs=5.0))

        async def server_with_20ms_lead() -> None:
            conn.send_text(stream_audio(tone(0.02), seq=0))
            for i in range(1, 100):
                conn.send_text(stream_audio(tone(0.02), seq=i))
                await asyncio.sleep(0.02)

        sender = asyncio.ensure_future(server_with_20ms_lead())
        while not sender.done() and not st.hangup_would_deadlock:
            await asyncio.sleep(0.001)
        t0 = time.monotonic()
        await fs.hangup(uuid)
        sender.cancel()
        assert ch.stuck
        assert await asyncio.wait_for(transfer, 2.0) == "caller_hung_up"
        assert time.monotonic() - t0 < 1.0
        await fs.kill_switch_channel(uuid)
