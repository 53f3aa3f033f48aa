"""The emulated caller's line: digital silence by default, or a line's noise under everything."""

from __future__ import annotations

import numpy as np

from pipeswitch.bench.fakeswitch.media import CallerSource

FB = 320  # 20 ms at 8 kHz


def _rms_dbfs(frame: bytes | memoryview) -> float:
    x = np.frombuffer(bytes(frame), dtype="<i2").astype(np.float64)
    return float(20 * np.log10(np.sqrt(np.mean(x * x)) / 32768.0))


def _speech() -> bytes:
    t = np.arange(8000) / 8000
    tone = 8000 * np.sin(2 * np.pi * 300 * t) * (t < 0.5)  # 0.5 s "speech", 0.5 s pause
    return tone.astype("<i2").tobytes()


def test_default_line_is_digital_silence() -> None:
    src = CallerSource(FB, 300.0)
    frame, voiced = src.next()
    assert bytes(frame) == bytes(FB) and not voiced


def test_line_noise_under_silence_and_speech_keeps_the_voiced_flags() -> None:
    quiet = CallerSource(FB, 300.0)
    noisy = CallerSource(FB, 300.0, noise_dbfs=-50.0)
    idle = [noisy.next() for _ in range(120)]  # more than the 1 s the noise cycles through
    levels = [_rms_dbfs(f) for f, _ in idle]
    assert all(-52.0 < lv < -48.0 for lv in levels), (min(levels), max(levels))
    assert not any(v for _, v in idle)
    assert len({bytes(f) for f, _ in idle[:50]}) == 50  # not one frame repeated

    quiet.queue(_speech())
    noisy.queue(_speech())
    a = [quiet.next() for _ in range(50)]
    b = [noisy.next() for _ in range(50)]
    assert [v for _, v in a] == [v for _, v in b]  # flags from the speech, not the noise
    assert sum(v for _, v in b) == 25
    diff = [
        np.frombuffer(bytes(fb), "<i2").astype(int) - np.frombuffer(bytes(fa), "<i2")
        for (fa, _), (fb, _) in zip(a, b, strict=True)
    ]
    noise = np.concatenate(diff).astype(np.float64)
    assert -52.0 < 20 * np.log10(np.sqrt(np.mean(noise**2)) / 32768) < -48.0
