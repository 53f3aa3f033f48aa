"""Short measurements of call control over ESL, through the emulated switch.

``python -m pipeswitch.bench.fakeswitch.esl_measure [--turns N] [--rtt N]`` prints JSON:

* ESL command round trip (``api status``; ``bgapi`` until its BACKGROUND_JOB) p50/p99;
* per playback dialect (``file`` = community build + ESL playback, ``json-stream`` =
  voxcom, ``binary`` = cloudfieldcz): first audio the caller *hears* after the end
  of their question, and barge-in stop (caller speech onset -> the interrupted
  reply is silent on the channel).

Why here: the numbers come from the same emulator rules the tests use (doc §14-15
timings for ESL playback, the fork models for the streaming dialects); emulated
Deepgram/Groq at their published medians, real Piper.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp
import numpy as np

from pipeswitch.bench.emulators.runner import EmulatorConfig, run_emulators
from pipeswitch.bench.emulators.scripts import LLM_SCRIPTS
from pipeswitch.bench.fakeswitch.esl import FakeSwitchEsl, recommended_variables
from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream
from pipeswitch.bench.realswitch import esl_round_trips
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import PlaybackDialect, Tenant
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.emulated import endpoints_for
from pipeswitch.transports.esl import EslClient

QUESTION = "What are your opening hours on Saturday?"
BARGE_IN = "Sorry, can you hold on a second?"
BUILD = {"file": "community", "json-stream": "voxcom", "binary": "cloudfieldcz"}
DIALECTS: tuple[PlaybackDialect, ...] = ("file", "json-stream", "binary")


async def esl_rtt(n: int) -> dict[str, Any]:
    """api and bgapi round trips against the emulated event socket (as against a real one)."""
    async with FakeSwitchEsl() as fs:
        c = EslClient("127.0.0.1", fs.port, "ClueCon")
        await c.start()
        await c.wait_connected(3.0)
        try:
            return await esl_round_trips(c, n, bg_command="uuid_exists nobody")
        finally:
            await c.close()


def _trim(pcm: bytes, peak: int = 300) -> bytes:
    a = np.frombuffer(pcm, dtype="<i2")
    idx = np.flatnonzero(np.abs(a) > peak)
    return a[idx[0] : idx[-1] + 1].tobytes() if len(idx) else pcm


async def _quiet(st: FakeSwitchStream, quiet_s: float = 0.6, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, frames = st.played_audio()
        last = next((t for t, v in reversed(frames) if v), None)
        if last is not None and time.monotonic() - last > quiet_s:
            return
        await asyncio.sleep(0.05)


async def _speak(st: FakeSwitchStream, pcm: bytes) -> float:
    st.queue_caller_audio(pcm)
    st.queue_caller_silence(0.3)
    await st.wait_caller_drained(timeout_s=len(pcm) / 16000 + 3)
    end = st.last_voiced_sent_at()
    assert end is not None
    return end


async def dialect_figures(turns: int) -> dict[str, Any]:
    """First audio heard and barge-in stop per dialect."""
    out: dict[str, Any] = {}
    async with run_emulators(
        EmulatorConfig(llm_script="office", stt_script="office", seed=1)
    ) as emu:
        fs = FakeSwitchEsl()
        await fs.start()
        tenants = [Tenant(name=f"{d}.m", playback=d) for d in DIALECTS]
        settings = Settings(
            host="127.0.0.1", port=0, providers="emulated", esl_enabled=True, esl_port=fs.port
        )
        app = Pipeswitch(
            settings,
            loader=StaticTenantLoader(tenants, default="file.m"),
            default_tenant="file.m",
            endpoints=endpoints_for(emu),
        )
        await app.start()
        assert app.esl is not None
        await app.esl.wait_connected(3.0)
        async with aiohttp.ClientSession() as http:
            speech: dict[str, bytes] = {}
            for text in (QUESTION, BARGE_IN):
                async with http.post(
                    app.endpoints.piper_for_rate(8000), json={"text": text, "voice": "joe"}
                ) as r:
                    speech[text] = _trim((await r.read())[44:])
        try:
            for d in DIALECTS:
                first: list[float] = []
                stops: list[float] = []
                for i in range(turns):
                    uuid = f"m-{d}-{i}"
                    build = BUILD[d]
                    ch = await fs.start_call(
                        f"ws://127.0.0.1:{app.port}/fs/{uuid}?domain={d}.m&rate=8000",
                        call_uuid=uuid,
                        build=build,  # type: ignore[arg-type]
                        variables=recommended_variables(build),  # type: ignore[arg-type]
                    )
                    st = ch.stream
                    assert st is not None
                    await st.wait_connected(3.0)
                    await _quiet(st)
                    emu.openai.script = LLM_SCRIPTS["office"]  # type: ignore[assignment]
                    end = await _speak(st, speech[QUESTION])
                    heard = await st.wait_bot_audio_after(end, 8.0, played=True)
                    if heard is not None:
                        first.append((heard - end) * 1000)
                    await _quiet(st)
                    # Barge-in into a long reply.
                    emu.openai.script = LLM_SCRIPTS["long"]  # type: ignore[assignment]
                    end = await _speak(st, speech[QUESTION])
                    heard = await st.wait_bot_audio_after(end, 8.0, played=True)
                    if heard is not None:
                        await asyncio.sleep(1.5)
                        n_sent = len(st.sent_frames)
                        st.queue_caller_audio(speech[BARGE_IN])
                        onset = None
                        while onset is None:
                            await asyncio.sleep(0.01)
                            onset = next((f.t for f in st.sent_frames[n_sent:] if f.voiced), None)
                        await asyncio.sleep(1.2)
                        _, frames = st.played_audio()
                        voiced = [t for t, v in frames if v and t >= onset - 0.1]
                        # The reply is silent from the first gap of >= 200 ms after the onset.
                        stop = next(
                            (a for a, b in zip(voiced, voiced[1:], strict=False) if b - a > 0.2),
                            voiced[-1] if voiced else onset,
                        )
                        stops.append((stop - onset) * 1000)
                    await fs.hangup(uuid)
                    await asyncio.sleep(0.3)
                out[d] = {
                    "build": BUILD[d],
                    "first_audio_heard_ms": [round(x) for x in first],
                    "first_audio_heard_median_ms": round(statistics.median(first))
                    if first
                    else None,
                    "barge_in_stop_ms": [round(x) for x in stops],
                    "barge_in_stop_median_ms": round(statistics.median(stops)) if stops else None,
                }
        finally:
            await app.stop(drain_secs=1.0)
            await fs.stop()
    return out


async def main_async(turns: int, rtt: int) -> dict[str, Any]:
    """Both measurements."""
    return {"esl_round_trip": await esl_rtt(rtt), "dialects": await dialect_figures(turns)}


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=3, help="calls per dialect")
    ap.add_argument("--rtt", type=int, default=500, help="api/bgapi round trips")
    a = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(a.turns, a.rtt)), indent=2))


if __name__ == "__main__":
    main()
