"""Stop caller audio where nothing downstream needs it any more.

Pipecat passes every 20 ms input frame through every processor to the end of the
pipeline (it is a SystemFrame). In the cascade only the STT and the user
aggregator (VAD) use it; after them, each hop is an asyncio queue put, a task
switch and an observer notification, 50 times a second per call, for nothing.
"""

from __future__ import annotations

from typing import Any

from pipecat.frames.frames import Frame, InputAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipeswitch.transports.frames import CallerSpeechFrame


class CallerAudioSink(FrameProcessor):
    """Consumes caller audio (and the fast path's speech counts); passes the rest on."""

    def __init__(self, **kwargs: Any) -> None:
        # Direct mode: frames run through in the pusher's task (no queue, no task of our
        # own); nothing here waits, so there is nothing to queue behind.
        kwargs.setdefault("enable_direct_mode", True)
        super().__init__(**kwargs)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, (InputAudioRawFrame, CallerSpeechFrame)):
            await self.push_frame(frame, direction)
