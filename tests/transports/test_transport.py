"""The per-call transport in-process: a real aiohttp socket, a fake FreeSWITCH, no subprocess.

The test is FreeSWITCH (an aiohttp WebSocket client) and the pipeline at once:
frames it queues into the worker travel input -> output like a bot's would, and a
recorder after the output transport sees what the transport reports downstream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from pipecat.frames.frames import (
    AggregatedTextFrame,
    BotStartedSpeakingFrame,
    Frame,
    InputDTMFFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.utils.text.base_text_aggregator import TextType
from pipecat.workers.runner import WorkerRunner

from pipeswitch.transports.call_info import CallInfo
from pipeswitch.transports.dialects import make_dialect
from pipeswitch.transports.frames import PlaybackFinishedFrame
from pipeswitch.transports.serializer import ModAudioStreamSerializer
from pipeswitch.transports.transport import BOT_CHUNK_10MS, FreeSwitchCallTransport

pytestmark = pytest.mark.asyncio(loop_scope="session")

RATE = 8000
FRAME_BYTES = RATE // 50 * 2  # 20 ms of s16le


class Recorder(FrameProcessor):
    """Keeps every frame that reaches it, passes everything on."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        self.frames.append(frame)
        await self.push_frame(frame, direction)

    def of(self, kind: type[Frame]) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]


class BreakRecorder:
    """A PlaybackControl that remembers which calls it was asked to stop."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def break_playback(self, call_uuid: str) -> None:
        self.calls.append(call_uuid)


@dataclass
class FakeCall:
    """One call: the server side (transport + worker) and the FreeSWITCH side (ws)."""

    ws: aiohttp.ClientWebSocketResponse
    worker: PipelineWorker
    transport: FreeSwitchCallTransport
    before_output: Recorder
    after_output: Recorder
    playback: BreakRecorder
    received: list[tuple[float, str | bytes]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def speak(self, text: str, secs: float, *, end: bool = True) -> None:
        """What a TTS service does: the sentence, its audio, then its text frame."""
        sentence = AggregatedTextFrame(text=text, text_type=TextType.SENTENCE)
        sentence.will_be_spoken = True  # as a TTS service marks the text it speaks
        await self.worker.queue_frame(sentence)
        tone = b"\x10\x20" * (FRAME_BYTES // 2)
        for _ in range(int(secs / 0.02)):
            await self.worker.queue_frame(
                OutputAudioRawFrame(audio=tone, sample_rate=RATE, num_channels=1)
            )
        if end:
            await self.worker.queue_frame(TTSTextFrame(text=text, text_type=TextType.SENTENCE))

    def audio(self) -> list[tuple[float, bytes]]:
        return [(t, m) for t, m in self.received if isinstance(m, bytes)]

    def texts(self) -> list[str]:
        return [m for _, m in self.received if isinstance(m, str)]


async def _wait(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest_asyncio.fixture(loop_scope="session")
async def fake_call_factory() -> AsyncIterator[Any]:
    """Start an in-process server; each call runs the transport under a real worker."""
    made: list[FakeCall] = []
    pending: asyncio.Queue[FakeCall] = asyncio.Queue()
    dialects: dict[str, str] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        call = CallInfo(call_uuid=request.match_info["uuid"], domain=None, rate=RATE, mix="mono")
        serializer = ModAudioStreamSerializer(
            stream_rate=RATE,
            channels=1,
            dialect=make_dialect(dialects[call.call_uuid]),  # type: ignore[arg-type]
        )
        params = TransportParams(
            audio_in_enabled=True,
            audio_in_sample_rate=RATE,
            audio_out_enabled=True,
            audio_out_sample_rate=RATE,
            audio_out_10ms_chunks=BOT_CHUNK_10MS,
            audio_out_end_silence_secs=0,
        )
        playback = BreakRecorder()
        transport = FreeSwitchCallTransport(ws, serializer, params, call, playback_control=playback)
        before, after = Recorder(), Recorder()
        worker = PipelineWorker(
            Pipeline([transport.input(), before, transport.output(), after]),
            params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE),
            enable_rtvi=False,
            enable_turn_tracking=False,
            idle_timeout_secs=None,
        )

        @transport.event_handler("on_client_disconnected")
        async def _gone(_: Any, code: int | None, reason: str) -> None:
            await worker.cancel(reason="caller hung up")

        fc = FakeCall(None, worker, transport, before, after, playback)  # type: ignore[arg-type]
        await pending.put(fc)
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(worker)
        await runner.run()
        fc.closed.set()
        return ws

    app = web.Application()
    app.router.add_get("/fs/{uuid}", handler)
    server = TestServer(app)
    await server.start_server()
    http = aiohttp.ClientSession()

    async def open_call(uuid: str, dialect: str) -> FakeCall:
        dialects[uuid] = dialect
        ws = await http.ws_connect(server.make_url(f"/fs/{uuid}"), autoclose=False)
        fc = await asyncio.wait_for(pending.get(), 5.0)
        fc.ws = ws

        async def read() -> None:
            async for msg in ws:
                if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    fc.received.append((time.monotonic(), msg.data))
            fc.closed.set()

        asyncio.ensure_future(read())  # noqa: RUF006 - ends with the socket
        made.append(fc)
        return fc

    yield open_call
    for fc in made:
        if not fc.ws.closed:
            await fc.ws.close()
        await asyncio.wait_for(fc.closed.wait(), 5.0)
    await http.close()
    await server.close()


async def test_binary_audio_is_paced_and_a_finished_sentence_is_reported(
    fake_call_factory: Any,
) -> None:
    call: FakeCall = await fake_call_factory("pace-1", "binary")
    t0 = time.monotonic()
    await call.speak("Hello there.", secs=0.6)
    await _wait(lambda: call.after_output.of(PlaybackFinishedFrame))
    frames = call.audio()
    assert len(frames) == 30 and all(len(m) == FRAME_BYTES for _, m in frames)
    # Paced in real time, at most the 60 ms playout lead ahead of the clock.
    assert frames[-1][0] - t0 >= 0.6 - 0.06 - 0.02
    fact = call.after_output.of(PlaybackFinishedFrame)[0]
    assert fact.text == "Hello there." and not fact.interrupted
    assert fact.duration == pytest.approx(0.6, abs=1e-6)
    assert fact.playback_position == fact.duration
    # Bot audio stops at the output transport: nothing downstream needs it.
    assert not call.after_output.of(OutputAudioRawFrame)


async def test_barge_in_clears_and_reports_how_far_playback_got(fake_call_factory: Any) -> None:
    call: FakeCall = await fake_call_factory("barge-1", "binary")
    await call.speak("This sentence is cut short by the caller.", secs=2.0, end=False)
    await _wait(lambda: len(call.audio()) >= 25)  # ~0.5 s played
    await call.worker.queue_frame(InterruptionFrame())
    await _wait(lambda: '{"type":"clearAudio"}' in call.texts())
    await _wait(lambda: call.after_output.of(PlaybackFinishedFrame))
    fact = call.after_output.of(PlaybackFinishedFrame)[0]
    assert fact.interrupted
    # Reported as heard: what was written minus what the clear dropped from the far end.
    assert 0.3 < fact.playback_position <= fact.duration < 2.0
    assert fact.duration - fact.playback_position <= 0.06 + 0.02
    sent = len(call.audio())
    await asyncio.sleep(0.2)
    assert len(call.audio()) == sent, "audio kept flowing after the barge-in"
    assert not call.playback.calls  # streaming dialects stop in-band


async def test_json_stream_has_no_clear_so_the_lead_counts_as_heard(
    fake_call_factory: Any,
) -> None:
    call: FakeCall = await fake_call_factory("barge-json", "json-stream")
    await call.speak("No clear message exists for this build.", secs=1.0, end=False)
    await _wait(lambda: len(call.texts()) >= 10)
    await call.worker.queue_frame(InterruptionFrame())
    await _wait(lambda: call.after_output.of(PlaybackFinishedFrame))
    fact = call.after_output.of(PlaybackFinishedFrame)[0]
    assert fact.interrupted and fact.playback_position == fact.duration
    assert all(json.loads(t)["type"] == "streamAudio" for t in call.texts())


async def test_file_dialect_coalesces_and_breaks_playback_out_of_band(
    fake_call_factory: Any,
) -> None:
    call: FakeCall = await fake_call_factory("file-1", "file")
    await call.speak("One file for this sentence.", secs=0.4)
    await _wait(lambda: call.texts())
    msgs = [json.loads(t) for t in call.texts()]
    assert len(msgs) == 1 and msgs[0]["data"]["seq"] == 0
    await call.speak("And another that gets cut.", secs=0.4, end=False)
    await asyncio.sleep(0.05)
    await call.worker.queue_frame(InterruptionFrame())
    await _wait(lambda: call.playback.calls == ["file-1"])


async def test_dtmf_text_becomes_a_dtmf_frame(fake_call_factory: Any) -> None:
    call: FakeCall = await fake_call_factory("dtmf-1", "binary")
    await call.ws.send_str(json.dumps({"event": "start", "uuid": "dtmf-1"}))
    await call.ws.send_str(json.dumps({"event": "dtmf", "digit": "0"}))
    await _wait(lambda: call.before_output.of(InputDTMFFrame))
    assert call.before_output.of(InputDTMFFrame)[0].button.value == "0"


async def test_caller_close_ends_the_call(fake_call_factory: Any) -> None:
    call: FakeCall = await fake_call_factory("close-1", "binary")
    await call.ws.close(code=1000, message=b"Normal closure")
    await asyncio.wait_for(call.closed.wait(), 5.0)
    assert call.transport.closed.is_set() and call.transport.close_code == 1000


async def test_a_gap_in_the_middle_of_a_sentence_counts_as_an_underrun(
    fake_call_factory: Any,
) -> None:
    call: FakeCall = await fake_call_factory("underrun-1", "binary")
    await call.speak("This sentence stalls halfway.", secs=0.3, end=False)
    await _wait(lambda: len(call.audio()) >= 15)
    await asyncio.sleep(0.3)  # the TTS stalls: the far end's 60 ms lead runs out
    assert call.transport.stats.underruns == 0
    tone = b"\x10\x20" * (FRAME_BYTES // 2)
    await call.worker.queue_frame(OutputAudioRawFrame(audio=tone, sample_rate=RATE, num_channels=1))
    await _wait(lambda: call.transport.stats.underruns == 1)
    # A new sentence after a pause is not a gap in one.
    await call.worker.queue_frame(TTSTextFrame(text="x", text_type=TextType.SENTENCE))
    await asyncio.sleep(0.3)
    await call.speak("Next sentence.", secs=0.2)
    await _wait(lambda: call.after_output.of(PlaybackFinishedFrame))
    await asyncio.sleep(0.1)
    assert call.transport.stats.underruns == 1


async def test_the_first_chunk_of_a_reply_is_written_at_once_the_rest_in_order(
    fake_call_factory: Any,
) -> None:
    call: FakeCall = await fake_call_factory("first-now-1", "binary")
    out = call.transport.output()
    await _wait(lambda: None in out._media_senders)  # the pipeline has started
    queued: list[bool] = []  # per chunk written: did it come through Pipecat's audio task?
    via_task = False
    write, write_audio_frame = out._write, out.write_audio_frame

    async def task_write(frame: OutputAudioRawFrame) -> bool:
        nonlocal via_task
        via_task = True  # the audio task's path (our own fast path calls _write)
        return await write_audio_frame(frame)

    async def spy(frame: OutputAudioRawFrame) -> bool:
        nonlocal via_task
        queued.append(via_task)
        via_task = False
        return await write(frame)

    out._write = spy  # type: ignore[method-assign]
    out.write_audio_frame = task_write  # type: ignore[method-assign]
    # A 100 ms provider delta: five 20 ms chunks, each with its own sample value.
    delta = b"".join(bytes([i + 1, 0]) * (FRAME_BYTES // 2) for i in range(5))
    await call.worker.queue_frame(TTSAudioRawFrame(audio=delta, sample_rate=RATE, num_channels=1))
    await _wait(lambda: len(call.audio()) == 5)
    assert [m[0] for _, m in call.audio()] == [1, 2, 3, 4, 5]
    # The first 60 ms (the binary playout lead) left from the transport's own frame
    # path, not the audio task's queue; the rest queued behind them, as one chunk of
    # whole frames (not held back until a full 100 ms chunk).
    assert queued == [False, False, False, True]
    await _wait(lambda: call.after_output.of(BotStartedSpeakingFrame))
    # With the lead full, the next delta waits its turn in the queue.
    await call.worker.queue_frame(TTSAudioRawFrame(audio=delta, sample_rate=RATE, num_channels=1))
    await _wait(lambda: len(call.audio()) == 10)
    assert queued[4:] == [True]  # one 100 ms chunk, five wire frames
    assert [m[0] for _, m in call.audio()][5:] == [1, 2, 3, 4, 5]
    assert len(call.after_output.of(BotStartedSpeakingFrame)) == 1


async def test_audio_that_trickles_in_is_not_held_back_to_fill_a_chunk(
    fake_call_factory: Any,
) -> None:
    """A provider streaming a little faster than real time (20 ms every 15 ms): each
    frame goes out as it comes, not once Pipecat's sender has a whole 100 ms chunk."""
    call: FakeCall = await fake_call_factory("trickle-1", "json-stream")
    out = call.transport.output()
    await _wait(lambda: None in out._media_senders)
    tone = b"\x10\x20" * (FRAME_BYTES // 2)
    for _ in range(40):
        await call.worker.queue_frame(
            TTSAudioRawFrame(audio=tone, sample_rate=RATE, num_channels=1)
        )
        await asyncio.sleep(0.015)
    await _wait(lambda: len(call.texts()) == 40)
    arrivals = [t for t, _ in call.received]
    # Held for a chunk, the far end would sit dry ~55 ms after the first frame.
    assert max(b - a for a, b in zip(arrivals, arrivals[1:], strict=False)) < 0.045


async def test_the_silence_padding_after_a_reply_is_not_sent(fake_call_factory: Any) -> None:
    """Pipecat pads a reply's last chunk to a full chunk (up to 80 ms of silence here):
    the wire gets the frames with speech in them, the last one padded to 20 ms."""
    call: FakeCall = await fake_call_factory("pad-1", "binary")
    out = call.transport.output()
    await _wait(lambda: None in out._media_senders)
    speech = b"\x10\x20" * (FRAME_BYTES * 13 // 4)  # 130 ms: 6.5 wire frames
    await call.worker.queue_frame(TTSStartedFrame())
    await call.worker.queue_frame(TTSAudioRawFrame(audio=speech, sample_rate=RATE, num_channels=1))
    await call.worker.queue_frame(TTSStoppedFrame())
    await _wait(lambda: len(call.audio()) >= 7)
    await asyncio.sleep(0.2)
    frames = [m for _, m in call.audio()]
    assert len(frames) == 7 and all(len(m) == FRAME_BYTES for m in frames)
    assert frames[-1][: FRAME_BYTES // 2] == speech[-FRAME_BYTES // 2 :]  # speech, then pad
    assert frames[-1][FRAME_BYTES // 2 :] == bytes(FRAME_BYTES // 2)
