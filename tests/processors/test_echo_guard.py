"""Echo guard: the decision core (no clock, no frames) and its processors in a pipeline."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    UserBackchannelFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from pipeswitch.processors import echo_guard
from pipeswitch.processors.echo_guard import (
    NOISE_EVERY,
    EchoGuard,
    EchoGuardCore,
    EchoGuardParams,
    Verdict,
    is_backchannel,
    level_db,
)

F = 0.02  # one 20 ms frame


def run_frames(core: EchoGuardCore, t0: float, levels: list[float]) -> list[Verdict]:
    return [core.caller_frame(t0 + (i + 1) * F, F, lv) for i, lv in enumerate(levels)]


def bot_speaks(core: EchoGuardCore, t0: float, secs: float, level: float = -20.0) -> None:
    """The bot's audio arrives in one burst (providers stream faster than real time)."""
    for _ in range(round(secs / F)):
        core.bot_audio(t0, F, level)


def speech_envelope(n: int, seed: int = 0) -> list[float]:
    """Per-20 ms levels of speech-like bot audio: syllables and pauses, -12..-45 dBFS."""
    rng = np.random.default_rng(seed)
    env = -22.0 + 8.0 * np.sin(np.arange(n) * 2 * np.pi / 12.0) + rng.normal(0, 3.0, n)
    env[rng.random(n) < 0.1] = -45.0
    return [float(x) for x in np.clip(env, -45.0, -12.0)]


def bot_and_echo(
    core: EchoGuardCore, secs: float, erl: float, lag: int, seed: int = 0
) -> list[Verdict]:
    """The bot speaks from t=0; its echo (``lag`` frames late, ``erl`` dB) plus -60 dBFS noise."""
    n = round(secs / F)
    env = speech_envelope(n, seed)
    for lv in env:
        core.bot_audio(0.0, F, lv)
    rng = np.random.default_rng(seed + 1)
    out = []
    for k in range(n):
        echo = env[k - lag] + erl if k >= lag else -90.0
        power = 10 ** (echo / 10) + 10 ** (-60 / 10)
        level = 10 * np.log10(power) + rng.normal(0, 1.0)
        out.append(core.caller_frame((k + 1) * F, F, float(level)))
    return out


@pytest.mark.parametrize("erl", [-10.0, -15.0, -20.0, -25.0])
@pytest.mark.parametrize("lag", [2, 6, 12])
def test_echo_alone_is_muted_and_never_a_barge_in(erl: float, lag: int) -> None:
    core = EchoGuardCore()
    verdicts = bot_and_echo(core, 8.0, erl, lag)
    assert Verdict.BARGE_IN not in verdicts
    assert verdicts.count(Verdict.MUTE) > 350
    assert core.stats.barge_ins == 0


def test_echo_path_is_learnt() -> None:
    core = EchoGuardCore()
    bot_and_echo(core, 6.0, -20.0, 5)
    path = core.path
    assert path is not None
    delay, erl, spread = path
    assert delay == pytest.approx(0.10, abs=0.021)
    assert -22.0 < erl < -18.0
    assert spread < 3.0


def test_caller_over_bot_barges_in_after_min_speech() -> None:
    p = EchoGuardParams(min_speech_secs=0.2)
    core = EchoGuardCore(p)
    bot_speaks(core, 0.0, 4.0)
    run_frames(core, 0.0, [-35.0] * 50)  # echo only, the estimate settles at -15 dB
    verdicts = run_frames(core, 1.0, [-18.0] * 15)
    first = verdicts.index(Verdict.BARGE_IN)
    assert verdicts[:first] == [Verdict.HOLD] * first
    assert (first + 1) * F == pytest.approx(0.2)
    assert core.stats.barge_ins == 1


def test_soft_speech_learnt_as_echo_never_raises_the_bar_above_the_cautious_rule() -> None:
    # The caller talks over the greeting, a little softer than the bot, on a line with
    # no echo: what falls under the threshold is learnt as if it were echo, and the
    # "path" fitted to their voice says the echo is nearly as loud as the bot.
    core = EchoGuardCore()
    bot_levels = speech_envelope(200, seed=3)
    for lv in bot_levels:
        core.bot_audio(0.0, F, lv)
    caller = [-96.0] * 10 + [lv - 4.0 for lv in speech_envelope(110, seed=7)]
    run_frames(core, 0.0, caller)
    assert core.path is not None
    # Still over the bot: speech louder than the loudest bot audio in the delay window
    # by the margin interrupts, as it would have before anything was learnt.
    t = len(caller) * F
    cautious = max(bot_levels) + core.p.initial_erl_db + 4.0
    echo = core.expected_echo(t + F)
    assert echo is not None and echo <= cautious + 1e-9
    loud = cautious + core.p.echo_margin_db + 1.0
    assert Verdict.BARGE_IN in run_frames(core, t, [loud] * 10)


def test_short_burst_over_bot_is_rejected() -> None:
    core = EchoGuardCore()
    bot_speaks(core, 0.0, 4.0)
    run_frames(core, 0.0, [-35.0] * 50)
    verdicts = run_frames(core, 1.0, [-18.0] * 5 + [-36.0] * 10)  # a 100 ms cough
    assert Verdict.BARGE_IN not in verdicts
    assert core.stats.rejected == 1


def test_barge_in_after_bot_interrupted_and_silence_passes() -> None:
    core = EchoGuardCore()
    bot_speaks(core, 0.0, 4.0)
    run_frames(core, 0.0, [-35.0] * 10)
    core.bot_interrupted(0.25)
    later = run_frames(core, 1.0, [-20.0] * 3)
    assert later == [Verdict.PASS] * 3


def test_pending_candidate_becomes_turn_when_bot_stops() -> None:
    core = EchoGuardCore()
    bot_speaks(core, 0.0, 0.3)
    v = run_frames(core, 0.0, [-15.0] * 5)
    assert v == [Verdict.HOLD] * 5
    # The bot's audio (and its echo tail) is over; the caller is still talking.
    assert core.caller_frame(1.0, F, -15.0) is Verdict.BARGE_IN


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mm-hm.", True),
        ("Okay.", True),
        ("yeah, right", True),
        ("Uh-huh", True),
        ("Okay, but what about Sunday?", False),
        ("Hold on", False),
        ("", False),
    ],
)
def test_backchannel_words(text: str, expected: bool) -> None:
    assert is_backchannel(text) is expected


def test_backchannel_only_while_bot_was_audible() -> None:
    core = EchoGuardCore()
    assert not core.is_backchannel_now(0.0, "okay")
    bot_speaks(core, 0.0, 2.0)
    core.caller_frame(1.0, F, -60.0)
    assert core.is_backchannel_now(1.5, "okay")
    assert not core.is_backchannel_now(1.5, "okay what time")
    assert not core.is_backchannel_now(10.0, "okay")  # long after the bot stopped


def _gated(core: EchoGuardCore, t0: float, levels: list[float]) -> int:
    """Feed frames as the gate does (the level only where needed); returns how many
    frames were measured."""
    measured = 0
    for i, lv in enumerate(levels):
        now = t0 + (i + 1) * F
        if not core.passes_unmeasured(now):
            measured += 1
            core.caller_frame(now, F, lv)
    return measured


def test_noise_floor_sampled_while_the_bot_is_silent_creeps_as_fast_per_second() -> None:
    every, sampled = EchoGuardCore(), EchoGuardCore()
    levels = [-62.0] * 10 + [-55.0] * 100  # the line gets noisier for two seconds
    run_frames(every, 0.0, levels)
    measured = _gated(sampled, 0.0, levels)
    assert measured == len(levels) // NOISE_EVERY
    assert every.noise_db > -58.0  # it did creep
    assert sampled.noise_db == pytest.approx(every.noise_db, abs=0.5)


def test_every_frame_is_measured_while_the_bot_is_audible_or_speech_is_held() -> None:
    core = EchoGuardCore()
    bot_speaks(core, 0.0, 0.4)
    # The bot plays 0-0.4 s; its echo may come up to max_lag + tail later.
    assert not any(core.passes_unmeasured(0.02 * k) for k in range(1, 50))
    assert run_frames(core, 0.0, [-15.0] * 3) == [Verdict.HOLD] * 3
    # Long after the bot, a held candidate still needs its level (it becomes the turn).
    assert not core.passes_unmeasured(5.0)
    assert core.caller_frame(5.0, F, -15.0) is Verdict.BARGE_IN


def test_gate_measures_one_frame_in_noise_every_while_the_bot_is_silent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bytes] = []

    def counting(pcm: bytes) -> float:
        calls.append(pcm)
        return level_db(pcm)

    monkeypatch.setattr(echo_guard, "level_db", counting)
    guard = EchoGuard()
    frame = InputAudioRawFrame(audio=_pcm(-50.0), sample_rate=8000, num_channels=1)
    out = [guard.gate(frame) for _ in range(8 * NOISE_EVERY)]
    assert all(v is Verdict.PASS and fs == [frame] for v, fs in out)
    assert len(calls) == 8
    guard.core.bot_audio(time.monotonic(), 1.0, -20.0)
    calls.clear()
    for _ in range(5):
        guard.gate(frame)
    assert len(calls) == 5  # the bot is audible: every frame is judged


def test_level_db() -> None:
    tone = (np.sin(np.arange(160) / 3.0) * 3276.8).astype("<i2").tobytes()
    assert level_db(tone) == pytest.approx(-23.0, abs=0.5)
    assert level_db(bytes(320)) < -90


# -- processors in a pipeline ------------------------------------------------------


def _pcm(level: float, secs: float = F, rate: int = 8000) -> bytes:
    n = int(rate * secs)
    amp = 32768.0 * 10 ** (level / 20.0) * np.sqrt(2)
    return (np.sin(np.arange(n) * 0.3) * amp).astype("<i2").tobytes()


class _Pace(FrameProcessor):
    """Lets each caller frame take its real 20 ms, as the transport delivers them."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await asyncio.sleep(F)
        await self.push_frame(frame, direction)


async def test_processors_mute_echo_and_release_a_barge_in() -> None:
    guard = EchoGuard(EchoGuardParams(min_speech_secs=0.1))
    bot = [TTSAudioRawFrame(audio=_pcm(-20.0, 1.0), sample_rate=8000, num_channels=1)]
    echo = [InputAudioRawFrame(audio=_pcm(-38.0), sample_rate=8000, num_channels=1)] * 20
    voice = [InputAudioRawFrame(audio=_pcm(-14.0), sample_rate=8000, num_channels=1)] * 8
    pipeline = Pipeline([_Pace(), guard.input(), guard.reference()])
    down, up = await run_test(
        pipeline,
        frames_to_send=[*bot, SleepFrame(0.05), *echo, *voice],
        expected_down_frames=None,
        expected_up_frames=None,
    )
    audio = [f for f in down if isinstance(f, InputAudioRawFrame)]
    muted = [f for f in audio if not any(f.audio)]
    assert len(muted) >= 15, "echo over the bot went through"
    released = [f for f in audio if any(f.audio) and level_db(f.audio) > -20]
    assert len(released) == 8, "the barge-in (onset included) was not released"
    assert any(isinstance(f, InterruptionFrame) for f in up)
    assert guard.core.stats.barge_ins == 1


async def test_reference_swaps_backchannel_transcripts() -> None:
    guard = EchoGuard()
    guard.core.bot_audio(time.monotonic(), 3600.0, -20.0)  # the bot talks throughout
    frames = [
        TranscriptionFrame("Mm-hm.", "caller", "t"),
        TranscriptionFrame("What about Sunday?", "caller", "t"),
    ]
    down, _ = await run_test(
        Pipeline([guard.reference()]),
        frames_to_send=frames,
        expected_down_frames=[UserBackchannelFrame, TranscriptionFrame],
    )
    assert isinstance(down[1], TranscriptionFrame) and down[1].text == "What about Sunday?"


class _Sink:
    """A media fast path stand-in: records what the gate let through."""

    def __init__(self) -> None:
        self.frames: list[InputAudioRawFrame] = []

    async def setup(self, setup: object) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def write(self, frame: InputAudioRawFrame) -> None:
        self.frames.append(frame)


async def _feed(sink: object, frames: list[InputAudioRawFrame]) -> None:
    for f in frames:
        await sink.write(f)  # type: ignore[attr-defined]
        await asyncio.sleep(F)  # the transport delivers one frame per 20 ms


async def test_greeting_played_outside_the_pipeline_is_covered() -> None:
    """The greeting goes out through the transport's prompt tap, not the pipeline: its
    echo is muted all the same, and a caller talking over it still gets through."""
    guard = EchoGuard(EchoGuardParams(min_speech_secs=0.1))
    sink = _Sink()
    gated = guard.sink(sink)
    guard.prompt_tap(_pcm(-20.0, 1.5), 8000)  # the greeting starts playing now
    echo = [InputAudioRawFrame(audio=_pcm(-38.0), sample_rate=8000, num_channels=1)] * 20
    voice = [InputAudioRawFrame(audio=_pcm(-14.0), sample_rate=8000, num_channels=1)] * 8
    await _feed(gated, [*echo, *voice])
    muted = [f for f in sink.frames if not any(f.audio)]
    assert len(muted) >= 15, "the greeting's echo reached the VAD/STT"
    assert len([f for f in sink.frames if level_db(f.audio) > -20]) == 8
    assert guard.core.stats.barge_ins == 1


async def test_without_the_prompt_tap_greeting_echo_would_pass() -> None:
    """The case the tap fixes: the guard does not know the bot is talking."""
    guard = EchoGuard(EchoGuardParams(min_speech_secs=0.1))
    sink = _Sink()
    echo = [InputAudioRawFrame(audio=_pcm(-38.0), sample_rate=8000, num_channels=1)] * 10
    await _feed(guard.sink(sink), echo)
    assert all(any(f.audio) for f in sink.frames)


async def test_the_sink_sends_one_reused_silent_frame_for_echo_of_its_length() -> None:
    """Muted echo reaches the fast path as silence of the same length; the silent frame is
    made once, not per frame (a sink copies what it keeps), and remade when the size changes."""
    guard = EchoGuard(EchoGuardParams(min_speech_secs=0.1))
    sink = _Sink()
    guard.prompt_tap(_pcm(-20.0, 1.5), 8000)
    echo = [InputAudioRawFrame(audio=_pcm(-38.0), sample_rate=8000, num_channels=1)] * 6
    longer = InputAudioRawFrame(audio=_pcm(-38.0) * 2, sample_rate=8000, num_channels=1)
    await _feed(guard.sink(sink), [*echo, longer])
    muted = [f for f in sink.frames if not any(f.audio)]
    assert len(muted) == 7
    assert len({id(f) for f in muted[:-1]}) == 1
    assert all(len(f.audio) == len(echo[0].audio) for f in muted[:-1])
    assert len(muted[-1].audio) == 2 * len(echo[0].audio) and muted[-1] is not muted[0]


@pytest.mark.parametrize("seed", range(5))
def test_expected_echo_matches_the_window_rule_written_out(seed: int) -> None:
    """The window's loudest bot level (looked up in C) is the plain max over the slots
    that hold bot audio, learnt path or not."""
    rng = np.random.default_rng(seed)
    core = EchoGuardCore()
    slots = rng.choice(np.arange(0, 200), size=60, replace=False)
    for s in slots:
        core._bot[int(s)] = float(rng.uniform(-45.0, -10.0))
    cautious = core.p.initial_erl_db + 4.0
    for slot in range(0, 220, 3):
        window = [core._bot[s] for s in range(slot - core._n_lags, slot + 1) if s in core._bot]
        want = max(window) + cautious if window else None
        got = core.expected_echo(slot * F)
        assert got == pytest.approx(want) if want is not None else got is None
