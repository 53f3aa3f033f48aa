"""The media fast path: caller audio straight to the VAD and the STT socket.

Pipecat carries every 20 ms of caller audio as an ``InputAudioRawFrame``
through a queue and a task per processor (plus observer proxies) to reach the
STT service and the VAD in the user aggregator: 50 frame hops per second per
call that do nothing but move bytes. The fast path takes the audio from the
input transport (:class:`~pipeswitch.transports.transport.CallerMediaSink`)
and feeds

* Pipecat's own ``VADController`` (on the process's batched Silero), in 40 ms
  chunks, in one task per call (so the socket is never read slower than Silero
  scores under load); its events enter the pipeline as the frames the aggregator would have
  made (``VADUserStartedSpeakingFrame``, ``VADUserStoppedSpeakingFrame``,
  ``UserSpeakingFrame``, ``SpeechControlParamsFrame``), pushed by the input
  transport so every processor sees them in order;
* the STT service through its own ``process_audio_frame`` (mute, reconnect
  buffering and usage metrics stay Pipecat's), in 80 ms chunks, flushed before
  the VAD stop goes out so Deepgram's ``Finalize`` follows all of the speech.

While the caller speaks over the bot it also pushes :class:`CallerSpeechFrame`
per chunk, so the barge-in rule can count seconds of speech without audio frames
(it counts only speech over the bot: with the bot quiet, the VAD start is the
turn, and the counts would cross the pipeline for nothing). Services
that need the audio itself in the pipeline (local Whisper, speech-to-speech,
the echo guard) keep Pipecat's frame path: :func:`fast_path_supported`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, ClassVar

from pipecat.audio.vad.vad_analyzer import VADAnalyzer
from pipecat.audio.vad.vad_controller import VADController
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    UserSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.stt_service import STTService

from pipeswitch.pipelines.services import send_uncompressed
from pipeswitch.transports.frames import CallerSpeechFrame
from pipeswitch.transports.transport import FreeSwitchInputTransport

# VAD chunk: two 20 ms frames (Silero's window is 32 ms at 8 kHz; the state machine
# counts seconds, so chunking adds at most 20 ms to a start or stop decision).
VAD_CHUNK_SECS = 0.04
# STT chunk: Deepgram accepts 20-100 ms per message; fewer, larger sends.
STT_CHUNK_SECS = 0.08
# A UserSpeakingFrame crosses every processor to the end of the pipeline; Pipecat's VAD
# controller sends one every 0.2 s of speech, 23 % of a cascade call's frame hops
# (measured, 10 calls). Only the pipeline's idle timeout (minutes) reads it here.
SPEECH_ACTIVITY_SECS = 1.0
# Caller audio kept after it went to the STT, so a turn a hung or broken stream swallowed
# can be sent again on the new stream (128 KB at 8 kHz: the chunks already sent are kept,
# nothing is copied).
HISTORY_SECS = 8.0


def fast_path_supported(stt: STTService) -> bool:
    """Whether this STT takes caller audio on a socket we may feed directly.

    Deepgram's streaming service (Nova) does; Flux decides turns itself and
    segmented/local services need the audio in the pipeline.
    """
    return type(stt) is DeepgramSTTService


class CallerMediaFastPath:
    """A :class:`~pipeswitch.transports.transport.CallerMediaSink` for one call."""

    # Its VAD controller is the call's alone: taken apart with the call (dismantle.py).
    call_owned: ClassVar[bool] = True

    def __init__(
        self,
        transport_input: FreeSwitchInputTransport,
        stt: STTService,
        vad: VADAnalyzer,
        *,
        vad_chunk_secs: float = VAD_CHUNK_SECS,
        stt_chunk_secs: float = STT_CHUNK_SECS,
    ) -> None:
        self._input = transport_input
        self._stt = stt
        self._vad_analyzer = vad
        self._vad = VADController(vad, speech_activity_period=SPEECH_ACTIVITY_SECS)
        self._vad.add_event_handler("on_speech_started", self._on_speech_started)
        self._vad.add_event_handler("on_speech_stopped", self._on_speech_stopped)
        self._vad.add_event_handler("on_speech_activity", self._on_speech_activity)
        self._vad.add_event_handler("on_push_frame", self._on_push_frame)
        self._vad.add_event_handler("on_broadcast_frame", self._on_broadcast_frame)
        self._vad_chunk_secs = vad_chunk_secs
        self._stt_chunk_secs = stt_chunk_secs
        self._rate = 0
        self._vad_bytes = 0
        self._stt_bytes = 0
        self._vad_buf = bytearray()
        self._stt_buf = bytearray()
        self._speaking = False
        self._running = False
        self._vad_queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._vad_task: asyncio.Task[None] | None = None
        self._history: deque[tuple[float, bytes]] = deque(
            maxlen=max(1, round(HISTORY_SECS / stt_chunk_secs))
        )
        self._stt_conn: object | None = None  # the STT stream last seen (a new one: undeflate)

    async def setup(self, setup: FrameProcessorSetup) -> None:
        """Take the pipeline rate; set up the VAD controller (Pipecat's)."""
        self._rate = setup.audio_in_sample_rate
        frame = self._rate // 50 * 2
        self._vad_bytes = max(frame, round(self._vad_chunk_secs * 50) * frame)
        self._stt_bytes = max(frame, round(self._stt_chunk_secs * 50) * frame)
        await self._vad.setup(setup)

    async def start(self) -> None:
        """Announce the VAD params (STT services read them) and start the idle watch."""
        self._running = True
        await self._vad.start()
        self._vad_task = self._input.create_task(self._run_vad(), "fast-path-vad")

    async def stop(self) -> None:
        """Stop feeding; release the VAD controller's task."""
        if not self._running:
            return
        self._running = False
        if self._vad_task is not None:
            task, self._vad_task = self._vad_task, None
            await self._input.cancel_task(task)
        await self._vad.stop()

    async def write(self, frame: InputAudioRawFrame) -> None:
        """20 ms of caller audio: STT in its chunks, VAD in its chunks.

        Never waits for the VAD (Silero runs in a thread, batched across calls): the
        socket keeps being read while a window is being scored.
        """
        if not self._running:
            return
        audio = frame.audio
        self._stt_buf += audio
        if len(self._stt_buf) >= self._stt_bytes:
            await self._send_stt()
        self._vad_buf += audio
        if len(self._vad_buf) >= self._vad_bytes:
            self._vad_queue.put_nowait(bytes(self._vad_buf))
            self._vad_buf.clear()

    async def _run_vad(self) -> None:
        """The call's VAD, one chunk at a time, in order (events are pushed from here)."""
        while True:
            chunk = await self._vad_queue.get()
            await self._vad.process_frame(
                InputAudioRawFrame(audio=chunk, sample_rate=self._rate, num_channels=1)
            )
            if self._speaking and self._input.bot_speaking:
                await self._input.push_frame(CallerSpeechFrame(secs=len(chunk) / (2 * self._rate)))

    async def _send_stt(self) -> None:
        if not self._stt_buf:
            return
        chunk = bytes(self._stt_buf)
        self._stt_buf.clear()
        self._history.append((time.monotonic(), chunk))
        conn = getattr(self._stt, "_connection", None)
        if conn is not self._stt_conn:
            # A new stream (the first, or after a reconnect): audio goes undeflated.
            self._stt_conn = conn
            if conn is not None:
                send_uncompressed(conn)
        await self._stt.process_audio_frame(
            InputAudioRawFrame(audio=chunk, sample_rate=self._rate, num_channels=1),
            FrameDirection.DOWNSTREAM,
        )

    async def replay(self, since: float, until: float) -> float:
        """Send the STT again the caller audio it was sent between ``since`` and ``until``
        (monotonic); returns the seconds sent. For a new stream after a reconnect: what
        the old one swallowed (a stall, a malformed reply) is transcribed after all."""
        chunks = [c for t, c in self._history if since <= t < until]
        for chunk in chunks:
            await self._stt.process_audio_frame(
                InputAudioRawFrame(audio=chunk, sample_rate=self._rate, num_channels=1),
                FrameDirection.DOWNSTREAM,
            )
        return sum(len(c) for c in chunks) / (2 * self._rate) if self._rate else 0.0

    async def _on_speech_started(self, _controller: VADController) -> None:
        self._speaking = True
        await self._input.push_frame(
            VADUserStartedSpeakingFrame(start_secs=self._vad_analyzer.params.start_secs)
        )

    async def _on_speech_stopped(self, _controller: VADController) -> None:
        self._speaking = False
        await self._send_stt()  # all the speech reaches the STT before its Finalize
        await self._input.push_frame(
            VADUserStoppedSpeakingFrame(stop_secs=self._vad_analyzer.params.stop_secs)
        )

    async def _on_speech_activity(self, _controller: VADController) -> None:
        await self._input.push_frame(UserSpeakingFrame())

    async def _on_push_frame(
        self,
        _controller: VADController,
        frame: Frame,
        direction: FrameDirection = FrameDirection.DOWNSTREAM,
    ) -> None:
        await self._input.push_frame(frame, direction)

    async def _on_broadcast_frame(
        self, _controller: VADController, frame_cls: type[Frame], **kwargs: Any
    ) -> None:
        await self._input.broadcast_frame(frame_cls, **kwargs)
