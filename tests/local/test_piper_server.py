"""Piper TTS server: real synthesis through Pipecat's unmodified ``PiperHttpTTSService``."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from pipecat.frames.frames import TTSAudioRawFrame, TTSSpeakFrame
from pipecat.pipeline.worker import PipelineParams
from pipecat.services.piper.tts import PiperHttpTTSService
from pipecat.tests.utils import run_test

from pipeswitch.pipelines.local.supervisor import LocalModelServers, LocalServerError
from pipeswitch.pipelines.piper_client import wav_pcm

pytestmark = pytest.mark.asyncio(loop_scope="session")

GREETING = "Thank you for calling Riverside Dental. How can I help you today?"


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


async def post_tts(session: aiohttp.ClientSession, url: str, text: str) -> tuple[int, bytes]:
    async with session.post(url, json={"text": text, "voice": None}) as resp:
        return resp.status, await resp.read()


async def metrics(session: aiohttp.ClientSession, servers: LocalModelServers) -> dict:
    async with session.get(f"{servers.piper_base}/metrics") as resp:
        return await resp.json()


async def test_pipecat_piper_http_service_8k(piper_servers: LocalModelServers) -> None:
    async with aiohttp.ClientSession() as session:
        tts = PiperHttpTTSService(base_url=piper_servers.piper_url(8000), aiohttp_session=session)
        down, _ = await run_test(
            tts,
            frames_to_send=[TTSSpeakFrame(GREETING)],
            pipeline_params=PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000),
            start_timeout=5.0,
        )
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio, f"no audio frames: {[type(f).__name__ for f in down]}"
    assert {f.sample_rate for f in audio} == {8000}
    assert {f.num_channels for f in audio} == {1}
    pcm = b"".join(f.audio for f in audio)
    seconds = len(pcm) / 2 / 8000
    assert 2.0 < seconds < 10.0, seconds
    assert rms(pcm) > 500, "audio is (near) silent"
    # The 44-byte header must have been stripped, not played as audio.
    assert not pcm.startswith(b"RIFF")


async def test_stream_format_and_per_sentence_flush(piper_servers: LocalModelServers) -> None:
    text = "Sure, I can help with that. Which day works best for you? We open at eight."
    chunks: list[bytes] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(piper_servers.piper_url(16000), json={"text": text}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "audio/wav"
        async for chunk in resp.content.iter_any():
            chunks.append(chunk)
    first = chunks[0]
    assert len(first) > 44 and first.startswith(b"RIFF") and first[8:12] == b"WAVE"
    riff_size, rate, data_size = (
        struct.unpack("<I", first[4:8])[0],
        struct.unpack("<I", first[24:28])[0],
        struct.unpack("<I", first[40:44])[0],
    )
    assert (riff_size, rate, data_size) == (0xFFFFFFFF, 16000, 0xFFFFFFFF)
    assert len(chunks) >= 2, "expected audio to arrive sentence by sentence"
    assert rms(wav_pcm(b"".join(chunks))[0]) > 500


async def test_cache_hit_on_repeat(piper_servers: LocalModelServers) -> None:
    url = piper_servers.piper_url(8000)
    text = "One moment please, while I check the calendar."
    async with aiohttp.ClientSession() as session:
        before = await metrics(session, piper_servers)
        status1, body1 = await post_tts(session, url, text)
        status2, body2 = await post_tts(
            session, url, "  One moment please,  while I check the calendar. "
        )
        after = await metrics(session, piper_servers)
    assert status1 == status2 == 200
    assert body1 == body2
    assert after["cache_hits"] == before["cache_hits"] + 1
    assert after["cache_misses"] == before["cache_misses"] + 1
    assert after["ttfa_cached"]["last_s"] < 0.05


async def test_warm_pins_phrases(piper_servers: LocalModelServers) -> None:
    phrases = ["Hello, you have reached Riverside Dental.", "Goodbye and have a nice day."]
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{piper_servers.piper_base}/warm", json={"texts": phrases, "rate": 8000}
        ) as resp:
            assert resp.status == 200
            result = await resp.json()
        assert result["warmed"][0]["synthesized"] + result["warmed"][0]["already_cached"] == 2
        before = await metrics(session, piper_servers)
        status, body = await post_tts(session, piper_servers.piper_url(8000), phrases[0])
        after = await metrics(session, piper_servers)
    assert status == 200 and rms(wav_pcm(body)[0]) > 500
    assert after["cache_hits"] == before["cache_hits"] + 1


async def test_bad_requests(piper_servers: LocalModelServers) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(piper_servers.piper_url(None), json={"voice": None}) as resp:
            assert resp.status == 400
        async with session.post(
            f"{piper_servers.piper_base}/tts?rate=12345", json={"text": "hi"}
        ) as resp:
            assert resp.status == 400
        async with session.post(
            piper_servers.piper_url(8000), json={"text": "hi", "voice": "en_GB-nobody"}
        ) as resp:
            assert resp.status == 400
        async with session.get(f"{piper_servers.piper_base}/health") as resp:
            health = await resp.json()
    assert health["status"] == "ok" and health["voices"] == ["en_US-joe-medium"]


async def test_native_rate_without_query(piper_servers: LocalModelServers) -> None:
    async with aiohttp.ClientSession() as session:
        status, body = await post_tts(session, piper_servers.piper_url(None), "Hi there.")
    assert status == 200
    assert struct.unpack("<I", body[24:28])[0] == 22050


async def test_piper_only_mode(piper_servers: LocalModelServers) -> None:
    assert set(piper_servers.children) == {"piper"}
    with pytest.raises(LocalServerError):
        _ = piper_servers.whisper_base_url
    with pytest.raises(LocalServerError):
        _ = piper_servers.llm_base_url
    health = await piper_servers.health()
    assert health["piper"]["ok"] and health["piper"]["alive"]
    assert piper_servers.dead() == []


async def test_dead_child_reported_and_queue_full() -> None:
    servers = LocalModelServers.piper_only(
        extra_args={"piper": ["--max-queue", "0"]}, piper_warm=["Hello there."]
    )
    async with servers:
        url = servers.piper_url(8000)
        async with aiohttp.ClientSession() as session:
            warmed = await metrics(session, servers)
            assert warmed["cache_entries"] == 1  # --warm at start-up
            status, _ = await post_tts(session, url, "Hello there.")
            assert status == 200 and (await metrics(session, servers))["cache_hits"] == 1
        long_text = " ".join(f"This is sentence number {i} of a long reply." for i in range(8))
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(post_tts(session, url, f"{long_text} Variant {i}.") for i in range(3))
            )
        statuses = sorted(s for s, _ in results)
        assert statuses[0] == 200 and 503 in statuses, statuses

        pid = servers.children["piper"].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.3)
        assert servers.dead() == ["piper"]
        health = await servers.health()
        assert health["piper"]["alive"] is False and health["piper"]["ok"] is False
        with pytest.raises(LocalServerError, match="piper"):
            servers.require_alive()


async def test_refuses_non_loopback_host() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeswitch.pipelines.local.piper_server",
        "--host",
        "0.0.0.0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode != 0
    assert b"non-loopback" in stderr
    assert stdout == b""


async def test_supervisor_reports_startup_failure(tmp_path: Path) -> None:
    """A child that dies before its ready line yields a clear error with its stderr tail."""
    servers = LocalModelServers.piper_only(piper_voice=str(tmp_path / "missing.onnx"))
    with pytest.raises(
        Exception, match=r"(?s)piper server exited with code 2 .*not found: .*missing\.onnx"
    ):
        await servers.start()
    assert servers.dead() == ["piper"]


async def test_hangup_mid_stream_stops_synthesis(piper_servers: LocalModelServers) -> None:
    text = " ".join(f"Here is sentence number {i} of a rather long answer." for i in range(12))
    async with aiohttp.ClientSession() as session:
        before = await metrics(session, piper_servers)
        async with session.post(piper_servers.piper_url(8000), json={"text": text}) as resp:
            first = await resp.content.readany()
            assert first.startswith(b"RIFF")
            resp.close()  # barge-in: drop the connection after the first sentence
        after = before
        for _ in range(50):
            await asyncio.sleep(0.1)
            after = await metrics(session, piper_servers)
            if after["disconnects"] > before["disconnects"] and after["in_flight"] == 0:
                break
        status, body = await post_tts(session, piper_servers.piper_url(8000), "Still here.")
    assert after["disconnects"] == before["disconnects"] + 1
    assert after["sentences"] - before["sentences"] < 12, "kept synthesising after hang-up"
    assert status == 200 and rms(wav_pcm(body)[0]) > 500


async def test_identical_requests_share_one_synthesis(piper_servers: LocalModelServers) -> None:
    """Calls asking for the same sentence at once get one synthesis, not one each (they
    used to fill the queue until callers got 503s); one hanging up does not cut the
    others' audio short."""
    url = piper_servers.piper_url(8000)
    text = "Our front desk is open until six tonight. Shall I book you in for tomorrow?"
    async with aiohttp.ClientSession() as session:
        before = await metrics(session, piper_servers)

        async def hang_up_after_first_chunk() -> None:
            async with session.post(url, json={"text": text}) as resp:
                assert (await resp.content.readany()).startswith(b"RIFF")
                resp.close()

        results, _ = await asyncio.gather(
            asyncio.gather(*(post_tts(session, url, text) for _ in range(5))),
            hang_up_after_first_chunk(),
        )
        after = await metrics(session, piper_servers)
        status, again = await post_tts(session, url, text)
    bodies = [body for _, body in results]
    assert all(s == 200 for s, _ in results)
    assert len(set(bodies)) == 1 and rms(wav_pcm(bodies[0])[0]) > 500
    assert after["cache_misses"] == before["cache_misses"] + 1
    assert after["coalesced"] == before["coalesced"] + 5
    assert after["sentences"] - before["sentences"] == 2  # synthesized once
    assert status == 200 and again == bodies[0]  # and cached whole
