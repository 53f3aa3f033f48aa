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

EXPERIMENTS: dict[str, str] = {
    "drop-caller-audio": "drop InputAudioRawFrame right after the user aggregator "
    "(nothing downstream - LLM, TTS, output, assistant aggregator - needs caller audio)",
    "no-turn-tracking": "PipelineWorker(enable_turn_tracking=False): one observer proxy "
    "(and its queue hop per frame push) less",
    "no-vad-volume": "skip the per-window loudness computation when VAD min_volume is 0",
    "stt-batch-100ms": "send caller audio to Deepgram in 100 ms messages (flushed before "
    "Finalize) instead of one WebSocket message per 20 ms frame",
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


def _drop_caller_audio() -> None:
    from pipecat.frames.frames import Frame, InputAudioRawFrame
    from pipecat.processors.aggregators.llm_response_universal import LLMUserAggregator
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

    import pipeswitch.pipelines.cascade as cascade

    class DropCallerAudio(FrameProcessor):
        """Caller audio has reached STT and VAD; it stops here (no queue: direct mode)."""

        def __init__(self) -> None:
            super().__init__(enable_direct_mode=True)

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, InputAudioRawFrame) and direction is FrameDirection.DOWNSTREAM:
                return
            await self.push_frame(frame, direction)

    original = cascade.Pipeline

    def pipeline(processors: list[Any], **kw: Any) -> Any:
        out: list[Any] = []
        for p in processors:
            out.append(p)
            if isinstance(p, LLMUserAggregator):
                out.append(DropCallerAudio())
        return original(out, **kw)

    cascade.Pipeline = pipeline  # type: ignore[assignment,misc]


def _no_turn_tracking() -> None:
    import pipeswitch.pipelines.session as session

    original = session.PipelineWorker

    def worker(*args: Any, **kw: Any) -> Any:
        kw.setdefault("enable_turn_tracking", False)
        return original(*args, **kw)

    session.PipelineWorker = worker  # type: ignore[assignment,misc]


def _no_vad_volume() -> None:
    from pipeswitch.pipelines.vad import BatchedSileroVADAnalyzer

    original: Callable[[Any, bytes], float] = BatchedSileroVADAnalyzer._get_smoothed_volume

    def smoothed_volume(self: Any, audio: bytes) -> float:
        if self.params.min_volume <= 0.0:
            return 1.0
        return original(self, audio)

    BatchedSileroVADAnalyzer._get_smoothed_volume = smoothed_volume  # type: ignore[method-assign]


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


_PATCHES: dict[str, Callable[[], None]] = {
    "drop-caller-audio": _drop_caller_audio,
    "no-turn-tracking": _no_turn_tracking,
    "no-vad-volume": _no_vad_volume,
    "stt-batch-100ms": _stt_batch,
}
