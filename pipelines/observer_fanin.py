"""A call's observers behind one of Pipecat's observer proxies.

Pipecat's ``WorkerObserver`` gives every observer of a pipeline its own queue and
task, and queues to each one every ``FrameProcessed`` event (whether or not it
implements ``on_process_frame``) and every frame's first push: with N observers,
N queue puts and N task wake-ups per frame hop, on the event loop every call's
audio shares. :class:`FanInObserver` stands for all of a call's observers, so a hop
costs one; it hands each observer exactly what the proxies would have (first
pushes, or every push to those that ask for it; processed frames only to those
that implement ``on_process_frame``), in the same order, and one observer's
exception is logged without silencing the others (a proxy's task would have died).
"""

from __future__ import annotations

from typing import Any

from loguru import logger
from pipecat.observers.base_observer import (
    BaseObserver,
    FrameProcessed,
    FramePushed,
    ProcessorSetUp,
)
from pipecat.utils.asyncio.task_manager import BaseTaskManager


def _implements(observer: BaseObserver, name: str) -> bool:
    """Whether ``observer`` has its own ``name`` (BaseObserver's does nothing)."""
    method = getattr(observer, name)
    return getattr(method, "__func__", method) is not getattr(BaseObserver, name)


class FanInObserver(BaseObserver):
    """Several observers, one proxy (see the module docstring)."""

    def __init__(self, observers: list[BaseObserver], **kwargs: Any) -> None:
        """Observe for ``observers``, in their order."""
        super().__init__(observe_every_push=any(o.observe_every_push for o in observers), **kwargs)
        self.observers = list(observers)
        self._every = [(o, o.observe_every_push) for o in self.observers]
        self._processed = [o for o in self.observers if _implements(o, "on_process_frame")]
        self._setups = [o for o in self.observers if _implements(o, "on_processor_setup")]

    async def setup(self, task_manager: BaseTaskManager) -> None:
        """Set up this observer and each of its observers (their event handlers' tasks)."""
        await super().setup(task_manager)
        for o in self.observers:
            await o.setup(task_manager)

    async def cleanup(self) -> None:
        """Clean up each observer, then this one."""
        for o in self.observers:
            try:
                await o.cleanup()
            except Exception as exc:
                logger.error("observer {} cleanup failed: {}", o, exc)
        await super().cleanup()

    async def on_pipeline_started(self) -> None:
        """Tell each observer."""
        for o in self.observers:
            try:
                await o.on_pipeline_started()
            except Exception as exc:
                logger.exception("observer {} failed: {}", o, exc)

    async def on_push_frame(self, data: FramePushed) -> None:
        """A push, to the observers that would have been told of it."""
        first = data.first_push
        for o, every in self._every:
            if first or every:
                try:
                    await o.on_push_frame(data)
                except Exception as exc:
                    logger.exception("observer {} failed: {}", o, exc)

    async def on_process_frame(self, data: FrameProcessed) -> None:
        """A processed frame, to the observers that implement ``on_process_frame``."""
        for o in self._processed:
            try:
                await o.on_process_frame(data)
            except Exception as exc:
                logger.exception("observer {} failed: {}", o, exc)

    async def on_processor_setup(self, data: ProcessorSetUp) -> None:
        """A processor's set-up timing, to the observers that implement it."""
        for o in self._setups:
            try:
                await o.on_processor_setup(data)
            except Exception as exc:
                logger.exception("observer {} failed: {}", o, exc)
