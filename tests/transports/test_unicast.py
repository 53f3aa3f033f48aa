"""Unicast media end to end: a stock FreeSWITCH (emulated: ESL + core unicast UDP) with
no mod_audio_stream, the dialplan's HTTP trigger, the real server and pipeline
(emulated Deepgram/Groq, real Piper). The caller hears the greeting and a reply,
barge-in stops the bot, and a hangup ends everything.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web
from loguru import logger
from pipecat.services.llm_service import LLMService

from pipeswitch.bench.emulators.openai_chat import ChatReply, ToolCall
from pipeswitch.bench.fakeswitch.esl import FakeSwitchEsl
from pipeswitch.bench.fakeswitch.unicast import UnicastLeg, install, legs
from pipeswitch.config.loaders import StaticTenantLoader, TenantResolver
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.cascade import build_cascade
from pipeswitch.pipelines.compose import CallContext, CallPipeline
from pipeswitch.processors.tools import ReceptionistTools, register_tools
from pipeswitch.transports.esl import EslClient
from pipeswitch.transports.unicast import (
    PortPool,
    UdpMedia,
    UnicastEndpoint,
    UnicastMedia,
    unicast_headers,
)
from tests.conftest import BARGE_IN, QUESTION, Served

ASYNC = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Rig:
    esl: FakeSwitchEsl
    client: EslClient
    media: UnicastMedia
    endpoint: UnicastEndpoint
    base: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rig(served: Served) -> AsyncIterator[Rig]:
    app = served.app
    assert app.server is not None and app.sessions is not None
    esl = FakeSwitchEsl()
    await esl.start()
    install(esl)
    client = EslClient("127.0.0.1", esl.port, "ClueCon")
    await client.start()
    assert await client.wait_connected(3.0)
    # A range of its own per xdist worker (two rigs on one host must not share ports).
    low = 31000 + 200 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    settings = Settings(unicast_port_min=low, unicast_port_max=low + 99)
    media = UnicastMedia(client, settings)
    endpoint = UnicastEndpoint(media, app.resolver, app.sessions.run_call, app.server.accepting)
    web_app = web.Application()
    endpoint.add_routes(web_app)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Rig(esl, client, media, endpoint, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
        await client.close()
        await esl.stop()


async def until(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def heard_after(leg: UnicastLeg, t: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = leg.first_heard_after(t)
        if h is not None:
            return h
        await asyncio.sleep(0.02)
    return None


async def quiet(leg: UnicastLeg, secs: float = 0.6, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = leg.last_heard_at()
        if last is not None and time.monotonic() - last > secs:
            return
        await asyncio.sleep(0.05)


async def start_call(served: Served, rig: Rig, uuid: str, rate: int) -> tuple[UnicastLeg, float]:
    rig.esl.new_channel(uuid, rate=rate)  # the dialplan answered
    t0 = time.monotonic()
    async with served.http.post(f"{rig.base}/unicast/{uuid}?domain=default&rate={rate}") as r:
        assert r.status == 200, await r.text()
    await until(lambda: uuid in legs(rig.esl), 3.0)  # ... and parked; the sendmsg arrived
    return legs(rig.esl)[uuid], t0


def test_port_pool_pairs() -> None:
    pool = PortPool(30001, 30006)
    a, b = pool.take(), pool.take()
    assert (a, b) == (30002, 30004) and pool.free == 0
    with pytest.raises(RuntimeError):
        pool.take()
    pool.give_back(a)
    assert pool.take() == a


@ASYNC
async def test_a_port_held_by_another_program_is_skipped() -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    # Another program on the host holds the pool's first (even) port.
    odd: list[socket.socket] = []
    while True:
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        holder.bind(("127.0.0.1", 0))
        if holder.getsockname()[1] % 2 == 0:
            break
        odd.append(holder)
    for sock in odd:
        sock.close()
    low = int(holder.getsockname()[1])
    settings = Settings(
        unicast_media_ip="127.0.0.1", unicast_port_min=low, unicast_port_max=low + 5
    )
    media = UnicastMedia(None, settings)  # type: ignore[arg-type]
    try:
        udp, port = await media._bind(8000)
    finally:
        holder.close()
        logger.remove(sink)
    await udp.close(1000, b"done")
    assert port == low + 2
    assert any(f"unicast port {low} is in use" in line for line in lines)


def test_sendmsg_headers_never_ask_for_native() -> None:
    h = unicast_headers("10.0.0.2", 24001, "10.0.0.9", 24000)
    assert h == {
        "call-command": "unicast",
        "local-ip": "10.0.0.2",
        "local-port": "24001",
        "remote-ip": "10.0.0.9",
        "remote-port": "24000",
        "transport": "udp",
    }


@ASYNC
async def test_pacer_sends_one_datagram_per_tick_and_clear_drops() -> None:
    got: list[float] = []
    loop = asyncio.get_running_loop()

    class Sink(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            got.append(time.monotonic())

    sink, _ = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
    peer = sink.get_extra_info("sockname")
    media = UdpMedia(("127.0.0.1", 0), peer, 320)
    await media.open()
    await media.send_bytes(bytes(320 * 10 + 100))  # 10 frames and a partial one
    await asyncio.sleep(0.1)
    await media.send_str('{"type":"clearAudio"}')
    at_clear = len(got)
    await asyncio.sleep(0.15)
    assert 2 <= at_clear <= 7, at_clear  # ~100 ms of 20 ms ticks (a loaded CI is slower)
    assert len(got) <= at_clear + 1  # the clear dropped the rest
    assert float(np.diff(got).min()) > 0.012  # never a burst
    await media.close()
    sink.close()


@ASYNC
@pytest.mark.parametrize("rate", [8000, 16000])
async def test_unicast_call_end_to_end(served: Served, rig: Rig, rate: int) -> None:
    uuid = f"unicast-{rate}"
    leg, t0 = await start_call(served, rig, uuid, rate)
    assert not leg.native
    greeting = await heard_after(leg, t0, 5.0)
    assert greeting is not None, "no greeting"
    await quiet(leg)
    leg.queue_caller_audio(await served.speech(QUESTION, rate))
    leg.queue_caller_silence(0.3)
    await leg.caller_drained(10.0)
    end = leg.last_voiced_sent_at
    assert end is not None
    answer = await heard_after(leg, end, 8.0)
    assert answer is not None, "no answer"
    await quiet(leg)
    # The reply is speech at the channel rate, 20 ms datagrams, never a burst.
    pcm = b"".join(h.pcm for h in leg.heard if h.t > end)
    rms = float(np.sqrt(np.mean(np.frombuffer(pcm, dtype="<i2").astype(np.float32) ** 2)))
    assert rms > 200
    assert leg.hazards == []
    assert {len(h.pcm) for h in leg.heard} == {rate // 50 * 2}
    print(
        f"\nunicast {rate} Hz: greeting {1000 * (greeting - t0):.0f} ms after the trigger, "
        f"reply {1000 * (answer - end):.0f} ms after end of speech"
    )
    free = rig.media.ports.free
    await rig.esl.caller_hangup(uuid)
    await until(lambda: uuid not in rig.endpoint.active, 5.0)
    assert rig.media.ports.free == free + 1  # the port pair came back
    assert leg.closed


@ASYNC
async def test_unicast_barge_in_stops_the_bot(served: Served, rig: Rig) -> None:
    rate = 8000
    uuid = "unicast-barge"
    leg, t0 = await start_call(served, rig, uuid, rate)
    assert await heard_after(leg, t0, 5.0) is not None
    # Speak over the greeting: the bot must stop.
    await asyncio.sleep(0.5)
    onset = time.monotonic()
    leg.queue_caller_audio(await served.speech(BARGE_IN, rate))
    leg.queue_caller_silence(0.5)
    await leg.caller_drained(10.0)
    stops = [h.t for h in leg.heard if h.t > onset and h.non_silent]
    # The last greeting audio heard after the onset: when the bot went quiet.
    gap = [b - a for a, b in zip(stops, stops[1:], strict=False)]
    cut = stops[next((i for i, g in enumerate(gap) if g > 0.3), len(stops) - 1)] if stops else onset
    print(f"\nunicast barge-in: bot audio stopped {1000 * (cut - onset):.0f} ms after speech onset")
    # Left alone, the greeting runs ~2.5 s past the onset; the caller's speech cut it.
    assert cut - onset < 2.0
    await rig.esl.caller_hangup(uuid)
    await until(lambda: uuid not in rig.endpoint.active, 5.0)


@ASYNC
async def test_trigger_refusals(served: Served, rig: Rig) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{rig.base}/unicast/x1?domain=nobody.example&rate=8000") as r:
            assert r.status == 404 and "unknown tenant" in (await r.json())["error"]
        async with http.post(f"{rig.base}/unicast/x2?domain=default&rate=11025") as r:
            assert r.status == 400


# -- tools on a real call: the announcement is heard before the transfer -------------------

TOOL_CONTROL: list[EslClient] = []
TOOLS: dict[str, ReceptionistTools] = {}


async def build_with_tools(ctx: CallContext) -> CallPipeline:
    """The cascade plus the tenant's tools over the test's ESL client (the wiring the
    call controller is to do for every cascade call)."""
    cp = await build_cascade(ctx)
    llm = cp.parts["llm"]
    assert isinstance(llm, LLMService) and cp.context is not None
    tools = register_tools(llm, cp.context, TOOL_CONTROL[0], ctx.tenant, ctx.call.call_uuid)
    assert tools is not None
    TOOLS[ctx.call.call_uuid] = tools
    return cp


TOOLS_TENANT = Tenant.model_validate(
    {
        "name": "tools.test",
        "pipeline": "python:tests.transports.test_unicast:build_with_tools",
        "tools": {
            "enabled": ["transfer_call", "take_message"],
            "transfer_targets": {"sales": {"destination": "2001", "description": "sales"}},
            "transfer_ring_secs": 1.0,
        },
    }
)


def sales_script(messages: list[dict[str, Any]]) -> ChatReply:
    last = messages[-1]
    # The outcome comes back as the tool result, or (when the caller talked over the
    # ringback and the tool call was cancelled) as a note once it is known.
    if last["role"] == "tool" or "did not answer" in str(last.get("content", "")):
        return "Sorry, sales did not answer. Can I take a message?"
    if last["role"] == "user" and "sales" in str(last.get("content", "")):
        return ToolCall("transfer_call", {"target": "sales"})
    return "Hello."


@asynccontextmanager
async def tools_endpoint(served: Served, rig: Rig) -> AsyncIterator[tuple[str, UnicastEndpoint]]:
    """A unicast trigger for the tools tenant, with the emulators scripted for a transfer."""
    TOOL_CONTROL[:] = [rig.client]
    assert served.app.server is not None and served.app.sessions is not None
    endpoint = UnicastEndpoint(
        rig.media,
        TenantResolver(StaticTenantLoader([TOOLS_TENANT])),
        served.app.sessions.run_call,
        served.app.server.accepting,
    )
    app = web.Application()
    endpoint.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    emu = served.emu
    saved = (emu.deepgram.script, emu.openai.script)
    emu.deepgram.script = ["Put me through to sales please."]
    emu.openai.script = sales_script
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", endpoint
    finally:
        emu.deepgram.script, emu.openai.script = saved
        await runner.cleanup()


async def ask_for_sales(served: Served, rig: Rig, base: str, uuid: str) -> UnicastLeg:
    rig.esl.new_channel(uuid)
    async with served.http.post(f"{base}/unicast/{uuid}?domain=tools.test&rate=8000") as r:
        assert r.status == 200
    await until(lambda: uuid in legs(rig.esl), 3.0)
    leg = legs(rig.esl)[uuid]
    await heard_after(leg, 0.0, 5.0)
    await quiet(leg)
    leg.queue_caller_audio(await served.speech("Put me through to sales please.", 8000))
    leg.queue_caller_silence(0.3)
    await leg.caller_drained(10.0)
    await until(lambda: rig.esl.channels[uuid].transfers, 15.0)
    return leg


@ASYNC
async def test_unanswered_transfer_over_unicast_comes_back(served: Served, rig: Rig) -> None:
    uuid = "unicast-tools"
    async with tools_endpoint(served, rig) as (base, endpoint):
        try:
            leg = await ask_for_sales(served, rig, base, uuid)
            ch = rig.esl.channels[uuid]
            sent = next(
                c.t for c in rig.esl.commands if c.command.startswith("bgapi uuid_transfer")
            )
            # The announcement was heard, and had finished, before the transfer went out.
            said = [h for h in leg.heard if h.non_silent and h.t > (leg.last_voiced_sent_at or 0)]
            assert said and said[-1].t < sent
            assert ch.transfers[0] == ("2001", "XML", "tools.test")
            await until(lambda: leg.closed, 1.0)  # leaving park tore the unicast media down
            # Nobody answers within 1 s: back to the parking extension, unicast started
            # again (same ports), and the agent speaks.
            await until(lambda: len(ch.transfers) == 2, 5.0)
            assert ch.transfers[1] == ("pipeswitch_return", "XML", "tools.test")
            back = rig.esl.commands[-1].t
            await until(lambda: legs(rig.esl)[uuid] is not leg, 3.0)
            again = legs(rig.esl)[uuid]
            assert again.local == leg.local and again.remote == leg.remote
            assert await heard_after(again, back, 8.0) is not None, "agent silent after return"
            assert TOOLS[uuid].state.transfers[0]["outcome"] == "no_answer"
            await quiet(again)
            assert len(ch.transfers) == 2  # the agent offered a message, it did not retry
        finally:
            await rig.esl.caller_hangup(uuid)
            await until(lambda: uuid not in endpoint.active, 5.0)


@ASYNC
async def test_answered_transfer_over_unicast_ends_the_agent(served: Served, rig: Rig) -> None:
    uuid = "unicast-tools-answered"
    async with tools_endpoint(served, rig) as (base, endpoint):
        await ask_for_sales(served, rig, base, uuid)
        ch = rig.esl.channels[uuid]
        rig.esl.fire("CHANNEL_BRIDGE", {"Unique-ID": uuid, "Other-Leg-Unique-ID": "sales-1"})
        # The agent's call ends by itself: no fallback transfer, no hangup of the caller.
        await until(lambda: uuid not in endpoint.active, 5.0)
        assert ch.transfers == [("2001", "XML", "tools.test")]
        assert not any(f"uuid_kill {uuid}" in c.command for c in rig.esl.commands)
        assert ch.up
        assert TOOLS[uuid].state.transfers[0]["outcome"] == "answered"
        await rig.esl.caller_hangup(uuid)
