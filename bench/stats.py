"""Pure statistics for the bench: percentiles, audio timelines, overhead arithmetic.

Nothing here does I/O or reads a clock, so every rule the reports rely on is
unit-tested with synthetic numbers (``tests/bench/test_stats.py``).

Time values are seconds on ``time.monotonic()`` (one clock for every process on
the machine); reports convert to milliseconds at the edge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# A gap in bot audio at the emulator longer than this, while the bot talks, is an
# underrun: two 20 ms frames missing, which a caller hears as a click or a stutter.
UNDERRUN_GAP_S = 0.040


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), linear interpolation (numpy's default).

    None for no values. ``q`` outside 0..100 is an error, not a clamp.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    xs = sorted(float(v) for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


@dataclass(frozen=True, slots=True)
class Summary:
    """Distribution summary; all None when there were no samples."""

    n: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None
    min: float | None
    mean: float | None

    def scaled(self, k: float) -> Summary:
        """The same summary with every value multiplied by ``k`` (e.g. s -> ms)."""

        def s(v: float | None) -> float | None:
            return None if v is None else v * k

        return Summary(
            self.n, s(self.p50), s(self.p95), s(self.p99), s(self.max), s(self.min), s(self.mean)
        )

    def to_dict(self, ndigits: int = 1) -> dict[str, Any]:
        """JSON-ready, rounded."""
        return {
            k: (round(v, ndigits) if isinstance(v, float) else v) for k, v in asdict(self).items()
        }


def summarize(values: Iterable[float | None]) -> Summary:
    """p50/p95/p99/max/min/mean of the non-None values."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return Summary(0, None, None, None, None, None, None)
    return Summary(
        n=len(xs),
        p50=percentile(xs, 50),
        p95=percentile(xs, 95),
        p99=percentile(xs, 99),
        max=max(xs),
        min=min(xs),
        mean=sum(xs) / len(xs),
    )


def ratio(ours: float | None, ref: float | None) -> float | None:
    """ours / ref, None when either is missing or ref is 0."""
    if ours is None or ref is None or ref == 0:
        return None
    return ours / ref


# -- bot audio timelines -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RxFrame:
    """One bot audio message as the emulated module received it."""

    t: float  # receive time
    dur_s: float  # audio it carries
    audible: bool  # non-silent (peak above the emulator's threshold)


@dataclass(slots=True)
class ReplyAudio:
    """What the timeline of one bot reply (a talk spurt) looked like at the emulator."""

    frames: int = 0
    audio_s: float = 0.0
    first_t: float | None = None
    first_audible_t: float | None = None
    last_t: float | None = None
    last_audible_t: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # wire gaps > threshold (underruns)
    gap_offsets_s: list[float] = field(default_factory=list)  # where (from the first message)
    playout_underruns: int = 0  # times a zero-lead playout buffer ran dry mid-reply
    playout_dry_s: float = 0.0
    interarrival_dev_s: list[float] = field(default_factory=list)  # |gap - previous duration|

    @property
    def underruns(self) -> int:
        """Wire-level underruns (gaps above the threshold)."""
        return len(self.gaps_s)


def reply_window_frames(
    frames: Sequence[RxFrame], start: float, end: float | None
) -> list[RxFrame]:
    """Frames received in ``[start, end)`` (``end`` None = to the end)."""
    return [f for f in frames if f.t >= start and (end is None or f.t < end)]


def premature_reply_at(
    frames: Sequence[RxFrame], speech_start: float, speech_end: float
) -> float | None:
    """When bot speech arrived while the caller was still talking, if it did.

    ``speech_start``/``speech_end``: the caller's first and last voiced frames sent.
    Audible bot audio received in between - over the caller's words or in a pause
    inside the sentence - is a reply to a turn that had not ended (the bench waits
    for the bot to be quiet before the caller speaks, so it is not an earlier reply's
    tail). A barge-in utterance talks over the bot on purpose: don't ask for those.
    """
    return min((f.t for f in frames if f.audible and speech_start < f.t < speech_end), default=None)


def analyse_reply(frames: Sequence[RxFrame], gap_s: float = UNDERRUN_GAP_S) -> ReplyAudio:
    """Underruns and jitter of one reply's frames (sorted by time).

    * A *wire gap* is the time between two consecutive messages; one above
      ``gap_s`` while the bot talks is an underrun (the baseline's definition).
      Trailing silence after the reply is not "while the bot talks", so only
      gaps between the reply's first and last message count.
    * The *playout* view models a far end that plays each message on arrival
      with no jitter buffer beyond what the sender built up: it runs dry when a
      message arrives after everything before it has finished playing. A
      server that keeps a playout lead (ours: 40 ms) survives short wire gaps
      this way; one that paces with no lead does not.
    """
    out = ReplyAudio()
    if not frames:
        return out
    out.frames = len(frames)
    out.first_t = frames[0].t
    out.last_t = frames[-1].t
    play_end = frames[0].t
    prev: RxFrame | None = None
    for f in frames:
        out.audio_s += f.dur_s
        if f.audible:
            if out.first_audible_t is None:
                out.first_audible_t = f.t
            out.last_audible_t = f.t
        if prev is not None:
            gap = f.t - prev.t
            if gap > gap_s:
                out.gaps_s.append(gap)
                out.gap_offsets_s.append(prev.t - frames[0].t)
            out.interarrival_dev_s.append(abs(gap - prev.dur_s))
            if f.t > play_end + 1e-4:
                out.playout_underruns += 1
                out.playout_dry_s += f.t - play_end
        play_end = max(play_end, f.t) + f.dur_s
        prev = f
    return out


def gap_cause(
    start: float,
    end: float,
    server_stalls: Sequence[tuple[float, float]],
    loadgen_stalls: Sequence[tuple[float, float]],
) -> str:
    """Whose event-loop stall overlaps the audio gap ``[start, end]``.

    Stalls are ``(when the timer was due, how late it fired)``. ``server`` /
    ``loadgen`` / ``both``, or ``unexplained`` (pacing, the network, the machine).
    """

    def hit(stalls: Sequence[tuple[float, float]]) -> bool:
        return any(due < end and due + lag > start for due, lag in stalls)

    s, g = hit(server_stalls), hit(loadgen_stalls)
    if s and g:
        return "both"
    return "server" if s else "loadgen" if g else "unexplained"


def first_gap_after(times: Sequence[float], after: float, min_gap_s: float) -> float | None:
    """The last time before the first gap of at least ``min_gap_s`` following ``after``.

    Used for barge-in: the caller starts talking at ``after``; bot audio "stops
    arriving" at the last message before a silence of ``min_gap_s``. None if no
    message arrived after ``after`` (audio had already stopped) - the caller of
    this function then uses the last message before ``after``.
    """
    last: float | None = None
    for t in times:
        if t < after:
            last = t
            continue
        if last is not None and last >= after and t - last >= min_gap_s:
            return last
        last = t
    return last if last is not None and last >= after else None


# -- overhead arithmetic -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TurnTimes:
    """The parts of one turn's wire latency that are *not* the server's own work.

    * ``stt_ttfs_s`` - the TTFS the Deepgram emulator injected for this utterance,
      measured, like Deepgram's published figure (pipecat-ai/stt-benchmark), from
      the *true end of speech*: it already contains the VAD stop window, and the
      emulator sends the final at ``max(speech_end + ttfs, Finalize)``.
    * ``vad_stop_s`` + ``policy_wait_s`` - the configured silence before the turn
      may end: the VAD ``stop_secs`` plus any fixed turn-stop wait after it (ours:
      0 for a complete-looking transcript; the reference's
      ``SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.2)``: 0.2).
    * ``llm_ttft_s`` - the TTFT the chat emulator injected; ``llm_stream_s`` the
      time its injected token rate needs for the first sentence.
    * ``tts_ttfb_s`` - Piper's time to first byte for the first sentence (the
      TTS TTFB Pipecat reports for the turn).
    * ``lead_silence_s`` - leading silence in the first TTS audio, as measured on
      the wire (first message -> first audible message).
    """

    wire_s: float
    stt_ttfs_s: float | None
    vad_stop_s: float
    policy_wait_s: float
    llm_ttft_s: float | None
    llm_stream_s: float
    tts_ttfb_s: float | None
    lead_silence_s: float

    def endpointing_floor_s(self) -> float | None:
        """End of speech -> earliest moment the turn can end: the slower of STT and VAD."""
        if self.stt_ttfs_s is None:
            return None
        return max(self.stt_ttfs_s, self.vad_stop_s + self.policy_wait_s)

    def external_s(self) -> float | None:
        """Everything the server waited for: providers, configured waits, TTS."""
        floor = self.endpointing_floor_s()
        if floor is None or self.llm_ttft_s is None or self.tts_ttfb_s is None:
            return None
        return floor + self.llm_ttft_s + self.llm_stream_s + self.tts_ttfb_s + self.lead_silence_s

    def overhead_s(self) -> float | None:
        """Server overhead = wire latency - external waits (None if a part is unknown)."""
        ext = self.external_s()
        return None if ext is None else self.wire_s - ext

    def naive_overhead_s(self) -> float | None:
        """The issue's literal formula (wire - injected - stop_secs - TTS), for the record.

        It subtracts the VAD window twice (Deepgram's TTFS already contains it),
        so it runs about ``stop_secs`` low; reported only so the two can be compared.
        """
        if self.stt_ttfs_s is None or self.llm_ttft_s is None or self.tts_ttfb_s is None:
            return None
        return (
            self.wire_s
            - self.stt_ttfs_s
            - self.llm_ttft_s
            - self.llm_stream_s
            - self.vad_stop_s
            - self.tts_ttfb_s
        )


def cpu_percent(cpu_s_before: float, cpu_s_after: float, wall_s: float) -> float | None:
    """CPU use over an interval in % of one core (200 = both cores of this machine)."""
    if wall_s <= 0:
        return None
    return 100.0 * max(0.0, cpu_s_after - cpu_s_before) / wall_s


def per_call(loaded: float | None, idle: float | None, calls: int) -> float | None:
    """(loaded - idle) / calls: the marginal cost of one call."""
    if loaded is None or idle is None or calls <= 0:
        return None
    return (loaded - idle) / calls
