"""Stateful s16le resampling for the wire, only when the stream rate differs.

soxr's stream resampler at "VHQ" (Pipecat's default) releases audio in ~100 ms
bursts at telephone chunk sizes; "HQ" releases every 20-40 ms, which keeps the
caller-audio path's added delay at one or two frames.
"""

from __future__ import annotations

import numpy as np
import soxr


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
