"""The ConvAI emulator's provider share: its reply's leading silence counts, as played.

The S2S bench's server overhead is wire latency minus the provider's share (the
caller's end of turn -> the agent's first audible sample). Agent audio streams 2x
faster than real time, so the audible sample becomes playable when the silence
before it has *played*, not when its chunk was sent.
"""

from __future__ import annotations

import asyncio

import pytest
from elevenlabs.client import ElevenLabs
from elevenlabs.conversational_ai.conversation import AsyncConversation

from pipeswitch.bench.emulators.elevenlabs_convai import (
    ConvAISettings,
    ElevenLabsConvAIEmulator,
    serve_convai,
    voiced_standin,
)
from pipeswitch.bench.emulators.latency import LatencyModel
from tests.emulators.test_elevenlabs_sdk import ScriptedCaller

pytestmark = pytest.mark.asyncio(loop_scope="session")

LEAD_S = 0.4  # the reply's leading silence


async def _speech(text: str, rate: int) -> bytes:
    return bytes(int(rate * LEAD_S) * 2) + voiced_standin(text, rate)


async def test_first_voiced_at_counts_the_leading_silence_as_played() -> None:
    emu = ElevenLabsConvAIEmulator(
        settings=ConvAISettings(agent_ids=["agent_t"], first_message="Hi there."),
        response_latency=LatencyModel.constant(50),
        script={"*": "Sure, tomorrow at nine works."},
        synthesize=_speech,
    )
    runner, port = await serve_convai(emu)
    client = ElevenLabs(api_key="test-key", base_url=f"http://127.0.0.1:{port}")
    said: list[str] = []

    async def on_agent(text: str) -> None:
        said.append(text)

    conversation = AsyncConversation(
        client,
        "agent_t",
        requires_auth=False,
        audio_interface=ScriptedCaller(),
        callback_agent_response=on_agent,
    )
    try:
        await conversation.start_session()
        for _ in range(200):
            turns = emu.conversations[-1].agent_turns if emu.conversations else []
            if len(said) >= 2 and turns[-1].first_voiced_at is not None:
                break
            await asyncio.sleep(0.05)
    finally:
        await conversation.end_session()
        await conversation.wait_for_session_end()
        await runner.cleanup()
    for turn in emu.conversations[-1].agent_turns[:2]:
        assert turn.first_audio_at is not None and turn.first_voiced_at is not None
        lead = turn.first_voiced_at - turn.first_audio_at
        # Sent at 2x the lead shows up as ~0.2 s; played, it is the whole 0.4 s.
        assert lead == pytest.approx(LEAD_S, abs=0.03), (turn.text, lead)
