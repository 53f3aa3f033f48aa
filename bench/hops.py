"""``pipeswitch bench hops``: the CPU one frame costs to cross one Pipecat processor.

Every event of a call (an LLM token, a TTS chunk, a metrics report, a speaking tick) is
a frame that crosses a dozen processors; the profile puts that machinery at a fifth of
the server's GIL time. This measures one hop in isolation, in one process: ``--frames``
frames through ``--hops`` pass-through processors under a real ``PipelineWorker``, with
``--observers`` observers (the call's latency, provider metrics and turn recorder) and
the worker's idle-timeout observer, for each combination of

* processors queued (Pipecat's default: an input queue and tasks per processor) or in
  direct mode (``enable_direct_mode=True``: run in the pusher's task), and
* Pipecat's ``PipelineWorker`` or the call's :class:`~pipeswitch.pipelines.call_worker.CallWorker`
  (no process-frame fan-out to observers that do not read it).

Process CPU time per frame per hop, the minimum and the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from pipecat.frames.frames import Frame, LLMTextFrame, TTSAudioRawFrame
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from pipeswitch.pipelines.call_worker import CallWorker


def add_hops_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``bench hops``."""
    p.add_argument("--frames", type=int, default=20000)
    p.add_argument("--hops", type=int, default=6, help="pass-through processors")
    p.add_argument("--observers", type=int, default=3, help="besides the idle-timeout one")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write results.json here")


class _Pass(FrameProcessor):
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class _Count(FrameProcessor):
    """The last processor: counts the measured frames and swallows them."""

    def __init__(self, n: int, done: asyncio.Event) -> None:
        super().__init__()
        self._n = n
        self._seen = 0
        self._done = done

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, (TTSAudioRawFrame, LLMTextFrame)):
            self._seen += 1
            if self._seen == self._n:
                self._done.set()
            return
        await self.push_frame(frame, direction)


class _FirstPushObserver(BaseObserver):
    """Like the call's observers: first pushes only, a type check, nothing else."""

    def __init__(self) -> None:
        super().__init__(observe_every_push=False)
        self.seen = 0

    async def on_push_frame(self, data: FramePushed) -> None:
        if isinstance(data.frame, TTSAudioRawFrame):
            self.seen += 1


async def one_run(
    *, frames: int, hops: int, observers: int, direct: bool, call_worker: bool, kind: str
) -> float:
    """CPU µs per frame per hop for one configuration."""
    done = asyncio.Event()
    chain = [_Pass(enable_direct_mode=direct) for _ in range(hops)]
    make = CallWorker if call_worker else PipelineWorker
    worker = make(
        Pipeline([*chain, _Count(frames, done)]),
        params=PipelineParams(enable_metrics=True, send_initial_empty_metrics=False),
        observers=[_FirstPushObserver() for _ in range(observers)],
        enable_rtvi=False,
        enable_turn_tracking=False,
        idle_timeout_secs=300,
    )
    runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
    await runner.add_workers(worker)
    task = asyncio.ensure_future(runner.run())
    await asyncio.sleep(0.3)  # started
    audio = bytes(320)
    c0 = time.process_time()
    for i in range(frames):
        f: Frame = (
            TTSAudioRawFrame(audio=audio, sample_rate=8000, num_channels=1)
            if kind == "audio"
            else LLMTextFrame("word")
        )
        await chain[0].queue_frame(f)
        if i % 50 == 49:
            await asyncio.sleep(0)  # let the chain drain, as a call's bursts do
    await done.wait()
    cpu = time.process_time() - c0
    await worker.cancel()
    await task
    # The counting processor is a queued hop too: hops + 1 crossings per frame.
    return cpu / frames / (hops + 1) * 1e6


async def run_hops(args: argparse.Namespace) -> int:
    """Every combination, ``--repeat`` times, interleaved; print and optionally save."""
    combos = list(itertools.product((False, True), (False, True), ("text", "audio")))
    got: dict[tuple[bool, bool, str], list[float]] = {c: [] for c in combos}
    for _ in range(args.repeat):
        for call_worker, direct, kind in combos:
            got[(call_worker, direct, kind)].append(
                await one_run(
                    frames=args.frames,
                    hops=args.hops,
                    observers=args.observers,
                    direct=direct,
                    call_worker=call_worker,
                    kind=kind,
                )
            )
    print(
        f"# CPU per frame per hop ({args.frames} frames, {args.hops} pass-through processors, "
        f"{args.observers} observers + idle timeout; µs, min / median of {args.repeat})\n"
    )
    print("| worker | processors | LLM text frame | TTS audio frame |")
    print("|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    for call_worker, direct in itertools.product((False, True), (False, True)):
        name = "CallWorker" if call_worker else "PipelineWorker"
        cells = []
        for kind in ("text", "audio"):
            v = got[(call_worker, direct, kind)]
            cells.append(f"{min(v):.1f} / {statistics.median(v):.1f}")
            rows.append({"worker": name, "direct": direct, "frame": kind, "us_per_hop": v})
        print(f"| {name} | {'direct' if direct else 'queued'} | {cells[0]} | {cells[1]} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"hops": rows}, indent=1))
    return 0
