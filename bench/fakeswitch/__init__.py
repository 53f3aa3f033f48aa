"""FreeSWITCH emulator: mod_audio_stream client (libwsc 1.1.0 wire behaviour).

Used by tests, the latency bench and ``pipeswitch call``/``demo`` to drive the
Pipeswitch server as a real FreeSWITCH would. See ``stream.FakeSwitchStream``.
"""

from pipeswitch.bench.fakeswitch.records import CloseRecord, ReceivedAudio, SentFrame, StreamEvent
from pipeswitch.bench.fakeswitch.stream import ConnState, FakeSwitchStream, StreamConfig

__all__ = [
    "CloseRecord",
    "ConnState",
    "FakeSwitchStream",
    "ReceivedAudio",
    "SentFrame",
    "StreamConfig",
    "StreamEvent",
]
