"""The real ``DeepgramFluxSTTService`` (Pipecat 1.14) against the emulator's Flux mode.

Flux owns turn detection: the service turns ``TurnInfo`` events into frames
(``EagerTranscriptionFrame`` for EagerEndOfTurn, ``EagerEndOfTurnCancelFrame``
for TurnResumed, the committed ``TranscriptionFrame`` for EndOfTurn). Latencies
are constant here so the timing can be checked; windows are loose for a busy box.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from pipecat.frames.frames import (
    EagerEndOfTurnCancelFrame,
    EagerTranscriptionFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
)
from pipecat.services.deepgram.flux.stt import DeepgramFluxSTTService

from pipeswitch.bench.emulators.deepgram import DeepgramEmulator
from pipeswitch.bench.emulators.latency import LatencySpec
from tests.emulators.helpers import running_pipeline, silence, voiced

SR = 16000
EAGER_MS = 150.0
EOT_MS = 400.0
LINES = ["What are your opening hours?", "And on Sunday?", "Thanks."]


@contextlib.asynccontextmanager
async def flux_emulator() -> AsyncIterator[tuple[DeepgramEmulator, str]]:
    emu = DeepgramEmulator(
        script=LINES,
        flux_eager=LatencySpec(EAGER_MS, 0.0),
        flux_eot=LatencySpec(EOT_MS, 0.0),
    )
    app = web.Application()
    emu.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield emu, f"ws://127.0.0.1:{port}/v2/listen"
    finally:
        await emu.close_all()
        await runner.cleanup()


def _flux(url: str) -> DeepgramFluxSTTService:
    return DeepgramFluxSTTService(
        api_key="emulated", url=url, sample_rate=SR, enable_eager_end_of_turn=True
    )


async def test_eager_end_of_turn_then_end_of_turn_on_the_clock() -> None:
    async with flux_emulator() as (emu, url), running_pipeline(_flux(url), SR) as h:
        await asyncio.sleep(0.3)  # Connected
        sent = await h.stream_audio(voiced(1.0, SR))
        speech_end = sent[-1]
        quiet = asyncio.create_task(h.stream_audio(silence(0.8, SR)))
        [(t_eager, eager)] = await h.down.wait_for(EagerTranscriptionFrame, 2.0)
        [(t_final, final)] = await h.down.wait_for(TranscriptionFrame, 2.0)
        await quiet

    assert eager.text == final.text == LINES[0]
    assert EAGER_MS - 30 <= (t_eager - speech_end) * 1000 <= EAGER_MS + 250
    assert EOT_MS - 30 <= (t_final - speech_end) * 1000 <= EOT_MS + 250
    assert final.finalized
    assert h.down.of_type(InterimTranscriptionFrame)  # Updates while speaking
    assert not h.down.of_type(EagerEndOfTurnCancelFrame)
    [stream] = emu.streams
    assert stream.query["model"] == "flux-general-en"
    assert stream.query["eager_eot_threshold"] == "0.5"
    assert stream.close_stream


async def test_speech_after_the_eager_prediction_withdraws_it() -> None:
    async with flux_emulator() as (emu, url), running_pipeline(_flux(url), SR) as h:
        await asyncio.sleep(0.3)
        await h.stream_audio(voiced(1.0, SR))
        # A pause longer than the eager prediction, shorter than the end of turn.
        await h.stream_audio(silence(0.25, SR))
        await h.down.wait_for(EagerTranscriptionFrame, 1.0)
        await h.stream_audio(voiced(0.6, SR))
        quiet = asyncio.create_task(h.stream_audio(silence(0.9, SR)))
        await h.down.wait_for(EagerEndOfTurnCancelFrame, 1.0)
        [(_, final)] = await h.down.wait_for(TranscriptionFrame, 2.0)
        await quiet

    # One turn, committed with both sentences; the eager one (first sentence) was withdrawn.
    assert final.text == f"{LINES[0]} {LINES[1]}"
    eagers = [f.text for _, f in h.down.of_type(EagerTranscriptionFrame)]
    assert eagers[0] == LINES[0]
    [utt] = emu.streams[0].utterances
    assert utt.resumed_after_eager == 1
