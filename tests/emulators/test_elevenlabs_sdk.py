"""The ConvAI emulator against ElevenLabs' own Python SDK client, unmodified.

Our agent service was written from the protocol; this checks the emulator speaks
that protocol the way the official client (``elevenlabs`` ``AsyncConversation``)
expects it: initiation metadata, agent audio and text, the caller's transcript,
pings answered, all over the client's own URL scheme pointed at the emulator
by base URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
from elevenlabs.client import ElevenLabs
from elevenlabs.conversational_ai.conversation import AsyncAudioInterface, AsyncConversation

from pipeswitch.bench.emulators.elevenlabs_convai import (
    ElevenLabsConvAIEmulator,
    voiced_standin,
)
from tests.emulators.helpers import convai_on_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

AGENT = "agent_sdk"
RATE = 16000


class ScriptedCaller(AsyncAudioInterface):
    """Speaks one utterance after a pause (20 ms chunks, real time) and keeps what it hears."""

    def __init__(self) -> None:
        self.heard = bytearray()
        self._task: asyncio.Task[None] | None = None

    async def start(self, input_callback: Callable[[bytes], Awaitable[None]]) -> None:
        async def speak() -> None:
            step = RATE // 50 * 2
            silence = bytes(step)
            speech = voiced_standin("hello I would like an appointment", RATE)[: RATE * 2]
            for _ in range(50):  # the agent's greeting plays first
                await input_callback(silence)
                await asyncio.sleep(0.02)
            for i in range(0, len(speech), step):
                await input_callback(speech[i : i + step])
                await asyncio.sleep(0.02)
            while True:  # then silence, as a phone line does
                await input_callback(silence)
                await asyncio.sleep(0.02)

        self._task = asyncio.ensure_future(speak())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def output(self, audio: bytes) -> None:
        self.heard += audio

    async def interrupt(self) -> None:
        return None


@pytest_asyncio.fixture(loop_scope="session")
async def emulator() -> AsyncIterator[tuple[ElevenLabsConvAIEmulator, int]]:
    async with convai_on_port(AGENT, "Sure, tomorrow at nine works.", 0.3) as served:
        yield served


async def test_official_sdk_client_holds_a_conversation(
    emulator: tuple[ElevenLabsConvAIEmulator, int],
) -> None:
    emu, port = emulator
    client = ElevenLabs(api_key="test-key", base_url=f"http://127.0.0.1:{port}")
    caller = ScriptedCaller()
    agent_said: list[str] = []
    caller_said: list[str] = []

    async def on_agent(text: str) -> None:
        agent_said.append(text)

    async def on_user(text: str) -> None:
        caller_said.append(text)

    conversation = AsyncConversation(
        client,
        AGENT,
        requires_auth=False,
        audio_interface=caller,
        callback_agent_response=on_agent,
        callback_user_transcript=on_user,
    )
    await conversation.start_session()
    try:
        for _ in range(200):
            if len(agent_said) >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        await conversation.end_session()
        await conversation.wait_for_session_end()

    assert agent_said[:2] == ["Hi there.", "Sure, tomorrow at nine works."]
    assert caller_said == [emu.user_line(0)]
    assert len(caller.heard) > RATE  # more than half a second of agent speech (16-bit)
    record = emu.conversations[-1]
    # The SDK answered the emulator's pings with their event ids.
    assert record.pings_sent and set(record.pings_sent[:-1]) <= set(record.pongs)
