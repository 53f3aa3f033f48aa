"""The media path of the emulated channel: caller audio, write buffer, media bug.

Why here: the 20 ms tick must only slice precomputed bytes. Caller audio is
cut into frames (with "voiced" flags) when it is queued; the write buffer
hands out whole frames without reallocating; the media bug decides which
BINARY payloads leave, exactly as the FreeSWITCH core and the module do.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import numpy as np

from pipeswitch.bench.fakeswitch.audio import voiced_flags

__all__ = ["MAX_BUG_BUFFER", "CallerSource", "MediaBug", "WriteBuffer"]

MAX_BUG_BUFFER = 1024 * 512  # FreeSWITCH media-bug buffer limit (bytes per direction)


class CallerSource:
    """Caller (read-leg) audio queued ahead of time and handed out one frame per tick.

    Silence is returned when nothing is queued: a real channel keeps reading
    media while the caller says nothing. A trailing partial frame is zero-padded.
    ``noise_dbfs`` puts a line's noise (white, that RMS level) under everything the
    caller sends, silence included; None sends digital silence (a quiet line, a
    muted phone, silence suppression). Speech is flagged voiced before the noise.
    """

    def __init__(
        self, frame_bytes: int, rms_threshold: float, noise_dbfs: float | None = None
    ) -> None:
        self.frame_bytes = frame_bytes
        self.silence = bytes(frame_bytes)
        self._rms = rms_threshold
        self._noise: np.ndarray | None = None
        self._noise_frames: list[memoryview] = []
        self._noise_pos = 0
        if noise_dbfs is not None:
            # One second, cycled: the 20 ms tick only slices precomputed bytes.
            rng = np.random.default_rng()
            n = 50 * (frame_bytes // 2)
            level = 32768.0 * 10 ** (noise_dbfs / 20)
            self._noise = np.clip(rng.standard_normal(n) * level, -32768, 32767).astype("<i2")
            view = memoryview(self._noise.tobytes())
            self._noise_frames = [view[i : i + frame_bytes] for i in range(0, 2 * n, frame_bytes)]
        self._segments: deque[tuple[bytes, list[bool]]] = deque()
        self._pos = 0
        self._queued = 0
        self.drained = asyncio.Event()
        self.drained.set()

    def queue(self, pcm: bytes | bytearray | memoryview) -> int:
        """Queue s16le mono PCM; returns the number of 20 ms frames added."""
        fb = self.frame_bytes
        data = bytes(pcm)
        if not data:
            return 0
        pad = -len(data) % fb
        if pad:
            data += bytes(pad)
        flags = voiced_flags(data, fb // 2, self._rms).tolist()
        if self._noise is not None:
            x = np.frombuffer(data, dtype="<i2").astype(np.int32)
            reps = -(-len(x) // len(self._noise))
            x += np.tile(self._noise, reps)[: len(x)]
            data = np.clip(x, -32768, 32767).astype("<i2").tobytes()
        self._segments.append((data, flags))
        self._queued += len(flags)
        self.drained.clear()
        return len(flags)

    def clear(self) -> None:
        """Drop everything queued (the caller stops talking at once)."""
        self._segments.clear()
        self._pos = 0
        self._queued = 0
        self.drained.set()

    @property
    def queued_frames(self) -> int:
        """Frames still to be spoken."""
        return self._queued

    def next(self) -> tuple[bytes | memoryview, bool]:
        """The next frame and whether it is voiced (silence when idle)."""
        if not self._segments:
            if self._noise_frames:
                self._noise_pos = (self._noise_pos + 1) % len(self._noise_frames)
                return self._noise_frames[self._noise_pos], False
            return self.silence, False
        data, flags = self._segments[0]
        i = self._pos
        fb = self.frame_bytes
        frame = memoryview(data)[i * fb : (i + 1) * fb]
        voiced = flags[i]
        self._queued -= 1
        if i + 1 == len(flags):
            self._segments.popleft()
            self._pos = 0
            if not self._segments:
                self.drained.set()
        else:
            self._pos = i + 1
        return frame, voiced


class WriteBuffer:
    """Audio waiting to be played to the caller (the channel's write leg).

    ``capacity`` None means unbounded (community files, cloudfieldcz checks
    its own 640000-byte limit); voxcom's buffer is one forward buffer long.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._buf = bytearray()
        self.high_water = 0  # the most bytes it held (how far ahead the server sent)

    def __len__(self) -> int:
        return len(self._buf)

    def space(self) -> int:
        """Bytes that still fit (a large number when unbounded)."""
        if self.capacity is None:
            return 1 << 62
        return max(0, self.capacity - len(self._buf))

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Append audio (caller enforces capacity)."""
        self._buf += data
        if len(self._buf) > self.high_water:
            self.high_water = len(self._buf)

    def take(self, n: int) -> bytes:
        """Remove and return up to ``n`` bytes from the front."""
        out = bytes(self._buf[:n])
        del self._buf[:n]  # CPython moves the start pointer: no memmove
        return out

    def clear(self) -> None:
        """Flush (uuid_break / clearAudio)."""
        self._buf.clear()


Emit = Callable[[bytes | memoryview, bool, float], None]


class MediaBug:
    """FreeSWITCH's media bug + mod_audio_stream's ``stream_frame``, sans I/O.

    Per tick the read frame (and the write frame when FS wrote one) go into the
    bug's buffers; from ``first_drain_tick`` on they are drained like
    ``while (switch_core_media_bug_read(bug, &frame, SWITCH_TRUE) == SUCCESS)``:
    mono needs only the read side; mixed/stereo need both (``fill=TRUE``), so a
    silent write leg stops the stream and the read leg piles up (doc §4.3, §13).
    Frames are aggregated to STREAM_BUFFER_SIZE and handed to ``emit``.
    """

    def __init__(
        self,
        *,
        mix: str,
        frame_bytes: int,
        rtp_packets: int,
        require_write_leg: bool,
        first_drain_tick: int,
        emit: Emit,
    ) -> None:
        self.mix = mix
        self.silence = bytes(frame_bytes)
        self._rtp_packets = rtp_packets
        self._buflen = frame_bytes * (2 if mix == "stereo" else 1) * rtp_packets
        self._need_write = require_write_leg
        self._first_drain = first_drain_tick
        self._emit_cb = emit
        self._max_frames = max(1, MAX_BUG_BUFFER // frame_bytes)
        self._read: deque[tuple[bytes | memoryview, bool, float]] = deque()
        self._write: deque[bytes] = deque()
        self._agg = bytearray()
        self._agg_voiced = False
        self._stereo = np.empty(frame_bytes, dtype="<i2")  # 2 × samples
        self._mix = np.empty(frame_bytes // 2, dtype=np.int32)

    def flush(self) -> None:
        """``switch_core_media_bug_flush`` (pause/resume) and the partial buffer."""
        self._read.clear()
        self._write.clear()

    def discard_partial(self) -> None:
        """A partly filled STREAM_BUFFER_SIZE buffer is dropped at cleanup."""
        self._agg.clear()
        self._agg_voiced = False

    def tick(
        self,
        k: int,
        t: float,
        read: bytes | memoryview,
        voiced: bool,
        write: bytes,
        write_active: bool,
    ) -> None:
        """Tick ``k`` (from 1) at media time ``t``: buffer both legs, then drain."""
        if len(self._read) < self._max_frames:
            self._read.append((read, voiced, t))
        if self.mix != "mono" and write_active and len(self._write) < self._max_frames:
            self._write.append(write)
        if k >= self._first_drain:
            self._drain()

    def _drain(self) -> None:
        r, w = self._read, self._write
        if self.mix == "mono":
            while r:
                frame, voiced, cap = r.popleft()
                self._emit(frame, voiced, cap)
            return
        while r and (w or not self._need_write):
            if len(w) > len(r) and len(w) > 2:
                w.popleft()  # the core tosses a write frame when write runs ahead
            frame, voiced, cap = r.popleft()
            wf = w.popleft() if w else self.silence
            self._emit(self._combine(frame, wf), voiced, cap)

    def _combine(self, read: bytes | memoryview, write: bytes) -> bytes:
        rd = np.frombuffer(read, dtype="<i2")
        wr = np.frombuffer(write, dtype="<i2")
        if self.mix == "stereo":
            out = self._stereo
            out[0::2] = rd  # left = read leg (the caller)
            out[1::2] = wr  # right = write leg (what the caller hears)
            return out.tobytes()
        if write == self.silence:  # memcmp; nothing to add
            return bytes(read)
        m = self._mix
        np.add(rd, wr, out=m, dtype=np.int32)
        np.clip(m, -32768, 32767, out=m)  # the core's overflow handling ends in a clamp
        return m.astype("<i2").tobytes()

    def _emit(self, pcm: bytes | memoryview, voiced: bool, captured_at: float) -> None:
        if self._rtp_packets == 1:
            self._emit_cb(pcm, voiced, captured_at)
            return
        self._agg += pcm
        self._agg_voiced = self._agg_voiced or voiced
        if len(self._agg) >= self._buflen:
            payload = bytes(self._agg)
            v = self._agg_voiced
            self.discard_partial()
            self._emit_cb(payload, v, captured_at)
