"""A small client for the Piper HTTP server: one place that reads its WAV replies, and
the body wrapper that resumes a reply the server cut mid-stream.

The Piper server streams a WAV whose header declares unknown sizes
(``0xFFFFFFFF``), so the standard library's ``wave`` module refuses it; this
parser walks the RIFF chunks instead of assuming a 44-byte header.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from aiohttp.streams import AsyncStreamIterator
from yarl import URL


class WavError(ValueError):
    """Bytes that are not a 16-bit PCM WAV this code can play."""


def wav_layout(head: bytes | bytearray) -> tuple[int, int] | None:
    """``(data offset, sample rate)`` of a mono 16-bit WAV's first bytes, or None while
    the header is incomplete (raises :class:`WavError` for what is not such a WAV)."""
    if len(head) < 12:
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise WavError("not a RIFF/WAVE file")
    pos, rate = 12, 0
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        body = pos + 8
        if chunk == b"fmt ":
            if body + 16 > len(head):
                return None
            fmt, channels, rate = struct.unpack("<HHI", head[body : body + 8])
            bits = struct.unpack("<H", head[body + 14 : body + 16])[0]
            if fmt != 1 or channels != 1 or bits != 16:
                raise WavError(f"need mono 16-bit PCM, got format={fmt} ch={channels} bits={bits}")
        elif chunk == b"data":
            if not rate:
                raise WavError("data chunk before fmt chunk")
            return body, rate
        pos = body + size + (size & 1)
    return None


def wav_pcm(data: bytes) -> tuple[bytes, int]:
    """``(pcm, sample_rate)`` of a mono 16-bit WAV (a streamed one included)."""
    layout = wav_layout(data)
    if layout is None:
        raise WavError("no data chunk (or a truncated header)")
    body, rate = layout
    size = struct.unpack("<I", data[body - 4 : body])[0]
    end = len(data) if size == 0xFFFFFFFF else min(len(data), body + size)
    pcm = data[body:end]
    return pcm[: len(pcm) - len(pcm) % 2], rate


async def synthesize(
    http: aiohttp.ClientSession,
    url: str,
    text: str,
    *,
    voice: str | None = None,
    timeout_secs: float = 10.0,
) -> tuple[bytes, int]:
    """``(pcm, sample_rate)`` of ``text`` from the Piper server at ``url`` (with ``?rate=``)."""
    async with http.post(
        url,
        json={"text": text, "voice": voice},
        timeout=aiohttp.ClientTimeout(total=timeout_secs),
    ) as r:
        r.raise_for_status()
        return wav_pcm(await r.read())


# --- A response that survives a drop mid-body ------------------------------------------

# Per drop, the rest of the sentence must be under way within this long: the caller has
# heard what was delivered and hears silence after it (the dead-air limit is 2 s).
RESUME_BUDGET_SECS = 2.0
# With a fallback to go to, the server that dropped gets this much of the budget.
RESUME_SAME_SECS_WITH_FALLBACK = 1.0
# Seeking the join: the delivered audio's last TAIL_SECS are matched within +-WINDOW_SECS
# of the byte offset (a re-synthesis is not sample-identical: Piper's VITS draws noise, and
# a sentence's phoneme durations vary by tens of ms; measured up to ~80 ms at 8 kHz).
TAIL_SECS = 0.1
WINDOW_SECS = 0.2
# Below this normalised correlation the match is noise (a pause): keep the byte offset.
MIN_JOIN_CORRELATION = 0.6
_READ_ALL = 1 << 16


class ResumeFailed(aiohttp.ClientError):
    """A resumed body could not be used (status, format, or no bytes past the break)."""


@dataclass(frozen=True)
class ResumeSource:
    """Where to ask the sentence again: ``open(timeout)`` gives a 200 response or raises."""

    name: str
    open: Callable[[float], Awaitable[aiohttp.ClientResponse]]
    secs: float


def best_join(tail: np.ndarray, new: np.ndarray, expected: int, window: int) -> tuple[int, float]:
    """Where in ``new`` the audio that ended with ``tail`` ends: ``(sample index, r)``.

    Searches ends within ``expected +- window`` by normalised cross-correlation; a weak
    match (``r`` under :data:`MIN_JOIN_CORRELATION`, e.g. a pause) keeps ``expected``.
    """
    n = len(tail)
    lo, hi = max(n, expected - window), min(len(new), expected + window)
    if n == 0 or hi <= lo:
        return min(expected, len(new)), 0.0
    t = tail.astype(np.float64)
    seg = new[lo - n : hi].astype(np.float64)
    num = np.correlate(seg, t, mode="valid")
    energy = np.convolve(seg * seg, np.ones(n), mode="valid")
    r = num / (np.sqrt(np.maximum(energy, 1e-9)) * np.sqrt(max(float(t @ t), 1e-9)))
    k = int(np.argmax(r))
    if r[k] < MIN_JOIN_CORRELATION:
        return min(expected, len(new)), float(r[k])
    return lo + k, float(r[k])


class ResumingBody:
    """A Piper response body that survives the server closing it mid-stream.

    Stands in for ``ClientResponse.content``: the unmodified ``PiperHttpTTSService``
    reads ``response.content.iter_chunked()`` and plays each chunk as it comes, so a
    retry before the first byte cannot help once audio has been played. When the stream
    breaks, the sentence is asked again (the same server once, then the tenant's fallback
    Piper), the new body is joined where the old one broke (the byte offset, moved to
    the best match of the last 0.1 s delivered when the re-synthesis differs) and the
    reader gets only audio it has not had: no sentence repeated, a short gap at most.
    A body that does not start with a valid WAV header is asked again the same way
    (nothing of it is played: Pipecat would play any bytes as audio).
    """

    def __init__(
        self,
        first: aiohttp.ClientResponse,
        sources: list[ResumeSource],
        log: Any,
        budget_secs: float = RESUME_BUDGET_SECS,
    ) -> None:
        self._stream: aiohttp.StreamReader = first.content
        # Only a resumed response is held: the first one holds this body (its
        # ``content``), and a reference back would make the pair a cycle that only a
        # full collection frees.
        self._resumed: aiohttp.ClientResponse | None = None
        self._sources = sources
        self._log = log
        self._budget = budget_secs
        self._delivered = 0
        self._layout: tuple[int, int] | None = None
        # References to the last chunks delivered (no copies): the tail a join matches.
        self._recent: deque[bytes] = deque()
        self._recent_bytes = 0
        self._keep_bytes = 1 << 14
        self._pending = b""
        self._exc: BaseException | None = None
        self.resumes = 0

    # The part of aiohttp's StreamReader that readers and ClientResponse use.
    def iter_chunked(self, n: int) -> AsyncStreamIterator[bytes]:
        return AsyncStreamIterator(lambda: self.read(n))

    def iter_any(self) -> AsyncStreamIterator[bytes]:
        return AsyncStreamIterator(self.readany)

    def at_eof(self) -> bool:
        return not self._pending and self._stream.at_eof()

    def exception(self) -> BaseException | None:
        return self._exc

    def set_exception(self, exc: BaseException, exc_cause: BaseException | None = None) -> None:
        """The response was released (or failed): stop, and release a resumed one."""
        self._exc = exc
        self._sources = []
        if self._resumed is not None:
            self._resumed.release()

    async def readany(self) -> bytes:
        return await self.read(_READ_ALL)

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = []
            while chunk := await self.read(_READ_ALL):
                parts.append(chunk)
            return b"".join(parts)
        while not self._pending:
            try:
                if self._layout is None:
                    # Nothing reaches the reader before a whole, valid WAV header: a
                    # malformed body is asked again like a broken one, not played as noise.
                    self._pending = await self._header(self._stream)
                    if not self._pending:
                        return b""
                    continue
                data = await self._stream.read(n)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, WavError) as exc:
                if self._exc is not None or not await self._resume(exc):
                    raise
                continue
            self._note(data)
            return data
        data, self._pending = self._pending[:n], self._pending[n:]
        self._note(data)
        return data

    async def _header(self, stream: aiohttp.StreamReader) -> bytes:
        """The body's first bytes, up to a whole WAV header (``b""`` for an empty body)."""
        buf = bytearray()
        layout = None
        while layout is None:
            chunk = await stream.readany()
            if not chunk:
                if buf:
                    raise WavError("the body ended inside its WAV header")
                return b""
            buf += chunk
            layout = wav_layout(buf)
            if layout is None and len(buf) > 4096:
                raise WavError("no data chunk in the first 4 KB")
        self._layout = layout
        self._keep_bytes = 2 * int(layout[1] * TAIL_SECS) + 2
        return bytes(buf)

    def _note(self, data: bytes) -> None:
        if not data:
            return
        self._delivered += len(data)
        self._recent.append(data)
        self._recent_bytes += len(data)
        while self._recent_bytes - len(self._recent[0]) >= self._keep_bytes:
            self._recent_bytes -= len(self._recent.popleft())

    async def _resume(self, exc: BaseException) -> bool:
        """Ask the sentence again and join; False when no source gave the rest in time."""
        t0 = time.monotonic()
        deadline = t0 + self._budget
        heard = self._heard_secs()
        self._log.warning(
            "TTS stream broke after {:.2f}s of audio ({}: {}); asking for the rest",
            heard,
            type(exc).__name__,
            exc,
        )
        while self._sources:
            source = self._sources.pop(0)
            secs = min(source.secs, deadline - time.monotonic())
            if secs <= 0:
                break
            resp: aiohttp.ClientResponse | None = None
            try:
                resp = await source.open(secs)
                rest, shift_ms = await asyncio.wait_for(
                    self._join(resp), max(0.01, deadline - time.monotonic())
                )
            except (aiohttp.ClientError, TimeoutError, WavError) as why:
                if resp is not None:
                    resp.release()
                self._log.warning(
                    "TTS resume on {} failed: {}: {}", source.name, type(why).__name__, why
                )
                continue
            except BaseException:
                if resp is not None:
                    resp.release()
                raise
            if self._resumed is not None:
                self._resumed.release()
            self._resumed, self._stream, self._pending = resp, resp.content, rest
            self.resumes += 1
            self._log.info(
                "TTS resumed on {} after {:.0f} ms: the {:.2f}s already played skipped, joined"
                " {:+.0f} ms from the byte offset",
                source.name,
                1000 * (time.monotonic() - t0),
                heard,
                shift_ms,
            )
            return True
        self._log.warning("TTS stream not resumed; the rest of the sentence is lost")
        return False

    def _heard_secs(self) -> float:
        if self._layout is None:
            return 0.0
        offset, rate = self._layout
        return max(0, self._delivered - offset) / (2 * rate)

    async def _join(self, resp: aiohttp.ClientResponse) -> tuple[bytes, float]:
        """``resp``'s body from where the reader's left off, and the join's shift (ms)."""
        if self._layout is None:  # nothing delivered yet (the first body was malformed)
            return await self._header(resp.content), 0.0
        done = self._delivered
        offset, rate = self._layout
        buf = bytearray()
        while len(buf) < done + 2 * int(rate * WINDOW_SECS) + 64:
            chunk = await resp.content.readany()
            if not chunk:
                break
            buf += chunk
        new = wav_layout(buf)
        if new is None or new[1] != rate:
            raise ResumeFailed(f"the sentence came back as another format ({new})")
        s_done, odd = divmod(done - offset, 2)
        expected = new[0] + 2 * s_done
        tail = self._tail(min(s_done, int(rate * TAIL_SECS)))
        if not tail or buf[expected - len(tail) : expected] == tail:
            end = s_done  # the same bytes again (the server had it cached): the byte offset
        else:
            pcm = np.frombuffer(buf, dtype="<i2", count=(len(buf) - new[0]) // 2, offset=new[0])
            end, _ = await asyncio.to_thread(
                best_join,
                np.frombuffer(tail, dtype="<i2"),
                pcm,
                s_done,
                int(rate * WINDOW_SECS),
            )
        cut = new[0] + 2 * end + odd
        if cut >= len(buf) and not resp.content.at_eof():
            raise ResumeFailed("the resumed body broke before the point already heard")
        return bytes(buf[cut:]), 1000 * (end - s_done) / rate

    def _tail(self, samples: int) -> bytes:
        """The last ``samples`` whole samples delivered (bytes; empty when unknown)."""
        if self._layout is None or samples <= 0:
            return b""
        offset = self._layout[0]
        end = self._delivered - (self._delivered - offset) % 2  # whole samples only
        start = max(end - 2 * samples, offset, self._delivered - self._recent_bytes)
        recent = b"".join(self._recent)
        base = self._delivered - self._recent_bytes
        return recent[start - base : end - base]


def _resend(req: aiohttp.ClientRequest, url: URL) -> Callable[[float], Awaitable[Any]]:
    """Send ``req`` again to ``url`` (no middleware: this is the retry), 200 or raise."""
    headers = {k: v for k, v in req.headers.items() if k.upper() not in ("HOST", "CONTENT-LENGTH")}

    async def open_(secs: float) -> aiohttp.ClientResponse:
        resp = await asyncio.wait_for(
            req.session.request(req.method, url, data=req.body, headers=headers, middlewares=()),
            secs,
        )
        if resp.status != 200:
            resp.release()
            raise ResumeFailed(f"HTTP {resp.status}")
        return resp

    return open_


def resume_on_drop(
    resp: aiohttp.ClientResponse,
    req: aiohttp.ClientRequest,
    fallback_url: str | None,
    log: Any,
) -> aiohttp.ClientResponse:
    """``resp`` with a body that, if it breaks mid-stream, is resumed from the same server
    once, then from ``fallback_url`` (a 200 WAV only; anything else is returned as is)."""
    if resp.status != 200:
        return resp
    same = RESUME_SAME_SECS_WITH_FALLBACK if fallback_url else RESUME_BUDGET_SECS
    sources = [ResumeSource("the same TTS", _resend(req, req.url), same)]
    if fallback_url:
        url = URL(fallback_url).with_query(req.url.query)
        sources.append(ResumeSource("the fallback TTS", _resend(req, url), RESUME_BUDGET_SECS))
    resp.content = ResumingBody(resp, sources, log)  # type: ignore[assignment]
    return resp
