"""One observer proxy for a call's observers: each sees what its own proxy would have shown."""

from __future__ import annotations

from pipecat.frames.frames import Frame, TextFrame
from pipecat.observers.base_observer import BaseObserver, FrameProcessed, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import run_test

from pipeswitch.pipelines.observer_fanin import FanInObserver


class Relay(FrameProcessor):
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class Log(BaseObserver):
    """Text frames it is told about: (event, text)."""

    def __init__(self, *, every: bool, processed: bool) -> None:
        super().__init__(observe_every_push=every)
        self.seen: list[tuple[str, str]] = []
        self.started = 0
        if processed:
            self.on_process_frame = self._processed  # type: ignore[method-assign]

    async def on_pipeline_started(self) -> None:
        self.started += 1

    async def on_push_frame(self, data: FramePushed) -> None:
        if isinstance(data.frame, TextFrame):
            self.seen.append(("push", data.frame.text))

    async def _processed(self, data: FrameProcessed) -> None:
        if isinstance(data.frame, TextFrame):
            self.seen.append(("processed", data.frame.text))


class Processing(Log):
    """Implements on_process_frame as a method (what the fan-in looks for)."""

    async def on_process_frame(self, data: FrameProcessed) -> None:
        if isinstance(data.frame, TextFrame):
            self.seen.append(("processed", data.frame.text))


class Broken(BaseObserver):
    async def on_push_frame(self, data: FramePushed) -> None:
        raise RuntimeError("observer bug")


def _observers() -> tuple[Log, Log, Processing, Log]:
    return (
        Log(every=True, processed=False),
        Log(every=False, processed=False),
        Processing(every=False, processed=False),
        Log(every=False, processed=True),  # on_process_frame set on the instance
    )


async def _run(observers: list[BaseObserver]) -> None:
    frames = [TextFrame(text="a"), TextFrame(text="b")]
    await run_test(
        Pipeline([Relay(), Relay(), Relay()]),
        frames_to_send=frames,
        expected_down_frames=[TextFrame, TextFrame],
        observers=observers,
    )


async def test_each_observer_sees_what_its_own_proxy_showed() -> None:
    alone = _observers()
    await _run(list(alone))
    fanned = _observers()
    fan = FanInObserver(list(fanned))
    await _run([fan])
    for a, f in zip(alone, fanned, strict=True):
        assert f.seen == a.seen
        assert f.started == a.started == 1
    every, first_only, processing, per_instance = fanned
    # Every hop of each text frame, only its first push, and the processors' events.
    assert len(every.seen) > 2 * 3 and every.seen.count(("push", "a")) > 3
    assert first_only.seen == [("push", "a"), ("push", "b")]
    assert processing.seen.count(("processed", "a")) >= 3
    assert per_instance.seen.count(("processed", "a")) >= 3
    # One proxy for all four: it wants every push because one of them does.
    assert fan.observe_every_push


async def test_a_failing_observer_does_not_silence_the_others() -> None:
    log = Log(every=False, processed=False)
    await _run([FanInObserver([Broken(), log])])
    assert [t for _, t in log.seen] == ["a", "b"]
