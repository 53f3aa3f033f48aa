"""Provider faults the turn watchdog recovers from, through the real emulators and the
real (unmodified) Pipecat services: the caller hears something within 2 s of the end of
their speech, and the call goes on once the provider is back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest_asyncio

from pipeswitch.bench.emulators.deepgram import DeepgramFaults
from pipeswitch.bench.emulators.openai_chat import ChatFaults
from pipeswitch.bench.faults import TtsFaultProxy
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.recovery import PHRASES
from pipeswitch.processors.turn_watchdog import HOLDING_PHRASE, LLM_APOLOGY
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet

DEAD_AIR_S = 2.0


def _lines(log_lines: list[str], uuid: str, text: str) -> list[str]:
    return [line for line in log_lines if uuid in line and text in line]


async def _answered_by_llm(served: Served, stream: object, speech: bytes) -> None:
    """The caller asks again and the LLM answers (a request reached it, audio came back)."""
    before = len(served.emu.openai.requests)
    _, answer = await ask(stream, speech, 8000, timeout_s=8.0)  # type: ignore[arg-type]
    assert answer is not None, "the call did not recover once the provider was back"
    assert len(served.emu.openai.requests) > before, "no LLM request: the turn was lost"


async def test_llm_stall_holds_retries_once_then_apologises(
    served: Served, log_lines: list[str]
) -> None:
    uuid = "wd-llm-stall"
    speech = await served.speech(QUESTION, 8000)
    stream = await open_call(served.url(uuid=uuid), 8000, "json-stream")
    try:
        await wait_bot_quiet(stream, quiet_s=1.0)
        n = len(served.emu.openai.requests)
        served.emu.openai.set_faults(ChatFaults(first_token_delay_s=60.0))
        end, heard = await ask(stream, speech, 8000, timeout_s=8.0)
        assert heard is not None and heard - end <= DEAD_AIR_S, "dead air after an LLM stall"
        # Holding phrase at 1.2 s, retry at ~2.5 s, apology at 5 s (the default budget).
        await asyncio.sleep(max(0.0, end + 5.5 - time.monotonic()))
        await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=10.0)
        # The stuck request was cancelled and the turn run once more, then the apology.
        assert len(served.emu.openai.requests) - n == 2
        assert _lines(log_lines, uuid, "retrying once")
        assert _lines(log_lines, uuid, "apologising")
        served.emu.openai.set_faults(ChatFaults())
        await _answered_by_llm(served, stream, speech)
        assert stream.close_record.server_close_at is None, "the call was dropped"
    finally:
        served.emu.openai.set_faults(ChatFaults())
        await stream.hangup()


async def test_stt_stall_is_reconnected_and_the_turn_replayed(
    served: Served, log_lines: list[str]
) -> None:
    uuid = "wd-stt-stall"
    speech = await served.speech(QUESTION, 8000)
    # The call's first Deepgram stream hangs: open, no transcript ever.
    served.emu.deepgram.set_faults(DeepgramFaults(stall=True, connections=1))
    stream = await open_call(served.url(uuid=uuid), 8000, "json-stream")
    try:
        await wait_bot_quiet(stream, quiet_s=1.0)
        n = len(served.emu.openai.requests)
        end, heard = await ask(stream, speech, 8000, timeout_s=8.0)
        assert heard is not None and heard - end <= DEAD_AIR_S, "dead air after an STT stall"
        await asyncio.sleep(max(0.0, end + 5.5 - time.monotonic()))
        await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=10.0)
        assert _lines(log_lines, uuid, "no transcript for the caller's speech; reconnecting")
        # What the hung stream swallowed went again to the new one: the question is
        # answered (held, not apologised for).
        assert _lines(log_lines, uuid, "again on the new stream")
        asked = [
            m["content"]
            for r in served.emu.openai.requests[n:]
            for m in r.messages
            if m.get("role") == "user"
        ]
        assert asked, "the swallowed turn never reached the LLM"
        assert not _lines(log_lines, uuid, "apologising")
        await _answered_by_llm(served, stream, speech)
    finally:
        served.emu.deepgram.set_faults(DeepgramFaults())
        await stream.hangup()


async def test_stt_5xx_at_call_start_is_revived(served: Served, log_lines: list[str]) -> None:
    uuid = "wd-stt-5xx"
    speech = await served.speech(QUESTION, 8000)
    served.emu.deepgram.set_faults(DeepgramFaults(reject_status=500))
    stream = await open_call(served.url(uuid=uuid), 8000, "json-stream")
    try:
        await wait_bot_quiet(stream, quiet_s=1.0)
        end, heard = await ask(stream, speech, 8000, timeout_s=8.0)
        assert heard is not None and heard - end <= DEAD_AIR_S, "dead air with the STT down"
        served.emu.deepgram.set_faults(DeepgramFaults())
        await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=10.0)
        # Pipecat gave up on the stream (3 quick failures); the watchdog brings it back.
        await _answered_by_llm(served, stream, speech)
        assert _lines(log_lines, uuid, "reconnecting")
    finally:
        served.emu.deepgram.set_faults(DeepgramFaults())
        await stream.hangup()


@pytest_asyncio.fixture(loop_scope="session")
async def tts_proxied(served: Served) -> AsyncIterator[tuple[Pipeswitch, TtsFaultProxy]]:
    """A second server whose Piper sits behind the bench's fault-injecting proxy."""
    proxy = TtsFaultProxy(served.app.endpoints.piper_url.removesuffix("/tts"))
    url = await proxy.start()
    settings = Settings(host="127.0.0.1", port=0, providers="emulated", idle_timeout_secs=30)
    app = Pipeswitch(
        settings,
        loader=StaticTenantLoader([Tenant(name="default")], default="default"),
        default_tenant="default",
        endpoints=replace(served.app.endpoints, piper_url=f"{url}/tts"),
    )
    await app.start()
    try:
        yield app, proxy
    finally:
        await app.stop(drain_secs=1.0)
        await proxy.stop()


async def test_tts_5xx_is_retried_then_apologised_for_from_cache(
    served: Served, tts_proxied: tuple[Pipeswitch, TtsFaultProxy], log_lines: list[str]
) -> None:
    app, proxy = tts_proxied
    uuid = "wd-tts-5xx"
    speech = await served.speech(QUESTION, 8000)
    stream = await open_call(
        f"ws://127.0.0.1:{app.port}/fs/{uuid}?domain=default&rate=8000", 8000, "json-stream"
    )
    try:
        await wait_bot_quiet(stream, quiet_s=1.0)
        lookup = PHRASES.lookup(app.endpoints.piper_for_rate(8000), Tenant(name="default").voice)
        deadline = time.monotonic() + 5.0
        while lookup(LLM_APOLOGY) is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert lookup(HOLDING_PHRASE) is not None, "recovery phrases were not cached"
        proxy.kind, proxy.armed = "5xx", True
        end, heard = await ask(stream, speech, 8000, timeout_s=8.0)
        # Piper answers nothing but 500s: only the cached apology can have been heard.
        assert heard is not None and heard - end <= DEAD_AIR_S, "dead air with the TTS failing"
        await wait_bot_quiet(stream, quiet_s=1.0, timeout_s=10.0)
        assert _lines(log_lines, "", "TTS request failed (HTTP 500); retrying once")
        assert _lines(log_lines, uuid, "apologising from cached audio")
        proxy.armed = False
        _, answer = await ask(stream, speech, 8000, timeout_s=8.0)
        assert answer is not None, "no answer once the TTS was back"
    finally:
        proxy.armed = False
        with contextlib.suppress(Exception):
            await stream.hangup()


def test_local_models_are_waited_for_not_retried() -> None:
    """The offline stack is slow, not stuck: no holding phrase before 3 s, no LLM rerun, and
    the apology only after 12 s (a cloud tenant keeps its 1.2 / 2.5 / 5 s budget)."""
    from pipeswitch.processors.turn_watchdog import WatchdogParams

    cloud = WatchdogParams.from_hold(1.2)
    local = WatchdogParams.for_local_models(1.2)
    assert (cloud.hold_secs, cloud.retry_llm) == (1.2, True)
    assert local.hold_secs == 3.0 and not local.retry_llm
    assert local.give_up_secs >= 12.0 and local.stt_stall_secs > cloud.stt_stall_secs
    assert WatchdogParams.for_local_models(4.0).hold_secs == 4.0  # a tenant's longer budget holds
