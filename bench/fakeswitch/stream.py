"""FreeSWITCH 1.10.12 + mod_audio_stream (libwsc 1.1.0) as an asyncio client.

Why: tests, the latency bench and the demo drive the Pipeswitch server through
this instead of a real FreeSWITCH, so it reproduces the module's wire bytes,
ordering, timing and events (protocol doc §3-§7, §12.2, §13, §14) and adds a
"playout" model of what the caller hears for the community build and the
voxcom/cloudfieldcz forks (§10.2, §10.3).

One ``FakeSwitchStream`` is one ``uuid_audio_stream <uuid> start …`` on one
channel: a 20 ms media clock (absolute schedule on ``time.monotonic``), the
WebSocket, and the records.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import socket
import tempfile
import time
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal
from uuid import uuid4

from loguru import logger

from pipeswitch.bench.fakeswitch.audio import decode_audio_bytes, load_wav, resample
from pipeswitch.bench.fakeswitch.fsargs import api_text_argument
from pipeswitch.bench.fakeswitch.handshake import (
    WsUrl,
    build_upgrade_request,
    find_header_end,
    make_key,
    negotiate_deflate,
    parse_extra_headers,
    parse_ws_url,
    upgrade_accepted,
)
from pipeswitch.bench.fakeswitch.media import CallerSource, MediaBug
from pipeswitch.bench.fakeswitch.playout import Playback, Playout
from pipeswitch.bench.fakeswitch.records import (
    ERR_CONNECT_FAILED,
    ERR_IO,
    ERR_NOT_SUPPORTED,
    ERR_PROTOCOL,
    ERR_TIMEOUT,
    EVENT_CONNECT,
    EVENT_DISCONNECT,
    EVENT_ERROR,
    EVENT_JSON,
    EVENT_PLAY,
    CloseRecord,
    ReceivedAudio,
    SentFrame,
    StreamEvent,
    WireMessage,
)
from pipeswitch.bench.fakeswitch.streamaudio import CJObject, cjson_dumps, process_message
from pipeswitch.bench.fakeswitch.wsframe import (
    Frame,
    FrameParser,
    MaskKeys,
    Opcode,
    PerMessageDeflate,
    ProtocolError,
    close_payload,
    encode_frame,
)

__all__ = ["ConnState", "EventCallback", "FakeSwitchStream", "Playback", "StreamConfig"]

Mix = Literal["mono", "mixed", "stereo"]
Ordering = Literal["libwsc", "metadata-first"]
EventCallback = Callable[[StreamEvent], Awaitable[None] | None]

MAX_QUEUE = 1024  # libwsc MAX_QUEUE_SIZE (messages queued while connecting)
CLOSE_TIMER_S = 1.0  # libwsc armCloseTimer
MAX_METADATA = 8192  # tech_pvt->initialMetadata


@dataclass(slots=True)
class StreamConfig:
    """``uuid_audio_stream <uuid> start <url> <mix> <rate> [metadata]`` plus channel variables.

    ``metadata`` is the exact TEXT sent (after FS argument clean-up; see
    ``fsargs.separate_string``). ``buffer_ms`` is STREAM_BUFFER_SIZE,
    ``heartbeat_s`` STREAM_HEART_BEAT (floats allowed for tests),
    ``offer_deflate`` means STREAM_MESSAGE_DEFLATE is *not* true,
    ``extra_headers`` STREAM_EXTRA_HEADERS (mapping or JSON text).

    Emulator knobs: ``ordering`` (``libwsc``: audio queued while connecting is
    flushed before the metadata; ``metadata-first``: MAS-ix / mod_audio_fork),
    ``playback`` (who plays bot audio to the caller), ``require_write_leg``
    (mixed/stereo send nothing while nothing is played: FS ``fill=TRUE``),
    ``first_drain_tick`` (the first media-bug read happens on tick 2, so the
    first two frames leave back to back ~40 ms after start, as observed),
    ``libwsc`` ``"old"`` (4b80a30: 2 s timeout, strict 101 check),
    ``tcp_nodelay`` (libwsc leaves Nagle on; True disables it as asyncio would),
    ``close_eof_cap_s`` (how long ``hangup`` waits for the server's EOF after a
    server-initiated close; libwsc waits for ever).
    """

    url: str
    uuid: str = field(default_factory=lambda: str(uuid4()))
    mix: Mix = "mono"
    rate: int = 8000
    metadata: str | None = None
    buffer_ms: int = 20
    heartbeat_s: float = 0
    offer_deflate: bool = False
    extra_headers: Mapping[str, str] | str | None = None
    connect_timeout_s: float | None = None
    libwsc: Literal["1.1.0", "old"] = "1.1.0"
    ordering: Ordering = "libwsc"
    playback: Playback = "community"
    ptime_ms: int = 20
    require_write_leg: bool = True
    first_drain_tick: int = 2
    temp_dir: str | None = None
    keep_files: bool = False
    voiced_rms: float = 300.0
    line_noise_dbfs: float | None = None  # white noise under the caller's audio (None: none)
    non_silent_peak: int = 500
    voxcom_blocking_inject: bool = True
    voxcom_honour_sample_rate: bool = False
    close_eof_cap_s: float = 5.0
    tcp_nodelay: bool = False

    def __post_init__(self) -> None:
        if self.mix not in ("mono", "mixed", "stereo"):
            raise ValueError(f"invalid mix type: {self.mix}, must be mono, mixed, or stereo")
        if self.rate <= 0 or self.rate % 8000:
            raise ValueError(f"invalid sample rate: {self.rate}")
        if self.metadata is not None and len(self.metadata.encode("utf-8")) >= MAX_METADATA:
            raise ValueError("metadata must be < 8192 bytes (FreeSWITCH copies it unterminated)")
        if self.ordering not in ("libwsc", "metadata-first"):
            raise ValueError(f"invalid ordering {self.ordering!r}")
        if self.playback not in ("community", "voxcom", "cloudfieldcz"):
            raise ValueError(f"invalid playback {self.playback!r}")
        parse_ws_url(self.url)  # raises InvalidUrl: FS answers -ERR, nothing starts

    @property
    def channels(self) -> int:
        """2 for stereo, else 1."""
        return 2 if self.mix == "stereo" else 1

    @property
    def rtp_packets(self) -> int:
        """STREAM_BUFFER_SIZE → 20 ms frames per message (not a multiple of 20 → 1)."""
        if self.buffer_ms % 20 or self.buffer_ms < 20:
            return 1
        return self.buffer_ms // 20

    @property
    def mono_frame_bytes(self) -> int:
        """One ptime of mono s16le at the stream rate."""
        return self.rate * self.ptime_ms // 1000 * 2

    @property
    def message_bytes(self) -> int:
        """Bytes per BINARY message: ``320 × rate/8000 × channels × N/20``."""
        return self.mono_frame_bytes * self.channels * self.rtp_packets

    @property
    def timeout_s(self) -> float:
        """Connect/handshake timeout: 1 s (libwsc 1.1.0) or 2 s (old libwsc)."""
        if self.connect_timeout_s is not None:
            return self.connect_timeout_s
        return 2.0 if self.libwsc == "old" else 1.0


class ConnState(Enum):
    """libwsc connection state as seen from the module."""

    IDLE = "idle"
    CONNECTING = "connecting"  # isConnected() already true: audio is queued
    OPEN = "open"
    CLOSING = "closing"  # we sent CLOSE; waiting ≤1 s for the server's EOF
    REMOTE_CLOSED = "remote_closed"  # server CLOSE echoed; waiting for its EOF
    CLOSED = "closed"
    FAILED = "failed"


class _HandshakeFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FakeSwitchStream:
    """One mod_audio_stream stream on one emulated channel.

    Lifecycle: ``await start()`` (returns at once, like ``+OK``; the outcome
    arrives as events, see ``wait_connected``), feed caller audio, then
    ``await hangup()`` or ``await stop(text)``. Usable as ``async with``.
    """

    def __init__(self, config: StreamConfig, *, on_event: EventCallback | None = None) -> None:
        self.config = config
        self.uuid = config.uuid
        self.url: WsUrl = parse_ws_url(config.url)
        self.on_event = on_event
        self.state = ConnState.IDLE
        self.events: list[StreamEvent] = []
        self.sent_frames: list[SentFrame] = []
        self.sent_log: list[WireMessage] = []
        self.received_log: list[WireMessage] = []
        self.files: list[str] = []
        self.close_record = CloseRecord()
        self.request_bytes = b""
        self.response_head = b""
        self.started_at: float | None = None
        self.tcp_connected_at: float | None = None
        self.upgraded_at: float | None = None
        self.connected_at: float | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.audio_bytes_sent = 0
        self.frames_dropped = 0

        c = config
        self._mono_fb = c.mono_frame_bytes
        self._caller = CallerSource(self._mono_fb, c.voiced_rms, c.line_noise_dbfs)
        vox_blocking = c.playback == "voxcom" and c.voxcom_blocking_inject
        self.playout = Playout(
            playback=c.playback,
            rate=c.rate,
            frame_bytes=self._mono_fb,
            # voxcom's write buffer is as long as the forward buffer (buflen)
            capacity=self._mono_fb * c.channels * c.rtp_packets if vox_blocking else None,
            non_silent_peak=c.non_silent_peak,
            honour_sample_rate=c.voxcom_honour_sample_rate,
        )
        self._bug = MediaBug(
            mix=c.mix,
            frame_bytes=self._mono_fb,
            rtp_packets=c.rtp_packets,
            require_write_leg=c.require_write_leg,
            first_drain_tick=c.first_drain_tick,
            emit=self._send_audio,
        )

        self._queue: deque[tuple[int, bytes | memoryview, bool, float]] = deque()
        self._out: list[bytes] = []
        self._out_scheduled = False
        self._tx_blocked = False
        self._tx_unblocked = asyncio.Event()
        self._inject_left = 0  # bytes a blocked injectRawAudio still has to place
        self._tx_unblocked.set()
        self._mask = MaskKeys()
        self._deflate: PerMessageDeflate | None = None
        self._parser = FrameParser()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._attached = False
        self._cleaned_up = False
        self._paused = False
        self._play_index = 0
        self._temp_dir = c.temp_dir or tempfile.gettempdir()
        self._warned: set[str] = set()

        self._media_task: asyncio.Task[None] | None = None
        self._conn_task: asyncio.Task[None] | None = None
        self._ping_task: asyncio.Task[None] | None = None
        self._close_timer: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._done = asyncio.Event()  # TCP closed (or never opened) and the WS is over
        self._event_signal = asyncio.Event()
        self._subscribers: list[asyncio.Queue[StreamEvent]] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Attach the media bug, start the media clock and the connection.

        Returns immediately, as ``uuid_audio_stream … start`` answers ``+OK``
        before the WebSocket is up.
        """
        if self.state is not ConnState.IDLE:
            raise RuntimeError("stream already started")
        self.started_at = time.monotonic()
        self.state = ConnState.CONNECTING
        self._attached = True
        self._media_task = asyncio.create_task(self._media_loop(), name=f"fs-media-{self.uuid}")
        self._conn_task = asyncio.create_task(self._connection(), name=f"fs-ws-{self.uuid}")
        if self.config.heartbeat_s and self.config.heartbeat_s > 0:
            self._ping_task = asyncio.create_task(self._ping_loop(), name=f"fs-ping-{self.uuid}")

    async def wait_connected(self, timeout_s: float | None = None) -> bool:
        """Wait for ``::connect`` (True) or ``::error`` (False)."""
        limit = timeout_s if timeout_s is not None else self.config.timeout_s + 1.0
        ev = await self.wait_event(
            lambda e: e.name in (EVENT_CONNECT, EVENT_ERROR), timeout_s=limit
        )
        return ev.name == EVENT_CONNECT

    async def hangup(self) -> CloseRecord:
        """Channel hangup: CLOSE 1000 "Normal closure", ≤1 s for the server's EOF, no event."""
        return await self.stop(None)

    async def stop(self, text: str | None = None, *, api_split: bool = True) -> CloseRecord:
        """``uuid_audio_stream <uuid> stop [text]``: optional TEXT, then CLOSE 1000.

        libwsc stops reading once it sends CLOSE, so the server's echo is only
        recorded; it waits for the server to close TCP and gives up after 1 s.
        After a server-initiated close it waits for the server's EOF with no
        limit in real life (capped here by ``close_eof_cap_s``, with a warning).
        """
        if self.state is ConnState.IDLE:
            self.state = ConnState.CLOSED
            self._done.set()
            return self.close_record
        if not self._cleaned_up:
            self._cleaned_up = True  # markCleanedUp(): callbacks cleared, no more events
            self._detach()
            if self._tx_blocked:
                self._tx_blocked = False
                self._tx_unblocked.set()
                self._flush_queue()
            st = self.state
            if text is not None and st in (ConnState.CONNECTING, ConnState.OPEN):
                final = api_text_argument(self.uuid, text, "stop") if api_split else text
                if final is not None:
                    self._send_text(final)
            if st is ConnState.CONNECTING:
                self.close_record.initiator = self.close_record.initiator or "local"
                self._abort()
            elif st is ConnState.OPEN:
                self.close_record.initiator = "local"
                self._start_local_close(1000, "Normal closure")
        cap = (
            self.config.close_eof_cap_s
            if self.state is ConnState.REMOTE_CLOSED
            else CLOSE_TIMER_S + 0.5
        )
        try:
            await asyncio.wait_for(self._done.wait(), cap)
        except TimeoutError:
            if self.state is ConnState.REMOTE_CLOSED:
                logger.warning(
                    "fakeswitch {}: the server closed the WebSocket but kept TCP open {:.1f} s "
                    "after our echo; a real FreeSWITCH would block this hangup until it does",
                    self.uuid,
                    cap,
                )
            self._close_transport()
        await self._stop_tasks()
        return self.close_record

    async def aclose(self) -> None:
        """Hang up if needed and cancel everything (idempotent)."""
        if self.state not in (ConnState.CLOSED, ConnState.FAILED) or not self._cleaned_up:
            await self.hangup()
        await self._stop_tasks()

    async def __aenter__(self) -> FakeSwitchStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ API commands

    def send_text(self, text: str, *, api_split: bool = True) -> bool:
        """``uuid_audio_stream <uuid> send_text <text>``; False where FS answers -ERR.

        With ``api_split`` only FreeSWITCH's ``argv[2]`` is sent (cut at the
        first unquoted space, quotes stripped, escapes decoded). ``+OK`` does
        not mean delivered: the text is dropped unless connecting/open.
        """
        if not self._attached:
            return False
        final = api_text_argument(self.uuid, text) if api_split else text
        if final is None:
            return False
        self._send_text(final)
        return True

    def pause(self) -> bool:
        """``pause``: no audio at all (not silence); the bug buffers are flushed."""
        if not self._attached:
            return False
        self._paused = True
        self._bug.flush()
        return True

    def resume(self) -> bool:
        """``resume``: flush the bug buffers again and resume sending."""
        if not self._attached:
            return False
        self._bug.flush()
        self._paused = False
        return True

    # ------------------------------------------------------------------ caller audio

    def queue_caller_audio(self, pcm: bytes | bytearray | memoryview) -> float:
        """Queue s16le mono PCM at the stream rate; returns its duration in seconds."""
        frames = self._caller.queue(pcm)
        return frames * self.config.ptime_ms / 1000

    def queue_caller_wav(self, path: str | Path) -> float:
        """Queue a 16-bit WAV, mixed to mono and resampled to the stream rate (soxr)."""
        pcm, _ = load_wav(path, self.config.rate)
        return self.queue_caller_audio(pcm)

    def queue_caller_silence(self, seconds: float) -> float:
        """Queue explicit silence (e.g. a pause between two questions)."""
        n = int(round(seconds * 1000 / self.config.ptime_ms))
        return self.queue_caller_audio(bytes(n * self._mono_fb))

    def clear_caller_audio(self) -> None:
        """Drop the caller audio not yet spoken."""
        self._caller.clear()

    @property
    def caller_queued_s(self) -> float:
        """Seconds of caller audio still to be spoken."""
        return self._caller.queued_frames * self.config.ptime_ms / 1000

    async def wait_caller_drained(self, timeout_s: float | None = None) -> None:
        """Wait until all queued caller audio has been spoken."""
        await asyncio.wait_for(self._caller.drained.wait(), timeout_s)

    # ------------------------------------------------------------------ playback hooks

    def play_file(self, path: str | Path) -> float:
        """Play a file to the caller (what ``uuid_broadcast``/``playback`` would do).

        For an ESL emulator to reuse; decodes ``.rN``/``.wav``/``.pcmu``/``.pcma``,
        resamples to the stream rate and appends to the write leg. Returns seconds.
        """
        return self.playout.play_file(path)

    def play_pcm(self, pcm: bytes, rate: int) -> float:
        """Append s16le mono audio at ``rate`` to what the caller hears."""
        return self.playout.play_pcm(pcm, rate)

    def break_playback(self) -> None:
        """``uuid_break <uuid> all``: stop what is playing and drop what is queued."""
        self.playout.clear()

    @property
    def playing(self) -> bool:
        """Audio is waiting to be played to the caller."""
        return self.playout.playing

    # ------------------------------------------------------------------ events

    def subscribe(self) -> asyncio.Queue[StreamEvent]:
        """A queue that receives every event fired from now on."""
        q: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._subscribers.append(q)
        return q

    async def wait_event(
        self,
        match: str | Callable[[StreamEvent], bool],
        *,
        timeout_s: float = 5.0,
        since: int = 0,
    ) -> StreamEvent:
        """First event (index ≥ ``since``) whose name equals / that satisfies ``match``."""
        pred: Callable[[StreamEvent], bool] = (
            (lambda e: e.name == match) if isinstance(match, str) else match
        )
        deadline = time.monotonic() + timeout_s
        i = since
        while True:
            while i < len(self.events):
                if pred(self.events[i]):
                    return self.events[i]
                i += 1
            signal = self._event_signal
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching event within {timeout_s} s")
            try:
                await asyncio.wait_for(signal.wait(), remaining)
            except TimeoutError:
                continue

    def event_counts(self) -> dict[str, int]:
        """Number of events per subclass."""
        return dict(Counter(e.name for e in self.events))

    # ------------------------------------------------------------------ measurements

    @property
    def upgrade_s(self) -> float | None:
        """Start of the connect → complete 101 received."""
        if self.upgraded_at is None or self.started_at is None:
            return None
        return self.upgraded_at - self.started_at

    def last_voiced_sent_at(self, before: float | None = None) -> float | None:
        """Send time of the last voiced caller frame (optionally before ``before``)."""
        for f in reversed(self.sent_frames):
            if f.voiced and (before is None or f.t < before):
                return f.t
        return None

    def voiced_segments(self, min_gap_s: float = 0.5) -> list[tuple[float, float]]:
        """(first, last) send times of caller speech bursts split by ≥ ``min_gap_s`` silence."""
        segs: list[tuple[float, float]] = []
        for f in self.sent_frames:
            if not f.voiced:
                continue
            if segs and f.t - segs[-1][1] < min_gap_s:
                segs[-1] = (segs[-1][0], f.t)
            else:
                segs.append((f.t, f.t))
        return segs

    def received_audio(self) -> tuple[bytes, list[ReceivedAudio]]:
        """Bot audio accepted by the module (wire level), at the stream rate."""
        return self.playout.received_audio()

    def first_bot_audio_received_after(self, t: float) -> float | None:
        """Receive time of the first non-silent bot audio at or after ``t``."""
        return self.playout.first_received_at_or_after(t)

    def played_audio(self) -> tuple[bytes, list[tuple[float, bool]]]:
        """What the caller heard: one 20 ms frame per tick, silence when idle."""
        return self.playout.played_audio()

    def first_bot_audio_played_after(self, t: float) -> float | None:
        """Tick time of the first non-silent frame played to the caller at or after ``t``."""
        return self.playout.first_played_at_or_after(t)

    def last_bot_audio_at(self) -> float | None:
        """Latest non-silent bot audio, received or played."""
        return self.playout.last_bot_audio_at()

    async def wait_bot_audio_after(
        self, t: float, timeout_s: float, *, played: bool = False
    ) -> float | None:
        """First bot audio at or after ``t`` (received, or ``played`` to the caller), waiting
        up to ``timeout_s``; None if none came. The time is the recorder's, not the poll's."""
        first = self.first_bot_audio_played_after if played else self.first_bot_audio_received_after
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (got := first(t)) is not None:
                return got
            await asyncio.sleep(0.01)
        return None

    async def wait_bot_quiet(self, quiet_s: float = 0.6, timeout_s: float = 15.0) -> bool:
        """Wait until no bot audio has come for ``quiet_s`` (after some came); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            last = self.last_bot_audio_at()
            if last is not None and time.monotonic() - last > quiet_s:
                return True
            await asyncio.sleep(0.05)
        return False

    # ------------------------------------------------------------------ media clock

    async def _media_loop(self) -> None:
        assert self.started_at is not None
        ptime = self.config.ptime_ms / 1000
        t0 = self.started_at
        k = 0
        try:
            while True:
                k += 1
                target = t0 + k * ptime
                delay = target - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._tick(k, target)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("fakeswitch {}: media clock failed", self.uuid)
            raise

    def _tick(self, k: int, t_tick: float) -> None:
        played, write_active = self.playout.tick(t_tick)
        frame, voiced = self._caller.next()
        if self._attached and not self._paused:
            self._bug.tick(k, t_tick, frame, voiced, played, write_active)

    # ------------------------------------------------------------------ sending

    def _send_audio(self, pcm: bytes | memoryview, voiced: bool, captured_at: float) -> None:
        st = self.state
        if st is ConnState.CONNECTING or (st is ConnState.OPEN and self._tx_blocked):
            self._enqueue(Opcode.BINARY, pcm, voiced, captured_at)
        elif st is ConnState.OPEN:
            self._write_audio(pcm, voiced, captured_at)
        else:
            self.frames_dropped += 1  # isConnected() false: writeBinary drops it

    def _send_text(self, text: str) -> None:
        st = self.state
        data = text.encode("utf-8")
        if st is ConnState.CONNECTING or (st is ConnState.OPEN and self._tx_blocked):
            self._enqueue(Opcode.TEXT, data, False, time.monotonic())
        elif st is ConnState.OPEN:
            self._wire(Opcode.TEXT, data)

    def _enqueue(
        self, opcode: int, payload: bytes | memoryview, voiced: bool, captured_at: float
    ) -> None:
        if len(self._queue) >= MAX_QUEUE:
            self.frames_dropped += 1
            self._warn_once("queue", "send queue full (1024): dropping messages, as libwsc does")
            return
        self._queue.append((opcode, payload, voiced, captured_at))

    def _flush_queue(self) -> None:
        q = self._queue
        while q:
            opcode, payload, voiced, cap = q.popleft()
            if opcode == Opcode.BINARY:
                self._write_audio(payload, voiced, cap)
            else:
                self._wire(opcode, payload)

    def _write_audio(self, pcm: bytes | memoryview, voiced: bool, captured_at: float) -> None:
        t = self._wire(Opcode.BINARY, pcm)
        if t is not None:
            n = len(pcm)
            self.audio_bytes_sent += n
            self.sent_frames.append(SentFrame(t, n, voiced, captured_at))

    def _wire(self, opcode: int, payload: bytes | memoryview) -> float | None:
        """Encode and write one frame now; returns the send time (None if no socket)."""
        w = self._writer
        if w is None or w.is_closing():
            return None
        rsv1 = False
        if self._deflate is not None and opcode in (Opcode.TEXT, Opcode.BINARY):
            packed = self._deflate.compress(bytes(payload))
            if packed is not None:
                payload, rsv1 = packed, True
        data = encode_frame(opcode, payload, self._mask(), rsv1=rsv1)
        t = time.monotonic()
        self._out.append(data)
        if not self._out_scheduled:
            # Like libevent's output evbuffer: everything queued in one loop
            # iteration leaves in one send (matters with Nagle on).
            self._out_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)
        self.bytes_sent += len(data)
        self.sent_log.append(WireMessage(t, opcode, len(payload)))
        return t

    def _flush_out(self) -> None:
        self._out_scheduled = False
        out = self._out
        if not out:
            return
        w = self._writer
        if w is not None and not w.is_closing():
            w.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    # ------------------------------------------------------------------ connection

    async def _connection(self) -> None:
        c = self.config
        try:
            if self.url.port == 0:
                raise _HandshakeFailed(ERR_CONNECT_FAILED, "Invalid host or port")
            if self.url.secure:
                self._warn_once(
                    "tls", "TLS support not compiled in (USE_TLS=OFF), proceeding in insecure mode"
                )
            try:
                head, leftover = await asyncio.wait_for(self._handshake(), c.timeout_s)
            except TimeoutError:
                if c.libwsc == "old":
                    raise _HandshakeFailed(ERR_CONNECT_FAILED, "Connection timeout") from None
                raise _HandshakeFailed(ERR_TIMEOUT, "Timeout") from None
            except socket.gaierror:
                raise _HandshakeFailed(ERR_CONNECT_FAILED, "Connection error") from None
            except OSError as e:
                raise _HandshakeFailed(ERR_CONNECT_FAILED, _socket_error_text(e)) from None
        except _HandshakeFailed as e:
            if self.state is ConnState.CONNECTING:
                self.close_record.initiator = "connect"
                self._fire_error(e.code, e.message)
                self._bug_close()
                self._abort(failed=True)
            return
        await self._on_open(head, leftover)
        await self._read_loop()

    async def _handshake(self) -> tuple[bytes, bytes]:
        u = self.url
        reader, writer = await asyncio.open_connection(u.host, u.port, family=socket.AF_INET)
        self._reader, self._writer = reader, writer
        self.tcp_connected_at = time.monotonic()
        sock = writer.get_extra_info("socket")
        if sock is not None and not self.config.tcp_nodelay:
            # libevent/libwsc never set TCP_NODELAY (asyncio does): keep Nagle on.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        self.request_bytes = build_upgrade_request(
            u,
            make_key(),
            offer_deflate=self.config.offer_deflate,
            extra_headers=parse_extra_headers(self.config.extra_headers),
        )
        writer.write(self.request_bytes)
        self.bytes_sent += len(self.request_bytes)
        buf = bytearray()
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                raise _HandshakeFailed(
                    ERR_CONNECT_FAILED, "Connection closed during handshake (EOF)"
                )
            self.bytes_received += len(chunk)
            buf += chunk
            if len(buf) >= 4 and (hl := find_header_end(buf)):
                break
        head = bytes(buf[:hl])
        if not upgrade_accepted(head, old_libwsc=self.config.libwsc == "old"):
            raise _HandshakeFailed(ERR_CONNECT_FAILED, "WebSocket upgrade failed")
        return head, bytes(buf[hl:])

    async def _on_open(self, head: bytes, leftover: bytes) -> None:
        self.upgraded_at = time.monotonic()
        self.response_head = head
        compression_failed = False
        if self.config.offer_deflate:
            try:
                self._deflate = negotiate_deflate(head)
            except (ValueError, zlib.error):
                compression_failed = True
        self._parser = FrameParser(deflate=self._deflate)
        self.state = ConnState.OPEN
        if compression_failed:
            # libwsc reports NOT_SUPPORTED; the module's error handler closes the bug.
            self._fire_error(ERR_NOT_SUPPORTED, "Compression negotiation failed")
            self._bug_close()
            self.close_record.initiator = "local"
            self._start_local_close(1000, "Normal closure")
            return
        if self.config.ordering == "libwsc":
            self._flush_queue()  # audio queued while CONNECTING goes first
            self._open_callback()
        else:
            self._open_callback()
            self._flush_queue()
        self.connected_at = time.monotonic()
        if leftover:
            await self._handle_bytes(leftover, self.upgraded_at)

    def _open_callback(self) -> None:
        """send_initial_metadata() then fire ``::connect``."""
        md = self.config.metadata
        if md and not self._cleaned_up:
            self._wire(Opcode.TEXT, md.encode("utf-8"))
        self._fire(EVENT_CONNECT, '{"status":"connected"}')

    async def _read_loop(self) -> None:
        reader = self._reader
        assert reader is not None
        while True:
            try:
                data = await reader.read(65536)
            except OSError as e:
                self._on_socket_error(e)
                return
            if not data:
                self._on_eof()
                return
            now = time.monotonic()
            self.bytes_received += len(data)
            await self._handle_bytes(data, now)
            if self.state in (ConnState.CLOSED, ConnState.FAILED):
                return

    async def _handle_bytes(self, data: bytes, now: float) -> None:
        st = self.state
        if st is not ConnState.OPEN:
            if st is ConnState.CLOSING:
                self._diagnose(data, now)  # libwsc ignores it; we only record the echo
            return
        frames = self._parser.feed(data)
        for f in frames:
            self.received_log.append(WireMessage(now, f.opcode, len(f.payload)))
            await self._on_frame(f, now)
            if self.state is not ConnState.OPEN:
                return
        err = self._parser.error
        if err is not None:
            self._protocol_error(err)

    def _diagnose(self, data: bytes, now: float) -> None:
        for f in self._parser.feed(data):
            self.received_log.append(WireMessage(now, f.opcode, len(f.payload)))
            if f.opcode == Opcode.CLOSE and self.close_record.server_close_at is None:
                self.close_record.server_close_at = now
                self.close_record.server_close_code = f.close_code
                self.close_record.server_close_reason = f.close_reason

    async def _on_frame(self, f: Frame, now: float) -> None:
        op = f.opcode
        if op == Opcode.PING:
            self._wire(Opcode.PONG, f.payload)
        elif op == Opcode.CLOSE:
            self._on_server_close(f.close_code or 1000, f.close_reason or "", now)
        elif op == Opcode.TEXT:
            await self._on_text(f.text or "", now)
        elif op == Opcode.BINARY:
            self.playout.on_binary(f.payload, now)

    def _on_server_close(self, code: int, reason: str, now: float) -> None:
        """onRxClose: echo the same code and reason, fire ``::disconnect``, stay attached."""
        cr = self.close_record
        cr.initiator = "server"
        cr.server_close_at, cr.server_close_code, cr.server_close_reason = now, code, reason
        self._wire(Opcode.CLOSE, close_payload(code, reason))
        cr.close_sent_at = time.monotonic()
        cr.close_code_sent, cr.close_reason_sent = code, reason
        self.state = ConnState.REMOTE_CLOSED
        msg = CJObject([("code", code), ("reason", reason)])
        body = CJObject([("status", "disconnected"), ("message", msg)])
        self._fire(EVENT_DISCONNECT, cjson_dumps(body))

    def _on_eof(self) -> None:
        if self._done.is_set():
            return  # we closed the transport ourselves (close timer / abort)
        now = time.monotonic()
        self.close_record.server_eof_at = now
        if self.state is ConnState.OPEN:
            self.close_record.initiator = "eof"
            self._fire_error(ERR_IO, "Connection closed without WebSocket CLOSE (abnormal EOF)")
            self._bug_close()
        self._close_transport()

    def _on_socket_error(self, e: OSError) -> None:
        if self.state is ConnState.OPEN:
            self.close_record.initiator = "eof"
            self._fire_error(ERR_IO, _socket_error_text(e))
            self._bug_close()
        self._close_transport()

    def _protocol_error(self, err: ProtocolError) -> None:
        """onRxProtocolError: ``::error`` 11, the module closes the bug, CLOSE code/why."""
        self.close_record.initiator = "protocol"
        self._fire_error(ERR_PROTOCOL, err.event_message)
        self._bug_close()
        self._start_local_close(err.code, err.reason)

    def _start_local_close(self, code: int, reason: str) -> None:
        if self.state is not ConnState.OPEN:
            return
        self.state = ConnState.CLOSING
        self._wire(Opcode.CLOSE, close_payload(code, reason))
        cr = self.close_record
        cr.close_sent_at = time.monotonic()
        cr.close_code_sent, cr.close_reason_sent = code, reason
        self._close_timer = asyncio.create_task(self._close_timer_cb())

    async def _close_timer_cb(self) -> None:
        await asyncio.sleep(CLOSE_TIMER_S)
        if not self._done.is_set():
            self._close_transport()  # the peer never closed TCP: libwsc gives up

    def _abort(self, *, failed: bool = False) -> None:
        """No WebSocket to close (still connecting / failed): drop TCP, discard the queue."""
        self._queue.clear()
        if self._conn_task is not None and asyncio.current_task() is not self._conn_task:
            self._conn_task.cancel()
        self._close_transport()
        self.state = ConnState.FAILED if failed else ConnState.CLOSED

    def _close_transport(self) -> None:
        self._flush_out()
        w = self._writer
        if w is not None and not w.is_closing():
            w.close()
        if self.close_record.tcp_closed_at is None and w is not None:
            self.close_record.tcp_closed_at = time.monotonic()
        if self.state is not ConnState.FAILED:
            self.state = ConnState.CLOSED
        self._queue.clear()
        self._done.set()

    async def _ping_loop(self) -> None:
        assert self.started_at is not None
        period = float(self.config.heartbeat_s)
        k = 0
        while True:
            k += 1
            delay = self.started_at + k * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._tx_blocked:
                await self._tx_unblocked.wait()  # the libwsc event loop is busy
            if self.state is ConnState.OPEN:
                self._wire(Opcode.PING, b"ping")
            elif self.state not in (ConnState.CONNECTING, ConnState.IDLE):
                return

    # ------------------------------------------------------------------ server → FS

    async def _on_text(self, text: str, now: float) -> None:
        text = text.split("\0", 1)[0]  # the module hands C strings around
        pb = self.config.playback
        pr = process_message(text, raw_to_file=pb != "voxcom")
        for err in pr.errors:
            logger.error("fakeswitch ({}) {}", self.uuid, err)
        if pb == "cloudfieldcz" and pr.json_type == "clearAudio":
            self.playout.clear()
        if not pr.ok:
            self._fire(EVENT_JSON, text)
            return
        if pb == "voxcom" and pr.audio_type == "raw":
            pcm = self.playout.voxcom_pcm(pr.audio, pr.sample_rate)
            self.playout.record(now, pcm, "streamAudio")
            await self._voxcom_inject(pcm)
            return
        path = os.path.join(self._temp_dir, f"{self.uuid}_{self._play_index}.tmp{pr.extension}")
        self._play_index += 1
        if not self._write_play_file(path, pr.audio):
            self._fire(EVENT_JSON, text)
            return
        self.files.append(path)
        decoded = decode_audio_bytes(pr.audio, pr.extension)
        if decoded is None:
            self.playout.record_opaque(now, len(pr.audio), "streamAudio")
        else:
            pcm = resample(decoded[0], decoded[1], self.config.rate)
            self.playout.record(now, pcm, "streamAudio")
        self._fire(EVENT_PLAY, pr.play_body(path))

    def _write_play_file(self, path: str, data: bytes) -> bool:
        """Write the decoded audio synchronously, as the module does in the libwsc thread."""
        try:
            Path(path).write_bytes(data)
        except OSError as e:
            logger.error(
                "fakeswitch ({}) processMessage - failed writing file: {} ({})", self.uuid, path, e
            )
            return False
        return True

    @property
    def hangup_would_deadlock(self) -> bool:
        """voxcom (§15): bot audio blocks libwsc's thread in ``injectRawAudio`` with
        more left than the buffer can take once a hangup stops playout. A hangup now
        deadlocks; one a tick later may not (that tick made room, and the thread sees
        the stop before its next message)."""
        return self._tx_blocked and self._inject_left > self.playout.buffer.space()

    async def _voxcom_inject(self, pcm: bytes) -> None:
        """injectRawAudio: busy-wait (10 ms yields) in the libwsc thread until it all fits.

        While blocked nothing is read and outgoing audio only queues, as in the fork.
        """
        po = self.playout
        if po.dead:
            return
        if not self.config.voxcom_blocking_inject:
            po.buffer.append(pcm)
            return
        view = memoryview(pcm)
        off = 0
        try:
            while off < len(pcm):
                space = po.buffer.space()
                if space == 0:
                    self._tx_blocked = True
                    self._inject_left = len(pcm) - off
                    self._tx_unblocked.clear()
                    await asyncio.sleep(0.01)  # switch_yield(10000)
                    if po.dead or self.state is not ConnState.OPEN:
                        return
                    continue
                n = min(space, len(pcm) - off)
                po.buffer.append(view[off : off + n])
                off += n
        finally:
            self._inject_left = 0
            if self._tx_blocked:
                self._tx_blocked = False
                self._tx_unblocked.set()
                if self.state is ConnState.OPEN:
                    self._flush_queue()

    # ------------------------------------------------------------------ module side

    def _fire(self, name: str, raw: str) -> None:
        if self._cleaned_up:
            return  # markCleanedUp() cleared the callbacks
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        ev = StreamEvent(name, raw, body, time.monotonic(), self.uuid)
        self.events.append(ev)
        self._event_signal.set()
        self._event_signal = asyncio.Event()
        for q in self._subscribers:
            q.put_nowait(ev)
        if self.on_event is not None:
            res = self.on_event(ev)
            if inspect.isawaitable(res):
                task = asyncio.ensure_future(res)
                self._bg.add(task)
                task.add_done_callback(self._bg.discard)

    def _fire_error(self, code: int, message: str) -> None:
        msg = CJObject([("code", code), ("error", message)])
        self._fire(EVENT_ERROR, cjson_dumps(CJObject([("status", "error"), ("message", msg)])))

    def _bug_close(self) -> None:
        """media_bug_close → stream_session_cleanup: files deleted, callbacks cleared."""
        self._cleaned_up = True
        self._detach()

    def _detach(self) -> None:
        self._attached = False
        self._bug.flush()
        self._bug.discard_partial()
        self.playout.kill()
        if not self.config.keep_files:
            for p in self.files:
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("fakeswitch {}: {}", self.uuid, message)

    async def _stop_tasks(self) -> None:
        me = asyncio.current_task()
        tasks = [
            t
            for t in (self._media_task, self._ping_task, self._close_timer, self._conn_task)
            if t is not None and t is not me and not t.done()
        ]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("fakeswitch {}: task failed", self.uuid)
        self._flush_out()
        w = self._writer
        if w is not None:
            if not w.is_closing():
                w.close()
            try:
                await asyncio.wait_for(w.wait_closed(), 0.5)
            except (TimeoutError, OSError):
                pass


def _socket_error_text(e: OSError) -> str:
    """``evutil_socket_error_to_string(err) + " (system error N)"``, or "Connection error"."""
    if e.errno:
        return f"{os.strerror(e.errno)} (system error {e.errno})"
    return "Connection error"
