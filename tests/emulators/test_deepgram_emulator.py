"""The real ``DeepgramSTTService`` (deepgram-sdk 7.17) against the Deepgram emulator.

Timing assertions are loose (a window of [-30 ms, +300 ms] around the
configured latency) so they hold on a busy 2-core CI box.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pipecat.frames.frames import (
    ErrorFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.services.deepgram.stt import DeepgramSTTService

from pipeswitch.bench.emulators import DeepgramFaults, EmulatorConfig, run_emulators
from tests.emulators.helpers import running_pipeline, silence, voiced

SR = 16000
TTFS_MS = 250.0


def _config(**kw: object) -> EmulatorConfig:
    # p95 <= median: a constant latency, so the test can check it.
    base: dict[str, object] = {
        "deepgram_ttfs_median_ms": TTFS_MS,
        "deepgram_ttfs_p95_ms": 0.0,
        "stt_script": ["What are your opening hours?", "Can I book for Tuesday?"],
    }
    base.update(kw)
    return EmulatorConfig(**base)  # type: ignore[arg-type]


def _assert_latency(measured_s: float, expected_ms: float) -> None:
    assert expected_ms - 30 <= measured_s * 1000 <= expected_ms + 300, measured_s


async def test_final_transcript_arrives_ttfs_after_true_speech_end() -> None:
    async with run_emulators(_config()) as emu:
        stt = DeepgramSTTService(api_key="emulated", base_url=emu.deepgram_url, sample_rate=SR)
        async with running_pipeline(stt, SR) as h:
            sent = await h.stream_audio(voiced(1.0, SR))
            speech_end = sent[-1]  # the last speech frame left in real time
            silence_task = asyncio.create_task(h.stream_audio(silence(0.8, SR)))
            [(t, frame)] = await h.down.wait_for(TranscriptionFrame, 2.0)
            await silence_task
            # Second utterance gets the next script line.
            await h.stream_audio(voiced(0.6, SR))
            silence_task = asyncio.create_task(h.stream_audio(silence(0.6, SR)))
            finals = await h.down.wait_for(TranscriptionFrame, 2.0, count=2)
            await silence_task

    assert frame.text == "What are your opening hours?"
    _assert_latency(t - speech_end, TTFS_MS)
    assert finals[1][1].text == "Can I book for Tuesday?"
    # Interims while speaking, partial text of the same line.
    interims = [f.text for _, f in h.down.of_type(InterimTranscriptionFrame)]
    assert interims and all("What are your opening hours?".startswith(x) for x in interims[:2])

    [stream] = emu.deepgram.streams
    # The query the SDK really sends, and its auth scheme.
    assert stream.auth_scheme == "token"
    assert stream.query["encoding"] == "linear16"
    assert stream.query["sample_rate"] == str(SR)
    assert stream.query["interim_results"] == "true"
    assert stream.query["model"] == "nova-3-general"
    assert stream.close_stream  # the service sends CloseStream when it stops
    first = stream.utterances[0]
    assert first.speech_final and not first.from_finalize
    assert first.speech_end_audio_s == pytest.approx(1.0, abs=0.03)
    # Result timestamps are audio positions.
    result = frame.result
    assert result is not None
    assert result.start == pytest.approx(0.0, abs=0.05)
    assert result.duration == pytest.approx(1.0, abs=0.05)


async def test_vad_stop_sends_finalize_and_gets_from_finalize_final() -> None:
    """Pipecat sends Finalize on VADUserStoppedSpeakingFrame; the final says from_finalize."""
    async with run_emulators(_config()) as emu:
        stt = DeepgramSTTService(api_key="emulated", base_url=emu.deepgram_url, sample_rate=SR)
        async with running_pipeline(stt, SR) as h:
            sent = await h.stream_audio(voiced(0.8, SR))
            speech_end = sent[-1]
            silence_task = asyncio.create_task(h.stream_audio(silence(0.6, SR)))
            await asyncio.sleep(0.2)  # Silero's default stop_secs
            await h.worker.queue_frame(
                VADUserStoppedSpeakingFrame(stop_secs=0.2, timestamp=time.time())
            )
            [(t, frame)] = await h.down.wait_for(TranscriptionFrame, 2.0)
            await silence_task

            # A Finalize with nothing pending is answered at once with an empty final.
            await h.worker.queue_frame(
                VADUserStoppedSpeakingFrame(stop_secs=0.2, timestamp=time.time())
            )
            await asyncio.sleep(0.2)

    _assert_latency(t - speech_end, TTFS_MS)
    assert frame.finalized  # request_finalize() + from_finalize -> confirm_finalize()
    assert frame.result is not None and frame.result.from_finalize is True
    [stream] = emu.deepgram.streams
    assert stream.finalizes == 2
    assert stream.utterances[0].from_finalize and stream.utterances[0].finalize_at is not None
    assert stream.empty_finals_sent == 1
    assert len(h.down.of_type(TranscriptionFrame)) == 1  # the empty final makes no frame


async def test_finalize_after_an_endpointed_final_is_answered_empty() -> None:
    """A late Finalize (VAD stop_secs > TTFS) finds the final already sent."""
    async with run_emulators(_config(deepgram_ttfs_median_ms=100.0)) as emu:
        stt = DeepgramSTTService(api_key="emulated", base_url=emu.deepgram_url, sample_rate=SR)
        async with running_pipeline(stt, SR) as h:
            await h.stream_audio(voiced(0.5, SR))
            silence_task = asyncio.create_task(h.stream_audio(silence(0.5, SR)))
            await h.down.wait_for(TranscriptionFrame, 2.0)
            await h.worker.queue_frame(
                VADUserStoppedSpeakingFrame(stop_secs=0.3, timestamp=time.time())
            )
            await silence_task
    [stream] = emu.deepgram.streams
    assert stream.finals_sent == 1 and stream.empty_finals_sent == 1
    assert stream.utterances[0].speech_final and not stream.utterances[0].from_finalize


async def test_short_noise_burst_is_not_an_utterance() -> None:
    async with run_emulators(_config()) as emu:
        stt = DeepgramSTTService(api_key="emulated", base_url=emu.deepgram_url, sample_rate=8000)
        async with running_pipeline(stt, 8000) as h:
            await h.stream_audio(silence(0.2, 8000) + voiced(0.06, 8000) + silence(0.5, 8000))
    assert not h.down.of_type(TranscriptionFrame)
    [stream] = emu.deepgram.streams
    assert all(u.discarded for u in stream.utterances)
    assert stream.query["sample_rate"] == "8000"


async def test_rejected_key_gives_permanent_error_not_a_hang() -> None:
    async with run_emulators(_config(deepgram_faults=DeepgramFaults(reject_status=401))) as emu:
        stt = DeepgramSTTService(api_key="emulated", base_url=emu.deepgram_url, sample_rate=SR)
        async with running_pipeline(stt, SR) as h:
            [(_, err)] = await h.up.wait_for(ErrorFrame, 5.0)
            assert "401" in err.error
            assert not stt.is_usable
    assert emu.deepgram.rejected == 1 and not emu.deepgram.streams


async def test_a_fault_for_one_region_leaves_the_other_answering() -> None:
    """``/eu/v1/listen`` is a second endpoint of the same emulator; a fault scoped to the
    plain path (``region=""``) refuses it there only, as when one region is down."""
    faults = DeepgramFaults(reject_status=500, region="")
    async with run_emulators(_config(deepgram_faults=faults)) as emu:
        eu = DeepgramSTTService(
            api_key="emulated", base_url=f"{emu.deepgram_url}/eu", sample_rate=SR
        )
        async with running_pipeline(eu, SR) as h:
            await h.stream_audio(voiced(0.6, SR))
            silence_task = asyncio.create_task(h.stream_audio(silence(0.6, SR)))
            [(_, frame)] = await h.down.wait_for(TranscriptionFrame, 2.0)
            await silence_task
        assert frame.text == "What are your opening hours?"
        assert emu.deepgram.rejected == 0
        home = DeepgramSTTService(api_key="emulated", base_url=emu.deepgram_url, sample_rate=SR)
        async with running_pipeline(home, SR) as h:
            await h.up.wait_for(ErrorFrame, 5.0)
        assert emu.deepgram.rejected >= 1


async def test_provider_drop_mid_call_reports_error_and_reconnects() -> None:
    """The stream is aborted after the first final; the service errors, then reconnects.

    Pipecat waits ``exponential_backoff_time(1)`` = 4 s before reconnecting, so
    this test takes ~6 s. ``tag`` keys the script position, so the reconnected
    stream carries on with the call's next line.
    """
    faults = DeepgramFaults(drop_after_utterances=1, connections=1)
    async with run_emulators(_config(deepgram_faults=faults)) as emu:
        stt = DeepgramSTTService(
            api_key="emulated", base_url=emu.deepgram_url, sample_rate=SR, tag="call-1"
        )
        async with running_pipeline(stt, SR) as h:
            await h.stream_audio(voiced(0.5, SR))
            silence_task = asyncio.create_task(h.stream_audio(silence(0.4, SR)))
            await h.down.wait_for(TranscriptionFrame, 2.0)
            await silence_task
            [(_, err)] = await h.up.wait_for(ErrorFrame, 2.0)
            assert stt.is_usable  # a dropped connection is retried, not fatal
            deadline = time.monotonic() + 8.0
            while len(emu.deepgram.streams) < 2 and time.monotonic() < deadline:
                await h.stream_audio(silence(0.2, SR))
            assert len(emu.deepgram.streams) == 2, "no reconnect"
            await asyncio.sleep(0.3)  # let the new connection settle
            await h.stream_audio(voiced(0.5, SR))
            silence_task = asyncio.create_task(h.stream_audio(silence(0.5, SR)))
            finals = await h.down.wait_for(TranscriptionFrame, 2.0, count=2)
            await silence_task
    first, second = emu.deepgram.streams
    assert first.close_reason == "fault: drop_after_utterances"
    assert [f.text for _, f in finals] == [
        "What are your opening hours?",
        "Can I book for Tuesday?",
    ]
    assert second.query["tag"] == "call-1"


async def test_drop_with_1011_close_is_reported() -> None:
    faults = DeepgramFaults(drop_after_s=0.3, drop_mode="close", connections=1)
    async with run_emulators(_config(deepgram_faults=faults)) as emu:
        stt = DeepgramSTTService(api_key="emulated", base_url=emu.deepgram_url, sample_rate=SR)
        async with running_pipeline(stt, SR) as h:
            stream_task = asyncio.create_task(h.stream_audio(silence(0.6, SR)))
            [(_, err)] = await h.up.wait_for(ErrorFrame, 2.0)
            await stream_task
    assert "1011" in err.error
    assert emu.deepgram.streams[0].close_reason == "fault: drop_after_s"


async def test_caller_audio_goes_undeflated_and_the_stream_still_transcribes() -> None:
    """The SDK's client negotiates permessage-deflate (the emulator accepts, as servers
    may); ``send_uncompressed`` makes it send audio as stored blocks, and the server
    still reads every message of the stream."""
    import zlib

    from websockets.extensions.permessage_deflate import PerMessageDeflate

    from pipeswitch.pipelines.services import send_uncompressed

    async with run_emulators(_config()) as emu:
        stt = DeepgramSTTService(api_key="emulated", base_url=emu.deepgram_url, sample_rate=SR)
        async with running_pipeline(stt, SR) as h:
            connection = stt._connection
            assert connection is not None
            [ext] = [
                e for e in connection._websocket.extensions if isinstance(e, PerMessageDeflate)
            ]
            zeros = bytes(3200)

            def sent_size() -> int:
                enc = ext.encoder.copy()  # what the next message would be, on a copy
                return len(enc.compress(zeros) + enc.flush(zlib.Z_SYNC_FLUSH))

            deflated = sent_size()
            assert send_uncompressed(connection)
            assert deflated < 100 < len(zeros) <= sent_size()  # it did compress; not now
            await h.stream_audio(voiced(1.0, SR))
            silence_task = asyncio.create_task(h.stream_audio(silence(0.8, SR)))
            [(_, frame)] = await h.down.wait_for(TranscriptionFrame, 2.0)
            await silence_task
    assert frame.text == "What are your opening hours?"
    assert not send_uncompressed(object())  # nothing to change on something else


async def test_a_client_gone_before_the_101_is_counted_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A call that hangs up while its STT connects resets the socket before our 101: the
    emulator counts it and answers nothing, and aiohttp logs no "Unhandled exception"."""
    import logging
    import socket
    import struct
    from urllib.parse import urlparse

    async with run_emulators(_config()) as emu:
        port = urlparse(emu.deepgram_url).port or 80
        request = (
            "GET /v1/listen?encoding=linear16&sample_rate=8000&channels=1 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Authorization: Token emulated\r\n\r\n"
        ).encode()
        with caplog.at_level(logging.ERROR, logger="aiohttp"):
            for _ in range(3):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(request)
                # Close with a reset (linger 0), as a process that gives up does.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            for _ in range(100):
                if emu.deepgram.abandoned_upgrades + len(emu.deepgram.streams) >= 3:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
        assert emu.deepgram.abandoned_upgrades + len(emu.deepgram.streams) == 3
        assert emu.deepgram.abandoned_upgrades >= 1, "no reset reached the handler first"
    assert not [r for r in caplog.records if "Unhandled exception" in r.getMessage()]
    assert "prepare() first" not in caplog.text
