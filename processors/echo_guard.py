"""Echo-safe barge-in: the caller's voice interrupts the bot, the bot's own echo does not.

Phone lines echo the bot's voice back into the caller's leg (hybrid echo, -10 to
-25 dB, 40-120 ms late). A provider with server-side VAD (ElevenLabs Agents, OpenAI
Realtime) hears that echo as the caller talking and cuts itself off; users of other
stacks report exactly this on PBXs. While the bot is audible, this guard lets caller
audio count as speech only when it is louder than the echo could be:

    threshold = max(noise floor + noise margin, bot level + echo return loss + echo margin)

* **bot level**: the loudest bot audio that can be echoing now, from the bot's own
  outgoing audio (the :meth:`EchoGuard.reference` tap schedules each chunk on a
  playout clock, as the output transport paces it) over the echo-delay window;
* **echo return loss (ERL)**: an ERLE-style running estimate of caller level minus
  bot level, learned while the bot talks and the caller is silent (fast up, slow
  down, clamped), starting from a cautious -6 dB;
* a barge-in needs ``min_speech_secs`` of such speech (short gaps allowed).

Until a barge-in is confirmed, caller audio heard over the bot is *held* (the
provider gets silence in its place, so its VAD never sees echo); on confirmation the
held onset is released with the rest and the bot is interrupted at once (local
playback stops; the provider follows). Held audio that never became a barge-in (a
cough, a click, the echo itself, a short "mm-hm") goes as silence.

Backchannels are transcript based: a transcript made only of "mm-hm", "okay",
"yeah", "uh-huh" and the like, said while the bot was talking, is swapped for
Pipecat's ``UserBackchannelFrame``, so it starts no turn and stays out of the
context. Such a word shorter than ``min_speech_secs`` never interrupted the bot;
a longer one did (the 250 ms stop budget leaves no time to wait for its words).

:class:`EchoGuardCore` is the decision logic: no clock, no tasks, no frames; the
thin processors feed it levels and times.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pipecat.audio.filters.base_audio_filter import BaseAudioFilter
from pipecat.frames.frames import (
    FilterControlFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    TranscriptionFrame,
    UserBackchannelFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup

if TYPE_CHECKING:
    from pipeswitch.transports.transport import CallerMediaSink

SILENCE_DB = -96.0
# Caller audio more than this behind real time is a pause in the stream, not a delay.
RESYNC_SECS = 0.3

BACKCHANNEL_WORDS = frozenset(
    [
        "mm",
        "mmm",
        "hmm",
        "mhm",
        "mmhm",
        "mm-hm",
        "mm-hmm",
        "uh-huh",
        "uhhuh",
        "uh",
        "um",
        "okay",
        "ok",
        "yeah",
        "yep",
        "yup",
        "yes",
        "right",
        "sure",
        "alright",
        "i",
        "see",
        "got",
        "it",
        "cool",
        "great",
    ]
)
_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*")


def is_backchannel(text: str, max_words: int = 3) -> bool:
    """Whether ``text`` is only an acknowledgement ("mm-hm", "okay", "yeah, right")."""
    words = _TOKEN.findall(text.lower())
    return 0 < len(words) <= max_words and all(w in BACKCHANNEL_WORDS for w in words)


def level_db(pcm: bytes) -> float:
    """RMS level of s16le audio in dBFS (``SILENCE_DB`` for digital silence)."""
    a = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    if a.size == 0:
        return SILENCE_DB
    ms = float(np.dot(a, a)) / a.size
    return SILENCE_DB if ms <= 1.0 else 10.0 * math.log10(ms / (32768.0 * 32768.0))


def frame_levels_db(pcm: bytes, rate: int, step_secs: float = 0.02) -> list[float]:
    """RMS level (dBFS) of each ``step_secs`` piece of s16le audio (a short tail included)."""
    a = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    step = max(1, int(rate * step_secs))
    n = a.size // step
    out: list[float] = []
    if n:
        ms = np.einsum("ij,ij->i", a[: n * step].reshape(n, step), a[: n * step].reshape(n, step))
        ms = ms / step
        out = [
            SILENCE_DB if m <= 1.0 else 10.0 * math.log10(m / (32768.0 * 32768.0))
            for m in ms.tolist()
        ]
    if a.size - n * step:
        out.append(level_db(a[n * step :].astype("<i2").tobytes()))
    return out


@dataclass(frozen=True, slots=True)
class EchoGuardParams:
    """Tunables; the defaults are what ``bench/echo.py`` measured (README).

    Attributes:
        min_speech_secs: Speech over the bot needed before it counts as a barge-in.
        max_gap_secs: Quiet allowed inside that speech (between syllables).
        echo_margin_db: How far above the expected echo speech must be...
        spread_factor: ...plus this many standard deviations of the echo's level
            around its expectation (a line whose echo wanders needs more room).
            Until the path is learnt, the margin is ``echo_margin_db`` + 4 dB.
        noise_margin_db: How far above the noise floor speech must be.
        initial_erl_db: Echo return loss assumed until the echo path is learnt.
        max_lag_secs: Longest delay from a chunk's scheduled playout to its echo in
            the caller's audio (transport lead + far-end buffering + the line's echo).
        bot_active_db: Bot audio quieter than this teaches nothing about the echo.
        learn_alpha: Weight of one frame in the running echo statistics.
        learn_frames: Echo frames needed before the learnt path is trusted.
        tail_secs: The bot counts as audible this long after its last echo could end.
        backchannel_window_secs: A transcript this soon after the bot was audible may
            be a backchannel.
    """

    min_speech_secs: float = 0.15
    max_gap_secs: float = 0.1
    echo_margin_db: float = 2.0
    spread_factor: float = 1.5
    noise_margin_db: float = 12.0
    initial_erl_db: float = -6.0
    max_lag_secs: float = 0.5
    bot_active_db: float = -40.0
    learn_alpha: float = 0.05
    learn_frames: int = 40
    tail_secs: float = 0.1
    backchannel_window_secs: float = 1.5


class Verdict(Enum):
    """What to do with one caller frame."""

    PASS = "pass"  # the bot is silent: caller audio as is
    HOLD = "hold"  # maybe a barge-in: keep it, send nothing yet
    MUTE = "mute"  # echo (and any held audio was not speech): send silence
    BARGE_IN = "barge_in"  # confirmed: release held audio, interrupt the bot


@dataclass
class GuardStats:
    """Counters for the bench and the call record."""

    frames_over_bot: int = 0
    candidates: int = 0
    barge_ins: int = 0
    rejected: int = 0
    backchannels: int = 0
    barge_in_at: list[float] = field(default_factory=list)


_SLOT = 0.02  # the bot timeline's resolution


# Learnt frames between two recomputations of the echo path (100 ms of quiet caller).
_PATH_EVERY = 5
# Once this many frames were learnt (3.2 s of echo at the defaults) the path is settled:
# one quiet frame in this many updates it (a pass over every candidate delay was 21 us
# a frame, ~10 % of a cascade call's main-thread CPU; the statistics' memory is ~20 updates).
_SETTLED_FRAMES = 160
_LEARN_EVERY_SETTLED = 3
# While the bot is silent a caller frame passes as is and its level only feeds the noise
# floor: one frame in this many is measured (the level was ~4 % of a cascade call's main
# thread, profile at 30 calls); the floor's creep is scaled to the frames it stood for.
NOISE_EVERY = 4
_NOISE_CREEP = 0.02  # per frame
# The default of every slot lookup in _window_max (no bot audio there).
_NO_BOT = itertools.repeat(-math.inf)


class _LagStats:
    """Running mean and spread of (caller level - bot level) at one candidate delay."""

    __slots__ = ("mean", "n", "sq")

    def __init__(self) -> None:
        self.mean = 0.0
        self.sq = 0.0
        self.n = 0

    @property
    def std(self) -> float:
        return math.sqrt(max(0.0, self.sq - self.mean * self.mean))


class EchoGuardCore:
    """Decides, frame by frame, whether caller audio over the bot is the caller.

    The echo path is learnt, not assumed: the bot's levels on a 20 ms playout grid
    are compared with the caller's levels at every candidate delay (0 to
    ``max_lag_secs``); the delay at which their difference is steadiest is the echo
    path, and the mean difference there is its return loss (ERL). Expected echo =
    bot level one path-delay ago + ERL; speech must clear it by the margin. Until
    the path is learnt, the loudest bot audio in the whole delay window and a
    cautious ERL stand in.

    Times are the caller's clock (``time.monotonic()`` in the processors); nothing
    here reads a clock. Cost per 20 ms frame: one pass over the candidate delays.
    """

    def __init__(self, params: EchoGuardParams | None = None) -> None:
        """Start with no bot audio, a -60 dBFS floor and the cautious ERL."""
        self.p = params or EchoGuardParams()
        self.noise_db = -60.0
        self.stats = GuardStats()
        self._play_until = -math.inf
        self._bot: dict[int, float] = {}  # slot -> bot level (dBFS)
        self._n_lags = max(1, round(self.p.max_lag_secs / _SLOT)) + 1
        self._lags = [_LagStats() for _ in range(self._n_lags)]
        self._learnt = 0
        self._quiet_frames = 0  # caller frames quiet over the bot (the learning candidates)
        self._forgotten_to: int | None = None  # bot slots before this one are dropped
        # The learnt path, recomputed every _PATH_EVERY learnt frames rather than per frame
        # (a min over every candidate delay; the path moves slowly).
        self._path: tuple[float, float, float] | None = None
        self._path_at = -_PATH_EVERY
        self._run = 0.0
        self._gap = 0.0
        self._held = False
        self._confirmed = False
        self._last_audible = -math.inf
        self._unmeasured = 0  # frames passed unmeasured since the noise floor's last sample

    # -- bot side -------------------------------------------------------------

    def bot_audio(self, now: float, secs: float, level: float) -> None:
        """The bot sent ``secs`` of audio at ``level`` dBFS; it plays after what is queued."""
        start = max(now, self._play_until)
        self._play_until = start + secs
        first = round(start / _SLOT)
        last = round(self._play_until / _SLOT)
        for slot in range(first, max(first + 1, last)):
            self._bot[slot] = level

    def bot_interrupted(self, now: float) -> None:
        """Playback was cut: nothing more of the bot will play (its echo may linger)."""
        cut = round(now / _SLOT)
        for slot in [s for s in self._bot if s > cut]:
            del self._bot[slot]
        self._play_until = min(self._play_until, now)

    def _forget(self, now: float) -> None:
        """Drop bot levels too old to echo now: the slots passed since the last call (a
        scan of the whole map, which holds a reply's future slots, only after a gap)."""
        old = round(now / _SLOT) - self._n_lags - 50
        start = self._forgotten_to
        if start is not None and old <= start:
            return
        bot = self._bot
        if start is None or old - start > len(bot):
            for slot in [s for s in bot if s < old]:
                del bot[slot]
        else:
            for slot in range(start, old):
                bot.pop(slot, None)
        self._forgotten_to = old

    @property
    def path(self) -> tuple[float, float, float] | None:
        """The learnt echo path: (delay s, ERL dB, spread dB), or None while learning."""
        if self._learnt < self.p.learn_frames:
            return None
        if self._learnt - self._path_at >= _PATH_EVERY:
            self._path = self._best_path()
            self._path_at = self._learnt
        return self._path

    def _best_path(self) -> tuple[float, float, float] | None:
        best = min(
            (st for st in self._lags if st.n >= self.p.learn_frames // 2),
            key=lambda st: st.std,
            default=None,
        )
        if best is None:
            return None
        return self._lags.index(best) * _SLOT, best.mean, best.std

    def expected_echo(self, now: float) -> float | None:
        """The echo level expected in the caller frame ending ``now`` (None: no bot)."""
        slot = round(now / _SLOT)
        bot = self._bot
        cautious_erl = self.p.initial_erl_db + 4.0
        path = self.path
        if path is not None:
            lag = round(path[0] / _SLOT)
            levels = [bot[s] for s in range(slot - lag - 1, slot - lag + 2) if s in bot]
            if not levels:
                return None
            erl = path[1] + self.p.spread_factor * path[2]
            if erl <= cautious_erl:
                return max(levels) + erl
            # Learning may only make a barge-in easier than the cautious rule. Soft caller
            # speech under the threshold is learnt as if it were echo; a "path" fitted to
            # it wanders by tens of dB and would put the threshold above full scale, so a
            # caller who spoke over the greeting could never be heard until it ended.
            near = max(levels)
            window = self._window_max(slot)
            loudest = near if window is None else max(near, window)
            return min(near + erl, loudest + cautious_erl)
        window = self._window_max(slot)
        return None if window is None else window + cautious_erl

    def _window_max(self, slot: int) -> float | None:
        """The loudest bot level over the delay window ending at ``slot`` (None: none);
        the lookups in C: this runs for every frame over the bot until the path is
        learnt, and after it as the cautious bound."""
        top = max(map(self._bot.get, range(slot - self._n_lags, slot + 1), _NO_BOT))
        return None if top == -math.inf else top

    def _learn(self, now: float, level: float) -> None:
        slot = round(now / _SLOT)
        bot = self._bot
        alpha = self.p.learn_alpha
        active = self.p.bot_active_db
        used = False
        # An exponential mean and mean square per delay, inline: this runs for every
        # candidate delay of every frame the caller is quiet over the bot.
        for lag, st in enumerate(self._lags):
            b = bot.get(slot - lag)
            if b is not None and b >= active:
                d = level - b
                n = st.n
                if n == 0:
                    st.mean, st.sq = d, d * d
                else:
                    a = 1.0 / (n + 1)
                    if a < alpha:
                        a = alpha
                    st.mean += a * (d - st.mean)
                    st.sq += a * (d * d - st.sq)
                st.n = n + 1
                used = True
        if used:
            self._learnt += 1

    def bot_audible(self, now: float) -> bool:
        """Whether bot audio (or its echo tail) may be in the caller's leg now."""
        return now < self._play_until + self.p.max_lag_secs + self.p.tail_secs

    # -- caller side ----------------------------------------------------------

    def passes_unmeasured(self, now: float) -> bool:
        """Whether the caller frame ending ``now`` passes without its level being needed:
        the bot is silent, nothing is held, and the noise floor's sample is not due
        (then :meth:`caller_frame` need not be called for it)."""
        if self._held or self.bot_audible(now):
            return False
        self._bot_silent()
        if self._unmeasured + 1 >= NOISE_EVERY:
            return False
        self._unmeasured += 1
        return True

    def caller_frame(self, now: float, secs: float, level: float) -> Verdict:
        """Classify one caller frame of ``secs`` at ``level`` dBFS ending at ``now``."""
        p = self.p
        if not self.bot_audible(now):
            if self._held:
                # The bot stopped while a candidate was pending: the caller is talking.
                return self._confirm(now)
            self._bot_silent()
            frames, self._unmeasured = self._unmeasured + 1, 0
            if level < self.noise_db + p.noise_margin_db:
                self._track_noise(level, frames)
            return Verdict.PASS
        self._last_audible = now
        self._forget(now)
        if self._confirmed:
            return Verdict.PASS  # this barge-in goes on until the bot is silent
        self.stats.frames_over_bot += 1
        echo = self.expected_echo(now)
        floor = self.noise_db + p.noise_margin_db
        threshold = floor if echo is None else max(floor, echo + p.echo_margin_db)
        if level > threshold:
            if not self._held:
                self.stats.candidates += 1
            self._held = True
            self._run += secs
            self._gap = 0.0
            if self._run >= p.min_speech_secs - 1e-9:
                return self._confirm(now)
            return Verdict.HOLD
        if self._held:
            self._gap += secs
            if self._gap <= p.max_gap_secs:
                return Verdict.HOLD
            self.stats.rejected += 1
            self._held = False
            self._run = self._gap = 0.0
            return Verdict.MUTE
        self._quiet_frames += 1
        if self._learnt < _SETTLED_FRAMES or not self._quiet_frames % _LEARN_EVERY_SETTLED:
            self._learn(now, level)
        return Verdict.MUTE

    def _bot_silent(self) -> None:
        """The bot is silent and nothing is held: a barge-in in progress is over."""
        self._confirmed = False
        self._run = self._gap = 0.0

    def _confirm(self, now: float) -> Verdict:
        self._held = False
        self._confirmed = True
        self._run = self._gap = 0.0
        self.stats.barge_ins += 1
        self.stats.barge_in_at.append(now)
        return Verdict.BARGE_IN

    def _track_noise(self, level: float, frames: int = 1) -> None:
        # Minimum tracking: drop at once to a quieter floor, creep up slowly (as fast per
        # second whether every frame or one in ``frames`` is measured).
        if level < self.noise_db:
            self.noise_db = level
        else:
            creep = _NOISE_CREEP if frames == 1 else 1.0 - (1.0 - _NOISE_CREEP) ** frames
            self.noise_db += creep * (level - self.noise_db)

    # -- transcripts ----------------------------------------------------------

    def is_backchannel_now(self, now: float, text: str) -> bool:
        """A transcript that only acknowledges the bot, said while it was talking."""
        window = self.p.backchannel_window_secs
        recent = self.bot_audible(now) or now - self._last_audible <= window
        if recent and is_backchannel(text):
            self.stats.backchannels += 1
            return True
        return False


class EchoGuard:
    """The guard for one call: a core and the processors that feed it.

    ``input()`` goes right after the transport input (before the provider or STT);
    ``reference()`` right before the transport output (it sees the bot's audio and,
    in speech-to-speech pipelines, the provider's transcripts).
    """

    # The call's alone: unwired with the call's processors (pipelines/dismantle.py).
    call_owned: ClassVar[bool] = True

    def __init__(self, params: EchoGuardParams | None = None, *, interrupt: bool = True) -> None:
        """``interrupt``: broadcast Pipecat's interruption on a barge-in (speech-to-speech).

        The cascade leaves it False: its user aggregator already interrupts on the
        speech the guard lets through.
        """
        self.core = EchoGuardCore(params)
        self._held: list[InputAudioRawFrame] = []
        self._clock = -math.inf
        self._input = EchoGuardInput(self, interrupt=interrupt)
        self._reference = EchoGuardReference(self)
        self._filter: EchoReferenceFilter | None = None

    def input(self) -> EchoGuardInput:
        """The caller-audio gate."""
        return self._input

    def reference(self) -> EchoGuardReference:
        """The bot-audio tap and backchannel filter."""
        return self._reference

    def output_filter(self) -> EchoReferenceFilter:
        """A transport ``audio_out_filter`` that times the bot's audio as it is written.

        Better than the pipeline tap: the output transport paces its writes in real
        time, so the echo path learnt from these times has no queueing jitter in it
        (the tap sees a provider's audio in bursts, faster than real time). With it
        attached, the reference processor leaves bot audio to the filter.
        """
        if self._filter is None:
            self._filter = EchoReferenceFilter(self.core)
        return self._filter

    def prompt_tap(self, audio: bytes, sample_rate: int) -> None:
        """Bot audio the transport plays outside the pipeline (the cached greeting), as
        it is written: the greeting's echo must not count as the caller either."""
        now = _now()
        secs = len(audio) / (2 * sample_rate)
        for k, lv in enumerate(frame_levels_db(audio, sample_rate)):
            self.core.bot_audio(now, min(0.02, secs - 0.02 * k), lv)

    def _audio_time(self, secs: float) -> float:
        """When this frame was captured: the caller's audio clock, not its arrival.

        Frames delayed on the way arrive in bursts; stamping each with its arrival
        time would misalign it with the bot's echo. The clock advances by the audio's
        own duration, never runs ahead of now, and re-anchors after a real pause.
        """
        now = _now()
        t = self._clock + secs
        if t > now or t < now - RESYNC_SECS:
            t = now
        self._clock = t
        return t

    def gate(self, frame: InputAudioRawFrame) -> tuple[Verdict, list[InputAudioRawFrame]]:
        """One caller frame through the gate: the verdict and the frames to send on
        (none while held; silence for echo; the held onset with a barge-in)."""
        verdict, out = self.judge(frame)
        if verdict is Verdict.MUTE:
            out = [_silent(f) for f in out]
        return verdict, out

    def judge(self, frame: InputAudioRawFrame) -> tuple[Verdict, list[InputAudioRawFrame]]:
        """As :meth:`gate`, but MUTE's frames come back as they are: the caller sends
        silence in their place (a media sink may reuse one silent frame)."""
        secs = len(frame.audio) / (2 * frame.sample_rate * frame.num_channels)
        now = self._audio_time(secs)
        if self.core.passes_unmeasured(now):
            return Verdict.PASS, [frame]
        verdict = self.core.caller_frame(now, secs, level_db(frame.audio))
        if verdict is Verdict.PASS:
            return verdict, [frame]
        if verdict is Verdict.HOLD:
            self._held.append(frame)
            return verdict, []
        out, self._held = [*self._held, frame], []
        return verdict, out

    def sink(self, inner: CallerMediaSink) -> EchoGatedSink:
        """The gate in front of a media fast path (caller audio that skips the pipeline)."""
        return EchoGatedSink(self, inner)

    @property
    def timed_by_filter(self) -> bool:
        """Whether the output filter, not the pipeline tap, feeds the bot's audio."""
        return self._filter is not None and self._filter.active


def _now() -> float:
    return time.monotonic()


class EchoGuardInput(FrameProcessor):
    """Gates caller audio with the core's verdicts (see the module docstring)."""

    def __init__(self, guard: EchoGuard, *, interrupt: bool, **kwargs: Any) -> None:
        """Bind to the call's guard."""
        super().__init__(**kwargs)
        self._guard = guard
        self._interrupt = interrupt

    @property
    def core(self) -> EchoGuardCore:
        """The call's decision core (its stats, for the call record and the bench)."""
        return self._guard.core

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Caller audio through the gate; everything else unchanged."""
        await super().process_frame(frame, direction)
        if not isinstance(frame, InputAudioRawFrame):
            if isinstance(frame, InterruptionFrame):
                self._guard.core.bot_interrupted(_now())
            await self.push_frame(frame, direction)
            return
        verdict, out = self._guard.gate(frame)
        if verdict is Verdict.BARGE_IN and self._interrupt:
            self._guard.core.bot_interrupted(_now())
            await self.broadcast_interruption()
        for f in out:
            await self.push_frame(f, direction)


class EchoGatedSink:
    """The guard's gate in front of the media fast path (a ``CallerMediaSink``).

    With the fast path, caller audio goes from the transport straight to the VAD and
    the STT socket; the gate decides there, frame by frame, exactly as
    :class:`EchoGuardInput` does in the pipeline: echo reaches neither as speech.
    """

    # Wraps the call's own media sink: taken apart with the call (pipelines/dismantle.py).
    call_owned: ClassVar[bool] = True

    def __init__(self, guard: EchoGuard, inner: CallerMediaSink) -> None:
        """Gate ``inner``'s audio with ``guard``."""
        self._guard = guard
        self._inner = inner
        # What the caller's echo is replaced with: one frame, reused (a sink copies what
        # it keeps), not a new one per muted frame (most frames while the bot talks).
        self._silence: InputAudioRawFrame | None = None

    async def setup(self, setup: FrameProcessorSetup) -> None:
        """Pass through."""
        await self._inner.setup(setup)

    async def start(self) -> None:
        """Pass through."""
        await self._inner.start()

    async def stop(self) -> None:
        """Pass through."""
        await self._inner.stop()

    async def write(self, frame: InputAudioRawFrame) -> None:
        """One caller frame through the gate, then on to the fast path."""
        verdict, out = self._guard.judge(frame)
        if verdict is Verdict.MUTE:
            for f in out:
                await self._inner.write(self._silent_like(f))
            return
        for f in out:
            await self._inner.write(f)

    def _silent_like(self, frame: InputAudioRawFrame) -> InputAudioRawFrame:
        s = self._silence
        if (
            s is None
            or len(s.audio) != len(frame.audio)
            or s.sample_rate != frame.sample_rate
            or s.num_channels != frame.num_channels
        ):
            s = self._silence = _silent(frame)
        return s


class EchoGuardReference(FrameProcessor):
    """Feeds the bot's outgoing audio to the core; swaps backchannel transcripts."""

    def __init__(self, guard: EchoGuard, **kwargs: Any) -> None:
        """Bind to the call's guard."""
        # Direct mode: a synchronous measurement per frame needs no queue or task.
        kwargs.setdefault("enable_direct_mode", True)
        super().__init__(**kwargs)
        self._guard = guard

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Bot audio is measured and passed on; backchannels become ``UserBackchannelFrame``."""
        await super().process_frame(frame, direction)
        core = self._guard.core
        if (
            isinstance(frame, OutputAudioRawFrame)
            and direction is FrameDirection.DOWNSTREAM
            and not self._guard.timed_by_filter
        ):
            now = _now()
            rate = frame.sample_rate * frame.num_channels
            pieces = frame_levels_db(frame.audio, rate)
            total = len(frame.audio) / (2 * rate)
            for k, lv in enumerate(pieces):
                core.bot_audio(now, min(0.02, total - 0.02 * k), lv)
        elif isinstance(frame, InterruptionFrame):
            core.bot_interrupted(_now())
        elif isinstance(frame, TranscriptionFrame) and core.is_backchannel_now(_now(), frame.text):
            frame = UserBackchannelFrame(
                text=frame.text, user_id=frame.user_id, timestamp=frame.timestamp
            )
        await self.push_frame(frame, direction)


class EchoReferenceFilter(BaseAudioFilter):
    """Feeds the core each chunk of bot audio as the output transport writes it."""

    def __init__(self, core: EchoGuardCore) -> None:
        """Bind to the call's core."""
        self._core = core
        self._rate = 0
        self.active = False

    async def start(self, sample_rate: int) -> None:
        """The transport's output rate."""
        self._rate = sample_rate
        self.active = True

    async def stop(self) -> None:
        """Nothing to release."""
        self.active = False

    async def process_frame(self, frame: FilterControlFrame) -> None:
        """No controls."""

    async def filter(self, audio: bytes) -> bytes:
        """Measure and pass the audio through unchanged."""
        if self._rate and audio:
            now = _now()
            secs = len(audio) / (2 * self._rate)
            for k, lv in enumerate(frame_levels_db(audio, self._rate)):
                self._core.bot_audio(now, min(0.02, secs - 0.02 * k), lv)
        return audio


def _silent(frame: InputAudioRawFrame) -> InputAudioRawFrame:
    return InputAudioRawFrame(
        audio=bytes(len(frame.audio)),
        sample_rate=frame.sample_rate,
        num_channels=frame.num_channels,
    )
