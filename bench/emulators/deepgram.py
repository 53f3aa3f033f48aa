"""Deepgram live speech-to-text emulator (``wss://api.deepgram.com/v1/listen``).

Speaks the listen-v1 WebSocket protocol that deepgram-sdk 7.x (and so the
unmodified ``pipecat.services.deepgram.stt.DeepgramSTTService``) uses, on
loopback, so the bench measures our media server rather than the internet:

* ``GET /v1/listen?encoding=linear16&sample_rate=…&channels=…&interim_results=…&model=…``
  upgraded to a WebSocket. The SDK authenticates with ``Authorization: Token <key>``;
  a missing or malformed header is refused with HTTP 401, as Deepgram does.
* Client → server: binary linear16 audio, and JSON text ``{"type": "KeepAlive"}``,
  ``{"type": "Finalize"}`` and ``{"type": "CloseStream"}``.
* Server → client: ``Results`` (interim ``is_final=false`` every ~300 ms of speech,
  then one ``is_final=true`` per utterance), ``SpeechStarted`` only when the query
  asks for ``vad_events=true``, ``UtteranceEnd`` only when it sets
  ``utterance_end_ms``, and ``Metadata`` when the stream is closed with
  CloseStream. Nothing is sent on open: the SDK does not wait for anything.

There is no ASR. Caller speech is found by energy (RMS over 10 ms windows, numpy
on the whole chunk) and every utterance is "recognised" as the next line of a
script. What the emulator does reproduce is *when* the final transcript comes:

* ``true_speech_end`` is the audio position where energy stopped, converted to
  the monotonic clock by the arrival of the audio carrying it (callers send in
  real time, so arrival time ≈ production time).
* The final is sent at ``max(true_speech_end + ttfs, now)``, ``ttfs`` drawn once
  per utterance from the latency model (default: Deepgram Nova-3, p50 247 / p95
  298 ms from the true end of speech). If energy resumes before then the
  utterance simply continues (the TTFS doubles as the endpointing hangover).
* ``Finalize`` closes the current utterance at once: its final goes out at the same
  due time or ``finalize_latency_ms`` after the Finalize, whichever is sooner, and
  carries ``from_finalize: true`` (``speech_final: false``). A Finalize
  with nothing pending is answered within ~20 ms by an empty
  ``from_finalize`` final, as Deepgram does.

How Pipecat drives this: ``DeepgramSTTService.process_frame`` answers every
``VADUserStoppedSpeakingFrame`` (emitted by Silero ``stop_secs`` after speech
ends) by calling ``request_finalize()`` and sending ``{"type": "Finalize"}``.
A ``from_finalize`` final then calls ``confirm_finalize()``, so its
``TranscriptionFrame`` gets ``finalized=True`` and STT TTFB is reported at once;
an empty ``from_finalize`` final only closes the TTFB measurement. With the
default 0.2 s ``stop_secs`` the Finalize arrives before the ~247 ms due time, so
in a real pipeline most finals are ``from_finalize`` ones.

Faults (:class:`DeepgramFaults`): refuse the upgrade with an HTTP status (401 …),
or drop a stream after N seconds or N utterances, either by aborting the TCP
connection (no close frame; websockets raises ``ConnectionClosedError`` 1006) or
by closing with 1011, which is how Deepgram reports server-side failures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from aiohttp import WSMsgType, web

from pipeswitch.bench.emulators.latency import DEEPGRAM_TTFS, LatencyModel, LatencySpec
from pipeswitch.bench.emulators.serving import add_admin_routes

TranscriptScript = Sequence[str] | Callable[[int], str]

DEFAULT_TRANSCRIPTS: tuple[str, ...] = ("What are your opening hours tomorrow?",)

# Deepgram's own message for its 10 s inactivity timeout (error NET-0001).
_NET0001 = (
    "Deepgram did not receive audio data or a text message within the timeout window. "
    "See https://dpgr.am/net0001"
)
# Flux (``/v2/listen``), from the true end of speech. Deepgram states ~260 ms end-of-turn
# latency for Flux; the eager prediction comes earlier by design. These are the
# emulator's assumptions (no public per-percentile figures), override per bench run.
FLUX_EOT = LatencySpec(median_ms=260.0, p95_ms=340.0)
FLUX_EAGER_EOT = LatencySpec(median_ms=150.0, p95_ms=200.0)
_MODEL_INFO = {"name": "general-nova-3", "version": "2025-01-01.0", "arch": "nova-3"}
_MODEL_UUID = "3b3aabe4-608a-46ac-9585-7960a25daf1a"


@dataclass
class DeepgramSettings:
    """Detector and protocol tunables; the defaults suit telephone speech.

    Attributes:
        energy_threshold_dbfs: RMS level (dBFS) above which a 10 ms window is voiced.
        window_ms: Energy window length.
        min_speech_ms: Consecutive voiced time needed to open an utterance
            (filters clicks).
        min_utterance_ms: Utterances with less voiced time than this are dropped
            without a transcript, and do not consume a script line.
        interim_interval_ms: Speech time between interim results.
        finalize_empty_delay_ms: How fast an empty Finalize is answered.
        finalize_latency_ms: How fast a Finalize flushes an open utterance: its final
            goes out at ``min(true end + ttfs, Finalize + this)``. Deepgram finalizes
            the audio it has at once; the stt-benchmark TTFS (247 ms with a 200 ms VAD
            wait plus Silero's ~50 ms lag before the Finalize) leaves tens of ms for it.
            This is what makes an earlier Finalize (a shorter VAD pause) pay off.
        idle_timeout_s: Close with 1011 (NET-0001) after this long without any
            message; Deepgram uses 10 s. None disables it.
        api_key: If set, the token in the Authorization header must equal it.
    """

    energy_threshold_dbfs: float = -40.0
    window_ms: int = 10
    min_speech_ms: int = 40
    min_utterance_ms: int = 100
    interim_interval_ms: int = 300
    finalize_empty_delay_ms: float = 20.0
    finalize_latency_ms: float = 30.0
    idle_timeout_s: float | None = 10.0
    api_key: str | None = None


@dataclass
class DeepgramFaults:
    """Faults to inject into new streams.

    Attributes:
        reject_status: Refuse the WebSocket upgrade with this HTTP status
            (401 makes the SDK raise ``ApiError(401)``, which Pipecat treats as
            permanent).
        drop_after_s: Drop the stream this many seconds after it opened.
        drop_after_utterances: Drop the stream right after its Nth final transcript.
        drop_mode: ``"abort"`` resets the TCP connection (provider vanished);
            ``"close"`` sends a 1011 close frame (provider-side error).
        connections: Apply the faults to this many new connections only, so a
            reconnect can succeed; None applies them to every connection.
        stall: Keep the stream open but never send a transcript (a hung provider).
        malformed: Send a text frame that is not JSON where each final would go.
        final_delay_s: Hold each final transcript this much longer (slow first byte).
        region: Fault only connections to this region: ``""`` is the plain
            ``/v1/listen``, ``"eu"`` is ``/eu/v1/listen`` (the emulator serves any
            ``/<region>/v1/listen`` as a second endpoint); None faults every one.
    """

    reject_status: int | None = None
    drop_after_s: float | None = None
    drop_after_utterances: int | None = None
    drop_mode: Literal["abort", "close"] = "abort"
    connections: int | None = None
    stall: bool = False
    malformed: bool = False
    final_delay_s: float | None = None
    region: str | None = None

    @property
    def active(self) -> bool:
        """Whether any fault is configured."""
        return (
            self.reject_status is not None
            or self.drop_after_s is not None
            or self.drop_after_utterances is not None
            or self.stall
            or self.malformed
            or self.final_delay_s is not None
        )


@dataclass
class UtteranceRecord:
    """One detected utterance and when its final transcript went out.

    Times ending in ``_at`` are ``time.monotonic()`` values; ``*_audio_s`` are
    positions in the stream's audio.
    """

    turn: int
    text: str
    speech_start_audio_s: float
    speech_end_audio_s: float
    speech_start_at: float
    speech_end_at: float
    ttfs_s: float
    voiced_s: float = 0.0
    finalize_at: float | None = None
    final_due_at: float | None = None
    final_sent_at: float | None = None
    from_finalize: bool = False
    speech_final: bool = False
    discarded: bool = False
    # Flux: when the eager end of turn went out, and whether speech resumed after it.
    eager_sent_at: float | None = None
    resumed_after_eager: int = 0


@dataclass
class StreamRecord:
    """What one WebSocket stream asked for and received; inspectable after the fact."""

    id: int
    query: dict[str, str]
    auth_scheme: str
    opened_at: float
    closed_at: float | None = None
    close_reason: str = ""
    audio_bytes: int = 0
    audio_s: float = 0.0
    keepalives: int = 0
    finalizes: int = 0
    close_stream: bool = False
    interims_sent: int = 0
    finals_sent: int = 0
    empty_finals_sent: int = 0
    utterances: list[UtteranceRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the admin endpoint and the bench report)."""
        return dataclasses.asdict(self)


@dataclass(eq=False)
class _Utterance:
    """A detected utterance, open or waiting for its final to go out."""

    rec: UtteranceRecord
    speaking: bool = True
    next_interim_s: float = 0.0
    timer: asyncio.TimerHandle | None = None
    closed: bool = False


class DeepgramEmulator:
    """Serves ``/v1/listen`` for any number of concurrent streams.

    Per message the work is one numpy pass over the chunk plus a Python step
    per 10 ms window only around speech onsets/ends, so ~100 concurrent 8 kHz
    streams cost little. Stream records accumulate in :attr:`streams`.
    """

    def __init__(
        self,
        *,
        ttfs: LatencyModel | None = None,
        script: TranscriptScript | None = None,
        settings: DeepgramSettings | None = None,
        faults: DeepgramFaults | None = None,
        flux_eager: LatencySpec | None = None,
        flux_eot: LatencySpec | None = None,
    ) -> None:
        """Create the emulator; ``script`` lines are cycled per call (see :meth:`transcript`)."""
        self.ttfs = ttfs or DEEPGRAM_TTFS.model(seed=0)
        seed = 1 if ttfs is None else int(ttfs.median_ms)
        self.flux_eager = (flux_eager or FLUX_EAGER_EOT).model(seed=seed + 1)
        self.flux_eot = (flux_eot or FLUX_EOT).model(seed=seed + 2)
        self.script: TranscriptScript = script if script is not None else DEFAULT_TRANSCRIPTS
        self.settings = settings or DeepgramSettings()
        self.faults = faults or DeepgramFaults()
        self._faulted = 0
        self.streams: list[StreamRecord] = []
        self.active_streams = 0
        self.rejected = 0
        self.abandoned_upgrades = 0  # clients gone before the 101
        self._turns: dict[str, int] = {}
        self._next_id = 0
        self._live: set[_Stream] = set()

    # -- public helpers -------------------------------------------------------

    def set_faults(self, faults: DeepgramFaults) -> None:
        """Replace the faults for new connections (resets the ``connections`` count)."""
        self.faults = faults
        self._faulted = 0

    def clear(self) -> None:
        """Forget recorded streams (open streams keep working)."""
        self.streams = []
        self._turns.clear()

    async def close_all(self) -> None:
        """Close every open stream with 1001 (going away), e.g. on server shutdown."""
        for stream in list(self._live):
            if not stream.ws.closed:
                stream.record.close_reason = "server shutdown"
                await stream.ws.close(code=1001, message=b"Emulator shutting down")

    def transcript(self, turn: int) -> str:
        """The scripted transcript for the ``turn``-th utterance of a call."""
        if callable(self.script):
            return str(self.script(turn))
        lines = list(self.script)
        return lines[turn % len(lines)] if lines else ""

    def add_routes(self, app: web.Application) -> None:
        """Register the listen endpoint and the admin endpoints on ``app``."""
        app.router.add_get("/v1/listen", self.handle_listen)
        app.router.add_get("/v2/listen", self.handle_flux)
        # Another region of the same service (a tenant's stt_fallback_url).
        app.router.add_get("/{region}/v1/listen", self.handle_listen)
        app.router.add_get("/{region}/v2/listen", self.handle_flux)
        add_admin_routes(
            app,
            self,
            DeepgramFaults,
            "streams",
            lambda: {"active": self.active_streams, "streams": [s.to_dict() for s in self.streams]},
        )

    # -- HTTP / WebSocket -----------------------------------------------------

    async def handle_flux(self, request: web.Request) -> web.StreamResponse:
        """Flux (``/v2/listen``): the same detector, turn events instead of Results."""
        return await self.handle_listen(request, flux=True)

    async def handle_listen(self, request: web.Request, flux: bool = False) -> web.StreamResponse:
        """Authenticate, validate the query, then run the stream."""
        auth_scheme, key = _credentials(request)
        if not key or auth_scheme not in ("token", "bearer"):
            return self._reject(401, "INVALID_AUTH", "Invalid credentials.")
        if self.settings.api_key is not None and key != self.settings.api_key:
            return self._reject(401, "INVALID_AUTH", "Invalid credentials.")

        faults = self._take_faults(request.match_info.get("region", ""))
        if faults is not None and faults.reject_status is not None:
            return self._reject(faults.reject_status, "EMULATED_FAULT", "Emulated rejection.")

        query = {k: v for k, v in request.query.items()}
        encoding = query.get("encoding", "linear16")
        if encoding != "linear16":
            return self._reject(400, "Bad Request", f"Emulator supports linear16, not {encoding}")
        try:
            sample_rate = int(query.get("sample_rate", "16000"))
            channels = int(query.get("channels", "1"))
        except ValueError:
            return self._reject(400, "Bad Request", "sample_rate and channels must be integers")
        if sample_rate <= 0 or channels <= 0:
            return self._reject(400, "Bad Request", "sample_rate and channels must be positive")

        ws = web.WebSocketResponse(protocols=("token",), timeout=2.0, autoping=True)
        try:
            await ws.prepare(request)
        except ConnectionResetError:
            # The client gave up before our 101 (a call hung up while its STT connected):
            # nothing to serve, and not an emulator error.
            self.abandoned_upgrades += 1
            # Not the unprepared WebSocketResponse: aiohttp would close() it and log a
            # "Call .prepare() first" traceback per abandoned call.
            return web.Response(status=499, text="client closed the connection")
        self._next_id += 1
        record = StreamRecord(
            id=self._next_id, query=query, auth_scheme=auth_scheme, opened_at=time.monotonic()
        )
        self.streams.append(record)
        kind = _FluxStream if flux else _Stream
        stream = kind(self, ws, request, record, sample_rate, channels, faults)
        self.active_streams += 1
        self._live.add(stream)
        try:
            await stream.run()
        finally:
            self.active_streams -= 1
            self._live.discard(stream)
            self._turns.pop(f"stream:{record.id}", None)  # tagged calls keep their place
            stream.shutdown()
            record.closed_at = time.monotonic()
        return ws

    def _take_faults(self, region: str = "") -> DeepgramFaults | None:
        faults = self.faults
        if not faults.active or (faults.region is not None and faults.region != region):
            return None
        if faults.connections is not None and self._faulted >= faults.connections:
            return None
        self._faulted += 1
        return faults

    def _reject(self, status: int, code: str, message: str) -> web.Response:
        self.rejected += 1
        body = {"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())}
        return web.json_response(body, status=status)

    def _turn_counter_key(self, record: StreamRecord) -> str:
        # A call that sets `tag` keeps its place in the script across reconnects.
        tag = record.query.get("tag")
        return f"tag:{tag}" if tag else f"stream:{record.id}"

    def _reserve_turn(self, record: StreamRecord) -> int:
        key = self._turn_counter_key(record)
        turn = self._turns.get(key, 0)
        self._turns[key] = turn + 1
        return turn

    def _release_turn(self, record: StreamRecord, turn: int) -> None:
        key = self._turn_counter_key(record)
        if self._turns.get(key) == turn + 1:
            self._turns[key] = turn


def _credentials(request: web.Request) -> tuple[str, str]:
    """(scheme, key) from ``Authorization``, or from ``Sec-WebSocket-Protocol: token, KEY``."""
    auth = request.headers.get("Authorization", "")
    if auth:
        scheme, _, key = auth.strip().partition(" ")
        return scheme.lower(), key.strip()
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if len(protocols) == 2 and protocols[0].lower() in ("token", "bearer"):
        return protocols[0].lower(), protocols[1]
    return "", ""


class _Stream:
    """State of one listen stream: energy detector, utterances, timers."""

    def __init__(
        self,
        emu: DeepgramEmulator,
        ws: web.WebSocketResponse,
        request: web.Request,
        record: StreamRecord,
        sample_rate: int,
        channels: int,
        faults: DeepgramFaults | None,
    ) -> None:
        self.emu = emu
        self.ws = ws
        self.request = request
        self.record = record
        self.sample_rate = sample_rate
        self.channels = channels
        self.faults = faults
        s = emu.settings
        self.win_s = s.window_ms / 1000.0
        self.win_samples = max(1, round(sample_rate * self.win_s)) * channels
        self.thr_ms = (32768.0 * 10 ** (s.energy_threshold_dbfs / 20.0)) ** 2
        self.min_on = max(1, math.ceil(s.min_speech_ms / s.window_ms))
        self.min_utt_s = s.min_utterance_ms / 1000.0
        self.interim_s = s.interim_interval_ms / 1000.0
        self.interim = record.query.get("interim_results", "false").lower() == "true"
        self.vad_events = record.query.get("vad_events", "false").lower() == "true"
        self.utterance_end = "utterance_end_ms" in record.query
        self.request_id = str(uuid.uuid4())
        self.leftover = np.zeros(0, dtype=np.int16)
        self.odd_byte = b""
        self.samples_in = 0  # samples (all channels) received
        self.windows_done = 0  # windows analysed
        self.onset_run = 0
        self.onset_start_s = 0.0
        self.need_gap = False
        self.cur: _Utterance | None = None
        self.pending: list[_Utterance] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.drop_timer: asyncio.TimerHandle | None = None
        self.dropped = False

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        if self.faults is not None and self.faults.drop_after_s is not None:
            loop = asyncio.get_running_loop()
            self.drop_timer = loop.call_later(self.faults.drop_after_s, self._drop, "drop_after_s")
        idle = self.emu.settings.idle_timeout_s
        ws = self.ws
        while True:
            try:
                msg = await ws.receive(timeout=idle)
            except TimeoutError:
                self.record.close_reason = "idle timeout (NET-0001)"
                await ws.close(code=1011, message=_NET0001.encode())
                return
            if msg.type == WSMsgType.BINARY:
                self._on_audio(msg.data, time.monotonic())
            elif msg.type == WSMsgType.TEXT:
                if await self._on_text(msg.data):
                    return
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                if not self.record.close_reason:
                    self.record.close_reason = "dropped" if self.dropped else "client closed"
                return

    def shutdown(self) -> None:
        if self.drop_timer is not None:
            self.drop_timer.cancel()
        for utt in [*self.pending, *([self.cur] if self.cur else [])]:
            if utt.timer is not None:
                utt.timer.cancel()
        for task in self.tasks:
            task.cancel()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _drop(self, why: str) -> None:
        if self.dropped or self.ws.closed:
            return
        self.dropped = True
        self.record.close_reason = f"fault: {why}"
        mode = self.faults.drop_mode if self.faults else "abort"
        if mode == "close":
            self._spawn(self.ws.close(code=1011, message=b"Emulated provider failure"))
        else:
            transport = self.request.transport
            if transport is not None:
                transport.abort()

    # -- text messages --------------------------------------------------------

    async def _on_text(self, data: str) -> bool:
        """Handle a control message; True when the stream should end."""
        try:
            kind = json.loads(data).get("type")
        except (ValueError, AttributeError):
            kind = None
        if kind == "KeepAlive":
            self.record.keepalives += 1
        elif kind == "Finalize":
            self.record.finalizes += 1
            self._on_finalize(time.monotonic())
        elif kind == "CloseStream":
            self.record.close_stream = True
            self.record.close_reason = "CloseStream"
            await self._flush_and_close()
            return True
        return False

    def _on_finalize(self, now: float) -> None:
        utt = self.cur
        if utt is None or utt.rec.voiced_s < self.min_utt_s:
            # Nothing worth transcribing yet: answer empty, and leave a just-started
            # utterance open rather than lose the words that follow.
            delay = self.emu.settings.finalize_empty_delay_ms / 1000.0
            asyncio.get_running_loop().call_later(delay, self._send_empty_finalize)
            return
        self.cur = None
        # Energy that continues past a Finalize (breath, noise the caller's VAD
        # rejected) must not open a new utterance until there has been a gap.
        self.need_gap = True
        self.onset_run = 0
        utt.speaking = False
        utt.rec.finalize_at = now
        utt.rec.from_finalize = True
        self._schedule_final(utt, now, cap=now + self.emu.settings.finalize_latency_ms / 1000.0)

    async def _flush_and_close(self) -> None:
        now = time.monotonic()
        if self.cur is not None:
            utt, self.cur = self.cur, None
            if utt.rec.voiced_s >= self.min_utt_s:
                self.pending.append(utt)
            else:
                self._discard(utt)
        for utt in list(self.pending):
            if utt.timer is not None:
                utt.timer.cancel()
            await self._send_final(utt, now)
        metadata = {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": "0" * 64,
            "created": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "duration": round(self.samples_in / self.channels / self.sample_rate, 3),
            "channels": self.channels,
            "models": [_MODEL_UUID],
            "model_info": {_MODEL_UUID: _MODEL_INFO},
        }
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(metadata))
            await self.ws.close(code=1000)

    # -- audio ----------------------------------------------------------------

    def _on_audio(self, data: bytes, arrival: float) -> None:
        if self.odd_byte:
            data = self.odd_byte + data
            self.odd_byte = b""
        if len(data) % 2:
            self.odd_byte, data = data[-1:], data[:-1]
        self.record.audio_bytes += len(data)
        samples = np.frombuffer(data, dtype="<i2")
        self.samples_in += samples.size
        self.record.audio_s = self.samples_in / self.channels / self.sample_rate
        buf = np.concatenate((self.leftover, samples)) if self.leftover.size else samples
        n_win = buf.size // self.win_samples
        used = n_win * self.win_samples
        self.leftover = buf[used:].copy() if used < buf.size else np.zeros(0, dtype=np.int16)
        if n_win == 0:
            return
        frames = buf[:used].reshape(n_win, self.win_samples).astype(np.float32)
        voiced = np.einsum("ij,ij->i", frames, frames) / self.win_samples > self.thr_ms

        t0 = self.windows_done * self.win_s
        self.windows_done += n_win
        t_end = self.windows_done * self.win_s
        # Audio position of everything received so far, for the wall-clock mapping:
        # the newest sample was produced "now" (arrival), earlier ones before it.
        pos_in = self.samples_in / self.channels / self.sample_rate

        def wall(audio_s: float) -> float:
            return arrival - (pos_in - audio_s)

        cur = self.cur
        # Fast paths: the whole chunk continues the current state.
        if cur is None and not voiced.any():
            self.onset_run = 0
            self.need_gap = False
            return
        if cur is not None and cur.speaking and voiced.all():
            cur.rec.voiced_s += n_win * self.win_s
            cur.rec.speech_end_audio_s = t_end
            cur.rec.speech_end_at = wall(t_end)
            self._maybe_interim(cur)
            return
        if cur is not None and not cur.speaking and not voiced.any():
            return

        for i, v in enumerate(voiced.tolist()):
            w_start = t0 + i * self.win_s
            w_end = w_start + self.win_s
            cur = self.cur
            if v:
                if cur is not None:
                    if not cur.speaking:  # resumed before the final went out
                        self._resumed(cur)
                    cur.rec.voiced_s += self.win_s
                    cur.rec.speech_end_audio_s = w_end
                    cur.rec.speech_end_at = wall(w_end)
                elif not self.need_gap:
                    if self.onset_run == 0:
                        self.onset_start_s = w_start
                    self.onset_run += 1
                    if self.onset_run >= self.min_on:
                        self._open_utterance(self.onset_start_s, w_end, wall)
            else:
                self.need_gap = False
                self.onset_run = 0
                if cur is not None and cur.speaking:
                    cur.speaking = False
                    self._schedule_final(cur, arrival)
        if self.cur is not None and self.cur.speaking:
            self._maybe_interim(self.cur)

    def _resumed(self, utt: _Utterance) -> None:
        """Energy came back before the utterance's final went out: it continues."""
        utt.speaking = True
        if utt.timer is not None:
            utt.timer.cancel()
            utt.timer = None

    def _open_utterance(self, start_s: float, end_s: float, wall: Callable[[float], float]) -> None:
        turn = self.emu._reserve_turn(self.record)
        rec = UtteranceRecord(
            turn=turn,
            text=self.emu.transcript(turn),
            speech_start_audio_s=start_s,
            speech_end_audio_s=end_s,
            speech_start_at=wall(start_s),
            speech_end_at=wall(end_s),
            ttfs_s=self.emu.ttfs.sample_s(),
            voiced_s=end_s - start_s,
        )
        self.record.utterances.append(rec)
        self.onset_run = 0
        self.cur = _Utterance(rec=rec, next_interim_s=self.interim_s)
        if self.vad_events:
            self._send_soon(
                {"type": "SpeechStarted", "channel": [0, 1], "timestamp": round(start_s, 3)}
            )

    def _maybe_interim(self, utt: _Utterance) -> None:
        if not self.interim:
            return
        rec = utt.rec
        elapsed = rec.speech_end_audio_s - rec.speech_start_audio_s
        if elapsed < utt.next_interim_s:
            return
        while utt.next_interim_s <= elapsed:
            utt.next_interim_s += self.interim_s
        words = rec.text.split()
        if not words:
            return
        # Reveal words at a speaking rate of ~3 words/s, never the whole line.
        shown = max(1, min(len(words) - 1, int(elapsed * 3.0))) if len(words) > 1 else 1
        partial = " ".join(words[:shown])
        self.record.interims_sent += 1
        self._send_soon(
            self._results(partial, rec.speech_start_audio_s, rec.speech_end_audio_s, False)
        )

    # -- finals ---------------------------------------------------------------

    def _schedule_final(self, utt: _Utterance, now: float, cap: float | None = None) -> None:
        """Send utt's final at max(true speech end + ttfs, now), or by ``cap`` (Finalize)."""
        due = utt.rec.speech_end_at + utt.rec.ttfs_s
        due = max(due if cap is None else min(due, cap), now)
        utt.rec.final_due_at = due
        if utt.timer is not None:
            utt.timer.cancel()
        if utt not in self.pending and utt is not self.cur:
            self.pending.append(utt)
        delay = max(0.0, due - time.monotonic())
        utt.timer = asyncio.get_running_loop().call_later(delay, self._final_due, utt)

    def _final_due(self, utt: _Utterance) -> None:
        utt.timer = None
        if utt is self.cur:
            if utt.speaking:
                return
            # Silence lasted the whole TTFS: the endpointer commits the utterance.
            self.cur = None
            if utt.rec.voiced_s < self.min_utt_s:
                self._discard(utt)
                return
            utt.rec.speech_final = True
            self.pending.append(utt)
        self._spawn(self._send_final(utt, time.monotonic()))

    def _discard(self, utt: _Utterance) -> None:
        utt.rec.discarded = True
        utt.closed = True
        if utt.timer is not None:
            utt.timer.cancel()
            utt.timer = None
        if utt in self.pending:
            self.pending.remove(utt)
        self.emu._release_turn(self.record, utt.rec.turn)

    async def _send_final(self, utt: _Utterance, now: float) -> None:
        if utt.closed:
            return
        utt.closed = True
        if utt in self.pending:
            self.pending.remove(utt)
        rec = utt.rec
        rec.final_sent_at = now
        msg = self._results(
            rec.text,
            rec.speech_start_audio_s,
            rec.speech_end_audio_s,
            True,
            speech_final=rec.speech_final,
            from_finalize=rec.from_finalize,
        )
        f = self.faults
        if f is not None and f.final_delay_s:
            await asyncio.sleep(f.final_delay_s)
        if self.ws.closed or (f is not None and f.stall):
            return
        if f is not None and f.malformed:
            await self.ws.send_str('{"type": "Results", "channel": {"alternatives": [')
            return
        await self.ws.send_str(json.dumps(msg))
        self.record.finals_sent += 1
        if self.utterance_end:
            end_s = round(rec.speech_end_audio_s, 3)
            end = {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": end_s}
            await self.ws.send_str(json.dumps(end))
        f = self.faults
        if (
            f is not None
            and f.drop_after_utterances is not None
            and self.record.finals_sent >= f.drop_after_utterances
        ):
            self._drop("drop_after_utterances")

    def _send_empty_finalize(self) -> None:
        pos = self.windows_done * self.win_s
        msg = self._results("", pos, pos, True, speech_final=False, from_finalize=True)
        self.record.empty_finals_sent += 1
        self._send_soon(msg)

    def _send_soon(self, msg: dict[str, Any]) -> None:
        if not self.ws.closed:
            self._spawn(self._send_json(msg))

    async def _send_json(self, msg: dict[str, Any]) -> None:
        if not self.ws.closed and not (self.faults is not None and self.faults.stall):
            await self.ws.send_str(json.dumps(msg))

    def _results(
        self,
        text: str,
        start_s: float,
        end_s: float,
        is_final: bool,
        *,
        speech_final: bool = False,
        from_finalize: bool = False,
    ) -> dict[str, Any]:
        duration = max(0.0, end_s - start_s)
        tokens = text.split()
        step = duration / len(tokens) if tokens else 0.0
        words = [
            {
                "word": tok.strip(".,?!;:\"'").lower(),
                "start": round(start_s + i * step, 3),
                "end": round(start_s + (i + 1) * step, 3),
                "confidence": 0.98,
                "punctuated_word": tok,
            }
            for i, tok in enumerate(tokens)
        ]
        msg: dict[str, Any] = {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(duration, 3),
            "start": round(start_s, 3),
            "is_final": is_final,
            "speech_final": speech_final,
            "channel": {
                "alternatives": [
                    {"transcript": text, "confidence": 0.98 if text else 0.0, "words": words}
                ]
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": _MODEL_INFO,
                "model_uuid": _MODEL_UUID,
            },
        }
        if is_final:
            msg["from_finalize"] = from_finalize
        return msg


class _FluxStream(_Stream):
    """One Flux stream (``/v2/listen``): the same energy detector, turn events on a clock.

    Flux owns turn detection, so the emulator sends, per caller turn:
    ``Connected`` once on open; ``StartOfTurn`` once the turn has
    ``min_utterance_ms`` of speech; an ``Update`` with the words so far every
    240 ms of speech (Flux's update cadence); after the speech stops,
    ``EagerEndOfTurn`` at speech end + ``flux_eager`` (only when the query sets
    ``eager_eot_threshold``, as Flux reports no prediction without it) and
    ``EndOfTurn`` at speech end + ``flux_eot``. Speech that resumes before the
    EndOfTurn continues the turn; after an eager prediction it is answered with
    ``TurnResumed`` and its words are the next script line, appended (the caller
    went on with a new sentence), so the committed transcript differs from the
    eager one. ``Configure`` is acknowledged with ``ConfigureSuccess``;
    ``CloseStream`` ends an open turn and closes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.interim_s = 0.24
        self.eager = "eager_eot_threshold" in self.record.query
        self.seq = 0
        self.eager_timer: asyncio.TimerHandle | None = None
        self.started: _Utterance | None = None

    async def run(self) -> None:
        await self._send_json(self._msg({"type": "Connected"}))
        await super().run()

    def shutdown(self) -> None:
        if self.eager_timer is not None:
            self.eager_timer.cancel()
        super().shutdown()

    def _msg(self, body: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        return {"request_id": self.request_id, "sequence_id": self.seq, **body}

    def _turn_info(self, event: str, utt: _Utterance, text: str, eot: float) -> dict[str, Any]:
        rec = utt.rec
        words = [
            {"word": tok.strip(".,?!;:\"'").lower(), "confidence": 0.98} for tok in text.split()
        ]
        return self._msg(
            {
                "type": "TurnInfo",
                "event": event,
                "turn_index": rec.turn,
                "audio_window_start": round(rec.speech_start_audio_s, 3),
                "audio_window_end": round(rec.speech_end_audio_s, 3),
                "transcript": text,
                "words": words,
                "end_of_turn_confidence": eot,
            }
        )

    def _partial(self, utt: _Utterance) -> str:
        rec = utt.rec
        words = rec.text.split()
        elapsed = rec.speech_end_audio_s - rec.speech_start_audio_s
        shown = max(1, min(len(words) - 1, int(elapsed * 3.0))) if len(words) > 1 else 1
        return " ".join(words[:shown])

    # -- control messages ----------------------------------------------------------

    async def _on_text(self, data: str) -> bool:
        try:
            kind = json.loads(data).get("type")
        except (ValueError, AttributeError):
            kind = None
        if kind == "KeepAlive":
            self.record.keepalives += 1
        elif kind == "Configure":
            await self._send_json(self._msg({"type": "ConfigureSuccess"}))
        elif kind == "CloseStream":
            self.record.close_stream = True
            self.record.close_reason = "CloseStream"
            await self._flush_and_close()
            return True
        return False

    async def _flush_and_close(self) -> None:
        now = time.monotonic()
        if self.cur is not None:
            utt, self.cur = self.cur, None
            if utt.rec.voiced_s >= self.min_utt_s:
                self.pending.append(utt)
            else:
                self._discard(utt)
        for utt in list(self.pending):
            if utt.timer is not None:
                utt.timer.cancel()
            await self._send_final(utt, now)
        if not self.ws.closed:
            await self.ws.close(code=1000)

    # -- turn events ---------------------------------------------------------------

    def _maybe_interim(self, utt: _Utterance) -> None:
        rec = utt.rec
        if self.started is not utt and rec.voiced_s >= self.min_utt_s:
            self.started = utt
            first = rec.text.split()[:1]
            self._send_soon(self._turn_info("StartOfTurn", utt, " ".join(first), 0.0))
        elapsed = rec.speech_end_audio_s - rec.speech_start_audio_s
        if self.started is not utt or elapsed < utt.next_interim_s:
            return
        while utt.next_interim_s <= elapsed:
            utt.next_interim_s += self.interim_s
        self.record.interims_sent += 1
        self._send_soon(self._turn_info("Update", utt, self._partial(utt), 0.05))

    def _resumed(self, utt: _Utterance) -> None:
        super()._resumed(utt)
        if self.eager_timer is not None:
            self.eager_timer.cancel()
            self.eager_timer = None
        rec = utt.rec
        if rec.eager_sent_at is None:
            return  # a pause inside the sentence: nothing was predicted
        rec.eager_sent_at = None
        rec.resumed_after_eager += 1
        rec.text = f"{rec.text} {self.emu.transcript(self.emu._reserve_turn(self.record))}"
        self._send_soon(self._turn_info("TurnResumed", utt, self._partial(utt), 0.1))

    def _schedule_final(self, utt: _Utterance, now: float, cap: float | None = None) -> None:
        """EagerEndOfTurn (when asked for) and EndOfTurn, timed from the true speech end."""
        rec = utt.rec
        eot_s = self.emu.flux_eot.sample_s()
        rec.ttfs_s = eot_s
        super()._schedule_final(utt, now, cap)
        if self.eager:
            eager_s = min(self.emu.flux_eager.sample_s(), eot_s * 0.9)
            due = max(rec.speech_end_at + eager_s, now)
            if self.eager_timer is not None:
                self.eager_timer.cancel()
            self.eager_timer = asyncio.get_running_loop().call_later(
                max(0.0, due - time.monotonic()), self._eager_due, utt
            )

    def _eager_due(self, utt: _Utterance) -> None:
        self.eager_timer = None
        if utt is not self.cur or utt.speaking or utt.closed or self.started is not utt:
            return
        utt.rec.eager_sent_at = time.monotonic()
        self._send_soon(self._turn_info("EagerEndOfTurn", utt, utt.rec.text, 0.55))

    async def _send_final(self, utt: _Utterance, now: float) -> None:
        if utt.closed:
            return
        utt.closed = True
        if utt in self.pending:
            self.pending.remove(utt)
        if self.eager_timer is not None and utt is self.cur:
            self.eager_timer.cancel()
            self.eager_timer = None
        rec = utt.rec
        rec.final_sent_at = now
        rec.speech_final = True
        f = self.faults
        if self.ws.closed or (f is not None and f.stall):
            return
        if self.started is not utt:
            first = " ".join(rec.text.split()[:1])
            await self._send_json(self._turn_info("StartOfTurn", utt, first, 0.0))
        self.started = None
        await self._send_json(self._turn_info("EndOfTurn", utt, rec.text, 0.9))
        self.record.finals_sent += 1
        if (
            f is not None
            and f.drop_after_utterances is not None
            and self.record.finals_sent >= f.drop_after_utterances
        ):
            self._drop("drop_after_utterances")
