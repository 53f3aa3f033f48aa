"""The ``/_emulator`` admin trio every emulator serves (one implementation in serving.py).

A separate emulator process (``pipeswitch emulators``, the bench's s2s runs) is driven only
through these routes, so each emulator is checked over HTTP: the listing shows what was
recorded, ``faults`` sets the faults for what comes next, ``reset`` clears both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pipeswitch.bench.emulators.deepgram import DeepgramEmulator
from pipeswitch.bench.emulators.elevenlabs_convai import ElevenLabsConvAIEmulator
from pipeswitch.bench.emulators.gemini_live import GeminiLiveEmulator
from pipeswitch.bench.emulators.openai_chat import OpenAIChatEmulator
from pipeswitch.bench.emulators.openai_realtime import OpenAIRealtimeEmulator

pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Case:
    make: Callable[[], Any]
    listing: str  # the admin path and the attribute holding the records
    fault: str  # a refusal field of the emulator's faults class


CASES = {
    "deepgram": Case(DeepgramEmulator, "streams", "reject_status"),
    "elevenlabs-convai": Case(ElevenLabsConvAIEmulator, "conversations", "reject_status"),
    "gemini-live": Case(GeminiLiveEmulator, "sessions", "refuse_status"),
    "openai-chat": Case(OpenAIChatEmulator, "requests", "status"),
    "openai-realtime": Case(OpenAIRealtimeEmulator, "sessions", "refuse_status"),
}


class _Record:
    """Stands in for one recorded connection (the listing only calls ``to_dict``)."""

    def to_dict(self) -> dict[str, Any]:
        return {"id": "recorded"}


@pytest.mark.parametrize("name", list(CASES))
async def test_admin_routes_list_set_faults_and_reset(name: str) -> None:
    case = CASES[name]
    emu = case.make()
    app = web.Application()
    emu.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/_emulator"
    try:
        async with aiohttp.ClientSession() as http:
            getattr(emu, case.listing).append(_Record())
            async with http.get(f"{base}/{case.listing}") as r:
                assert r.status == 200
                assert (await r.json())[case.listing] == [{"id": "recorded"}]

            async with http.post(f"{base}/faults", json={case.fault: 503}) as r:
                assert r.status == 200 and await r.json() == {"ok": True}
            assert getattr(emu.faults, case.fault) == 503

            async with http.post(f"{base}/reset", json={}) as r:
                assert r.status == 200
            assert getattr(emu.faults, case.fault) is None
            async with http.get(f"{base}/{case.listing}") as r:
                assert (await r.json())[case.listing] == []
    finally:
        await runner.cleanup()
