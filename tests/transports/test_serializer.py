"""The mod_audio_stream serializer against binary fixtures, good and broken."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import (
    InputAudioRawFrame,
    InputDTMFFrame,
    InputTransportMessageFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputTransportMessageUrgentFrame,
)
from pipecat.processors.frame_processor import FrameProcessorSetup

from pipeswitch.transports.dialects import (
    BinaryDialect,
    FileDialect,
    JsonStreamDialect,
    make_dialect,
)
from pipeswitch.transports.frames import CallMetadataFrame
from pipeswitch.transports.serializer import ModAudioStreamSerializer, pipeline_rate_for

FIX = Path(__file__).parent.parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIX / name).read_bytes()


async def make(
    rate: int = 8000, channels: int = 1, dialect: str = "json-stream"
) -> ModAudioStreamSerializer:
    ser = ModAudioStreamSerializer(
        stream_rate=rate,
        channels=channels,
        dialect=make_dialect(dialect),  # type: ignore[arg-type]
    )
    prate = pipeline_rate_for(rate)
    setup = FrameProcessorSetup(
        clock=None,  # type: ignore[arg-type]
        task_manager=None,  # type: ignore[arg-type]
        pipeline_worker=None,  # type: ignore[arg-type]
        audio_in_sample_rate=prate,
        audio_out_sample_rate=prate,
    )
    await ser.setup(setup)
    return ser


async def test_mono_8k_frame_passes_through_unchanged() -> None:
    ser = await make()
    data = fixture("mas_8k_mono_20ms.bin")
    frame = await ser.deserialize(data)
    assert isinstance(frame, InputAudioRawFrame)
    assert frame.audio == data  # no resampling when rates match
    assert (frame.sample_rate, frame.num_channels) == (8000, 1)


async def test_stereo_keeps_left_channel_the_caller_leg() -> None:
    ser = await make(channels=2)
    data = fixture("mas_8k_stereo_20ms.bin")
    frame = await ser.deserialize(data)
    assert isinstance(frame, InputAudioRawFrame)
    assert frame.audio == fixture("mas_8k_mono_20ms.bin")
    assert frame.num_channels == 1


async def test_truncated_sample_is_carried_into_the_next_message() -> None:
    ser = await make()
    bad = fixture("mas_8k_mono_truncated_321.bin")
    f1 = await ser.deserialize(bad)
    assert isinstance(f1, InputAudioRawFrame) and len(f1.audio) == 320
    f2 = await ser.deserialize(b"\x01")  # completes the dangling sample
    assert isinstance(f2, InputAudioRawFrame) and f2.audio == b"\x7f\x01"
    assert ser.stats.misaligned_messages == 1


async def test_half_stereo_pair_and_empty_messages_do_not_crash() -> None:
    ser = await make(channels=2)
    assert await ser.deserialize(b"\x01\x02") is None  # half a pair: kept, nothing out
    frame = await ser.deserialize(b"\x03\x04")
    assert isinstance(frame, InputAudioRawFrame) and frame.audio == b"\x01\x02"
    assert await ser.deserialize(b"") is None


@pytest.mark.parametrize("size", [320, 960, 3200, 1 << 16])
async def test_any_multiple_of_20ms_is_accepted(size: int) -> None:
    ser = await make()
    frame = await ser.deserialize(bytes(size))
    assert isinstance(frame, InputAudioRawFrame) and len(frame.audio) == size


async def test_random_bytes_never_raise() -> None:
    rng = np.random.default_rng(7)
    ser = await make(channels=2)
    total = 0
    for _ in range(200):
        n = int(rng.integers(0, 2000))
        frame = await ser.deserialize(rng.bytes(n))
        if frame is not None:
            assert isinstance(frame, InputAudioRawFrame)
            total += len(frame.audio)
    assert total > 0


async def test_48k_stream_is_resampled_to_16k_pipeline() -> None:
    ser = await make(rate=48000)
    out = b""
    for _ in range(10):
        frame = await ser.deserialize(fixture("mas_48k_mono_20ms.bin"))
        if frame is not None:
            assert isinstance(frame, InputAudioRawFrame)
            assert frame.sample_rate == 16000
            out += frame.audio
    # 200 ms at 16 kHz, minus the resampler's start-up delay
    assert 4000 < len(out) <= 6400


async def test_metadata_first_text_becomes_call_metadata() -> None:
    ser = await make()
    frame = await ser.deserialize(fixture("metadata_text.bin").decode())
    assert isinstance(frame, CallMetadataFrame)
    assert frame.data == {"uuid": "3f0b6c1e-1111-2222-3333-444455556666", "caller": "+15551234"}


async def test_metadata_may_be_plain_text_but_later_garbage_is_dropped() -> None:
    ser = await make()
    bad = fixture("metadata_invalid_json.bin").decode()
    first = await ser.deserialize(bad)
    assert isinstance(first, CallMetadataFrame) and first.data is None and first.text == bad
    assert await ser.deserialize(bad) is None
    assert ser.stats.bad_text == 1


async def test_relayed_dtmf_becomes_input_dtmf_frame() -> None:
    ser = await make()
    await ser.deserialize('{"uuid":"x"}')
    frame = await ser.deserialize('{"event":"dtmf","digit":"5"}')
    assert isinstance(frame, InputDTMFFrame) and frame.button == KeypadEntry.FIVE
    frame = await ser.deserialize('{"event":"dtmf","digit":"#"}')
    assert isinstance(frame, InputDTMFFrame) and frame.button == KeypadEntry.POUND
    assert await ser.deserialize('{"event":"dtmf","digit":"55"}') is None


async def test_other_json_after_metadata_is_a_transport_message() -> None:
    ser = await make()
    await ser.deserialize('{"uuid":"x"}')
    frame = await ser.deserialize('{"type":"custom","a":1}')
    assert isinstance(frame, InputTransportMessageFrame) and frame.message == {
        "type": "custom",
        "a": 1,
    }


async def test_oversized_text_is_ignored() -> None:
    ser = await make()
    assert await ser.deserialize('{"x":"' + "a" * 9000 + '"}') is None
    assert ser.stats.oversized_text == 1


async def test_json_stream_audio_message_shape() -> None:
    ser = await make(dialect="json-stream")
    pcm = fixture("mas_8k_mono_20ms.bin")
    msg = await ser.serialize(OutputAudioRawFrame(audio=pcm, sample_rate=8000, num_channels=1))
    assert isinstance(msg, str)
    obj = json.loads(msg)
    assert obj["type"] == "streamAudio"
    assert obj["data"]["audioDataType"] == "raw" and obj["data"]["sampleRate"] == 8000
    import base64

    assert base64.b64decode(obj["data"]["audioData"]) == pcm
    msg.encode("utf-8")  # always valid UTF-8
    assert await ser.serialize(InterruptionFrame()) is None  # no clear in this build


async def test_binary_dialect_sends_pcm_and_clear_audio() -> None:
    ser = await make(dialect="binary")
    pcm = fixture("mas_8k_mono_20ms.bin")
    assert (
        await ser.serialize(OutputAudioRawFrame(audio=pcm, sample_rate=8000, num_channels=1)) == pcm
    )
    assert await ser.serialize(InterruptionFrame()) == '{"type":"clearAudio"}'


async def test_output_resampled_to_stream_rate() -> None:
    ser = await make(rate=16000, dialect="binary")
    out = b""
    for _ in range(25):
        msg = await ser.serialize(
            OutputAudioRawFrame(audio=bytes(320), sample_rate=8000, num_channels=1)
        )
        out += msg if isinstance(msg, bytes) else b""
    assert 12000 < len(out) <= 16000  # ~2x the 8000 input bytes, less the filter delay


async def test_file_dialect_coalesces_and_caps_message_size() -> None:
    d = FileDialect(max_chunk_bytes=1000)
    assert d.encode_audio(bytes(600), 8000) is None
    first = d.encode_audio(bytes(600), 8000)  # crosses the cap: one full message out
    assert isinstance(first, str)
    assert json.loads(first)["data"]["seq"] == 0
    rest = d.flush(8000)
    assert len(rest) == 1 and json.loads(rest[0])["data"]["seq"] == 1
    import base64

    assert len(base64.b64decode(json.loads(rest[0])["data"]["audioData"])) == 200
    d.encode_audio(bytes(10), 8000)
    d.discard()
    assert d.flush(8000) == []


async def test_transport_messages_are_compact_json() -> None:
    ser = await make()
    msg = await ser.serialize(
        OutputTransportMessageUrgentFrame(message={"type": "hangup", "why": "done"})
    )
    assert msg == '{"type":"hangup","why":"done"}'


def test_dialect_leads() -> None:
    assert JsonStreamDialect().lead_secs <= 0.06  # no clear: anything sent will be heard
    assert BinaryDialect().encode_clear() is not None
    assert FileDialect().streaming is False


@pytest.mark.parametrize(
    ("buffer_ms", "channels", "lead_ms"),
    [(20, 1, 20), (40, 1, 20), (60, 1, 40), (80, 2, 60), (100, 1, 80), (200, 1, 80)],
)
async def test_json_stream_lead_is_the_uplink_message_less_one_frame(
    buffer_ms: int, channels: int, lead_ms: int
) -> None:
    """voxcom's playback buffer is one STREAM_BUFFER_SIZE long: the first caller message
    sets the lead so that what is sent never overfills it (capped at 80 ms)."""
    ser = await make(rate=8000, channels=channels)
    assert ser.playout_lead_secs == pytest.approx(0.02)
    await ser.deserialize(bytes(16 * buffer_ms * channels))
    assert ser.playout_lead_secs == pytest.approx(lead_ms / 1000)
    # Learnt once: a later, different message (or garbage) does not move it.
    await ser.deserialize(bytes(16 * 200 * channels))
    assert ser.playout_lead_secs == pytest.approx(lead_ms / 1000)


async def test_lead_ignores_odd_first_messages_and_other_dialects() -> None:
    odd = await make()
    await odd.deserialize(bytes(16 * 50))  # 50 ms: not whole frames
    assert odd.playout_lead_secs == pytest.approx(0.02)
    binary = await make(dialect="binary")
    await binary.deserialize(bytes(16 * 100))
    assert binary.playout_lead_secs == pytest.approx(BinaryDialect().lead_secs)
    file = await make(dialect="file")
    await file.deserialize(bytes(16 * 100))
    assert file.playout_lead_secs == pytest.approx(FileDialect().lead_secs)
