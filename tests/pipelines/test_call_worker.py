"""The call's worker: Pipecat's observers still see what they read, minus the unread fan-out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from pipecat.frames.frames import Frame, LLMTextFrame
from pipecat.observers.base_observer import BaseObserver, FrameProcessed, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import (
    FrameDirection,
    FrameProcessor,
    FrameProcessorSetup,
)
from pipecat.utils.asyncio.task_manager import TaskManager
from pipecat.workers.runner import WorkerRunner

from pipeswitch.pipelines.call_worker import CallWorker, ProcessQuietWorkerObserver

pytestmark = pytest.mark.asyncio


class _Pass(FrameProcessor):
    def __init__(self) -> None:
        super().__init__()
        self.observer_seen: object = None

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        await super().setup(setup)
        self.observer_seen = setup.observer

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class _Pushes(BaseObserver):
    def __init__(self) -> None:
        super().__init__(observe_every_push=False)
        self.texts: list[str] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        if isinstance(data.frame, LLMTextFrame):
            self.texts.append(data.frame.text)


class _Processes(BaseObserver):
    def __init__(self) -> None:
        super().__init__()
        self.processed: list[str] = []

    async def on_process_frame(self, data: FrameProcessed) -> None:
        if isinstance(data.frame, LLMTextFrame) and isinstance(data.processor, _Pass):
            self.processed.append(data.processor.name)


def _worker(
    procs: list[FrameProcessor], observers: list[BaseObserver], idle: float | None = None
) -> CallWorker:
    return CallWorker(
        Pipeline(procs),
        params=PipelineParams(),
        observers=observers,
        enable_rtvi=False,
        enable_turn_tracking=False,
        idle_timeout_secs=idle,
    )


async def _run(worker: CallWorker) -> tuple[WorkerRunner, asyncio.Future[None]]:
    runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
    await runner.add_workers(worker)
    return runner, asyncio.ensure_future(runner.run())


async def _settle(cond: Callable[[], bool], secs: float = 2.0) -> None:
    end = asyncio.get_running_loop().time() + secs
    while not cond() and asyncio.get_running_loop().time() < end:
        await asyncio.sleep(0.01)


async def test_processors_get_the_quiet_observer_and_pushes_still_reach_observers() -> None:
    a, b = _Pass(), _Pass()
    pushes = _Pushes()
    worker = _worker([a, b], [pushes])
    _, task = await _run(worker)
    await _settle(lambda: a.observer_seen is not None)
    assert isinstance(a.observer_seen, ProcessQuietWorkerObserver)
    assert a.observer_seen is b.observer_seen
    for word in ("one", "two", "three"):
        await a.queue_frame(LLMTextFrame(word))
    await _settle(lambda: len(pushes.texts) == 3)
    # Once per frame (the first push), as under Pipecat's own worker observer.
    assert pushes.texts == ["one", "two", "three"]
    await worker.cancel()
    await task


async def test_no_process_events_are_queued_while_nobody_reads_them() -> None:
    pushes = _Pushes()
    quiet = ProcessQuietWorkerObserver(observers=[pushes])
    await quiet.setup(TaskManager())
    proc = _Pass()
    data = FrameProcessed(
        processor=proc, frame=LLMTextFrame("x"), direction=FrameDirection.DOWNSTREAM, timestamp=0
    )
    for _ in range(10):
        await quiet.on_process_frame(data)
    proxies = quiet._proxies
    assert proxies is not None
    assert all(p.queue.qsize() == 0 for p in proxies.values())
    assert pushes.texts == []
    await quiet.cleanup()


async def test_an_observer_that_reads_process_events_gets_them_added_early_or_late() -> None:
    a, b = _Pass(), _Pass()
    early = _Processes()
    worker = _worker([a, b], [early])
    _, task = await _run(worker)
    await _settle(lambda: a.observer_seen is not None)
    await a.queue_frame(LLMTextFrame("one"))
    await _settle(lambda: len(early.processed) >= 2)
    assert early.processed == [a.name, b.name]

    late = _Processes()
    worker.add_observer(late)
    await a.queue_frame(LLMTextFrame("two"))
    await _settle(lambda: len(late.processed) >= 2)
    assert late.processed == [a.name, b.name]
    await worker.remove_observer(late)
    await worker.remove_observer(early)
    assert isinstance(a.observer_seen, ProcessQuietWorkerObserver)
    assert not a.observer_seen._listening
    await worker.cancel()
    await task


async def test_idle_timeout_still_ends_an_idle_call() -> None:
    worker = _worker([_Pass()], [], idle=0.3)
    fired = asyncio.Event()

    @worker.event_handler("on_idle_timeout")
    async def _idle(_: CallWorker) -> None:
        fired.set()

    _, task = await _run(worker)
    await asyncio.wait_for(fired.wait(), 5.0)
    await asyncio.wait_for(task, 5.0)
