"""Placing emulated calls: what FreeSWITCH would do, step by step."""

from __future__ import annotations

import numpy as np

from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig

PLAYBACK_FOR_DIALECT = {"json-stream": "voxcom", "binary": "cloudfieldcz", "file": "community"}


def is_speech_like(pcm: bytes, rate: int) -> bool:
    """Non-silent and voice-like: enough energy, not a constant or a click."""
    a = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    if len(a) < rate // 4:
        return False
    rms = float(np.sqrt(np.mean(a * a)))
    return rms > 200 and float(np.std(a)) > 100


async def open_call(url: str, rate: int, dialect: str, **cfg: object) -> FakeSwitchStream:
    """Start a stream like ``uuid_audio_stream <uuid> start <url> mono <rate>``."""
    stream = FakeSwitchStream(
        StreamConfig(url=url, rate=rate, playback=PLAYBACK_FOR_DIALECT[dialect], **cfg)  # type: ignore[arg-type]
    )
    await stream.start()
    assert await stream.wait_connected(3.0), "stream did not connect"
    return stream


async def wait_for_bot_audio(
    stream: FakeSwitchStream, after: float, timeout_s: float
) -> float | None:
    """Receive time of the first non-silent bot audio after ``after`` (polling the recorder)."""
    return await stream.wait_bot_audio_after(after, timeout_s)


async def wait_bot_quiet(
    stream: FakeSwitchStream, quiet_s: float = 0.6, timeout_s: float = 15.0
) -> None:
    """Wait until no bot audio has arrived for ``quiet_s``."""
    await stream.wait_bot_quiet(quiet_s, timeout_s)


async def ask(
    stream: FakeSwitchStream, speech: bytes, rate: int, timeout_s: float = 8.0
) -> tuple[float, float | None]:
    """Speak ``speech``; return (end of speech sent, first bot audio received after it)."""
    stream.queue_caller_audio(speech)
    stream.queue_caller_silence(0.3)
    await stream.wait_caller_drained(timeout_s=len(speech) / (2 * rate) + 3.0)
    end = stream.last_voiced_sent_at()
    assert end is not None, "no voiced caller frame was sent"
    return end, await wait_for_bot_audio(stream, end, timeout_s)
