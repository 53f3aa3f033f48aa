"""``ElevenLabsAgentService`` against the ConvAI emulator, without a phone call.

Protocol behaviour that an end-to-end call cannot pin down exactly: ping/pong by
event_id, malformed provider messages, and each way the provider can fail
(refused, dropped mid-call, stalled), which must leave the service unusable with
one error and one ``on_agent_disconnected`` (the fallback's cue), never a crash.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.tests.utils import SleepFrame, run_test

from pipeswitch.bench.emulators.elevenlabs_convai import (
    ConvAIFaults,
    ElevenLabsConvAIEmulator,
    voiced_standin,
)
from pipeswitch.pipelines.services_elevenlabs import (
    ElevenLabsAgentService,
    format_rate,
    ulaw_decode,
    ulaw_encode,
)
from pipeswitch.processors.heard_context import heard_prefix
from tests.emulators.helpers import convai_on_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

AGENT = "agent_unit"


@pytest_asyncio.fixture(loop_scope="session")
async def convai() -> AsyncIterator[tuple[ElevenLabsConvAIEmulator, int]]:
    async with convai_on_port(AGENT, "Sure.", 0.2) as served:
        yield served


def _service(port: int, **kw: Any) -> ElevenLabsAgentService:
    return ElevenLabsAgentService(
        agent_id=AGENT,
        api_key="k",
        base_url=f"ws://127.0.0.1:{port}",
        connect_timeout_secs=2.0,
        response_idle_secs=0.2,
        **kw,
    )


def _speech_frames(rate: int = 16000, secs: float = 0.8, silence: float = 0.6) -> list[Frame]:
    pcm = voiced_standin("hello there I have a question", rate)[: int(rate * secs) * 2]
    pcm += bytes(int(rate * silence) * 2)
    step = rate // 50 * 2
    return [
        InputAudioRawFrame(audio=pcm[i : i + step], sample_rate=rate, num_channels=1)
        for i in range(0, len(pcm), step)
    ]


async def _run(
    service: ElevenLabsAgentService, frames: list[Frame]
) -> tuple[list[Frame], list[Frame]]:
    down, up = await run_test(
        service, frames_to_send=frames, expected_down_frames=None, expected_up_frames=None
    )
    return list(down), list(up)


async def test_greeting_pings_and_a_turn(convai: tuple[ElevenLabsConvAIEmulator, int]) -> None:
    emu, port = convai
    service = _service(port)
    lost: list[str] = []

    @service.event_handler("on_agent_disconnected")
    async def _lost(_: Any, reason: str) -> None:
        lost.append(reason)

    down, _ = await _run(service, [SleepFrame(1.0), *_speech_frames(), SleepFrame(1.5)])
    conv = emu.conversations[-1]
    # The first message plays as agent audio, bracketed like any TTS.
    assert any(isinstance(f, TTSStartedFrame) for f in down)
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio and all(f.sample_rate == 16000 for f in audio)
    assert sum(isinstance(f, TTSStoppedFrame) for f in down) >= 1
    # One caller turn: transcript pushed downstream, agent reply spoken.
    assert [f.text for f in down if isinstance(f, TranscriptionFrame)] == [emu.user_line(0)]
    assert [t.text for t in conv.agent_turns] == ["Hi there.", "Sure."]
    # Every ping but possibly the last one got a pong with its event_id.
    assert len(conv.pings_sent) >= 5
    assert set(conv.pings_sent[:-1]) <= set(conv.pongs)
    assert service.pings_answered >= len(conv.pings_sent) - 1
    assert not lost and service.is_usable


async def test_input_is_resampled_once_to_the_agent_rate(
    convai: tuple[ElevenLabsConvAIEmulator, int],
) -> None:
    emu, port = convai
    service = _service(port)
    await _run(service, [SleepFrame(0.3), *_speech_frames(rate=8000), SleepFrame(0.8)])
    conv = emu.conversations[-1]
    # 1.4 s of 8 kHz caller audio arrives as ~1.4 s at the agent's 16 kHz.
    assert conv.audio_in_s == pytest.approx(1.4, abs=0.1)
    assert conv.user_turns and conv.user_turns[0].text


async def test_malformed_messages_are_survived(
    convai: tuple[ElevenLabsConvAIEmulator, int],
) -> None:
    emu, port = convai
    emu.set_faults(ConvAIFaults(malformed_after_turns=1))
    try:
        service = _service(port)
        down, up = await _run(service, [SleepFrame(0.5), *_speech_frames(), SleepFrame(1.5)])
    finally:
        emu.set_faults(ConvAIFaults())
    conv = emu.conversations[-1]
    assert conv.malformed_out == 1
    assert service.malformed_messages == 2  # bad JSON, audio without its event
    assert service.is_usable and not any(isinstance(f, ErrorFrame) for f in up)
    # The conversation went on: the reply after the garbage was still heard.
    assert conv.agent_turns[-1].text == "Sure."
    assert conv.agent_turns[-1].audio_done_at is not None


@pytest.mark.parametrize(
    ("faults", "reason"),
    [
        (ConvAIFaults(reject_status=503), "connect failed: HTTP 503"),
        (ConvAIFaults(drop_after_s=0.4), "connection dropped (1006)"),
        (ConvAIFaults(drop_after_s=0.4, drop_mode="close"), "closed 1011"),
        (ConvAIFaults(stall_after_s=0.3), "stalled"),
    ],
)
async def test_provider_failure_makes_service_unusable_once(
    convai: tuple[ElevenLabsConvAIEmulator, int], faults: ConvAIFaults, reason: str
) -> None:
    emu, port = convai
    emu.set_faults(faults)
    try:
        service = _service(port, stall_timeout_secs=0.8)
        lost: list[str] = []

        @service.event_handler("on_agent_disconnected")
        async def _lost(_: Any, why: str) -> None:
            lost.append(why)

        _, up = await _run(service, [SleepFrame(1.6)])
    finally:
        emu.set_faults(ConvAIFaults())
    assert len(lost) == 1 and lost[0].startswith(reason), lost
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and not service.is_usable
    assert errors[0].exception is None  # a provider failure, not a processor bug


async def test_unknown_agent_is_refused(convai: tuple[ElevenLabsConvAIEmulator, int]) -> None:
    _, port = convai
    service = ElevenLabsAgentService(agent_id="agent_nope", base_url=f"ws://127.0.0.1:{port}")
    _, up = await _run(service, [SleepFrame(0.2)])
    assert service.disconnect_reason is not None and "HTTP 404" in service.disconnect_reason
    assert any(isinstance(f, ErrorFrame) for f in up)


def test_codecs_and_helpers() -> None:
    pcm = voiced_standin("a b c", 8000)
    back = ulaw_decode(ulaw_encode(pcm))

    a = np.frombuffer(pcm, "<i2").astype(float)
    b = np.frombuffer(back, "<i2").astype(float)
    assert np.sqrt(np.mean((a - b) ** 2)) < 0.05 * np.sqrt(np.mean(a * a))
    assert format_rate("ulaw_8000") == 8000 and format_rate("pcm_24000") == 24000
    with pytest.raises(ValueError):
        format_rate("mp3_44100")
    assert heard_prefix("We open at nine tomorrow.", 0.5, 14.0) == "We open"
    assert heard_prefix("We open at nine.", 5.0, 14.0) == "We open at nine."


__all__ = ["web"]
