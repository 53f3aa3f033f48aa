"""PCM helpers for the emulator: levels, resampling, and the file types FS plays.

Why separate: the stream's hot path only slices precomputed bytes; everything
that touches numpy/soxr/wave lives here and runs when audio is queued or
received, not once per 20 ms tick.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soxr

__all__ = [
    "RAW_EXTENSION_RATES",
    "decode_audio_bytes",
    "decode_audio_file",
    "g711_decode",
    "load_wav",
    "peak_above",
    "resample",
    "voiced_flags",
    "write_wav",
]

# streamAudio "raw" sampleRate → temp-file extension (glue.cpp processMessage).
RAW_EXTENSION_RATES: dict[str, int] = {
    ".r8": 8000,
    ".r16": 16000,
    ".r24": 24000,
    ".r32": 32000,
    ".r48": 48000,
    ".r64": 64000,
}


def _i16(pcm: bytes | bytearray | memoryview) -> npt.NDArray[np.int16]:
    n = len(pcm) - (len(pcm) & 1)
    return np.frombuffer(pcm, dtype="<i2", count=n // 2)


def peak_above(pcm: bytes | bytearray | memoryview, threshold: int) -> bool:
    """True if any sample's magnitude exceeds ``threshold`` (cheap non-silence test)."""
    x = _i16(pcm)
    if x.size == 0:
        return False
    return bool(int(x.max()) > threshold or int(x.min()) < -threshold)


def voiced_flags(
    pcm: bytes | bytearray | memoryview, frame_samples: int, rms_threshold: float
) -> npt.NDArray[np.bool_]:
    """Per-frame "voiced" flags (RMS above threshold) for whole frames of ``pcm``."""
    x = _i16(pcm)
    frames = x.size // frame_samples
    if frames == 0:
        return np.zeros(0, dtype=np.bool_)
    blocks = x[: frames * frame_samples].reshape(frames, frame_samples).astype(np.float32)
    rms = np.sqrt(np.mean(blocks * blocks, axis=1))
    return np.asarray(rms > rms_threshold)


def resample(pcm: bytes, in_rate: int, out_rate: int) -> bytes:
    """s16le mono ``in_rate`` → ``out_rate`` with soxr (whole buffer, no state)."""
    if in_rate == out_rate or not pcm:
        return bytes(pcm)
    y = soxr.resample(_i16(pcm), in_rate, out_rate)
    return np.asarray(y, dtype="<i2").tobytes()


def load_wav(path: str | Path, rate: int | None = None) -> tuple[bytes, int]:
    """Read a 16-bit PCM WAV as mono s16le, optionally resampled to ``rate``."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        channels = w.getnchannels()
        src_rate = w.getframerate()
        data = w.readframes(w.getnframes())
    x = _i16(data)
    if channels > 1:
        x = x.reshape(-1, channels).astype(np.int32).mean(axis=1).astype("<i2")
    pcm = x.tobytes()
    if rate is not None and rate != src_rate:
        return resample(pcm, src_rate, rate), rate
    return pcm, src_rate


def write_wav(path: str | Path, pcm: bytes, rate: int) -> None:
    """Write mono s16le ``pcm`` as a WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


def _ulaw_table() -> npt.NDArray[np.int16]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_table() -> npt.NDArray[np.int16]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, np.where(seg == 1, t + 0x108, (t + 0x108) << (seg - 1)))
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ULAW = _ulaw_table()
_ALAW = _alaw_table()


def g711_decode(data: bytes, law: str) -> bytes:
    """G.711 μ-law (``pcmu``) or A-law (``pcma``) bytes → s16le at 8000 Hz."""
    table = _ULAW if law == "pcmu" else _ALAW
    return table[np.frombuffer(data, dtype=np.uint8)].astype("<i2").tobytes()


def decode_audio_bytes(data: bytes, extension: str) -> tuple[bytes, int] | None:
    """What FreeSWITCH would play from a ``<uuid>_<n>.tmp<ext>`` file.

    ``.rN`` raw s16le, ``.wav``, ``.pcmu``/``.pcma``; None for formats the
    emulator cannot decode (mp3, ogg).
    """
    ext = extension.lower()
    if ext in RAW_EXTENSION_RATES:
        return bytes(data[: len(data) - (len(data) & 1)]), RAW_EXTENSION_RATES[ext]
    if ext in (".pcmu", ".pcma"):
        return g711_decode(data, ext[1:]), 8000
    if ext == ".wav":
        import io

        try:
            with wave.open(io.BytesIO(data), "rb") as w:
                if w.getsampwidth() != 2:
                    return None
                ch, rate = w.getnchannels(), w.getframerate()
                frames = w.readframes(w.getnframes())
        except (wave.Error, EOFError):
            return None
        x = _i16(frames)
        if ch > 1:
            x = x.reshape(-1, ch).astype(np.int32).mean(axis=1).astype("<i2")
        return x.tobytes(), rate
    return None


def decode_audio_file(path: str | Path) -> tuple[bytes, int] | None:
    """``decode_audio_bytes`` for a file on disk (extension from the name)."""
    p = Path(path)
    return decode_audio_bytes(p.read_bytes(), p.suffix)
