"""Bench-only A/B switches: candidate optimisations patched into the bench server process.

``python -m pipeswitch.bench.serve --experiment NAME`` (``pipeswitch bench … --server-experiment
NAME``) applies one of these *at run time, in the bench's server process only*, so a
proposed change to ``pipelines/`` can be measured before anyone edits it. Nothing
here is imported by the production server. Each patch is the smallest faithful
version of the proposal it stands for (see the bench report).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

# Patches production has adopted (caller audio dropped after the user aggregator, no
# turn-tracking observer, no VAD loudness when the gate is off) are gone from here.
EXPERIMENTS: dict[str, str] = {
    "stt-batch-100ms": "send caller audio to Deepgram in 100 ms messages (flushed before "
    "Finalize) instead of one WebSocket message per 20 ms frame",
    "gc-automatic": "CPython's automatic collection while calls run, thresholds (700, 10, 100), "
    "as before 1 Dec 2026 (now paused while calls are up; a full collection hourly)",
    "keep-call-cycles": "finished calls left whole (not taken apart by pipelines/dismantle.py), "
    "as before 1 Dec 2026",
    "deflate-caller-audio": "caller audio to Deepgram deflated by the SDK's websockets client "
    "(its default where the server accepts), as before 1 Dec 2026 (now level 0)",
    "vad-score-every-window": "Silero scores every window, silence included, as before 1 Dec "
    "2026 (now windows within -60 dBFS after a reset are not scored)",
    "vad-batch-per-tick": "Silero gets each event-loop tick's windows as a batch at once, "
    "queued behind the one running, as before 1 Dec 2026 (now one batch in flight: what "
    "arrives meanwhile goes as the next)",
    "silero-nice": "the Silero thread at niceness 5, so a worker's event loop gets the CPU "
    "first when both are ready (today both at the process's own)",
    "hash-split": "--workers N: connections stay where SO_REUSEPORT's hash put them, as before "
    "1 Dec 2026 (now a worker with 2 more than the least busy hands new ones over)",
}


def apply(names: list[str]) -> list[str]:
    """Apply the named experiments; returns what was applied."""
    applied: list[str] = []
    for name in names:
        if name not in EXPERIMENTS:
            raise SystemExit(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
        _PATCHES[name]()
        applied.append(name)
    return applied


def _stt_batch() -> None:
    from pipecat.frames.frames import Frame, VADUserStoppedSpeakingFrame
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.deepgram.stt import DeepgramSTTService

    import pipeswitch.pipelines.services as services

    class BatchedDeepgramSTTService(DeepgramSTTService):
        """Deepgram accepts any chunk size; 100 ms messages cost 5x fewer sends."""

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self._pending = bytearray()

        async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
            self._pending += audio
            rate = self.sample_rate or 8000
            if len(self._pending) < rate // 10 * 2:  # 100 ms of 16-bit mono
                yield None
                return
            data, self._pending = bytes(self._pending), bytearray()
            async for f in super().run_stt(data):
                yield f

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            if isinstance(frame, VADUserStoppedSpeakingFrame) and self._pending:
                # Flush before the base class sends Finalize: no audio is held back.
                data, self._pending = bytes(self._pending), bytearray()
                async for _ in super().run_stt(data):
                    pass
            await super().process_frame(frame, direction)

    services.DeepgramSTTService = BatchedDeepgramSTTService  # type: ignore[misc]


def _gc_automatic() -> None:
    import gc

    import pipeswitch.pipelines.collector as collector

    collector.PAUSE_AUTOMATIC = False
    gc.set_threshold(700, 10, 100)


def _keep_call_cycles() -> None:
    import pipeswitch.pipelines.session as session

    session.DISMANTLE_CALLS = False


def _deflate_caller_audio() -> None:
    import pipeswitch.pipelines.media_fast_path as fast_path

    fast_path.send_uncompressed = lambda connection: False


def _vad_score_every_window() -> None:
    import pipeswitch.pipelines.vad as vad

    vad.QUIET_PEAK = 0  # no window has every sample within +/-0


def _vad_batch_per_tick() -> None:
    import pipeswitch.pipelines.vad as vad

    vad.ONE_BATCH_IN_FLIGHT = False


def _silero_nice() -> None:
    import pipeswitch.pipelines.vad as vad

    vad.SILERO_NICE = 5


def _hash_split() -> None:
    import os

    from pipeswitch.transports.handoff import BALANCE_ENV

    os.environ.pop(BALANCE_ENV, None)  # the worker then binds a plain SO_REUSEPORT site


_PATCHES: dict[str, Callable[[], None]] = {
    "stt-batch-100ms": _stt_batch,
    "gc-automatic": _gc_automatic,
    "keep-call-cycles": _keep_call_cycles,
    "deflate-caller-audio": _deflate_caller_audio,
    "vad-score-every-window": _vad_score_every_window,
    "vad-batch-per-tick": _vad_batch_per_tick,
    "silero-nice": _silero_nice,
    "hash-split": _hash_split,
}
