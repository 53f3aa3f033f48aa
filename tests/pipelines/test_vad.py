"""The shared, batched Silero analyzer decides exactly like Pipecat's own."""

from __future__ import annotations

import asyncio
import math
import wave
from pathlib import Path

import numpy as np
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams, VADState

from pipeswitch.pipelines.vad import BatchedSileroVADAnalyzer, SileroBatcher


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
    silence = bytes(len(speech))
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
