"""``pipeswitch bench playout``: the CPU of the bot-audio path alone.

N calls in one process, each a real ``FreeSwitchCallTransport`` under a Pipecat worker
on a real aiohttp socket, each read by a WebSocket client in the same process (the
FreeSWITCH side). Every call is handed ``--secs`` of TTS audio in one-second frames, as
Piper delivers a sentence, and the process's CPU is timed while it plays out in real
time. No providers, no VAD, no caller audio: what is left is Pipecat's media sender, the
transport's pacing and the socket writes (and the clients' reads, the same in any A/B).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from pipecat.frames.frames import TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from pipeswitch.transports.call_info import CallInfo
from pipeswitch.transports.dialects import make_dialect
from pipeswitch.transports.pacer import PlayoutPacer
from pipeswitch.transports.serializer import ModAudioStreamSerializer
from pipeswitch.transports.transport import BOT_CHUNK_10MS, FreeSwitchCallTransport


def add_playout_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``bench playout``."""
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--secs", type=float, default=15.0, help="bot audio per call")
    p.add_argument("--rate", type=int, choices=(8000, 16000), default=8000)
    p.add_argument("--dialect", choices=("json-stream", "binary"), default="json-stream")
    p.add_argument(
        "--chunk-10ms",
        type=int,
        default=BOT_CHUNK_10MS,
        help="Pipecat's output chunk (audio_out_10ms_chunks); 2 = a chunk per wire frame",
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write results.json here")


async def _one_run(args: argparse.Namespace) -> dict[str, Any]:
    rate, n = args.rate, args.calls
    calls: list[tuple[PipelineWorker, FreeSwitchCallTransport]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        info = CallInfo(call_uuid=request.match_info["uuid"], domain=None, rate=rate, mix="mono")
        ser = ModAudioStreamSerializer(
            stream_rate=rate, channels=1, dialect=make_dialect(args.dialect)
        )
        params = TransportParams(
            audio_in_enabled=True,
            audio_in_sample_rate=rate,
            audio_out_enabled=True,
            audio_out_sample_rate=rate,
            audio_out_10ms_chunks=args.chunk_10ms,
            audio_out_end_silence_secs=0,
        )
        transport = FreeSwitchCallTransport(ws, ser, params, info)
        worker = PipelineWorker(
            Pipeline([transport.input(), transport.output()]),
            params=PipelineParams(audio_in_sample_rate=rate, audio_out_sample_rate=rate),
            enable_rtvi=False,
            enable_turn_tracking=False,
            idle_timeout_secs=None,
        )
        calls.append((worker, transport))
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(worker)
        await runner.run()
        return ws

    app = web.Application()
    app.router.add_get("/fs/{uuid}", handler)
    site_runner = web.AppRunner(app)
    await site_runner.setup()
    site = web.TCPSite(site_runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    http = aiohttp.ClientSession()
    got = [0] * n

    async def far_end(i: int) -> None:
        async with http.ws_connect(f"http://127.0.0.1:{port}/fs/c{i}") as ws:
            async for _ in ws:
                got[i] += 1

    readers = [asyncio.ensure_future(far_end(i)) for i in range(n)]
    while len(calls) < n:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    second = b"\x10\x20" * rate  # one second, as a TTS service delivers a sentence
    pacer = PlayoutPacer.for_running_loop()
    rounds0 = pacer.rounds
    cpu0, t0 = time.process_time(), time.monotonic()
    for worker, _ in calls:
        await asyncio.sleep(0.02 * 7 / n)  # calls spread over the 20 ms frame, as in life
        await worker.queue_frame(TTSStartedFrame())
        for _ in range(int(args.secs)):
            await worker.queue_frame(TTSAudioRawFrame(second, rate, 1))
        await worker.queue_frame(TTSStoppedFrame())
    expect = int(args.secs / 0.02)
    while min(got) < expect:
        await asyncio.sleep(0.05)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    result = {
        "calls": n,
        "secs": args.secs,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "cpu_pct_per_call": round(100 * cpu / wall / n, 3),
        "wire_messages_per_call": min(got),
        "underruns": sum(t.stats.underruns for _, t in calls),
        "pacer_rounds_per_s": round((pacer.rounds - rounds0) / wall, 1),
    }
    for worker, _ in calls:
        await worker.cancel()
    for reader in readers:
        reader.cancel()
    await http.close()
    await site_runner.cleanup()
    return result


async def run_playout(args: argparse.Namespace) -> int:
    """Run ``--repeat`` times; print and keep every run."""
    runs = []
    for _ in range(args.repeat):
        r = await _one_run(args)
        runs.append(r)
        print(
            f"{r['calls']} calls, {r['secs']:.0f} s each: {r['cpu_pct_per_call']:.2f} % of a "
            f"core per call (server and far ends), {r['underruns']} underruns, "
            f"{r['pacer_rounds_per_s']:.0f} clock rounds/s"
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        (args.out / "results.json").write_text(
            json.dumps({"params": params, "runs": runs}, indent=1)
        )
    return 0
