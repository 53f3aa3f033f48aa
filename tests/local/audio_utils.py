"""Test-audio helpers: Piper speech over HTTP, degraded to an 8 kHz telephone channel."""

from __future__ import annotations

import io
import re
import wave

import aiohttp
import numpy as np

from pipeswitch.pipelines.piper_client import wav_pcm

# Short caller-style sentences (no digits/abbreviations, so WER needs no number normaliser).
SENTENCES = [
    "I would like to book an appointment for tomorrow.",
    "Is doctor Brown available in the afternoon?",
    "What time do you open on Saturday?",
    "Please cancel my visit on Friday morning.",
    "My tooth has been hurting since last week.",
    "Can I speak to someone about my bill?",
]


async def piper_pcm(session: aiohttp.ClientSession, url: str, text: str) -> bytes:
    """16-bit mono PCM from the Piper server (``url`` carries ``?rate=``)."""
    async with session.post(url, json={"text": text, "voice": None}) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.read()
    return wav_pcm(body)[0]


def telephone_band(pcm: bytes, rate: int = 8000) -> bytes:
    """Band-limit to 300-3400 Hz and pass through G.711 mu-law (encode/decode)."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1.0 / rate)
    spectrum[(freqs < 300) | (freqs > 3400)] = 0
    y = np.fft.irfft(spectrum, n=len(x))
    mu = 255.0
    encoded = np.sign(y) * np.log1p(mu * np.minimum(np.abs(y), 1.0)) / np.log1p(mu)
    quantized = np.round(encoded * 127.0) / 127.0  # 8-bit code words
    decoded = np.sign(quantized) * np.expm1(np.abs(quantized) * np.log1p(mu)) / mu
    return (np.clip(decoded, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def silence(seconds: float, rate: int = 8000) -> bytes:
    return bytes(int(seconds * rate) * 2)


def to_wav(pcm: bytes, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def normalize_words(text: str) -> str:
    text = text.lower().replace("dr.", "doctor")
    return " ".join(re.sub(r"[^a-z' ]+", " ", text).split())
