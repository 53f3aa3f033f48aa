"""Stateful s16le resampling for the wire, only when the stream rate differs.

Two kinds, one interface (``in_rate``, ``out_rate``, ``process``):

* :class:`StreamResampler` - soxr's stream resampler. soxr aligns its output (no
  group delay) by holding audio back: at 20 ms chunks "HQ" releases 8 -> 24 kHz
  audio 60 ms late, 16 <-> 24 kHz 20 ms late ("VHQ", Pipecat's default, 60-80 ms).
  Fine for prompts and the cascade's TTS, where nobody waits on the first 60 ms.
* :class:`LowDelayResampler` - a polyphase windowed-sinc FIR for small integer
  ratios (8 <-> 16 <-> 24 <-> 48 kHz). Every input chunk comes straight back
  resampled; the only delay is the filter's group delay (1.5-3.6 ms). It is what
  the speech-to-speech edges use (:func:`edge_resampler`), where every millisecond
  of holding is server overhead on each turn.
"""

from __future__ import annotations

from math import gcd
from typing import Any, Protocol

import numpy as np
import soxr

# Passband edge as a fraction of the lower Nyquist frequency (3.4 kHz at 8 kHz, the
# telephone band); the stopband starts at that Nyquist, so nothing aliases.
PASSBAND = 0.85
STOPBAND_DB = 70.0
# Largest up/down factor the FIR handles; other ratios (44.1 kHz) go to soxr.
MAX_FACTOR = 6


class Resampler(Protocol):
    """One direction of one call's audio at a fixed rate pair."""

    in_rate: int
    out_rate: int

    def process(self, pcm: bytes) -> bytes:
        """Resample a chunk of s16le mono (filter state carries to the next chunk)."""
        ...


class StreamResampler:
    """One direction of one call (soxr keeps filter state between chunks)."""

    __slots__ = ("in_rate", "out_rate", "_stream")

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)

    def process(self, pcm: bytes) -> bytes:
        """Resample a chunk; output may be empty while the filter fills."""
        out = self._stream.resample_chunk(np.frombuffer(pcm, dtype="<i2"))
        return out.tobytes()


def _design(up: int, down: int, in_rate: int) -> list[np.ndarray[Any, np.dtype[np.float32]]]:
    """Kaiser-windowed sinc low-pass at ``up * in_rate``, split into ``up`` phases.

    Phase ``p`` holds taps ``h[p], h[p + up], ...``, scaled by ``up`` so a zero-stuffed
    signal keeps its level: filtered sample ``k * up + p`` is
    ``sum_i x[k - i] * h[p + i * up]``, one ``np.convolve`` per phase.
    """
    fs = up * in_rate
    nyq = min(in_rate, in_rate * up // down) / 2
    f_pass, f_stop = PASSBAND * nyq, nyq
    width = 2 * np.pi * (f_stop - f_pass) / fs
    n = int(np.ceil((STOPBAND_DB - 7.95) / (2.285 * width))) + 1
    n = -(-n // up) * up
    beta = 0.1102 * (STOPBAND_DB - 8.7)
    t = np.arange(n) - (n - 1) / 2
    fc = (f_pass + f_stop) / 2 / fs
    h = 2 * fc * np.sinc(2 * fc * t) * np.kaiser(n, beta)
    h *= up / h.sum()
    return [np.ascontiguousarray(h[p::up], dtype=np.float32) for p in range(up)]


class LowDelayResampler:
    """Polyphase FIR resampler for ``out/in = up/down`` with both factors <= 6.

    Each call returns the resampled chunk at once (``len * up / down`` samples, the
    fraction carried), so nothing waits for a block to fill. Linear phase: the delay
    is ``group_delay_secs``, constant, and the same for every frequency.
    """

    __slots__ = ("in_rate", "out_rate", "up", "down", "_phases", "_hist", "_skip", "_ntaps")

    def __init__(self, in_rate: int, out_rate: int) -> None:
        g = gcd(in_rate, out_rate)
        up, down = out_rate // g, in_rate // g
        if up > MAX_FACTOR or down > MAX_FACTOR:
            raise ValueError(f"{in_rate} -> {out_rate} Hz is not a small integer ratio")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.up = up
        self.down = down
        self._phases = _design(up, down, in_rate)
        self._ntaps = sum(p.size for p in self._phases)
        self._hist = np.zeros(self._phases[0].size - 1, dtype=np.float32)
        # Filtered samples (at up * in_rate) to drop before the next one kept.
        self._skip = 0

    @property
    def group_delay_secs(self) -> float:
        """The filter's delay (half its length at the up-sampled rate)."""
        return (self._ntaps - 1) / 2 / (self.up * self.in_rate)

    def process(self, pcm: bytes) -> bytes:
        """Resample a chunk; every input sample is answered now."""
        x = np.frombuffer(pcm, dtype="<i2")
        if x.size == 0:
            return b""
        buf = np.concatenate((self._hist, x.astype(np.float32)))
        self._hist = buf[x.size :]
        if self.up == 1:
            y = np.convolve(buf, self._phases[0], "valid")[self._skip :: self.down]
        else:
            full = np.empty((x.size, self.up), dtype=np.float32)
            for p, taps in enumerate(self._phases):
                full[:, p] = np.convolve(buf, taps, "valid")
            y = full.reshape(-1)[self._skip :: self.down]
        self._skip = (self._skip - x.size * self.up) % self.down
        np.rint(y, out=y)
        np.clip(y, -32768.0, 32767.0, out=y)
        return y.astype("<i2").tobytes()


def edge_resampler(in_rate: int, out_rate: int) -> Resampler:
    """The speech-to-speech edges' resampler: low delay where the ratio allows."""
    g = gcd(in_rate, out_rate)
    if max(out_rate // g, in_rate // g) <= MAX_FACTOR:
        return LowDelayResampler(in_rate, out_rate)
    return StreamResampler(in_rate, out_rate)
