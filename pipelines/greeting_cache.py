"""Greetings kept in the server process, ready the moment a call connects.

Piper pre-synthesizes each greeting at start-up at every rate a call can arrive at
(8 and 16 kHz), but fetching it over loopback HTTP at call time still cost 10-30 ms
under load, and Piper's audio starts with 35-55 ms of near-silence that the output
transport paces in real time before the first word (the json-stream dialect keeps
only 20 ms of lead). Here a greeting is fetched once per (Piper URL, voice, text) -
the URL carries the rate - with its leading silence cut to ``LEAD_KEEP_SECS``, and
later calls play it from memory without awaiting anything.
"""

from __future__ import annotations

from collections import OrderedDict

import aiohttp
import numpy as np

from pipeswitch.pipelines.piper_client import synthesize

LEAD_KEEP_SECS = 0.01  # a soft onset, not a click
SILENCE_PEAK = 300  # int16 magnitude below which a sample is silence (about -40 dBFS)

_Key = tuple[str, str, str | None]


def trim_leading_silence(
    pcm: bytes, rate: int, keep_secs: float = LEAD_KEEP_SECS, peak: int = SILENCE_PEAK
) -> bytes:
    """``pcm`` (int16 mono) from ``keep_secs`` before its first sample above ``peak``."""
    x = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2")
    loud = np.flatnonzero(np.abs(x.astype(np.int32)) > peak)
    if loud.size == 0:
        return pcm
    start = max(0, int(loud[0]) - int(rate * keep_secs))
    return pcm[2 * start :]


class GreetingCache:
    """Trimmed greeting audio by (Piper URL, text, voice), least recently used dropped."""

    def __init__(self, max_entries: int = 128) -> None:
        self._max = max_entries
        self._pcm: OrderedDict[_Key, tuple[bytes, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pcm)

    def get(self, url: str, text: str, voice: str | None) -> tuple[bytes, int] | None:
        """The greeting's ``(pcm, rate)`` if this process has it."""
        key = (url, text, voice)
        hit = self._pcm.get(key)
        if hit is not None:
            self._pcm.move_to_end(key)
        return hit

    async def fetch(
        self,
        http: aiohttp.ClientSession,
        url: str,
        text: str,
        voice: str | None,
        timeout_secs: float = 3.0,
    ) -> tuple[bytes, int]:
        """From Piper (its cache when warmed), trimmed and kept; Piper's errors propagate."""
        pcm, rate = await synthesize(http, url, text, voice=voice, timeout_secs=timeout_secs)
        entry = (trim_leading_silence(pcm, rate), rate)
        self._pcm[(url, text, voice)] = entry
        while len(self._pcm) > self._max:
            self._pcm.popitem(last=False)
        return entry
