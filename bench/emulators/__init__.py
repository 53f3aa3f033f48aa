"""Wire-level provider emulators (Deepgram live STT, OpenAI/Groq chat) for the bench.

Loopback servers that speak each provider's real protocol, so the unmodified
Pipecat services can be pointed at them by ``base_url``. See :mod:`.runner`.
"""

from pipeswitch.bench.emulators.deepgram import DeepgramEmulator, DeepgramFaults, DeepgramSettings
from pipeswitch.bench.emulators.latency import (
    DEEPGRAM_TTFS,
    ELEVENLABS_TTFB,
    GROQ_TTFT,
    LatencyModel,
    LatencySpec,
)
from pipeswitch.bench.emulators.openai_chat import ChatFaults, OpenAIChatEmulator, ToolCall
from pipeswitch.bench.emulators.runner import (
    EmulatorConfig,
    EmulatorProcess,
    RunningEmulators,
    run_emulators,
    start_emulator_process,
)

__all__ = [
    "DEEPGRAM_TTFS",
    "ELEVENLABS_TTFB",
    "GROQ_TTFT",
    "ChatFaults",
    "DeepgramEmulator",
    "DeepgramFaults",
    "DeepgramSettings",
    "EmulatorConfig",
    "EmulatorProcess",
    "LatencyModel",
    "LatencySpec",
    "OpenAIChatEmulator",
    "RunningEmulators",
    "ToolCall",
    "run_emulators",
    "start_emulator_process",
]
