"""``--providers emulated``: Deepgram and Groq emulators on loopback, no keys.

The emulators run in their own process so the bench measures the server's
event loop, not theirs. The Pipecat services are the real ones, pointed at the
emulators by base URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pipeswitch.bench.emulators.runner import (
    EmulatorConfig,
    RunningEmulators,
    start_emulator_process,
)
from pipeswitch.config.settings import Settings
from pipeswitch.pipelines.services import ProviderEndpoints

EMULATED_KEY = "emulated"


def endpoints_for(urls: RunningEmulators | object) -> ProviderEndpoints:
    """Provider endpoints pointing at running emulators (in-process or not)."""
    return ProviderEndpoints(
        mode="emulated",
        piper_url="",
        deepgram_url=str(getattr(urls, "deepgram_url")),  # noqa: B009
        deepgram_api_key=EMULATED_KEY,
        groq_base_url=str(getattr(urls, "groq_base_url")),  # noqa: B009
        groq_api_key=EMULATED_KEY,
        # The chat emulator speaks OpenAI's chat completions API, as Groq does.
        openai_base_url=str(getattr(urls, "groq_base_url")),  # noqa: B009
        openai_api_key=EMULATED_KEY,
        # Speech-to-speech emulators (absent from an older emulator process: "").
        openai_realtime_url=str(getattr(urls, "openai_realtime_url", "")),
        gemini_url=str(getattr(urls, "gemini_url", "")),
        gemini_ca_file=str(getattr(urls, "gemini_ca_file", "")),
        google_api_key=EMULATED_KEY,
        elevenlabs_url=str(getattr(urls, "elevenlabs_url", "")) or "wss://api.elevenlabs.io",
        elevenlabs_api_key=EMULATED_KEY,
    )


@asynccontextmanager
async def emulated_endpoints(
    settings: Settings, config: EmulatorConfig | None = None
) -> AsyncIterator[ProviderEndpoints]:
    """Start the emulator process for the lifetime of the block."""
    proc = await asyncio.to_thread(start_emulator_process, config or EmulatorConfig())
    try:
        yield endpoints_for(proc)
    finally:
        await asyncio.to_thread(proc.stop)
