"""The emulated caller's speech: synthesized once with Piper, cached on disk.

Each question is trimmed to its voiced part (20 ms frames above the emulator's
voiced threshold), so "the last voiced frame sent" is where the words end and
the media clock only ever slices precomputed bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
from loguru import logger

from pipeswitch.bench.scenario import BARGE_IN, QUESTIONS
from pipeswitch.pipelines.piper_client import wav_pcm

CACHE_VERSION = 1
VOICED_RMS = 300.0  # same threshold as StreamConfig.voiced_rms (~ -40 dBFS)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE_DIR = RESULTS_DIR / ".cache" / "caller"


@dataclass(frozen=True)
class CallerAudio:
    """Precomputed caller utterances at one stream rate."""

    rate: int
    questions: tuple[bytes, ...]
    barge_in: bytes

    def seconds(self, pcm: bytes) -> float:
        """Duration of ``pcm`` at this rate."""
        return len(pcm) / (2 * self.rate)


def trim_to_voiced(pcm: bytes, rate: int, rms_threshold: float = VOICED_RMS) -> bytes:
    """Cut leading and trailing 20 ms frames whose RMS is below the threshold."""
    fs = rate // 50
    x = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2")
    n = x.size // fs
    if n == 0:
        return b""
    frames = x[: n * fs].reshape(n, fs).astype(np.float32)
    voiced = np.sqrt(np.mean(frames * frames, axis=1)) > rms_threshold
    idx = np.flatnonzero(voiced)
    if idx.size == 0:
        return b""
    return x[int(idx[0]) * fs : (int(idx[-1]) + 1) * fs].astype("<i2").tobytes()


def _key(text: str, rate: int, voice: str) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{voice}|{rate}|{text}".encode()).hexdigest()[:16]
    return f"{voice}-{rate}-{h}"


async def _synthesize(http: aiohttp.ClientSession, url: str, text: str) -> bytes:
    async with http.post(url, json={"text": text, "voice": None}) as resp:
        resp.raise_for_status()
        data = await resp.read()
    return wav_pcm(data)[0]


async def load_caller_audio(
    rate: int, cache_dir: Path = DEFAULT_CACHE_DIR, voice: str = "joe"
) -> CallerAudio:
    """The questions and the barge-in line at ``rate``; synthesized with Piper when not cached."""
    texts = [*QUESTIONS, BARGE_IN]
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [cache_dir / f"{_key(t, rate, voice)}.pcm" for t in texts]
    missing = [(t, p) for t, p in zip(texts, paths, strict=True) if not p.exists()]
    if missing:
        from pipeswitch.pipelines.local.supervisor import LocalModelServers

        logger.info("synthesizing {} caller utterances at {} Hz with Piper", len(missing), rate)
        async with (
            LocalModelServers.piper_only(piper_voice=voice, log_level="WARNING") as servers,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
        ):
            for text, path in missing:
                pcm = trim_to_voiced(await _synthesize(http, servers.piper_url(rate), text), rate)
                if not pcm:
                    raise RuntimeError(f"Piper produced no voiced audio for {text!r}")
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(pcm)
                tmp.replace(path)
        index = {
            p.name: {"text": t, "rate": rate, "voice": voice}
            for t, p in zip(texts, paths, strict=True)
        }
        (cache_dir / f"index-{rate}.json").write_text(json.dumps(index, indent=1))
    pcms = [p.read_bytes() for p in paths]
    return CallerAudio(rate=rate, questions=tuple(pcms[:-1]), barge_in=pcms[-1])
