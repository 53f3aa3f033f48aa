"""Drive real Pipecat services in a tiny pipeline and record what comes out.

``[up recorder] -> service -> [down recorder]``: downstream frames
(transcriptions, LLM text) land in ``down``; upstream ones (``ErrorFrame``) in
``up``. Each record carries ``time.monotonic()``, the emulators' clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from pipecat.frames.frames import Frame, InputAudioRawFrame, StartFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from pipeswitch.bench.emulators.elevenlabs_convai import (
    ConvAISettings,
    ElevenLabsConvAIEmulator,
    serve_convai,
)
from pipeswitch.bench.emulators.latency import LatencyModel

F = TypeVar("F", bound=Frame)


class FrameRecorder(FrameProcessor):
    """Passes every frame on and records those travelling in one direction."""

    def __init__(self, direction: FrameDirection) -> None:
        """Record frames going ``direction``."""
        super().__init__()
        self._direction = direction
        self.records: list[tuple[float, Frame]] = []
        self._changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Record, then forward."""
        await super().process_frame(frame, direction)
        if direction == self._direction and not isinstance(frame, StartFrame):
            self.records.append((time.monotonic(), frame))
            self._changed.set()
        await self.push_frame(frame, direction)

    def of_type(self, cls: type[F]) -> list[tuple[float, F]]:
        """Recorded (time, frame) pairs of one frame type."""
        return [(t, f) for t, f in self.records if isinstance(f, cls)]

    async def wait_for(
        self,
        cls: type[F],
        within: float,
        predicate: Callable[[F], bool] = lambda f: True,
        count: int = 1,
    ) -> list[tuple[float, F]]:
        """Wait until ``count`` frames of ``cls`` matching ``predicate`` were recorded."""
        deadline = time.monotonic() + within
        while True:
            found = [(t, f) for t, f in self.of_type(cls) if predicate(f)]
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = [type(f).__name__ for _, f in self.records]
                raise AssertionError(f"timed out waiting for {count} {cls.__name__}; got {names}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


@dataclass
class Harness:
    """A running one-service pipeline."""

    worker: PipelineWorker
    up: FrameRecorder
    down: FrameRecorder
    sample_rate: int
    sent_at: list[float] = field(default_factory=list)

    async def stream_audio(self, pcm: bytes, frame_ms: int = 20) -> list[float]:
        """Queue ``pcm`` as real-time 20 ms input frames; returns each frame's send time."""
        step = self.sample_rate * frame_ms // 1000 * 2
        period = frame_ms / 1000.0
        start = time.monotonic()
        times = []
        for k, off in enumerate(range(0, len(pcm), step)):
            delay = start + k * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            times.append(time.monotonic())
            chunk = pcm[off : off + step]
            await self.worker.queue_frame(InputAudioRawFrame(chunk, self.sample_rate, 1))
        self.sent_at.extend(times)
        return times


@contextlib.asynccontextmanager
async def running_pipeline(
    processor: FrameProcessor, sample_rate: int = 16000
) -> AsyncIterator[Harness]:
    """Run ``processor`` between two recorders until the block exits."""
    up = FrameRecorder(FrameDirection.UPSTREAM)
    down = FrameRecorder(FrameDirection.DOWNSTREAM)
    worker = PipelineWorker(
        Pipeline([up, processor, down]),
        params=PipelineParams(audio_in_sample_rate=sample_rate),
        enable_rtvi=False,
        enable_turn_tracking=False,
        cancel_on_idle_timeout=False,
        idle_timeout_secs=None,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker: PipelineWorker, _frame: Frame) -> None:
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run_task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(started.wait(), 15)
        yield Harness(worker, up, down, sample_rate)
    finally:
        await worker.cancel()
        await asyncio.wait_for(run_task, 15)


def voiced(
    duration_s: float, sample_rate: int, *, f0: float = 130.0, level_dbfs: float = -14.0
) -> bytes:
    """A speech-like signal: a harmonic-rich voice at ``f0`` with a syllabic (4 Hz) envelope.

    Never silent inside (the envelope stays above 40 %), with 15 ms fades, so
    its energy ends where the signal ends.
    """
    n = int(duration_s * sample_rate)
    t = np.arange(n) / sample_rate
    wave = np.zeros(n)
    for k in range(1, int(3400 / f0) + 1):
        wave += np.sin(2 * np.pi * f0 * k * t + k) / k
    wave /= np.max(np.abs(wave))
    env = 0.7 + 0.3 * np.sin(2 * np.pi * 4.0 * t)
    fade = min(n, int(0.015 * sample_rate))
    ramp = np.linspace(0.0, 1.0, fade)
    env[:fade] *= ramp
    env[n - fade :] *= ramp[::-1]
    peak = 32767 * 10 ** (level_dbfs / 20)
    return (wave * env * peak).astype("<i2").tobytes()


def silence(duration_s: float, sample_rate: int, *, noise_dbfs: float = -70.0) -> bytes:
    """Line-noise-level "silence"."""
    n = int(duration_s * sample_rate)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(n) * 32767 * 10 ** (noise_dbfs / 20)
    return noise.astype("<i2").tobytes()


@contextlib.asynccontextmanager
async def convai_on_port(
    agent: str, reply: str, ping_interval_s: float
) -> AsyncIterator[tuple[ElevenLabsConvAIEmulator, int]]:
    """An ElevenLabs ConvAI emulator for one agent ("Hi there.", then ``reply`` to every turn
    after 50 ms) on its own port; the SDK's tests and the Pipecat service's share it."""
    emu = ElevenLabsConvAIEmulator(
        settings=ConvAISettings(
            agent_ids=[agent], first_message="Hi there.", ping_interval_s=ping_interval_s
        ),
        response_latency=LatencyModel.constant(50),
        script={"*": reply},
    )
    runner, port = await serve_convai(emu)
    try:
        yield emu, port
    finally:
        await runner.cleanup()
