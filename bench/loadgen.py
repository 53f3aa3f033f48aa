"""The load generator: emulated FreeSWITCH calls that talk like callers.

Each call is one :class:`bench.fakeswitch.stream.FakeSwitchStream` (the real
20 ms media clock, libwsc framing, module events) running this pattern: wait
for the greeting, then *speak a question, wait for the answer, pause, repeat*,
with one barge-in per call (the caller talks over the bot's reply). Every
timestamp is ``time.monotonic()`` - the same clock in every process here - so
the bench can line the caller's view up with the server's and the emulators'.

All calls of one process share one event loop; audio is precomputed
(:mod:`bench.caller_speech`), so a tick only slices bytes. With
``python -m pipeswitch.bench.loadgen SPEC.json OUT.json`` a second process can run a share
of the calls (the capacity bench's ``--loadgen-procs 2``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from pipeswitch.bench.caller_speech import CallerAudio, load_caller_audio
from pipeswitch.bench.fakeswitch.audio import peak_above
from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig
from pipeswitch.bench.probe import LoopLagMonitor
from pipeswitch.bench.stats import (
    RxFrame,
    analyse_reply,
    first_gap_after,
    percentile,
    premature_reply_at,
    reply_window_frames,
)

# Which emulated module build plays each playback dialect (transports/dialects.py).
DIALECT_PLAYBACK = {"json-stream": "voxcom", "binary": "cloudfieldcz", "file": "community"}
# Bot audio "stops arriving" at the last message before a silence this long.
BARGE_STOP_GAP_S = 0.3

TurnCallback = Callable[["TurnResult"], None]


class BenchStream(FakeSwitchStream):
    """A FakeSwitchStream that also tracks bot audio incrementally.

    The fakeswitch keeps every received message (``received_audio()`` copies
    them all); waiting for "first audible audio after t" by polling that would
    cost O(messages) per poll per call. This adapter wraps the stream's
    per-message record hook instead (``playout.record``, or ``_record_rx`` in
    older versions of the emulator); a public per-message callback in
    FakeSwitchStream would make the wrapping unnecessary.
    """

    def __init__(self, config: StreamConfig) -> None:
        super().__init__(config)
        self.last_rx_t = 0.0
        self.last_audible_t = 0.0
        self._rx_t: list[float] = []
        self._rx_audible: list[bool] = []
        self._audible_waiters: list[tuple[float, asyncio.Future[float]]] = []
        self._peak = config.non_silent_peak
        self._install_rx_hook()

    def _install_rx_hook(self) -> None:
        playout = getattr(self, "playout", None)
        if playout is not None and callable(getattr(playout, "record", None)):
            orig = playout.record

            def record(t: float, pcm: bytes, kind: str) -> None:
                orig(t, pcm, kind)
                self._on_rx(t, peak_above(pcm, self._peak))

            playout.record = record
            return
        orig_rx = getattr(self, "_record_rx", None)
        if orig_rx is None:
            raise RuntimeError("FakeSwitchStream has no per-message audio hook to wrap")

        def record_rx(t: float, pcm: bytes, kind: str) -> None:
            orig_rx(t, pcm, kind)
            self._on_rx(t, peak_above(pcm, self._peak))

        self._record_rx = record_rx

    def _on_rx(self, t: float, audible: bool) -> None:
        self.last_rx_t = t
        self._rx_t.append(t)
        self._rx_audible.append(audible)
        if audible:
            self.last_audible_t = t
            if self._audible_waiters:
                keep = []
                for after, fut in self._audible_waiters:
                    if fut.done():
                        continue
                    if t > after:
                        fut.set_result(t)
                    else:
                        keep.append((after, fut))
                self._audible_waiters = keep

    async def wait_audible_after(self, after: float, timeout_s: float) -> float | None:
        """Receive time of the first non-silent bot audio after ``after`` (None on timeout)."""
        found = None
        for i in range(len(self._rx_t) - 1, -1, -1):  # only the tail after `after`
            if self._rx_t[i] <= after:
                break
            if self._rx_audible[i]:
                found = self._rx_t[i]
        if found is not None:
            return found
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._audible_waiters.append((after, fut))
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            return None

    async def wait_quiet(self, quiet_s: float, timeout_s: float) -> bool:
        """Wait until no audible bot audio arrived for ``quiet_s`` (the reply is over)."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            idle = now - max(self.last_audible_t, 0.0)
            if idle >= quiet_s:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(0.1, quiet_s - idle + 0.005))

    def rx_frames(self) -> list[RxFrame]:
        """Every bot audio message as (time, duration, audible)."""
        _pcm, audio = self.received_audio()
        rate2 = 2 * self.config.rate
        return [RxFrame(a.t, a.nbytes / rate2, a.non_silent) for a in audio]


@dataclass
class CallSpec:
    """One call in a load run. ``start_s`` is relative to the run's start."""

    uuid: str
    start_s: float
    turns: int | None = None  # None: until the run's deadline
    barge_in_turn: int | None = None
    seed: int = 0
    warmup: bool = False  # hang up as soon as the first reply is audible


@dataclass
class LoadSpec:
    """A load run: where, how many calls, how they behave, how long."""

    url_base: str
    rate: int
    dialect: str
    calls: list[CallSpec]
    t0: float = 0.0  # monotonic start of the run (shared across processes)
    deadline_s: float | None = None  # no new turn starts after this (relative)
    hangup_s: float | None = None  # calls still up are hung up at this time (relative)
    think_s: tuple[float, float] = (0.4, 0.9)
    reply_quiet_s: float = 1.0
    reply_timeout_s: float = 8.0
    greeting_timeout_s: float = 10.0
    barge_after_s: float = 1.0
    probe_every_s: float | None = None  # upgrade probes while loaded
    probe_from_s: float = 0.0
    probe_to_s: float = 0.0
    temp_dir: str = field(default_factory=tempfile.gettempdir)
    line_noise_dbfs: float | None = None  # the callers' line noise (None: digital silence)
    stream_buffer_ms: int = 20  # STREAM_BUFFER_SIZE: caller audio per message

    def to_json(self) -> str:
        """Serialise for a worker process."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoadSpec:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        d["calls"] = [CallSpec(**c) for c in d["calls"]]
        d["think_s"] = tuple(d["think_s"])
        return cls(**d)


@dataclass
class TurnResult:
    """One caller utterance and the bot's reply to it, as seen on the wire."""

    call: str
    index: int
    kind: str  # "turn" | "barge_in"
    speech_start: float | None = None  # first voiced caller frame sent
    t_end: float | None = None  # last voiced caller frame sent
    first_rx: float | None = None  # first bot message after t_end
    first_audible: float | None = None  # first non-silent bot message after t_end
    reply_end: float | None = None  # last bot message of the reply
    wire_s: float | None = None
    lead_silence_s: float | None = None
    lost: bool = False
    # Bot speech heard while the caller still talked (first word -> that audio), if any.
    premature_s: float | None = None
    barge_start: float | None = None  # (interrupted turn) caller starts talking over the bot
    barge_stop: float | None = None  # (interrupted turn) last bot message before the silence
    barge_stop_s: float | None = None
    barge_note: str = ""
    rx_frames: int = 0
    audio_s: float = 0.0
    gaps_ms: list[float] = field(default_factory=list)
    gap_offsets_ms: list[float] = field(default_factory=list)  # from the reply's first message
    playout_underruns: int = 0
    interarrival_p99_ms: float | None = None
    interarrival_max_ms: float | None = None

    @property
    def underruns(self) -> int:
        """Wire gaps above 40 ms while the bot talked."""
        return len(self.gaps_ms)


@dataclass
class CallResult:
    """One emulated call from start to hangup."""

    uuid: str
    started_at: float | None = None
    upgraded_at: float | None = None
    upgrade_ms: float | None = None
    connected: bool = False
    error: str = ""
    greeting_ms: float | None = None
    greeting_underruns: int = 0
    greeting_gaps_ms: list[float] = field(default_factory=list)
    turns: list[TurnResult] = field(default_factory=list)
    hangup_at: float | None = None
    close_initiator: str | None = None
    frames_dropped: int = 0
    rx_messages: int = 0
    probe: bool = False


@dataclass
class _Utterance:
    start: float | None
    end: float | None


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _speak(s: BenchStream, pcm: bytes, rate: int) -> _Utterance:
    """Queue one utterance and wait until its last frame went out."""
    n0 = len(s.sent_frames)
    s.queue_caller_audio(pcm)
    await s.wait_caller_drained(timeout_s=len(pcm) / (2 * rate) + 5.0)
    start = end = None
    for f in s.sent_frames[n0:]:
        if f.voiced:
            if start is None:
                start = f.t
            end = f.t
    return _Utterance(start, end)


def _stream_config(load: LoadSpec, uuid: str) -> StreamConfig:
    return StreamConfig(
        url=f"{load.url_base}/fs/{uuid}?rate={load.rate}&mix=mono",
        uuid=uuid,
        rate=load.rate,
        playback=DIALECT_PLAYBACK[load.dialect],  # type: ignore[arg-type]
        # Measure arrival on the wire: do not let the emulated fork's busy-wait
        # injection delay reads (it would couple arrival times to our own clock).
        voxcom_blocking_inject=False,
        temp_dir=load.temp_dir,
        line_noise_dbfs=load.line_noise_dbfs,
        buffer_ms=load.stream_buffer_ms,
    )


async def run_call(
    spec: CallSpec, load: LoadSpec, audio: CallerAudio, on_turn: TurnCallback | None = None
) -> CallResult:
    """Run one call to completion (bounded by the load's deadlines)."""
    res = CallResult(uuid=spec.uuid)
    await _sleep_until(load.t0 + spec.start_s)
    s = BenchStream(_stream_config(load, spec.uuid))
    rng = random.Random(spec.seed)
    utterances: list[tuple[TurnResult, _Utterance]] = []
    deadline = None if load.deadline_s is None else load.t0 + load.deadline_s
    try:
        await s.start()
        res.started_at = s.started_at
        res.connected = await s.wait_connected()
        res.upgraded_at = s.upgraded_at
        res.upgrade_ms = None if s.upgrade_s is None else s.upgrade_s * 1000.0
        if not res.connected:
            res.error = "connect failed: " + (s.events[-1].raw if s.events else "no event")
            return res
        assert s.started_at is not None
        g = await s.wait_audible_after(s.started_at, load.greeting_timeout_s)
        res.greeting_ms = None if g is None else (g - s.started_at) * 1000.0
        await s.wait_quiet(load.reply_quiet_s, load.reply_timeout_s + 10)
        k = 0
        while spec.turns is None or k < spec.turns:
            if deadline is not None and time.monotonic() >= deadline:
                break
            await asyncio.sleep(rng.uniform(*load.think_s))
            q = audio.questions[(k + spec.seed) % len(audio.questions)]
            u = await _speak(s, q, load.rate)
            turn = TurnResult(
                call=spec.uuid, index=k, kind="turn", speech_start=u.start, t_end=u.end
            )
            utterances.append((turn, u))
            first = None
            if u.end is not None:
                first = await s.wait_audible_after(u.end, load.reply_timeout_s)
            if first is None:
                turn.lost = True
            elif spec.warmup:
                break
            elif k == spec.barge_in_turn:
                await _sleep_until(first + load.barge_after_s)
                b = await _speak(s, audio.barge_in, load.rate)
                bt = TurnResult(
                    call=spec.uuid, index=k, kind="barge_in", speech_start=b.start, t_end=b.end
                )
                turn.barge_start = b.start
                utterances.append((bt, b))
                if (
                    b.end is not None
                    and await s.wait_audible_after(b.end, load.reply_timeout_s) is None
                ):
                    bt.lost = True
            await s.wait_quiet(load.reply_quiet_s, load.reply_timeout_s + 20)
            k += 1
    except Exception as exc:  # one broken call must not end the run
        res.error = f"{type(exc).__name__}: {exc}"
        logger.warning("call {} failed: {}", spec.uuid, res.error)
    finally:
        res.hangup_at = time.monotonic()
        with contextlib.suppress(Exception):
            await s.hangup()
        with contextlib.suppress(Exception):
            await s.aclose()
    res.close_initiator = s.close_record.initiator
    res.frames_dropped = s.frames_dropped
    _analyse_call(res, s, utterances, on_turn)
    return res


def _analyse_call(
    res: CallResult,
    s: BenchStream,
    utterances: list[tuple[TurnResult, _Utterance]],
    on_turn: TurnCallback | None,
) -> None:
    """Cut the bot-audio timeline into replies and measure each one."""
    frames = s.rx_frames()
    res.rx_messages = len(frames)
    starts = [u.start for _, u in utterances if u.start is not None]
    end_all = res.hangup_at
    # Greeting: from the stream start to the caller's first word.
    if res.started_at is not None:
        g = analyse_reply(
            reply_window_frames(frames, res.started_at, starts[0] if starts else end_all)
        )
        res.greeting_underruns = g.underruns
        res.greeting_gaps_ms = [x * 1000.0 for x in g.gaps_s]
    for i, (turn, u) in enumerate(utterances):
        if u.end is None:
            turn.lost = True
            res.turns.append(turn)
            continue
        nxt = next((v.start for _, v in utterances[i + 1 :] if v.start is not None), end_all)
        window_end = turn.barge_start if turn.barge_start is not None else nxt
        ra = analyse_reply(reply_window_frames(frames, u.end, window_end))
        if turn.kind == "turn" and u.start is not None:
            early = premature_reply_at(frames, u.start, u.end)
            turn.premature_s = None if early is None else early - u.start
        turn.first_rx = ra.first_t
        turn.first_audible = ra.first_audible_t
        turn.reply_end = ra.last_t
        if ra.first_audible_t is not None and not turn.lost:
            turn.wire_s = ra.first_audible_t - u.end
            if ra.first_t is not None:
                turn.lead_silence_s = ra.first_audible_t - ra.first_t
        else:
            turn.lost = True
        turn.rx_frames = ra.frames
        turn.audio_s = ra.audio_s
        turn.gaps_ms = [x * 1000.0 for x in ra.gaps_s]
        turn.gap_offsets_ms = [x * 1000.0 for x in ra.gap_offsets_s]
        turn.playout_underruns = ra.playout_underruns
        dev = [x * 1000.0 for x in ra.interarrival_dev_s]
        turn.interarrival_p99_ms = percentile(dev, 99)
        turn.interarrival_max_ms = max(dev) if dev else None
        if turn.barge_start is not None:
            barge = next((v for t2, v in utterances[i + 1 :] if t2.kind == "barge_in"), None)
            _measure_barge(turn, frames, u.end, barge.end if barge is not None else nxt)
        res.turns.append(turn)
        if on_turn is not None:
            on_turn(turn)


def _measure_barge(
    turn: TurnResult, frames: list[RxFrame], t_end: float, barge_end: float | None
) -> None:
    """When did bot audio stop arriving after the caller talked over it?

    Only audio up to the end of the barge-in utterance counts: after that it is
    the answer to the barge-in.
    """
    assert turn.barge_start is not None
    times = [f.t for f in frames if f.t >= t_end and (barge_end is None or f.t < barge_end)]
    if not any(t >= turn.barge_start for t in times):
        turn.barge_note = "reply had ended before the caller barged in"
        return
    stop = first_gap_after(times, turn.barge_start, BARGE_STOP_GAP_S)
    if stop is None:
        return
    turn.barge_stop = stop
    turn.barge_stop_s = stop - turn.barge_start
    if barge_end is not None and barge_end - stop < BARGE_STOP_GAP_S:
        turn.barge_note = "bot audio did not stop while the caller talked"


async def run_probe(load: LoadSpec, uuid: str) -> CallResult:
    """Connect, record the upgrade time, hang up (a call arriving while loaded)."""
    res = CallResult(uuid=uuid, probe=True)
    s = BenchStream(_stream_config(load, uuid))
    try:
        await s.start()
        res.started_at = s.started_at
        res.connected = await s.wait_connected()
        res.upgraded_at = s.upgraded_at
        res.upgrade_ms = None if s.upgrade_s is None else s.upgrade_s * 1000.0
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        res.hangup_at = time.monotonic()
        with contextlib.suppress(Exception):
            await s.aclose()
    return res


async def _probes(load: LoadSpec) -> list[CallResult]:
    """Probe calls at their scheduled times (concurrently: a slow one does not delay the next)."""
    if not load.probe_every_s:
        return []
    tag = int(load.t0 * 1000) % 100000

    async def one(i: int, at: float) -> CallResult:
        await _sleep_until(load.t0 + at)
        return await run_probe(load, f"probe-{tag}-{i}")

    times: list[float] = []
    t = load.probe_from_s
    while t < load.probe_to_s:
        times.append(t)
        t += load.probe_every_s
    return list(await asyncio.gather(*(one(i, at) for i, at in enumerate(times))))


@dataclass
class LoadResult:
    """Everything one load process measured."""

    calls: list[CallResult]
    probes: list[CallResult]
    loop_lag_ms: dict[str, Any]
    cpu_pct: float | None
    wall_s: float
    lag_spikes: list[tuple[float, float]] = field(default_factory=list)


async def run_load(
    load: LoadSpec, audio: CallerAudio, on_turn: TurnCallback | None = None
) -> LoadResult:
    """Run every call of ``load`` (and its probes) on this event loop."""
    import psutil

    me = psutil.Process()
    # The calls' records grow by thousands of objects a second; a generation-2
    # collection over them would stall this loop (and show up as bot-audio gaps
    # that the server did not cause). Reference counting frees the rest.
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    cpu0 = sum(me.cpu_times()[:2])
    t_wall = time.monotonic()
    lag = LoopLagMonitor()
    lag.start()
    tasks = [asyncio.create_task(run_call(c, load, audio, on_turn)) for c in load.calls]
    probe_task = asyncio.create_task(_probes(load))
    limit = None
    if load.hangup_s is not None:
        limit = max(0.0, load.t0 + load.hangup_s - time.monotonic()) + 20.0
    done, pending = await asyncio.wait([*tasks, probe_task], timeout=limit)
    for t in pending:
        t.cancel()
    if pending:
        logger.warning("{} calls did not finish in time and were cancelled", len(pending))
        await asyncio.gather(*pending, return_exceptions=True)
    await lag.stop()
    if gc_was_enabled:
        gc.enable()
    calls = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
    probes = probe_task.result() if probe_task in done and probe_task.exception() is None else []
    wall = time.monotonic() - t_wall
    cpu = 100.0 * (sum(me.cpu_times()[:2]) - cpu0) / wall if wall > 0 else None
    return LoadResult(calls, probes, lag.summary_ms(), cpu, wall, list(lag.spikes))


# -- worker process -----------------------------------------------------------------------


def _result_to_json(r: LoadResult) -> str:
    return json.dumps(
        {
            "calls": [asdict(c) for c in r.calls],
            "probes": [asdict(c) for c in r.probes],
            "loop_lag_ms": r.loop_lag_ms,
            "cpu_pct": r.cpu_pct,
            "wall_s": r.wall_s,
            "lag_spikes": r.lag_spikes,
        }
    )


def _call_from_dict(d: dict[str, Any]) -> CallResult:
    turns = [TurnResult(**t) for t in d.pop("turns", [])]
    return CallResult(**d, turns=turns)


def result_from_json(text: str) -> LoadResult:
    """A worker's :class:`LoadResult`."""
    d = json.loads(text)
    return LoadResult(
        calls=[_call_from_dict(c) for c in d["calls"]],
        probes=[_call_from_dict(c) for c in d["probes"]],
        loop_lag_ms=d["loop_lag_ms"],
        cpu_pct=d["cpu_pct"],
        wall_s=d["wall_s"],
        lag_spikes=[(float(t), float(lag)) for t, lag in d.get("lag_spikes", [])],
    )


async def _worker(spec_path: Path, out_path: Path) -> None:
    load = LoadSpec.from_json(spec_path.read_text())
    audio = await load_caller_audio(load.rate)
    result = await run_load(load, audio)
    out_path.write_text(_result_to_json(result))


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeswitch.bench.loadgen SPEC.json OUT.json [LOOP]``: run a share of a
    load (on the event loop ``LOOP`` names: auto, uvloop or asyncio; default asyncio)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        raise SystemExit("usage: python -m pipeswitch.bench.loadgen SPEC.json OUT.json [LOOP]")
    from pipeswitch.config.logging import configure_logging
    from pipeswitch.pipelines import event_loop

    kind = args[2] if len(args) == 3 else "asyncio"
    if kind not in event_loop.EVENT_LOOP_KINDS:
        raise SystemExit(f"unknown event loop {kind!r}")
    configure_logging("WARNING")
    event_loop.run(_worker(Path(args[0]), Path(args[1])), kind)


if __name__ == "__main__":
    main()
