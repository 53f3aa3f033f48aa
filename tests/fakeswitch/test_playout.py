"""What the caller hears: community ::play files, voxcom and cloudfieldcz playout."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import numpy as np

from pipeswitch.bench.fakeswitch.records import EVENT_JSON, EVENT_PLAY
from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig
from tests.fakeswitch.wsserver import FakeServer

BIN = 0x2


def tone(seconds: float, rate: int, amp: int = 8000, hz: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def stream_audio(pcm: bytes, rate: int, **extra: object) -> str:
    data = {"audioDataType": "raw", "sampleRate": rate, "audioData": base64.b64encode(pcm).decode()}
    return json.dumps({"type": "streamAudio", "data": {**data, **extra}})


def nonsilent_runs(flags: list[bool]) -> list[int]:
    runs: list[int] = []
    prev = False
    for f in flags:
        if f and prev:
            runs[-1] += 1
        elif f:
            runs.append(1)
        prev = f
    return runs


async def test_community_writes_play_files_and_fires_play_events(tmp_path: Path) -> None:
    one_second = tone(1.0, 8000)
    bad = stream_audio(b"\x00\x01", 44100)
    async with FakeServer() as srv:
        cfg = StreamConfig(url=srv.url(), uuid="u-1", temp_dir=str(tmp_path))
        async with FakeSwitchStream(cfg) as s:
            assert await s.wait_connected()
            c = await srv.conn()
            c.send_text(stream_audio(one_second, 8000, seq=7))
            c.send_text(bad)
            c.send_text(stream_audio(tone(0.1, 16000), 16000))
            c.send(BIN, tone(0.1, 8000))  # the community build ignores binary
            await s.wait_event(lambda e: sum(x.name == EVENT_PLAY for x in s.events) == 2)
            plays = [e for e in s.events if e.name == EVENT_PLAY]
            f0 = tmp_path / "u-1_0.tmp.r8"
            f1 = tmp_path / "u-1_1.tmp.r16"
            assert f0.read_bytes() == one_second  # 16000 B for 1 s at 8 kHz
            assert f1.exists()
            await asyncio.sleep(0.1)
            played, _ = s.played_audio()
        assert not f0.exists() and not f1.exists()  # deleted on hangup
    assert plays[0].raw == (
        f'{{"audioDataType":"raw","sampleRate":8000,"seq":7,"file":"{tmp_path}/u-1_0.tmp.r8"}}'
    )
    assert plays[1].body["file"] == f"{tmp_path}/u-1_1.tmp.r16"
    js = [e for e in s.events if e.name == EVENT_JSON]
    assert [e.raw for e in js] == [bad]  # failures fall back to ::json with the original text
    assert not any(played)  # nothing is played automatically
    pcm, rx = s.received_audio()
    assert [a.kind for a in rx] == ["streamAudio", "streamAudio"]
    assert len(pcm) == 16000 + 1600  # 16 kHz part resampled to the stream rate


async def test_play_file_hook_and_break(tmp_path: Path) -> None:
    f = tmp_path / "x.r16"
    f.write_bytes(tone(0.2, 16000))
    async with FakeServer() as srv, FakeSwitchStream(StreamConfig(url=srv.url())) as s:
        assert s.play_file(f) == 0.2
        await asyncio.sleep(0.1)
        s.break_playback()
        await asyncio.sleep(0.1)
    _, timeline = s.played_audio()
    n = sum(flag for _, flag in timeline)
    assert 3 <= n <= 7  # ~100 ms played, then uuid_break silenced it


async def test_voxcom_plays_stream_audio_one_frame_per_tick() -> None:
    async with FakeServer() as srv:
        cfg = StreamConfig(url=srv.url(), playback="voxcom")
        async with FakeSwitchStream(cfg) as s:
            assert await s.wait_connected()
            c = await srv.conn()
            t_sent = asyncio.get_running_loop().time()
            c.send_text(stream_audio(tone(0.21, 8000), 8000))
            await asyncio.sleep(0.4)
            assert s.playing  # the last 10 ms wait for more: voxcom writes whole frames only
    assert s.events[-1].name != EVENT_PLAY and s.files == []  # no file, no event
    _, timeline = s.played_audio()
    # All 200 ms are played, nothing dropped (a loaded CI machine may split the run).
    assert sum(nonsilent_runs([f for _, f in timeline])) == 10
    first = s.first_bot_audio_played_after(t_sent)
    rx_t = s.first_bot_audio_received_after(t_sent)
    assert first is not None and rx_t is not None and 0 <= first - rx_t <= 0.025


async def test_voxcom_injection_blocks_the_socket_thread() -> None:
    async with FakeServer() as srv:
        cfg = StreamConfig(url=srv.url(), playback="voxcom")
        async with FakeSwitchStream(cfg) as s:
            assert await s.wait_connected()
            c = await srv.conn()
            await c.wait(lambda c: len(c.of(BIN)) >= 2)
            c.send_text(stream_audio(tone(0.5, 8000), 8000))
            await asyncio.sleep(0.7)
    arrivals = np.array([f.t for f in c.of(BIN)])
    gaps = np.diff(arrivals)
    assert gaps.max() > 0.35  # caller audio stalled while the bot audio was injected
    assert (gaps[gaps.argmax() + 1 : gaps.argmax() + 10] < 0.005).all()  # then one burst


async def test_cloudfieldcz_binary_playout_and_clear_audio() -> None:
    async with FakeServer() as srv:
        cfg = StreamConfig(url=srv.url(), playback="cloudfieldcz")
        async with FakeSwitchStream(cfg) as s:
            assert await s.wait_connected()
            c = await srv.conn()
            c.send(BIN, tone(2.0, 8000))
            await asyncio.sleep(0.1)
            c.send_text('{"type":"clearAudio"}')
            ev = await s.wait_event(EVENT_JSON)
            await asyncio.sleep(0.1)
            assert not s.playing
    assert ev.raw == '{"type":"clearAudio"}'  # clearAudio still fires ::json
    _, timeline = s.played_audio()
    runs = nonsilent_runs([f for _, f in timeline])
    assert len(runs) == 1 and 4 <= runs[0] <= 8  # ~100 ms of the 2 s, then flushed
    pcm, rx = s.received_audio()
    assert len(pcm) == 32000 and rx[0].kind == "binary" and rx[0].non_silent


async def test_cloudfieldcz_keeps_the_write_leg_active_for_stereo() -> None:
    async with FakeServer() as srv:
        cfg = StreamConfig(url=srv.url(), playback="cloudfieldcz", mix="stereo")
        async with FakeSwitchStream(cfg) as s:
            assert await s.wait_connected()
            c = await srv.conn()
            await asyncio.sleep(0.1)
            assert c.of(BIN) == []  # stereo: nothing until FS writes to the channel
            c.send(BIN, tone(0.04, 8000))  # two frames, then injected silence
            await asyncio.sleep(0.2)
    assert len(c.of(BIN)) >= 8
    assert all(len(f.payload) == 640 for f in c.of(BIN))
