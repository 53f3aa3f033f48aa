"""FreeSWITCH's core ``unicast`` media, as the ESL emulator's ``sendmsg`` handler.

Stock FreeSWITCH (no mod_audio_stream) streams a parked channel over UDP when an
ESL client sends ``sendmsg <uuid>`` with ``call-command: unicast`` and the
headers ``local-ip``, ``local-port`` (FreeSWITCH binds it), ``remote-ip``,
``remote-port`` (where it sends), ``transport: udp`` and ``flags`` (protocol doc
§14). Without ``native`` FreeSWITCH sends and expects L16 at the channel's rate,
20 ms per datagram; with ``native`` it sends the channel's own codec (PCMU on a
phone call), which an L16 receiver hears as noise. Measured behaviour kept here:

* the caller's audio goes out every 20 ms for as long as the channel is parked;
* each datagram received is written to the caller as it arrives, unbuffered:
  first audio ~17 ms after the first datagram; datagrams arriving faster than the
  20 ms clock (a burst) come out garbled - recorded as a hazard;
* it runs only while parked: leaving park (a transfer, even back to a parking
  extension) or a hangup tears it down; a new ``sendmsg`` starts it again.

Install with ``install(esl)`` (adds ``esl.sendmsg_handlers["unicast"]``); the
legs are in ``esl.unicast_legs`` by call uuid, via :func:`legs`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from loguru import logger

from pipeswitch.bench.fakeswitch.esl import Channel, FakeSwitchEsl

__all__ = ["FIRST_WRITE_S", "UnicastLeg", "install", "legs"]

# A datagram is written to the channel on its next media tick (doc §14: 17 ms median).
FIRST_WRITE_S = 0.017
# Two datagrams closer than this are a burst (the channel writes them back to back).
BURST_GAP_S = 0.01
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux


@dataclass(slots=True)
class Heard:
    """One bot datagram as the caller hears it (``t``: monotonic, when written)."""

    t: float
    pcm: bytes
    non_silent: bool


@dataclass
class UnicastLeg:
    """One channel's unicast media: caller audio out, bot audio in."""

    channel: Channel
    local: tuple[str, int]
    remote: tuple[str, int]
    native: bool
    rate: int
    heard: list[Heard] = field(default_factory=list)
    hazards: list[str] = field(default_factory=list)
    sent_frames: int = 0
    last_voiced_sent_at: float | None = None
    closed: bool = False
    transfers_at_start: int = 0
    _sock: socket.socket | None = None
    _caller: bytearray = field(default_factory=bytearray)
    _task: asyncio.Task[None] | None = None
    _last_rx: float = 0.0

    @property
    def frame_bytes(self) -> int:
        """Bytes per 20 ms datagram (L16, or one byte per sample for native PCMU)."""
        samples = self.rate // 50
        return samples if self.native else samples * 2

    def hazard(self, text: str) -> None:
        """Record a rule violation once."""
        if text not in self.hazards:
            self.hazards.append(text)
            logger.warning("fakeswitch unicast {}: {}", self.channel.uuid, text)

    def queue_caller_audio(self, pcm: bytes) -> None:
        """The caller speaks ``pcm`` (L16 at the channel rate) from the next tick on."""
        self._caller += pcm

    def queue_caller_silence(self, secs: float) -> None:
        """The caller is quiet for ``secs``."""
        self._caller += bytes(int(self.rate * secs) * 2)

    async def caller_drained(self, timeout_s: float) -> None:
        """Wait until everything queued for the caller has been sent."""
        deadline = time.monotonic() + timeout_s
        while self._caller and time.monotonic() < deadline and not self.closed:
            await asyncio.sleep(0.02)

    def first_heard_after(self, t: float) -> float | None:
        """When the caller first heard non-silent bot audio after ``t``."""
        for h in self.heard:
            if h.t > t and h.non_silent:
                return h.t
        return None

    def last_heard_at(self) -> float | None:
        """When the caller last heard non-silent bot audio."""
        for h in reversed(self.heard):
            if h.non_silent:
                return h.t
        return None

    def heard_pcm(self) -> bytes:
        """Everything the caller heard, concatenated."""
        return b"".join(h.pcm for h in self.heard)

    # -- the media loop ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind the channel's port and start the 20 ms clock."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(self.local)
        # Kernel receive timestamps: this emulator shares its event loop with the server
        # under test, so the time a datagram is *read* says nothing about when it arrived.
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        loop.add_reader(self._sock.fileno(), self._on_readable)
        tick = 0.02
        t0 = time.monotonic()
        n = 0
        try:
            while self._parked():
                n += 1
                await asyncio.sleep(max(0.0, t0 + n * tick - time.monotonic()))
                if self._parked():
                    self._send_caller_frame()
        finally:
            self.close()

    def _parked(self) -> bool:
        """Still in the park that started it: leaving park (any transfer, even back to a
        parking extension) tears unicast down (``switch_ivr_park`` deactivates it on exit);
        a new ``sendmsg`` unicast starts it again."""
        ch = self.channel
        if self.closed or not ch.up or ch.state == "CS_HANGUP":
            return False
        return len(ch.transfers) == self.transfers_at_start

    def _send_caller_frame(self) -> None:
        assert self._sock is not None
        need = self.rate // 50 * 2
        pcm = bytes(self._caller[:need])
        del self._caller[:need]
        if len(pcm) < need:
            pcm += bytes(need - len(pcm))
        if np.abs(np.frombuffer(pcm, dtype="<i2")).max(initial=0) > 300:
            self.last_voiced_sent_at = time.monotonic()
        if self.native:
            pcm = _ulaw_encode(pcm)  # the channel's own codec: PCMU
        try:
            self._sock.sendto(pcm, self.remote)
            self.sent_frames += 1
        except OSError as exc:  # nobody listening yet: FreeSWITCH logs and goes on
            logger.debug("unicast send: {}", exc)

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, anc, _, _ = self._sock.recvmsg(65536, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            now = time.monotonic()
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    now -= time.time() - (sec + nsec / 1e9)
            self._on_datagram(data, now)

    def _on_datagram(self, data: bytes, now: float) -> None:
        if self._last_rx and now - self._last_rx < BURST_GAP_S:
            self.hazard("datagrams arrived in a burst: FreeSWITCH writes them unpaced (garbled)")
        self._last_rx = now
        if len(data) != self.rate // 50 * 2:
            self.hazard(f"datagram of {len(data)} B is not 20 ms of L16 at {self.rate} Hz")
        pcm = data[: len(data) - len(data) % 2]
        loud = bool(pcm) and int(np.abs(np.frombuffer(pcm, dtype="<i2")).max()) > 300
        self.heard.append(Heard(now + FIRST_WRITE_S, pcm, loud))

    def close(self) -> None:
        """Stop the media (hangup, transfer, or the emulator stopping)."""
        if self.closed:
            return
        self.closed = True
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except (RuntimeError, ValueError):
                pass
            self._sock.close()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()


def _ulaw_encode(pcm: bytes) -> bytes:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.int32)
    sign = (x < 0).astype(np.int32) << 7
    mag = np.minimum(np.abs(x), 32635) + 132
    exp = np.floor(np.log2(mag)).astype(np.int32) - 7
    mant = (mag >> (exp + 3)) & 0x0F
    return (~(sign | (exp << 4) | mant) & 0xFF).astype(np.uint8).tobytes()


def legs(esl: FakeSwitchEsl) -> dict[str, UnicastLeg]:
    """The unicast legs of an emulator, by call uuid."""
    table: dict[str, UnicastLeg] = esl.__dict__.setdefault("unicast_legs", {})
    return table


def install(esl: FakeSwitchEsl) -> None:
    """Teach the ESL emulator ``sendmsg … call-command: unicast``."""

    def handle(ch: Channel, h: Mapping[str, str]) -> str:
        try:
            local = (h.get("local-ip", "127.0.0.1"), int(h.get("local-port", "8025")))
            remote = (h.get("remote-ip", "127.0.0.1"), int(h.get("remote-port", "8026")))
        except ValueError:
            return "-ERR invalid port"
        if h.get("transport", "udp") != "udp":
            return "-ERR only udp is emulated"
        native = "native" in h.get("flags", "")
        leg = UnicastLeg(ch, local, remote, native, ch.rate, transfers_at_start=len(ch.transfers))
        if native:
            leg.hazard("flags: native sends the channel codec (PCMU), not L16")
        old = legs(esl).get(ch.uuid)
        if old is not None:
            old.close()
        try:
            leg.start()
        except OSError as exc:
            return f"-ERR cannot bind {local[0]}:{local[1]}: {exc}"
        legs(esl)[ch.uuid] = leg
        return "+OK"

    esl.sendmsg_handlers["unicast"] = handle
