"""The call's ``PipelineWorker``, without a per-processor observer fan-out nobody reads.

Pipecat's ``WorkerObserver`` tells every observer about every frame *twice over*: once
per push (only the first push, for observers that ask for that) and once per
``process_frame`` of every processor the frame crosses. The second goes through each
observer's own queue and task: with the call's four observers (latency, provider
metrics, idle timeout, turn recorder) a frame crossing 15 processors costs 60 queue
puts and 60 task wake-ups, to call ``BaseObserver.on_process_frame``, which does
nothing. Only Pipecat's start-up timing observer implements it.

:class:`CallWorker` keeps Pipecat's worker observer (its per-observer proxies, its
first-push bookkeeping, ``add_observer``/``remove_observer``) and skips the
process-frame fan-out while no observer overrides ``on_process_frame``. Measured on
this machine (``pipeswitch bench hops``, medians): a frame crossing a queued processor
with the call's observers costs 18-20 µs of CPU under Pipecat's worker, 12-16 µs under
this one, and 8-10 µs through a processor in direct mode.
"""

from __future__ import annotations

from typing import Any

from pipecat.observers.base_observer import BaseObserver, FrameProcessed
from pipecat.pipeline.worker import PipelineWorker
from pipecat.pipeline.worker_observer import WorkerObserver


def wants_process_events(observer: BaseObserver) -> bool:
    """Whether ``observer`` implements ``on_process_frame`` (the base class's is a no-op)."""
    return type(observer).on_process_frame is not BaseObserver.on_process_frame


class ProcessQuietWorkerObserver(WorkerObserver):
    """Pipecat's ``WorkerObserver``; process-frame events only when someone listens."""

    def __init__(self, **kwargs: Any) -> None:
        """As ``WorkerObserver``."""
        super().__init__(**kwargs)
        self._listening = self._anyone_listening()

    def _anyone_listening(self) -> bool:
        # Cached: on_process_frame runs on every processor hop of every frame.
        return any(map(wants_process_events, self._observers))

    def add_observer(self, observer: BaseObserver) -> None:
        """As ``WorkerObserver.add_observer``."""
        super().add_observer(observer)
        self._listening = self._anyone_listening()

    async def remove_observer(self, observer: BaseObserver) -> None:
        """As ``WorkerObserver.remove_observer``."""
        await super().remove_observer(observer)
        self._listening = self._anyone_listening()

    async def on_process_frame(self, data: FrameProcessed) -> None:
        """Fan out only while an observer implements ``on_process_frame``."""
        if self._listening:
            await super().on_process_frame(data)


class CallWorker(PipelineWorker):
    """A ``PipelineWorker`` whose worker observer skips the unread process-frame fan-out.

    Pipecat builds its ``WorkerObserver`` inside ``__init__`` and has no parameter for
    another; the swap below reads the observers it collected (ours, plus its idle and
    turn-tracking ones) and replaces it before anything was set up.
    ``tests/pipelines/test_call_worker.py`` fails if a Pipecat upgrade moves either.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As ``PipelineWorker``."""
        super().__init__(*args, **kwargs)
        collected: list[BaseObserver] = list(self._observer._observers)
        self._observer = ProcessQuietWorkerObserver(observers=collected)
