"""The low-delay edge resampler: level, frequency, no aliasing, delay, chunking."""

from __future__ import annotations

import numpy as np
import pytest

from pipeswitch.transports.resample import LowDelayResampler, StreamResampler, edge_resampler

PAIRS = [(8000, 24000), (24000, 8000), (16000, 24000), (24000, 16000), (8000, 16000), (16000, 8000)]


def _tone(rate: int, hz: float, secs: float = 1.0, amp: float = 8000.0) -> bytes:
    t = np.arange(int(rate * secs)) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def _run(r: LowDelayResampler | StreamResampler, pcm: bytes, chunk: int) -> np.ndarray:
    """Feed ``chunk``-sample pieces, as a call does; the concatenated output."""
    step = 2 * chunk
    out = b"".join(r.process(pcm[i : i + step]) for i in range(0, len(pcm), step))
    return np.frombuffer(out, dtype="<i2").astype(np.float64)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x)))


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_a_tone_keeps_its_frequency_and_level(src: int, dst: int) -> None:
    y = _run(LowDelayResampler(src, dst), _tone(src, 1000.0), src // 50)
    assert y.size == dst  # one second in, one second out, nothing held back
    y = y[dst // 10 :]  # past the filter's start
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    assert np.argmax(spec) * dst / y.size == pytest.approx(1000.0, abs=2.0)
    assert _rms(y) == pytest.approx(8000 / np.sqrt(2), rel=0.02)


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_the_telephone_band_passes_flat(src: int, dst: int) -> None:
    edge = 0.85 * min(src, dst) / 2  # 3.4 kHz at 8 kHz
    y = _run(LowDelayResampler(src, dst), _tone(src, edge), src // 50)[dst // 10 :]
    assert 20 * np.log10(_rms(y) / (8000 / np.sqrt(2))) > -1.0


@pytest.mark.parametrize(("src", "dst"), [p for p in PAIRS if p[1] < p[0]])
def test_nothing_above_the_new_nyquist_aliases_into_the_band(src: int, dst: int) -> None:
    # 24 -> 8 kHz: 5 kHz would fold to 3 kHz, 7 kHz to 1 kHz.
    for hz in (dst / 2 + 250, dst / 2 * 1.5, src / 2 - 500):
        y = _run(LowDelayResampler(src, dst), _tone(src, hz), src // 50)[dst // 10 :]
        assert 20 * np.log10(_rms(y) / (8000 / np.sqrt(2)) + 1e-12) < -60, hz


@pytest.mark.parametrize(("src", "dst"), [p for p in PAIRS if p[1] > p[0]])
def test_upsampling_leaves_no_images_above_the_old_nyquist(src: int, dst: int) -> None:
    y = _run(LowDelayResampler(src, dst), _tone(src, 1000.0), src // 50)[dst // 10 :]
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size))) ** 2
    freqs = np.fft.rfftfreq(y.size, 1 / dst)
    image = spec[freqs > src / 2].sum() / spec.sum()
    assert 10 * np.log10(image + 1e-20) < -60


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_a_click_comes_out_of_the_same_chunk_within_four_ms(src: int, dst: int) -> None:
    """The delay the edge adds: the filter's group delay, nothing held in blocks."""
    r = LowDelayResampler(src, dst)
    chunk = src // 50
    x = np.zeros(chunk * 10, dtype="<i2")
    x[chunk * 5] = 20000  # at the start of the sixth 20 ms chunk
    outs = [r.process(x[i : i + chunk].tobytes()) for i in range(0, x.size, chunk)]
    sixth = np.frombuffer(outs[5], dtype="<i2")
    y = np.frombuffer(b"".join(outs), dtype="<i2")
    peak = int(np.argmax(np.abs(sixth)))
    assert abs(int(sixth[peak])) > 1000  # answered by the call that fed it
    delay_s = (int(np.argmax(np.abs(y))) - 5 * dst // 50) / dst
    assert delay_s == pytest.approx(r.group_delay_secs, abs=1.5 / dst)
    assert delay_s < 0.004


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_any_chunking_gives_the_same_audio(src: int, dst: int) -> None:
    pcm = _tone(src, 440.0, secs=0.1)
    whole = _run(LowDelayResampler(src, dst), pcm, len(pcm) // 2)
    for chunk in (7, src // 50, 333):
        assert np.array_equal(_run(LowDelayResampler(src, dst), pcm, chunk), whole), chunk


def test_ratios_the_filter_does_not_cover_go_to_soxr() -> None:
    assert isinstance(edge_resampler(8000, 24000), LowDelayResampler)
    assert isinstance(edge_resampler(48000, 8000), LowDelayResampler)
    assert isinstance(edge_resampler(44100, 16000), StreamResampler)
    with pytest.raises(ValueError):
        LowDelayResampler(44100, 16000)
