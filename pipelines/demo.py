"""``pipeswitch demo``: the offline default answering one emulated call, end to end.

Starts the server on the embedded models (Whisper tiny.en, Qwen2.5 0.5B, Piper; no
keys, no network), places one call through the FreeSWITCH emulator with a spoken
question, and prints what the caller said, what the bot answered, and where the
time went. ``--out reply.wav`` keeps the bot's reply as a WAV file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from pipeswitch.bench.fakeswitch.audio import load_wav, resample, write_wav
from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig
from pipeswitch.config.settings import Settings
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.compose import CallPipeline
from pipeswitch.pipelines.local.models import set_offline_env
from pipeswitch.pipelines.piper_client import synthesize
from pipeswitch.pipelines.session import CallRecord

DEFAULT_QUESTION = "Hello, what time do you open tomorrow morning?"


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``pipeswitch demo``."""
    p.add_argument(
        "--question", default=DEFAULT_QUESTION, help="text the caller says (spoken by Piper)"
    )
    p.add_argument(
        "--wav", type=Path, default=None, help="use this recording as the question instead"
    )
    p.add_argument("--out", type=Path, default=None, help="write the bot's reply to this WAV file")
    p.add_argument(
        "--rate", type=int, choices=(8000, 16000), default=8000, help="stream sample rate"
    )
    p.add_argument(
        "--turns", type=int, default=1, help="ask the question this many times in one call"
    )
    p.add_argument("--log-level", default="WARNING", help="server log level")


async def _speak(http: aiohttp.ClientSession, piper_url: str, text: str) -> bytes:
    pcm, _ = await synthesize(http, piper_url, text, voice="joe")
    return pcm


async def _wait_quiet(
    stream: FakeSwitchStream, after: float, quiet_s: float, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = stream.last_bot_audio_at()
        if last is not None and last > after and time.monotonic() - last > quiet_s:
            return
        await asyncio.sleep(0.05)


async def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns a process exit code."""
    set_offline_env()
    t_start = time.monotonic()
    settings = Settings(host="127.0.0.1", port=0, providers="local")
    app = Pipeswitch(settings)
    done: asyncio.Future[tuple[CallRecord, CallPipeline]] = (
        asyncio.get_running_loop().create_future()
    )
    await app.start()
    cold_start = time.monotonic() - t_start
    assert app.sessions is not None

    async def _finished(rec: CallRecord, cp: CallPipeline) -> None:
        if not done.done():
            done.set_result((rec, cp))

    app.sessions.finished_hooks.append(_finished)
    rate = args.rate
    try:
        async with aiohttp.ClientSession() as http:
            if args.wav:
                pcm, wav_rate = load_wav(args.wav)
                question = resample(pcm, wav_rate, rate) if wav_rate != rate else pcm
            else:
                question = await _speak(http, app.endpoints.piper_for_rate(rate), args.question)
        stream = FakeSwitchStream(
            StreamConfig(
                url=f"ws://127.0.0.1:{app.port}/fs/demo-call?domain=default&rate={rate}&mix=mono",
                rate=rate,
                playback="voxcom",
                metadata='{"caller":"demo"}',
            )
        )
        await stream.start()
        if not await stream.wait_connected(3.0):
            print("the call did not connect")
            return 1
        connected = time.monotonic()
        await _wait_quiet(stream, 0.0, 0.7, 15.0)  # the greeting
        greeting_at = stream.first_bot_audio_received_after(0.0)
        latencies: list[float] = []
        premature = 0  # replies that began before the caller's last word
        speech_end = 0.0
        first_reply: float | None = None
        for _ in range(max(1, args.turns)):
            asked_at = time.monotonic()
            stream.queue_caller_audio(question)
            stream.queue_caller_silence(0.3)
            await stream.wait_caller_drained(timeout_s=len(question) / (2 * rate) + 5)
            speech_end = stream.last_voiced_sent_at() or time.monotonic()
            # Returns when the reply is over; the cap only matters on a starved CPU, where the
            # 0.5B LLM can take tens of seconds (measured 24 s at load average 15 on 2 cores).
            await _wait_quiet(stream, speech_end, 1.0, 60.0)
            early = stream.first_bot_audio_received_after(asked_at)
            premature += early is not None and early < speech_end
            first_reply = stream.first_bot_audio_received_after(speech_end)
            if first_reply is not None:
                latencies.append(first_reply - speech_end)
            if first_reply is None:
                break
        await stream.hangup()
        rec, _ = await asyncio.wait_for(done, 10.0)
    finally:
        await app.stop()

    _, rx = stream.received_audio()
    pcm_all, _ = stream.received_audio()
    # Keep the reply only: the audio received after the caller stopped talking.
    offset = sum(a.nbytes for a in rx if a.t <= speech_end)
    if args.out is not None:
        write_wav(args.out, pcm_all[offset:], rate)
    user = [m.get("content") for m in rec.messages if m.get("role") == "user"]
    bot = [m.get("content") for m in rec.messages if m.get("role") == "assistant"]
    summary: dict[str, Any] = {
        "caller_said": " ".join(str(u) for u in user) or None,
        "bot_replied": bot[-1] if len(bot) > 1 else None,
        "greeting": bot[0] if bot else None,
        "cold_start_s": round(cold_start, 2),
        "greeting_ms": round((greeting_at - connected) * 1000) if greeting_at else None,
        "turn_latency_ms_wire": [round(x * 1000) for x in latencies],
        "turn_latency_ms_wire_p50": round(1000 * statistics.median(latencies))
        if latencies
        else None,
        "turn_latency_ms_pipeline": [round(x * 1000) for x in rec.turn_latencies],
        "premature_replies": premature,
        # Timings on a shared machine mean little without it (1, 5, 15 min; 2 cores).
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "stages": [b.turn_contribution_lines() for b in rec.breakdowns] or None,
        "reply_wav": str(args.out) if args.out else None,
    }
    print(json.dumps(summary, indent=2))
    return 0 if summary["bot_replied"] and first_reply else 1
