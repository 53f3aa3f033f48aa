"""The shared, batched Silero analyzer decides exactly like Pipecat's own."""

from __future__ import annotations

import asyncio
import math
import threading
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams, VADState

from pipeswitch.pipelines.vad import BatchedSileroVADAnalyzer, SileroBatcher, SileroState


def question() -> bytes:
    """Real speech (Piper, 8 kHz): Silero rejects synthetic vowel-like signals."""
    with wave.open(str(Path(__file__).parent.parent / "fixtures" / "question_8k.wav")) as w:
        return w.readframes(w.getnframes())


def voiced(seconds: float, rate: int, f0: float = 140.0, seed: int = 0) -> bytes:
    """A crude vowel-like signal: harmonics of a wobbling pitch, syllable envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = f0 * (1 + 0.05 * np.sin(2 * math.pi * 3 * t))
    phase = 2 * math.pi * np.cumsum(pitch) / rate
    sig = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 + 0.5 * np.sin(2 * math.pi * 4 * t) ** 2
    sig = sig * env + 0.02 * rng.standard_normal(len(t))
    return (sig / np.max(np.abs(sig)) * 12000).astype("<i2").tobytes()


async def states(analyzer: object, pcm: bytes, chunk: int) -> list[VADState]:
    out = []
    for i in range(0, len(pcm), chunk):
        out.append(await analyzer.analyze_audio(pcm[i : i + chunk]))  # type: ignore[attr-defined]
    return out


async def test_confidences_match_pipecat_silero() -> None:
    rate = 8000
    pcm = bytes(8000) + question() + voiced(0.5, rate) + bytes(16000)
    params = VADParams(min_volume=0.0)
    ref = SileroVADAnalyzer(sample_rate=rate, params=params)
    ref.set_sample_rate(rate)
    ours = BatchedSileroVADAnalyzer(sample_rate=rate, params=params, batcher=SileroBatcher())
    ours.set_sample_rate(rate)
    need = ref.num_frames_required() * 2
    ref_conf = [
        np.asarray(ref.voice_confidence(pcm[i : i + need])).item()
        for i in range(0, len(pcm) - need + 1, need)
    ]
    ours_conf = []
    st = ours._silero
    assert st is not None
    for i in range(0, len(pcm) - need + 1, need):
        ours_conf.append(await ours._batcher.infer(st, pcm[i : i + need]))
    # Pipecat resets its model state after 2 s of audio; compare the windows before that.
    n = int(2.0 * rate // (need // 2))
    assert np.allclose(ref_conf[:n], ours_conf[:n], atol=1e-4)
    assert max(ref_conf[:n]) > 0.9  # the clip really contains speech


async def test_state_machine_matches_and_calls_do_not_share_state() -> None:
    rate = 8000
    speech = bytes(8000) + question() + bytes(16000)
    # The neighbour hears a fan (-45 dBFS): scored, never speech.
    silence = np.random.default_rng(5).integers(-180, 181, len(speech) // 2).astype("<i2").tobytes()
    params = VADParams(min_volume=0.0)
    batcher = SileroBatcher()
    ref = SileroVADAnalyzer(sample_rate=rate, params=params)
    ref.set_sample_rate(rate)
    expected = await states(ref, speech, 320)
    a = BatchedSileroVADAnalyzer(sample_rate=rate, params=params, batcher=batcher)
    b = BatchedSileroVADAnalyzer(sample_rate=rate, params=params, batcher=batcher)
    a.set_sample_rate(rate)
    b.set_sample_rate(rate)
    got_a, got_b = await asyncio.gather(states(a, speech, 320), states(b, silence, 320))
    assert VADState.SPEAKING in expected
    assert got_a == expected  # same decisions, frame for frame
    assert set(got_b) == {VADState.QUIET}  # the neighbour's speech did not leak in
    assert batcher.batches < batcher.windows  # windows from both calls shared batches


def scaled(pcm: bytes, peak: int) -> bytes:
    a = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return np.round(a * (peak / np.max(np.abs(a)))).astype("<i2").tobytes()


def transitions(seq: list[VADState]) -> list[tuple[int, VADState]]:
    """(frame index, new state) at each change."""
    return [(i, x) for i, x in enumerate(seq) if i == 0 or seq[i - 1] != x]


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_quiet_windows_are_not_scored_and_decisions_do_not_change(rate: int) -> None:
    """A listening caller (digital zeros, a line's idle noise below -60 dBFS) costs no
    inference once the state is reset; starts and stops are Pipecat's, frame for frame."""
    rng = np.random.default_rng(3)
    q = question()
    if rate != 8000:
        q = soxr.resample(np.frombuffer(q, dtype="<i2"), 8000, rate).astype("<i2").tobytes()
    half = rate  # bytes in 0.5 s
    for idle in (bytes(2 * half), rng.integers(-20, 21, half).astype("<i2").tobytes()):
        pcm = bytes(half) + idle + q + bytes(2 * half) + idle + q + bytes(half)
        params = VADParams(min_volume=0.0)
        ref = SileroVADAnalyzer(sample_rate=rate, params=params)
        ref.set_sample_rate(rate)
        frame = rate // 25  # bytes in 20 ms
        expected = await states(ref, pcm, frame)
        batcher = SileroBatcher()
        ours = BatchedSileroVADAnalyzer(sample_rate=rate, params=params, batcher=batcher)
        ours.set_sample_rate(rate)
        got = await states(ours, pcm, frame)
        assert expected.count(VADState.SPEAKING) > 100
        if rate == 8000:
            assert got == expected  # same starts and stops, frame for frame
        else:
            # At 16 kHz the model hears even sub-gate sound (the question's -70 dBFS lead-in,
            # a line's idle noise): a start may move by up to two frames, either way.
            want, have = transitions(expected), transitions(got)
            assert [s for _, s in have] == [s for _, s in want]
            assert all(abs(a - b) <= 2 for (a, _), (b, _) in zip(have, want, strict=True))
        windows = len(pcm) // (2 * ours.num_frames_required())
        assert batcher.windows + batcher.skipped == windows
        # The 1.5 s before the first question and most of the 1.5 s before the second.
        assert batcher.skipped >= 2.5 * rate / ours.num_frames_required(), batcher.skipped


async def test_quiet_talker_is_still_scored_and_heard() -> None:
    """The gate is far below speech: a talker at -40 dBFS peak is scored and detected."""
    rate = 8000
    soft = scaled(question(), 330)  # -40 dBFS peak
    params = VADParams(min_volume=0.0)
    batcher = SileroBatcher()
    ours = BatchedSileroVADAnalyzer(sample_rate=rate, params=params, batcher=batcher)
    ours.set_sample_rate(rate)
    got = await states(ours, bytes(4000) + soft + bytes(8000), 320)
    assert VADState.SPEAKING in got
    assert batcher.windows >= 0.7 * len(soft) // 512  # its pauses are near -60 dBFS


async def test_windows_arriving_while_a_batch_runs_go_together_as_the_next() -> None:
    """One batch in flight: what comes meanwhile waits and is scored as one batch."""
    batcher = SileroBatcher()
    real_run = batcher._run
    started = threading.Event()
    release = threading.Event()

    def slow_run(x: np.ndarray, state: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
        started.set()
        release.wait(5.0)
        return real_run(x, state, sr)

    batcher._run = slow_run  # type: ignore[method-assign]
    window = scaled(question()[:512], 8000)
    calls = [SileroState(8000) for _ in range(6)]
    first = batcher.infer(calls[0], window)
    await asyncio.to_thread(started.wait, 5.0)
    rest = [batcher.infer(st, window) for st in calls[1:]]
    await asyncio.sleep(0.05)  # several loop ticks: nothing else may be submitted
    assert batcher.batches == 1
    release.set()
    confs = await asyncio.gather(first, *rest)
    assert batcher.batches == 2 and batcher.windows == 6
    # Same window, fresh state: the lone first and the five batched agree.
    assert np.allclose(confs, confs[0], atol=1e-5)


async def test_a_failed_batch_fails_its_windows_and_the_next_still_runs() -> None:
    batcher = SileroBatcher()
    real_run = batcher._run
    fail = [True]

    def flaky(x: np.ndarray, state: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
        if fail[0]:
            fail[0] = False
            raise RuntimeError("onnx failed")
        return real_run(x, state, sr)

    batcher._run = flaky  # type: ignore[method-assign]
    window = bytes(512)
    with pytest.raises(RuntimeError, match="onnx failed"):
        await batcher.infer(SileroState(8000), window)
    assert 0.0 <= await batcher.infer(SileroState(8000), window) < 0.5


@pytest.mark.asyncio
async def test_silero_thread_niceness_is_settable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bench experiment ``silero-nice``: the model's thread yields the CPU to the loop."""
    import os

    import pipeswitch.pipelines.vad as vad

    monkeypatch.setattr(vad, "SILERO_NICE", 5)
    batcher = SileroBatcher()
    seen: list[int] = []
    try:
        await batcher.infer(SileroState(8000), bytes(512))
        loop = asyncio.get_running_loop()
        seen.append(
            await loop.run_in_executor(
                batcher._executor,
                lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
            )
        )
    finally:
        batcher.close()
    assert seen == [os.getpriority(os.PRIO_PROCESS, 0) + 5]
