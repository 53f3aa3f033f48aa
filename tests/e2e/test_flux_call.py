"""A cascade call with Deepgram Flux as its STT (``providers.stt = "deepgram-flux"``).

The real ``DeepgramFluxSTTService`` talks to the Deepgram emulator's Flux mode;
Flux decides the turns (Pipecat's eager strategies), an EagerEndOfTurn starts the
LLM early and a TurnResumed withdraws it. A second Pipeswitch app in this process
shares the session's emulators and Piper, with one Flux tenant.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from pipeswitch.bench.emulators.latency import LatencySpec
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import ProviderSettings, Tenant
from pipeswitch.pipelines.app import Pipeswitch
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet, wait_for_bot_audio

pytestmark = pytest.mark.asyncio(loop_scope="session")

TENANT = "flux.test"


def _spec(outcome: str) -> float:
    labels = {"tenant": TENANT, "outcome": outcome}
    return REGISTRY.get_sample_value("pipeswitch_turn_speculations_total", labels) or 0.0


@pytest_asyncio.fixture(loop_scope="session")
async def flux_app(served: Served) -> AsyncIterator[Pipeswitch]:
    dg = served.emu.deepgram
    saved = dg.flux_eager, dg.flux_eot
    # Constant latencies: the pause the caller makes below falls between the two.
    dg.flux_eager = LatencySpec(120.0, 0.0).model()
    dg.flux_eot = LatencySpec(500.0, 0.0).model()
    tenant = Tenant(
        name=TENANT,
        first_message=None,
        providers=ProviderSettings(stt="deepgram-flux"),
    )
    app = Pipeswitch(
        Settings(host="127.0.0.1", port=0, providers="emulated", idle_timeout_secs=30),
        loader=StaticTenantLoader([tenant], default=TENANT),
        default_tenant=TENANT,
        endpoints=served.app.endpoints,
    )
    await app.start()
    try:
        yield app
    finally:
        await app.stop(drain_secs=1.0)
        dg.flux_eager, dg.flux_eot = saved


def _url(app: Pipeswitch, uuid: str) -> str:
    return f"ws://127.0.0.1:{app.port}/fs/{uuid}?rate=8000&mix=mono&domain={TENANT}"


async def test_flux_call_answers_on_the_eager_end_of_turn(
    served: Served, flux_app: Pipeswitch
) -> None:
    speech = await served.speech(QUESTION, 8000)
    started, confirmed = _spec("started"), _spec("confirmed")
    n_llm = len(served.emu.openai.requests)
    stream = await open_call(_url(flux_app, "flux-1"), 8000, "json-stream")
    try:
        await asyncio.sleep(0.5)  # Flux's Connected
        end, answer = await ask(stream, speech, 8000)
        assert answer is not None, "no answer"
        await wait_bot_quiet(stream)
    finally:
        await stream.hangup()
    streams = [s for s in served.emu.deepgram.streams if s.query.get("model") == "flux-general-en"]
    assert streams and streams[-1].query["eager_eot_threshold"] == "0.5"
    [utt] = streams[-1].utterances
    assert utt.eager_sent_at is not None and utt.final_sent_at is not None
    # The reply was generated on the eager prediction and released at the EndOfTurn:
    # the caller hears it well before EndOfTurn + the LLM's TTFT + Piper would allow.
    assert _spec("started") == started + 1
    assert _spec("confirmed") == confirmed + 1
    assert len(served.emu.openai.requests) == n_llm + 1  # one inference for the turn
    assert answer - end < 2.5


async def test_flux_caller_going_on_after_the_eager_prediction_withdraws_it(
    served: Served, flux_app: Pipeswitch
) -> None:
    speech = await served.speech(QUESTION, 8000)
    started, wasted = _spec("started"), _spec("wasted")
    n_llm = len(served.emu.openai.requests)
    stream = await open_call(_url(flux_app, "flux-2"), 8000, "json-stream")
    try:
        await asyncio.sleep(0.5)
        # A pause longer than the eager prediction (120 ms), shorter than EndOfTurn (500 ms).
        stream.queue_caller_audio(speech)
        stream.queue_caller_silence(0.3)
        stream.queue_caller_audio(speech)
        stream.queue_caller_silence(0.3)
        await stream.wait_caller_drained(timeout_s=len(speech) / 8000 + 5.0)
        end = stream.last_voiced_sent_at()
        assert end is not None
        answer = await wait_for_bot_audio(stream, end, 8.0)
        assert answer is not None, "no answer after the second sentence"
        await wait_bot_quiet(stream)
        # Nothing was played between the two sentences (the eager reply was held, then dropped).
        first_end = end - len(speech) / 16000 - 0.3
        assert stream.first_bot_audio_received_after(first_end - 0.2) == answer
    finally:
        await stream.hangup()
    streams = [s for s in served.emu.deepgram.streams if s.query.get("model") == "flux-general-en"]
    [utt] = streams[-1].utterances
    assert utt.resumed_after_eager == 1
    assert _spec("wasted") >= wasted + 1
    assert _spec("started") >= started + 2  # the withdrawn one and the final sentence's
    # The committed turn holds both sentences; its reply answers that text.
    last = served.emu.openai.requests[-1]
    assert utt.text in str(last.to_dict())
    assert len(served.emu.openai.requests) >= n_llm + 2
