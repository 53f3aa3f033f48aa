"""What the caller hears (the channel's write leg), per playback model, and bot-audio records.

Why a model: the community module plays nothing itself (files + ``::play``
events for an ESL worker), the voxcom fork plays ``streamAudio`` from a
one-frame buffer, the cloudfieldcz fork plays server BINARY and injects
silence once active (protocol doc §5, §10.2, §10.3, §14). Latency numbers
must come from the same rules, and stereo/mixed streams only flow while
FreeSWITCH writes something to the channel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import soxr
from loguru import logger

from pipeswitch.bench.fakeswitch.audio import decode_audio_bytes, peak_above, resample
from pipeswitch.bench.fakeswitch.media import WriteBuffer
from pipeswitch.bench.fakeswitch.records import ReceivedAudio

__all__ = ["CLOUDFIELD_WRITE_BUFFER", "Playback", "Playout"]

Playback = Literal["community", "voxcom", "cloudfieldcz"]
CLOUDFIELD_WRITE_BUFFER = 640000  # cloudfieldcz WRITE_BUFFER_SIZE (bytes)


class Playout:
    """The write leg of one channel, one 20 ms frame per media tick.

    - community: plays only what ``play_file``/``play_pcm`` add (an ESL worker's
      ``uuid_broadcast``/``playback``); a last partial frame is zero-padded.
    - voxcom: whole frames only; a partial frame waits for more audio.
    - cloudfieldcz: partial frames padded; once the first BINARY arrived the
      leg stays active with silence (WRITE_REPLACE).
    """

    def __init__(
        self,
        *,
        playback: Playback,
        rate: int,
        frame_bytes: int,
        capacity: int | None,
        non_silent_peak: int,
        honour_sample_rate: bool = False,
    ) -> None:
        self.playback = playback
        self.rate = rate
        self.frame_bytes = frame_bytes
        self.silence = bytes(frame_bytes)
        self.buffer = WriteBuffer(capacity)
        self.write_active = False  # cloudfieldcz: the first binary arrived
        self.dead = False  # the fork's write path went away with the media bug
        # cloudfieldcz without send_silence_when_idle=-1: its WRITE_REPLACE callback only
        # runs when FreeSWITCH writes a frame, and a parked channel writes none (§15).
        self.gated = False
        self._peak = non_silent_peak
        self._honour_rate = honour_sample_rate
        self._resamplers: dict[int, soxr.ResampleStream] = {}
        self._warned = False
        self._played_t: list[float] = []
        self._played: list[bytes] = []
        self._played_flags: list[bool] = []
        self._rx: list[ReceivedAudio] = []
        self._rx_pcm: list[bytes] = []

    # ---------------------------------------------------------------- per tick

    def tick(self, t: float) -> tuple[bytes, bool]:
        """Play one frame; returns it and whether FreeSWITCH wrote to the channel."""
        frame, active = self._next_frame()
        self._played_t.append(t)
        self._played.append(frame)
        return frame, active

    def _next_frame(self) -> tuple[bytes, bool]:
        if self.gated:
            return self.silence, False
        fb = self.frame_bytes
        buf = self.buffer
        n = len(buf)
        if n >= fb:
            return buf.take(fb), True
        if self.playback == "voxcom":
            return self.silence, False  # the write thread needs a whole frame
        if n:
            return buf.take(n) + bytes(fb - n), True
        if self.playback == "cloudfieldcz" and self.write_active and not self.dead:
            return self.silence, True  # silence injected once active
        return self.silence, False

    # ---------------------------------------------------------------- feeding

    @property
    def playing(self) -> bool:
        """Audio is waiting to be played."""
        return len(self.buffer) > 0

    def play_pcm(self, pcm: bytes, rate: int) -> float:
        """Append s16le mono audio at ``rate`` (resampled to the stream rate); seconds."""
        data = resample(pcm, rate, self.rate)
        self.buffer.append(data)
        return len(data) / (2 * self.rate)

    def play_file(self, path: str | Path) -> float:
        """Append a ``.rN``/``.wav``/``.pcmu``/``.pcma`` file; seconds."""
        p = Path(path)
        decoded = decode_audio_bytes(p.read_bytes(), p.suffix)
        if decoded is None:
            raise ValueError(f"cannot play {path}")
        return self.play_pcm(*decoded)

    def clear(self) -> None:
        """Flush what is queued (``uuid_break … all`` / ``clearAudio``)."""
        self.buffer.clear()

    def kill(self) -> None:
        """The media bug is gone: a fork's write buffer and thread go with it."""
        if self.playback != "community":
            self.dead = True
            self.buffer.clear()

    def on_binary(self, payload: bytes, t: float) -> None:
        """Server BINARY: cloudfieldcz plays it; the others install no binary callback."""
        if self.playback != "cloudfieldcz" or self.dead:
            return
        self.write_active = True
        if len(self.buffer) + len(payload) > CLOUDFIELD_WRITE_BUFFER:
            logger.warning("cloudfieldcz write buffer (640000 B) full: chunk dropped")
            return  # switch_buffer_write on a full fixed buffer writes nothing
        self.buffer.append(payload)
        self.record(t, payload, "binary")

    def voxcom_pcm(self, pcm: bytes, sample_rate: int) -> bytes:
        """streamAudio raw as the voxcom fork plays it.

        Its resampler is set up from the *stream* rate, so the bytes are played
        as if at the stream rate whatever ``sampleRate`` says (only validated).
        ``honour_sample_rate`` resamples instead (what the fork's README implies).
        """
        if sample_rate == self.rate:
            return pcm
        if not self._honour_rate:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "voxcom plays streamAudio as if at the stream rate ({} Hz); "
                    "sampleRate {} is only validated",
                    self.rate,
                    sample_rate,
                )
            return pcm
        rs = self._resamplers.get(sample_rate)
        if rs is None:
            rs = soxr.ResampleStream(sample_rate, self.rate, 1, dtype="int16")
            self._resamplers[sample_rate] = rs
        x = np.frombuffer(pcm[: len(pcm) & ~1], dtype="<i2")
        return np.asarray(rs.resample_chunk(x), dtype="<i2").tobytes()

    # ---------------------------------------------------------------- records

    def record(self, t: float, pcm: bytes, kind: str) -> None:
        """Bot audio the module accepted, at the stream rate (wire-level time ``t``)."""
        self._rx.append(ReceivedAudio(t, len(pcm), peak_above(pcm, self._peak), kind))
        self._rx_pcm.append(pcm)

    def record_opaque(self, t: float, nbytes: int, kind: str) -> None:
        """Accepted audio the emulator cannot decode (mp3/ogg)."""
        self._rx.append(ReceivedAudio(t, nbytes, False, kind))
        self._rx_pcm.append(b"")

    def received_audio(self) -> tuple[bytes, list[ReceivedAudio]]:
        """Accepted bot audio (concatenated) and one record per message."""
        return b"".join(self._rx_pcm), list(self._rx)

    def first_received_at_or_after(self, t: float) -> float | None:
        """Receive time of the first non-silent bot audio at or after ``t``."""
        for a in self._rx:
            if a.t >= t and a.non_silent:
                return a.t
        return None

    def played_audio(self) -> tuple[bytes, list[tuple[float, bool]]]:
        """Everything played (silence included) and (tick time, non-silent) per frame."""
        self._update_flags()
        return b"".join(self._played), list(zip(self._played_t, self._played_flags, strict=True))

    def first_played_at_or_after(self, t: float) -> float | None:
        """Tick time of the first non-silent frame played at or after ``t``."""
        self._update_flags()
        for pt, flag in zip(self._played_t, self._played_flags, strict=True):
            if pt >= t and flag:
                return pt
        return None

    def last_bot_audio_at(self) -> float | None:
        """Latest non-silent bot audio, received or played."""
        self._update_flags()
        cands: list[float] = []
        for a in reversed(self._rx):
            if a.non_silent:
                cands.append(a.t)
                break
        for i in range(len(self._played_flags) - 1, -1, -1):
            if self._played_flags[i]:
                cands.append(self._played_t[i])
                break
        return max(cands) if cands else None

    def _update_flags(self) -> None:
        """Non-silence per played frame, computed lazily (never on the tick)."""
        silence = self.silence
        for frame in self._played[len(self._played_flags) :]:
            self._played_flags.append(frame is not silence and peak_above(frame, self._peak))
