"""Playback dialects: how bot audio and "stop playing" go back to FreeSWITCH.

Which one fits depends on the mod_audio_stream build (see README):

* ``json-stream`` - ``streamAudio`` JSON with base64 raw PCM, played directly by
  playback-capable builds (voxcom fork, commercial build). No clear command
  exists there, so barge-in means "stop sending"; keep the playout lead small.
* ``binary`` - raw s16le frames at the stream rate; ``{"type":"clearAudio"}``
  flushes the module's buffer on barge-in (cloudfieldcz fork).
* ``file`` - the community build writes each ``streamAudio`` message to a file
  and fires ``mod_audio_stream::play``; the ESL side plays it
  (:mod:`pipeswitch.transports.call_events`). Audio is coalesced into files that
  start small and double within a sentence (first audio early, files queued
  gaplessly), and barge-in is ``uuid_break <uuid> all`` through the
  :class:`PlaybackControl` seam.

Dialects are sans-I/O: they turn PCM into wire messages and nothing else.
"""

from __future__ import annotations

import base64
from typing import Protocol

from pipeswitch.config.tenants import PlaybackDialect as DialectName

CLEAR_AUDIO = '{"type":"clearAudio"}'
# One wire frame of bot audio (the output transport cuts audio into these).
FRAME_SECS = 0.02
# json-stream's largest adapted lead: a 100 ms STREAM_BUFFER_SIZE less one frame.
MAX_ADAPTED_LEAD_SECS = 0.08


class Dialect(Protocol):
    """Encodes outbound audio for one mod_audio_stream build."""

    name: DialectName
    # How far ahead of real time audio may be sent (the far end's playout buffer).
    lead_secs: float
    # Whether audio is sent as it comes (True) or coalesced into larger messages.
    streaming: bool

    def encode_audio(self, pcm: bytes, rate: int) -> str | bytes | None:
        """Wire message for ``pcm`` (mono s16le at ``rate``), or None if buffered."""
        ...

    def flush(self, rate: int) -> list[str]:
        """Messages for any buffered audio (coalescing dialects)."""
        ...

    def encode_clear(self) -> str | None:
        """In-band "stop playback" message, or None when the build has none."""
        ...

    def discard(self) -> None:
        """Drop buffered audio (barge-in)."""
        ...

    def uplink_message(self, secs: float) -> None:
        """The caller's audio arrives in messages of ``secs`` (``STREAM_BUFFER_SIZE``);
        a dialect whose far-end buffer is that long fits its lead to it."""
        ...


def stream_audio_message(pcm: bytes, rate: int, extra: str = "") -> str:
    """``streamAudio`` JSON. Built by formatting: base64 is ASCII, so always valid UTF-8."""
    b64 = base64.b64encode(pcm).decode("ascii")
    return (
        f'{{"type":"streamAudio","data":{{"audioDataType":"raw","sampleRate":{rate:d}{extra},'
        f'"audioData":"{b64}"}}}}'
    )


class JsonStreamDialect:
    """Paced ``streamAudio`` chunks for builds that play them directly.

    The voxcom fork's write buffer is as long as one uplink message
    (``STREAM_BUFFER_SIZE``, 20 ms by default) and its receive thread blocks while it
    is full (at a hangup, for good: protocol notes §15). The lead is therefore the
    buffer less one frame, learnt from the first uplink message: 20 ms for the 40 ms
    the shipped dialplan sets (and for the default 20, which deadlocks anyway), 40 ms
    for 60, up to :data:`MAX_ADAPTED_LEAD_SECS`. A longer lead rides out longer stalls
    of the server's loop without a gap; without a clear command, it is also what still
    plays after a barge-in.
    """

    name: DialectName = "json-stream"
    streaming = True

    def __init__(self, lead_secs: float = 0.02) -> None:
        self.lead_secs = lead_secs
        self._learnt = False

    def uplink_message(self, secs: float) -> None:
        if self._learnt:
            return
        self._learnt = True
        frames = round(secs / FRAME_SECS)
        if frames < 2 or abs(secs - frames * FRAME_SECS) > 1e-6:
            return  # not a STREAM_BUFFER_SIZE of whole frames: keep the default
        self.lead_secs = max(self.lead_secs, min((frames - 1) * FRAME_SECS, MAX_ADAPTED_LEAD_SECS))

    def encode_audio(self, pcm: bytes, rate: int) -> str | bytes | None:
        return stream_audio_message(pcm, rate)

    def flush(self, rate: int) -> list[str]:
        return []

    def encode_clear(self) -> str | None:
        return None

    def discard(self) -> None:
        return None


class BinaryDialect:
    """Raw PCM frames; ``clearAudio`` flushes the module's playout buffer."""

    name: DialectName = "binary"
    streaming = True

    def __init__(self, lead_secs: float = 0.06) -> None:
        self.lead_secs = lead_secs

    def encode_audio(self, pcm: bytes, rate: int) -> str | bytes | None:
        return pcm

    def flush(self, rate: int) -> list[str]:
        return []

    def encode_clear(self) -> str | None:
        return CLEAR_AUDIO

    def discard(self) -> None:
        return None

    def uplink_message(self, secs: float) -> None:
        return None  # cloudfieldcz's buffer is 640 KB: the lead is ours to choose


class FileDialect:
    """Coalesces audio into ``streamAudio`` messages, one file each for ESL playback.

    Within a burst (a TTS sentence) the first message goes out after
    ``first_chunk_secs`` and each later one may be twice as long: the caller hears
    the reply after a fraction of its first sentence is synthesized, not all of it,
    and files queued with ``sendmsg … playback`` play gaplessly as long as TTS runs
    faster than twice real time. Messages are capped (``max_chunk_bytes``) because
    old libwsc builds dropped ~120 KB messages. Each message carries a ``seq`` that
    comes back in the ``mod_audio_stream::play`` event so the ESL side can play
    files in order and drop the stale ones after a barge-in.
    """

    name: DialectName = "file"
    streaming = False

    def __init__(
        self, lead_secs: float = 3.0, max_chunk_bytes: int = 64000, first_chunk_secs: float = 0.5
    ) -> None:
        self.lead_secs = lead_secs
        self.max_chunk_bytes = max_chunk_bytes
        self.first_chunk_secs = first_chunk_secs
        self._buf = bytearray()
        self._seq = 0
        self._chunk_secs = first_chunk_secs

    def encode_audio(self, pcm: bytes, rate: int) -> str | bytes | None:
        self._buf += pcm
        limit = min(self.max_chunk_bytes, int(self._chunk_secs * rate) * 2)
        if len(self._buf) < limit:
            return None
        # One message now; the remainder waits for more audio or flush().
        chunk = bytes(self._buf[:limit])
        del self._buf[:limit]
        self._chunk_secs *= 2
        return self._message(chunk, rate)

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next message will carry (earlier ones are already sent)."""
        return self._seq

    def _message(self, chunk: bytes, rate: int) -> str:
        msg = stream_audio_message(chunk, rate, f',"seq":{self._seq:d}')
        self._seq += 1
        return msg

    def flush(self, rate: int) -> list[str]:
        self._chunk_secs = self.first_chunk_secs  # the next burst starts small again
        out: list[str] = []
        while self._buf:
            chunk = bytes(self._buf[: self.max_chunk_bytes])
            del self._buf[: self.max_chunk_bytes]
            out.append(self._message(chunk, rate))
        return out

    def encode_clear(self) -> str | None:
        # The community module turns any other text into mod_audio_stream::json,
        # so an ESL/Lua listener can map this to uuid_break as well.
        return CLEAR_AUDIO

    def discard(self) -> None:
        self._buf.clear()
        self._chunk_secs = self.first_chunk_secs

    def uplink_message(self, secs: float) -> None:
        return None  # files: the lead is seconds of queued playback


def make_dialect(name: DialectName, lead_secs: float | None = None) -> Dialect:
    """The dialect object for a tenant's ``playback`` setting."""
    d: Dialect
    if name == "json-stream":
        d = JsonStreamDialect()
    elif name == "binary":
        d = BinaryDialect()
    elif name == "file":
        d = FileDialect()
    else:  # pragma: no cover - validated by the tenant model
        raise ValueError(f"unknown playback dialect {name!r}")
    if lead_secs is not None:
        d.lead_secs = lead_secs
    return d
