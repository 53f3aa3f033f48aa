"""A Pipecat transport over one aiohttp WebSocket from mod_audio_stream.

One instance per call. The input side reads the socket and feeds frames into
the pipeline; the output side sends bot audio in the tenant's dialect, paced in
real time with a small playout lead (so a loop hiccup shorter than the lead is
not heard as a gap), and stops playback on barge-in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aiohttp import WSMessage, WSMsgType
from loguru import logger
from pipecat.frames.frames import (
    AggregatedTextFrame,
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InputTransportMessageFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    StartFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams

from pipeswitch.transports import metrics
from pipeswitch.transports.call_events import DtmfDeduplicator, keypad_entry
from pipeswitch.transports.call_info import CallInfo
from pipeswitch.transports.frames import CallMetadataFrame, PlaybackFinishedFrame
from pipeswitch.transports.pacer import PlayoutLane
from pipeswitch.transports.serializer import ModAudioStreamSerializer

# How long a closing call waits for queued audio to finish playing at the far end.
MAX_DRAIN_SECS = 5.0
# How long a close waits for the module's CLOSE reply: normally, and once ESL said the
# channel is gone (a module that will answer does so at once; a voxcom module stuck in
# its hangup never does, and the call's providers and slot would be held for nothing).
CLOSE_HANDSHAKE_SECS = 2.0
CLOSE_HANDSHAKE_GONE_SECS = 0.25
# A gap longer than one 20 ms frame in the middle of an utterance is an underrun.
UNDERRUN_SECS = 0.02
# Bot audio leaves in 20 ms wire frames, as FreeSWITCH plays them. Pipecat's media sender
# hands the transport chunks of up to BOT_CHUNK_10MS x 10 ms: its per-chunk machinery (a
# task and a timer for the queue get, another for the write) then runs once per 100 ms
# instead of once per frame. Audio that trickles in is not held back to fill a chunk:
# whole frames are queued as soon as the sender would otherwise wait (_queue_whole_frames).
WIRE_FRAME_SECS = 0.02
BOT_CHUNK_10MS = 10
# Coalescing dialects flush when no new audio arrived for this long (end of a TTS burst).
FLUSH_IDLE_SECS = 0.03
# Pipecat broadcasts a BotSpeakingFrame every 0.2 s while the bot talks: up and down
# through every processor, 42 % of a cascade call's frame hops (measured, 10 calls).
# Here only the pipeline's idle timeout (minutes) reads it; once a second is plenty.
BOT_SPEAKING_PERIOD_SECS = 1.0


class CallSocket(Protocol):
    """What the transport needs of the call's media socket.

    aiohttp's ``WebSocketResponse`` (mod_audio_stream) is one; the UDP media of a
    ``unicast`` call (:mod:`pipeswitch.transports.unicast`) is another. Messages are
    aiohttp's ``WSMessage`` either way.
    """

    @property
    def closed(self) -> bool:
        """No more sending."""
        ...

    @property
    def close_code(self) -> int | None:
        """The close code, once closed."""
        ...

    async def receive(self) -> WSMessage:
        """The next inbound message (BINARY audio, TEXT, or CLOSE/CLOSED/ERROR)."""
        ...

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary message."""
        ...

    async def send_str(self, data: str) -> None:
        """Send one text message."""
        ...

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        """Close with ``code`` and ``message``."""
        ...


class CallerMediaSink(Protocol):
    """Where caller audio goes instead of the pipeline: the media fast path.

    Pipecat would carry every 20 ms of caller audio through a queue and a task
    per processor to reach the VAD and the STT socket. A sink set on the input
    transport takes the audio directly (the VAD, the STT's socket) and enters
    the pipeline only with events (speech started/stopped, transcripts). It
    follows the input transport's lifecycle.
    """

    async def setup(self, setup: FrameProcessorSetup) -> None:
        """The pipeline's rates and task manager, before the pipeline starts."""
        ...

    async def start(self) -> None:
        """The pipeline is running: events may be pushed from now on."""
        ...

    async def stop(self) -> None:
        """The call is ending (idempotent)."""
        ...

    async def write(self, frame: InputAudioRawFrame) -> None:
        """One 20 ms frame of caller audio at the pipeline rate.

        The frame is the caller's only for the call: a sink copies what it keeps (a gate
        in front of it may hand it the same silent frame again).
        """
        ...


class PlaybackControl(Protocol):
    """Out-of-band playback control (ESL), the seam the ``file`` dialect needs.

    The community module cannot stop playback itself; an ESL client implements
    this with ``uuid_break <uuid> all``. The transport calls it on barge-in.
    """

    async def break_playback(self, call_uuid: str) -> None:
        """Stop whatever FreeSWITCH is playing to the caller, queued files included."""
        ...


def _piece(frame: OutputAudioRawFrame, audio: bytes) -> OutputAudioRawFrame:
    """Part of a bot audio frame, as the same frame type (TTS audio stays TTS audio)."""
    out = type(frame)(audio, sample_rate=frame.sample_rate, num_channels=frame.num_channels)
    out.transport_destination = frame.transport_destination
    out.interruptible = frame.interruptible
    return out


class CallStats:
    """Per-call outbound counters, read by the call's closing log line."""

    __slots__ = ("audio_out_secs", "clears", "messages_out", "started_at", "underruns")

    def __init__(self) -> None:
        self.started_at = time.monotonic()
        self.messages_out = 0
        self.audio_out_secs = 0.0
        self.clears = 0
        self.underruns = 0


class FreeSwitchCallTransport(BaseTransport):
    """Transport for one mod_audio_stream WebSocket (already upgraded).

    Events: ``on_client_connected(transport)``, ``on_client_disconnected(transport,
    code, reason)``, ``on_call_metadata(transport, frame)``.
    """

    def __init__(
        self,
        ws: CallSocket,
        serializer: ModAudioStreamSerializer,
        params: TransportParams,
        call: CallInfo,
        *,
        playback_control: PlaybackControl | None = None,
        log_context: dict[str, str] | None = None,
    ) -> None:
        super().__init__(name=f"FreeSwitchCallTransport#{call.call_uuid}")
        self.ws = ws
        self.serializer = serializer
        self.params = params
        self.call = call
        self.playback_control = playback_control
        self.stats = CallStats()
        self.log = logger.bind(**(log_context or {"call": call.call_uuid}))
        # Bounded metric label (tenant yes, call id never).
        self.tenant_label = metrics.tenant_label((log_context or {}).get("tenant", "-"))
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        # ESL said the channel hung up (the socket may never say so).
        self.channel_gone = False
        # The pipeline ended on our side (EndFrame, goodbye played out): with call control
        # the channel is then hung up (transports/call_events.py).
        self.ended_by_bot = False
        self._input = FreeSwitchInputTransport(self, params, name=f"{self.name}.input")
        self._output = FreeSwitchOutputTransport(self, params, name=f"{self.name}.output")
        self._register_event_handler("on_client_connected")
        self._register_event_handler("on_client_disconnected")
        self._register_event_handler("on_call_metadata")

    def input(self) -> FreeSwitchInputTransport:
        """The caller-audio side."""
        return self._input

    def output(self) -> FreeSwitchOutputTransport:
        """The bot-audio side."""
        return self._output

    @property
    def is_open(self) -> bool:
        """Whether we may still send on the socket."""
        return not self.ws.closed and not self.closed.is_set()

    async def send(self, payload: str | bytes) -> bool:
        """Send one message; a vanished peer is not an error worth a traceback."""
        if not self.is_open:
            return False
        try:
            if isinstance(payload, bytes):
                await self.ws.send_bytes(payload)
            else:
                await self.ws.send_str(payload)
        except (ConnectionError, RuntimeError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            self.log.info("send failed, peer gone: {}", exc)
            return False
        self.stats.messages_out += 1
        return True

    async def close(self, code: int = 1000, reason: str = "call ended") -> None:
        """Close the WebSocket (aiohttp closes TCP right after the closing handshake)."""
        if not self.ws.closed:
            wait = CLOSE_HANDSHAKE_GONE_SECS if self.channel_gone else CLOSE_HANDSHAKE_SECS
            try:
                await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), wait)
            except (TimeoutError, ConnectionError) as exc:
                self.log.info("close handshake incomplete: {}", exc)
        await self._mark_closed(code, reason)

    def write_backlog(self) -> int:
        """Bytes written to the socket that the kernel has not taken yet (0 if unknown).

        The playout clock skips a call whose peer stopped reading rather than block on
        it. aiohttp's socket keeps its asyncio transport on its writer; other sockets
        (UDP media) never block.
        """
        writer = getattr(self.ws, "_writer", None)
        tr = getattr(writer, "transport", None)
        return tr.get_write_buffer_size() if tr is not None else 0

    def release(self) -> None:
        """Forget everything once the server is done with the call (its last step).

        The call's event handlers (closures over its pipeline), the input and output
        halves and the ESL bridge all point back here: left whole, the call would wait
        for a full collection, which stalls every other call (pipelines/dismantle.py).
        """
        vars(self).clear()

    async def hung_up(self, reason: str) -> None:
        """The switch says the channel is gone (ESL): end the call now, whatever the
        socket does (a module stuck in cleanup may never close it)."""
        self.channel_gone = True
        await self._mark_closed(None, reason)

    async def _mark_closed(self, code: int | None, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_code = code
        self.closed.set()
        await self._call_event_handler("on_client_disconnected", code, reason)


class FreeSwitchInputTransport(BaseInputTransport):
    """Reads the socket: caller audio, metadata, relayed DTMF."""

    def __init__(self, transport: FreeSwitchCallTransport, params: TransportParams, **kw: Any):
        super().__init__(params, **kw)
        self._t = transport
        self._receive_task: asyncio.Task[None] | None = None
        self._dtmf = DtmfDeduplicator()
        # Keys pressed (heard over ESL) before the pipeline runs wait for it (None: running).
        self._early_dtmf: list[InputDTMFFrame] | None = []
        self._media_sink: CallerMediaSink | None = None
        self._bot_talking = False

    @property
    def bot_speaking(self) -> bool:
        """Whether the bot talks, by the Bot{Started,Stopped}SpeakingFrames that come up
        the pipeline to here (the same frames the barge-in rule goes by)."""
        return self._bot_talking

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, BotStartedSpeakingFrame):
            self._bot_talking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_talking = False
        await super().process_frame(frame, direction)

    def set_media_sink(self, sink: CallerMediaSink) -> None:
        """Send caller audio to ``sink`` instead of down the pipeline (set before the call runs)."""
        self._media_sink = sink

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        await super().setup(setup)
        await self._t.serializer.setup(setup)
        if self._media_sink is not None:
            await self._media_sink.setup(setup)

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)
        if self._media_sink is not None:
            await self._media_sink.start()
        early, self._early_dtmf = self._early_dtmf or [], None
        for dtmf in early:
            await self.push_frame(dtmf)
        if self._receive_task is None:
            self._receive_task = self.create_task(self._receive(), "receive")
        await self._t._call_event_handler("on_client_connected")

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._stop_receiving()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._stop_receiving()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._stop_receiving()

    async def _stop_receiving(self) -> None:
        if self._media_sink is not None:
            await self._media_sink.stop()
        if self._receive_task is not None:
            task, self._receive_task = self._receive_task, None
            if task is not asyncio.current_task():
                await self.cancel_task(task)

    async def _receive(self) -> None:
        ws = self._t.ws
        ser = self._t.serializer
        code: int | None = None
        reason = "socket closed"
        try:
            while True:
                msg = await ws.receive()
                kind = msg.type
                if kind is WSMsgType.BINARY:
                    frame = await ser.deserialize(msg.data)
                    if frame is not None:
                        await self.push_audio_frame(frame)  # type: ignore[arg-type]
                elif kind is WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif kind is WSMsgType.CLOSE:
                    code, reason = msg.data, (msg.extra or "")
                    break
                elif kind in (WSMsgType.CLOSING, WSMsgType.CLOSED):
                    code = ws.close_code
                    break
                elif kind is WSMsgType.ERROR:
                    code = ws.close_code
                    reason = f"protocol error: {msg.data}"
                    self._t.log.warning("websocket error, call ends: {}", msg.data)
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must end this call, not the server
            self._t.log.exception("receive loop failed: {}", exc)
            reason = f"receive failed: {exc}"
        finally:
            self._receive_task = None
        self._t.log.info("caller side closed (code={} reason={!r})", code, reason)
        await self._t._mark_closed(code, reason)

    async def push_audio_frame(self, frame: InputAudioRawFrame) -> None:
        """Push caller audio straight on: no per-frame queue and wait_for hop.

        Pipecat's base input transport queues every frame for a task that only
        applies an optional filter; with no filter that hop is pure overhead on
        the hottest path (50 frames/s per call). With a media sink the audio does
        not enter the pipeline at all.
        """
        if self._media_sink is not None:
            await self._media_sink.write(frame)
        elif self._params.audio_in_filter is not None:
            await super().push_audio_frame(frame)
        elif self._params.audio_in_enabled:
            await self.push_frame(frame)

    async def _on_text(self, text: str) -> None:
        frame = await self._t.serializer.deserialize(text)
        if frame is None:
            return
        if isinstance(frame, CallMetadataFrame):
            await self._t._call_event_handler("on_call_metadata", frame)
            await self.push_frame(frame)
        elif isinstance(frame, InputTransportMessageFrame):
            await self.broadcast_frame(InputTransportMessageFrame, message=frame.message)
        elif isinstance(frame, InputDTMFFrame):
            await self.push_dtmf(frame.button.value, "socket")
        elif isinstance(frame, InputAudioRawFrame):  # pragma: no cover - text never is
            await self.push_audio_frame(frame)
        else:
            await self.push_frame(frame)

    async def push_dtmf(self, digit: str, source: str) -> None:
        """The one path for a key press, relayed over the socket or heard over ESL:
        pushed once (a press both sources report is deduplicated) as InputDTMFFrame."""
        entry = keypad_entry(digit)
        if entry is None:
            self._t.log.warning("DTMF digit {!r} from {} ignored", digit[:4], source)
            return
        if not self._dtmf.accept(digit, source):
            return
        if self._early_dtmf is not None:
            self._early_dtmf.append(InputDTMFFrame(button=entry))
        else:
            await self.push_frame(InputDTMFFrame(button=entry))


class FreeSwitchOutputTransport(BaseOutputTransport):
    """Sends bot audio in the tenant's dialect, paced with a playout lead."""

    def __init__(self, transport: FreeSwitchCallTransport, params: TransportParams, **kw: Any):
        super().__init__(params, **kw)
        self._t = transport
        self._lead = transport.serializer.playout_lead_secs
        # Streaming dialects: encoded 20 ms frames wait here for the process's playout
        # clock (transports/pacer.py), which also keeps the far end's play-out time.
        self._lane = PlayoutLane(
            transport.send, self._on_sent, self._lead, backlog=transport.write_backlog
        )
        # Whether the chunk being written may be cut by a barge-in (Pipecat's flag).
        self._writing_interruptible = True
        self._audio_since_clear = False
        self._flush_handle: asyncio.TimerHandle | None = None
        # The utterance being played (a sentence's text arrives just before its audio)
        # and how much of its audio has been written: the playback facts we report.
        self._sentence = ""
        self._sentence_secs = 0.0
        self._sentence_outside = False
        self._prompt_task: asyncio.Task[None] | None = None
        self._prompt_done: PlaybackFinishedFrame | None = None
        self._started = False
        # Called with the prompt's audio (the greeting) as it is written: it bypasses the
        # pipeline's audio_out_filter, and an echo canceller must still hear it.
        self.prompt_tap: Callable[[bytes, int], None] | None = None

    @property
    def _play_until(self) -> float:
        """Wall-clock time at which the far end finishes playing what we have sent."""
        return self._lane.play_until

    @_play_until.setter
    def _play_until(self, value: float) -> None:
        self._lane.play_until = value

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        await super().setup(setup)
        await self._t.serializer.setup(setup)

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)
        for sender in self._media_senders.values():
            sender._bot_speaking_frame_period = BOT_SPEAKING_PERIOD_SECS

    def play_prompt(self, pcm: bytes, sample_rate: int, text: str) -> None:
        """Play prepared audio (the greeting) now, before the pipeline is even running.

        A call's pipeline needs its providers connected before a frame can pass
        (hundreds of ms with a cloud STT); the greeting does not. It is paced like
        any bot audio, stops on barge-in, and only the heard part enters the context.
        """
        self._prompt_task = asyncio.ensure_future(self._play_prompt(pcm, sample_rate, text))

    async def _play_prompt(self, pcm: bytes, sample_rate: int, text: str) -> None:
        self._sentence, self._sentence_secs, self._sentence_outside = text, 0.0, True
        step = self._wire_step(sample_rate, 1) * BOT_CHUNK_10MS // 2
        for i in range(0, len(pcm), step):
            frame = OutputAudioRawFrame(
                audio=pcm[i : i + step], sample_rate=sample_rate, num_channels=1
            )
            if self.prompt_tap is not None:
                # As it is handed over, like the output filter: its first frame leaves now.
                self.prompt_tap(frame.audio, sample_rate)
            if not await self._write(frame):
                return
        await self._flush()
        self._prompt_done = self._finish_sentence()
        if self._started:
            await self._report_prompt()

    async def _report_prompt(self) -> None:
        fact, self._prompt_done = self._prompt_done, None
        if fact is not None:
            await super().push_frame(fact)

    def _finish_sentence(self) -> PlaybackFinishedFrame | None:
        """The fact for the utterance whose audio has all been written, if any."""
        fact = None
        if self._sentence:
            fact = PlaybackFinishedFrame(
                text=self._sentence,
                playback_position=self._sentence_secs,
                duration=self._sentence_secs,
                outside_pipeline=self._sentence_outside,
            )
        self._sentence, self._sentence_secs, self._sentence_outside = "", 0.0, False
        return fact

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._flush()
        # Let the far end play what it has before hanging up the stream.
        drain = min(MAX_DRAIN_SECS, self._play_until - time.monotonic())
        if drain > 0 and self._t.is_open:
            await asyncio.sleep(drain)
        self._t.ended_by_bot = not self._t.closed.is_set()
        await self._t.close(1000, "call ended")

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        self._lane.clear()
        self._cancel_flush()
        if self._prompt_task is not None:
            self._prompt_task.cancel()
        await self._t.close(1000, "call cancelled")

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, InterruptionFrame):
            if self._writing_interruptible:
                self._lane.clear()  # nothing more of the cut reply leaves from here on
            await self._report_interrupted()
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            await self._stop_playback()
        elif isinstance(frame, StartFrame):
            # Only now has the StartFrame gone downstream: a fact pushed from start()
            # would reach processors that are not started yet and be dropped.
            self._started = True
            if self._prompt_done is not None:
                await self._report_prompt()

    async def push_frame(
        self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM
    ) -> None:
        if direction is FrameDirection.DOWNSTREAM:
            if isinstance(frame, OutputAudioRawFrame):
                return  # written to the caller; nothing downstream uses bot audio
            if isinstance(frame, TTSTextFrame):
                # The sentence's audio has all been written: it played to its end.
                fact = self._finish_sentence()
                if fact is not None:
                    await super().push_frame(fact, direction)
            elif isinstance(frame, AggregatedTextFrame) and frame.will_be_spoken:
                self._sentence, self._sentence_secs = frame.text, 0.0
                self._sentence_outside = False
        await super().push_frame(frame, direction)

    def unplayed_secs(self) -> float:
        """Audio sent but not yet played at the far end that stopping playback would drop.

        A playback fact for services that must know, at the moment of a barge-in, how
        much of their reply was heard (speech-to-speech providers truncating their
        memory). With json-stream nothing sent can be recalled: it all plays.
        """
        if not self._t.serializer.clear_drops_buffered:
            return 0.0
        return max(0.0, self._play_until - time.monotonic())

    def queued_secs(self) -> float:
        """Audio sent that the far end has not played yet, whatever the dialect (a tool
        that hangs up or transfers after an announcement waits this long), and what
        waits in the playout lane to be sent."""
        return max(0.0, self._play_until - time.monotonic()) + self._lane.pending_secs

    async def _report_interrupted(self) -> None:
        """Report how much of the cut utterance reached the caller (a playback fact)."""
        if not self._sentence or self._sentence_secs <= 0:
            return
        heard = max(0.0, self._sentence_secs - self.unplayed_secs())
        fact = PlaybackFinishedFrame(
            text=self._sentence,
            playback_position=heard,
            duration=self._sentence_secs,
            interrupted=True,
            outside_pipeline=self._sentence_outside,
        )
        self._sentence, self._sentence_secs, self._sentence_outside = "", 0.0, False
        await super().push_frame(fact)

    async def send_message(
        self, frame: OutputTransportMessageFrame | OutputTransportMessageUrgentFrame
    ) -> None:
        payload = await self._t.serializer.serialize(frame)
        if payload:
            await self._t.send(payload)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        if self._prompt_task is not None and not self._prompt_task.done():
            await asyncio.wait({self._prompt_task})  # the pipeline speaks after the greeting
        ok = await self._write(frame)
        sender = self._media_senders.get(frame.transport_destination)
        if ok and sender is not None and not sender._audio_queue.has_frame(OutputAudioRawFrame):
            # The sender is about to wait for a full chunk: hand it the whole frames it holds.
            await self._queue_whole_frames(sender)
        return ok

    async def _handle_frame(self, frame: Frame) -> None:
        sender = self._media_senders.get(frame.transport_destination)
        if isinstance(frame, OutputAudioRawFrame):
            if await self._write_first_now(frame):
                return
            await super()._handle_frame(frame)
            if sender is not None and self._sender_idle(sender):
                await self._queue_whole_frames(sender)
            return
        if sender is not None and not isinstance(frame, (InterruptionFrame, TTSStoppedFrame)):
            # Audio that arrived before this frame (a sentence's text) plays before it.
            await self._queue_whole_frames(sender)
        await super()._handle_frame(frame)

    @staticmethod
    def _in_flight(queue: asyncio.Queue[Any]) -> int:
        """Frames the audio task has taken but not finished (``task_done`` comes after)."""
        unfinished: int = getattr(queue, "_unfinished_tasks", 1)
        return unfinished - queue.qsize()

    def _sender_idle(self, sender: BaseOutputTransport.MediaSender) -> bool:
        """No audio queued and nothing being written: new audio would wait for a chunk."""
        queue = sender._audio_queue
        return not self._in_flight(queue) and not queue.has_frame(OutputAudioRawFrame)

    async def _queue_whole_frames(self, sender: BaseOutputTransport.MediaSender) -> None:
        """Queue the whole 20 ms frames the sender holds short of a full chunk.

        Pipecat's sender queues audio only in full chunks (and the rest at TTSStopped).
        A provider that streams at about real time would leave the far end dry while a
        100 ms chunk fills; whole frames go now, a partial one waits for more audio.
        """
        runs = sender._audio_runs
        if not runs:
            return
        step = self._wire_step(sender.sample_rate, self._params.audio_out_channels)
        total = sum(len(audio) for audio, _ in runs)
        take = total - total % step
        if take <= 0:
            return
        chunk = bytearray()
        uninterruptible = False
        while len(chunk) < take:
            audio, flag = runs[0]
            uninterruptible = uninterruptible or flag
            need = take - len(chunk)
            if len(audio) <= need:
                chunk += audio
                runs.popleft()
            else:
                chunk += audio[:need]
                del audio[:need]
        await sender._enqueue_audio_chunk(bytes(chunk), uninterruptible)

    @staticmethod
    def _wire_step(sample_rate: int, channels: int) -> int:
        """Bytes in one 20 ms wire frame."""
        return int(sample_rate * WIRE_FRAME_SECS) * 2 * channels

    async def _write_first_now(self, frame: OutputAudioRawFrame) -> bool:
        """Bot audio straight to the wire while the sender is idle and the lead has room.

        Pipecat's media sender queues every chunk for its audio task, which takes it
        with ``wait_for(queue.get())`` and writes it with ``wait_for(write)``: four loop
        turns before the first byte of a reply leaves, measured at 50-240 ms on a
        loaded host (speech-to-speech server overhead). When no audio is queued or in
        flight and no partial chunk is held, the frames queued ahead (a reply's start
        and text frames) are handled here in order, as the audio task would, and whole
        chunks go out through the sender's own filter, volume and bot-speaking steps
        for as long as they fit in the far end's playout lead (no pacing wait here);
        the rest is queued as usual, behind them.
        """
        sender = self._media_senders.get(frame.transport_destination)
        step = self._wire_step(frame.sample_rate, frame.num_channels)
        secs = WIRE_FRAME_SECS
        queue = sender._audio_queue if sender is not None else None
        ahead: list[Frame] = list(getattr(queue, "_queue", ())) if queue is not None else []
        in_flight = self._in_flight(queue) if queue is not None else 1
        if (
            sender is None
            or queue is None
            or len(frame.audio) < step
            or frame.sample_rate != sender.sample_rate
            or sender._mixer is not None
            or sender._audio_runs
            or in_flight
            or any(isinstance(f, (OutputAudioRawFrame, EndFrame)) for f in ahead)
            or not self._t.serializer.streaming
            or not self._fits_lead(secs)
            or (self._prompt_task is not None and not self._prompt_task.done())
        ):
            return False
        while not queue.empty():
            queued = queue.get_nowait()
            await sender._handle_frame(queued)
            await self.push_frame(queued)
            queue.task_done()
        off = 0
        while off + step <= len(frame.audio) and (off == 0 or self._fits_lead(secs)):
            chunk = _piece(frame, frame.audio[off : off + step])
            await sender._filter_audio(chunk)
            sender._apply_volume(chunk)
            await sender._handle_frame(chunk)  # bot speaking, as the audio task would
            await self._write(chunk)
            off += step
        if off < len(frame.audio):
            await sender.handle_audio_frame(_piece(frame, frame.audio[off:]))
            await self._queue_whole_frames(sender)  # the sender is idle: no chunk to fill
        return True

    def _fits_lead(self, secs: float) -> bool:
        """Whether ``secs`` more audio can be written now without a pacing wait."""
        now = time.monotonic()
        return max(self._play_until, now) + secs - self._lead <= now + 1e-3

    async def _write(self, frame: OutputAudioRawFrame) -> bool:
        """Write a chunk of bot audio as 20 ms wire frames, paced to the far end.

        Streaming dialects hand the frames to the call's playout lane and wait once for
        the chunk; a barge-in drops what of an interruptible chunk has not left yet.
        """
        t = self._t
        if not t.is_open:
            return False
        lead = t.serializer.playout_lead_secs
        if lead != self._lead:  # learnt from the caller's first audio (dialects.py)
            self._lead = self._lane.lead_secs = lead
        audio = frame.audio
        rate, channels = frame.sample_rate, frame.num_channels
        if not t.serializer.streaming:
            return await self._write_piece(audio, rate, channels)
        step = self._wire_step(rate, channels)
        end = len(audio)
        if end > step and self._ends_speech(frame):
            # Pipecat pads the last chunk of a reply with silence to a full chunk: send
            # the frames that carry speech, not up to 80 ms of padding after them.
            while end - step > 0 and audio.count(0, end - step, end) == step:
                end -= step
        pieces: list[tuple[str | bytes, float]] = []
        for off in range(0, end, step):
            pcm = audio[off : min(off + step, end)]
            if len(pcm) < step:
                # Playback builds consume whole 20 ms frames: a partial one at the end of
                # an utterance would sit in their buffer until the next utterance. Pad it.
                pcm = pcm + bytes(step - len(pcm))
            payload = t.serializer.encode_audio(pcm, rate)
            if payload is not None:
                pieces.append((payload, WIRE_FRAME_SECS))
        self._writing_interruptible = frame.interruptible
        try:
            return await self._lane.play(pieces)
        finally:
            self._writing_interruptible = True

    def _on_sent(self, secs: float, dry_secs: float) -> None:
        """A wire frame left (the lane's report): count it and what the caller heard."""
        t = self._t
        t.stats.audio_out_secs += secs
        if dry_secs > UNDERRUN_SECS and self._sentence_secs > 0:
            # The far end ran dry in the middle of a sentence: the caller heard a gap.
            t.stats.underruns += 1
            metrics.PLAYBACK_UNDERRUNS.labels(t.tenant_label).inc()
        self._sentence_secs += secs
        self._audio_since_clear = True

    def _ends_speech(self, frame: OutputAudioRawFrame) -> bool:
        """Whether the sender's next frame ends the bot's turn (its chunk was padded)."""
        sender = self._media_senders.get(frame.transport_destination)
        ahead: Sequence[Frame] = getattr(sender._audio_queue, "_queue", ()) if sender else ()
        return bool(ahead) and isinstance(ahead[0], (TTSStoppedFrame, EndFrame))

    async def _write_piece(self, pcm: bytes, rate: int, channels: int) -> bool:
        """Coalescing dialects: hand audio to the serializer, wait while the far end is
        more than the (seconds-long) lead ahead."""
        t = self._t
        payload = t.serializer.encode_audio(pcm, rate)
        if payload is not None and not await t.send(payload):
            return False
        secs = len(pcm) / (2 * rate * channels)
        t.stats.audio_out_secs += secs
        self._sentence_secs += secs
        self._audio_since_clear = True
        self._arm_flush()
        now = time.monotonic()
        self._play_until = max(self._play_until, now) + secs
        wait = self._play_until - self._lead - now
        if wait > 0:
            await asyncio.sleep(wait)
        return True

    async def _stop_playback(self) -> None:
        """Barge-in: drop buffered audio and tell FreeSWITCH to stop playing."""
        self._cancel_flush()
        if self._writing_interruptible:
            self._lane.clear()
        if self._prompt_task is not None and not self._prompt_task.done():
            self._prompt_task.cancel()
        self._play_until = 0.0
        t = self._t
        # The serializer owns "stop playback" on the wire (and drops what it coalesced).
        clear = await t.serializer.serialize(InterruptionFrame())
        if not self._audio_since_clear:
            return
        self._audio_since_clear = False
        t.stats.clears += 1
        if clear is not None:
            await t.send(clear)
        if t.playback_control is not None and t.serializer.needs_playback_control:
            try:
                await t.playback_control.break_playback(t.call.call_uuid)
            except Exception as exc:
                t.log.warning("playback break failed: {}", exc)

    def _arm_flush(self) -> None:
        self._cancel_flush()
        loop = asyncio.get_running_loop()
        self._flush_handle = loop.call_later(FLUSH_IDLE_SECS, self._start_flush)

    def _start_flush(self) -> None:
        """Timer callback: a flush coroutine that cannot be scheduled is closed, not leaked."""
        coro = self._flush()
        try:
            self.create_task(coro, "flush")
        except Exception as exc:  # torn down between arming and firing
            coro.close()
            self._t.log.debug("flush not scheduled: {}", exc)

    def _cancel_flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    async def _flush(self) -> None:
        self._flush_handle = None
        for msg in self._t.serializer.flush():
            await self._t.send(msg)
