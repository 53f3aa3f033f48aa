"""Silero VAD shared by every call in the process, run in batches.

Pipecat's ``SileroVADAnalyzer`` gives each call its own ONNX session (~11 MB,
~40 ms to build on the event loop) and its own thread, and hops to that thread
once per 32 ms window per call. Here one session serves all calls: windows that
arrive in the same event-loop tick from many calls run as one batch (the model
takes a batch dimension, each row with its own recurrent state) in one worker
thread, and each call keeps only its state (a few KB). The speech/silence state
machine is Pipecat's own (``VADAnalyzer``); only where confidences come from
changes.

One batch is in flight at a time: windows that arrive while the model runs wait for it
and go together as the next batch (they would have waited in the thread's queue anyway).
Under load batches grow by themselves, and a window costs less the larger its batch
(here, at 8 kHz: 268 us alone, 173 in twos, 116 in fours, 90 in eights); a quiet process
still sends each window at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import onnxruntime
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState

# Same recurrent-state hygiene as Pipecat's Silero wrapper: after 2 s of audio, reset
# the state at the first run of 5 clearly non-speech windows (long silence at 8 kHz
# otherwise leaves the model unable to detect the speech that follows).
RESET_INTERVAL_SECS = 2.0
RESET_MAX_CONFIDENCE = 0.1
RESET_LOW_WINDOWS = 5
# Once the state has been reset in a silence, a window whose every sample lies within
# +/-QUIET_PEAK (-60 dBFS) is not scored: its confidence is 0, and when sound comes back the
# model resumes from the state it would have reached on that many windows of digital silence
# (a table computed once), so starts and stops are decided as if every window had been
# scored. Speech on a phone line sits at -45..-10 dBFS; a line's idle noise is below -65 dBm0
# (ITU-T G.712), and a muted phone, a trunk's silence suppression or a caller listening to
# the bot sends digital zeros: a listening caller costs no inference, while any audible
# sound, however quiet the talker, is scored. Noise above it (a car, a fan) is scored as before.
QUIET_PEAK = 33
# A reset comes at most every RESET_INTERVAL_SECS of windows (63 windows at either rate).
SILENCE_TABLE = 64
WINDOW_SAMPLES = {8000: 256, 16000: 512}
CONTEXT_SAMPLES = {8000: 32, 16000: 64}
# Windows that arrive while a batch runs wait for it (module docstring); False: every loop
# tick's windows go at once, queueing behind the batch in flight (the bench's A/B).
ONE_BATCH_IN_FLIGHT = True
# Niceness of the Silero thread (0: the process's own). Above 0 the event loop wins the
# CPU when both are ready (bench experiment ``silero-nice``).
SILERO_NICE = 0


def _silero_thread_started() -> None:
    if SILERO_NICE > 0:
        tid = threading.get_native_id()
        with contextlib.suppress(OSError):  # raising niceness needs no privilege
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + SILERO_NICE)


def _model_path() -> str:
    return str(resources.files("pipecat.audio.vad.data").joinpath("silero_vad.onnx"))


@dataclass(slots=True)
class SileroState:
    """One call's recurrent state and audio context."""

    sample_rate: int
    state: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), dtype=np.float32))
    context: np.ndarray | None = None

    def reset(self) -> None:
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = None


_Pending = tuple[SileroState, np.ndarray, "asyncio.Future[float]"]


class SileroBatcher:
    """The process's Silero session; batches windows from all calls per loop tick."""

    def __init__(self) -> None:
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            _model_path(), providers=["CPUExecutionProvider"], sess_options=opts
        )
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="silero", initializer=_silero_thread_started
        )
        self._pending: dict[int, list[_Pending]] = {8000: [], 16000: []}
        self._scheduled = False
        self._inflight = 0  # batches submitted and not delivered yet
        # The state after k windows of digital silence from a reset, per rate.
        self.silence_states = {sr: self._silence_table(sr) for sr in WINDOW_SAMPLES}
        self.batches = 0
        self.windows = 0  # scored by the model
        self.skipped = 0  # not scored: below QUIET_PEAK

    def _silence_table(self, sr: int) -> list[np.ndarray]:
        x = np.zeros((1, WINDOW_SAMPLES[sr] + CONTEXT_SAMPLES[sr]), dtype=np.float32)
        state = np.zeros((2, 1, 128), dtype=np.float32)
        table = [state]
        for _ in range(SILENCE_TABLE - 1):
            _, state = self._run(x, state, sr)
            table.append(state)
        return table

    def infer(self, st: SileroState, window: bytes) -> asyncio.Future[float]:
        """Confidence for one window (256 samples at 8 kHz, 512 at 16 kHz)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[float] = loop.create_future()
        pcm = np.frombuffer(window, dtype="<i2").astype(np.float32)
        pcm *= 1.0 / 32768.0
        self._pending[st.sample_rate].append((st, pcm, fut))
        if not self._scheduled and not (self._inflight and ONE_BATCH_IN_FLIGHT):
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        if self._inflight and ONE_BATCH_IN_FLIGHT:
            return  # the batch in flight sends what waits when it is delivered
        loop = asyncio.get_running_loop()
        for sr, items in self._pending.items():
            if not items:
                continue
            self._pending[sr] = []
            ctx = CONTEXT_SAMPLES[sr]
            rows = []
            for st, pcm, _ in items:
                prev = st.context if st.context is not None else np.zeros(ctx, dtype=np.float32)
                rows.append(np.concatenate((prev, pcm)))
            x = np.stack(rows)
            state = np.concatenate([st.state for st, _, _ in items], axis=1)
            job = loop.run_in_executor(self._executor, self._run, x, state, sr)
            job.add_done_callback(functools.partial(self._deliver, items=items, x=x, ctx=ctx))
            self._inflight += 1
            self.batches += 1
            self.windows += len(items)

    def _run(self, x: np.ndarray, state: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
        out, new_state = self._session.run(
            None, {"input": x, "state": state, "sr": np.array(sr, dtype=np.int64)}
        )
        return out, new_state

    def _deliver(
        self,
        job: asyncio.Future[tuple[np.ndarray, np.ndarray]],
        items: list[_Pending],
        x: np.ndarray,
        ctx: int,
    ) -> None:
        self._inflight -= 1
        try:
            self._resolve(job, items, x, ctx)
        finally:
            if not self._inflight and not self._scheduled and any(self._pending.values()):
                # Queued after the callers just woken: their next windows join this batch.
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    @staticmethod
    def _resolve(
        job: asyncio.Future[tuple[np.ndarray, np.ndarray]],
        items: list[_Pending],
        x: np.ndarray,
        ctx: int,
    ) -> None:
        if job.cancelled():  # the loop is closing
            return
        try:
            out, new_state = job.result()
        except Exception as exc:  # a failed batch fails its windows, not the process
            for _, _, fut in items:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for i, (st, _, fut) in enumerate(items):
            st.state = new_state[:, i : i + 1, :].copy()
            st.context = x[i, -ctx:].copy()
            if not fut.done():
                fut.set_result(float(out[i, 0]))

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def _quiet(window: bytes) -> bool:
    """Whether every sample of ``window`` (int16 PCM) is within +/-QUIET_PEAK."""
    pcm = np.frombuffer(window, dtype="<i2")
    return bool(pcm.max() < QUIET_PEAK and pcm.min() > -QUIET_PEAK)


_shared: SileroBatcher | None = None


def shared_batcher() -> SileroBatcher:
    """The process-wide batcher (created on first use, at start-up by the server)."""
    global _shared
    if _shared is None:
        _shared = SileroBatcher()
    return _shared


class BatchedSileroVADAnalyzer(VADAnalyzer):
    """Pipecat VAD analyzer whose confidences come from the shared batcher."""

    def __init__(
        self,
        *,
        sample_rate: int | None = None,
        params: VADParams | None = None,
        batcher: SileroBatcher | None = None,
    ) -> None:
        super().__init__(sample_rate=sample_rate, params=params)
        self._batcher = batcher or shared_batcher()
        self._silero: SileroState | None = None
        self._confs: deque[float] = deque()
        self._windows_since_reset = 0
        self._low_windows = 0
        # Quiet windows skipped since the last reset; None once the model scored one.
        self._skipped: int | None = 0

    def set_sample_rate(self, sample_rate: int) -> None:
        if sample_rate not in (8000, 16000):
            raise ValueError(f"Silero VAD runs at 8000 or 16000 Hz, not {sample_rate}")
        super().set_sample_rate(sample_rate)
        self._silero = SileroState(sample_rate)
        self._skipped = 0

    def num_frames_required(self) -> int:
        return WINDOW_SAMPLES[16000 if self.sample_rate == 16000 else 8000]

    def _get_smoothed_volume(self, audio: bytes) -> float:
        # The loudness gate is off by default (config.tenants.TurnSettings.vad_min_volume);
        # computing loudness anyway cost 3.5 % of the main thread at 20 calls (profile).
        if self._params.min_volume <= 0:
            return 1.0
        return super()._get_smoothed_volume(audio)

    def voice_confidence(self, buffer: bytes) -> float:
        # Called by Pipecat's state machine, window by window, after analyze_audio()
        # has fetched exactly these windows' confidences from the batcher.
        return self._confs.popleft() if self._confs else 0.0

    async def analyze_audio(self, buffer: bytes) -> VADState:
        need = self._vad_frames_num_bytes
        pending = len(self._vad_buffer) + len(buffer)
        if pending >= need and self._silero is not None:
            joined = self._vad_buffer + buffer
            st = self._silero
            for i in range(pending // need):
                window = joined[i * need : (i + 1) * need]
                if self._skipped is not None and _quiet(window):
                    conf = 0.0  # not scored: see QUIET_PEAK
                    self._skipped += 1
                    self._batcher.skipped += 1
                else:
                    if self._skipped:  # resume as if the silence had been scored
                        table = self._batcher.silence_states[self.sample_rate]
                        st.state = table[min(self._skipped, len(table) - 1)]
                        st.context = None
                    self._skipped = None
                    conf = await self._batcher.infer(st, window)
                self._confs.append(conf)
                self._maybe_reset(conf)
        return self._run_analyzer(buffer)

    def _maybe_reset(self, confidence: float) -> None:
        assert self._silero is not None
        self._windows_since_reset += 1
        self._low_windows = self._low_windows + 1 if confidence < RESET_MAX_CONFIDENCE else 0
        due = (
            self._windows_since_reset * self.num_frames_required()
            >= RESET_INTERVAL_SECS * self.sample_rate
        )
        if due and self._vad_state == VADState.QUIET and self._low_windows >= RESET_LOW_WINDOWS:
            self._silero.reset()
            self._windows_since_reset = 0
            self._skipped = 0
