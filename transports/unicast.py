"""Unicast media: calls on a stock FreeSWITCH with no mod_audio_stream at all.

FreeSWITCH's core can stream a *parked* channel over UDP by itself: an ESL
``sendmsg <uuid>`` with ``call-command: unicast`` makes it bind ``local-ip:
local-port``, send the caller's audio there-from to ``remote-ip:remote-port``
every 20 ms, and write every datagram it receives on ``local-port`` to the
caller as it arrives (measured: first audio 17 ms after the first datagram,
gapless when the sender paces at 20 ms; a burst comes out garbled). Without the
``native`` flag both directions are L16 at the channel's rate (8 kHz for G.711,
16 kHz for G.722); ``native`` would carry the channel's codec (PCMU), so it is
never sent.

Pieces:

* :class:`UdpMedia` - the call's UDP socket, shaped like the aiohttp WebSocket
  the mod_audio_stream transport reads and writes (``receive``/``send_bytes``/
  ``send_str``/``close``), with a strict 20 ms pacer on the way out;
  ``{"type":"clearAudio"}`` (what the binary dialect sends on barge-in) empties
  the pacer's queue, so barge-in stops the bot within one tick.
* :class:`UnicastCallTransport` - the same Pipecat transport as a WebSocket call
  (greeting fast path, pacing with a playout lead, barge-in, playback facts are
  written once, in :mod:`transports.transport`), over :class:`UdpMedia`.
* :class:`UnicastMedia` - sets a call up over ESL (ports from the configured
  range, ``sendmsg`` unicast, hangup events) and tears it down.
* :class:`UnicastEndpoint` - the trigger: ``POST /unicast/{call_uuid}?domain=…&
  rate=8000[&fallback=<ext>]``, sent by the dialplan (mod_curl) right before
  ``park``. An HTTP trigger (not an ESL CHANNEL_PARK listener) because the
  dialplan sees the answer at once and can fall back to an operator when
  Pipeswitch refuses (unknown tenant, over capacity, down) instead of parking a
  caller in silence.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from aiohttp import WSMessage, WSMsgType, web
from loguru import logger
from pipecat.transports.base_transport import TransportParams

from pipeswitch.config.loaders import TenantNotFound, TenantResolver
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.transports.call_control import (
    EVENT_CHANNEL_HANGUP,
    EVENT_CHANNEL_HANGUP_COMPLETE,
    CallControl,
    CallControlError,
    CallEvent,
)
from pipeswitch.transports.call_events import CallEventBridge
from pipeswitch.transports.call_info import BadCallRequest, CallInfo, parse_call_request
from pipeswitch.transports.dialects import CLEAR_AUDIO, make_dialect
from pipeswitch.transports.serializer import ModAudioStreamSerializer, pipeline_rate_for
from pipeswitch.transports.transport import FreeSwitchCallTransport

__all__ = [
    "Authorize",
    "PortPool",
    "UdpMedia",
    "UnicastCallTransport",
    "UnicastEndpoint",
    "UnicastMedia",
    "media_back",
    "media_handed_over",
    "media_leaving",
    "unicast_headers",
]

# (request, call uuid, domain, tenant) -> None when allowed, else the reason.
Authorize = Callable[[web.Request, str, "str | None", Tenant], "str | None"]
TICK_SECS = 0.02
# Closest two datagrams may follow each other when the pacer catches up after a late tick.
MIN_GAP_SECS = 0.016
# Audio the output transport may send ahead of real time: one tick in the pacer's queue,
# so barge-in drops at most ~20 ms and a loop hiccup shorter than that is not heard.
LEAD_SECS = 0.02
# FreeSWITCH sends the caller's audio every 20 ms while parked; this much silence on the
# socket means the channel left park (transferred, hung up) or the switch is gone.
NO_MEDIA_SECS = 5.0
# Caller datagrams held while the pipeline is behind (10 s); older ones are dropped.
MAX_QUEUED_IN = 500


class PortPool:
    """UDP port pairs from ``[low, high]``: even for Pipeswitch, odd for FreeSWITCH."""

    def __init__(self, low: int, high: int) -> None:
        if high - low < 1:
            raise ValueError("unicast port range needs at least two ports")
        start = low + (low % 2)
        self._free: deque[int] = deque(range(start, high, 2))
        self._used: set[int] = set()

    def take(self) -> int:
        """An even port whose odd neighbour is FreeSWITCH's (raises when exhausted)."""
        if not self._free:
            raise RuntimeError("unicast port range exhausted")
        port = self._free.popleft()
        self._used.add(port)
        return port

    def give_back(self, port: int) -> None:
        """Return a pair taken with :meth:`take`."""
        if port in self._used:
            self._used.discard(port)
            self._free.append(port)

    @property
    def free(self) -> int:
        """Pairs left."""
        return len(self._free)


def unicast_headers(
    local_ip: str, local_port: int, remote_ip: str, remote_port: int
) -> dict[str, str]:
    """The ``sendmsg`` headers that start unicast media (FreeSWITCH's point of view:
    ``local`` is the port it binds, ``remote`` where it sends). No ``native`` flag:
    both directions are L16 at the channel's rate."""
    return {
        "call-command": "unicast",
        "local-ip": local_ip,
        "local-port": str(local_port),
        "remote-ip": remote_ip,
        "remote-port": str(remote_port),
        "transport": "udp",
    }


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, media: UdpMedia) -> None:
        self.media = media

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.media._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable: switch not bound yet
        self.media.errors += 1


class UdpMedia:
    """One call's UDP media, with the face of an aiohttp ``WebSocketResponse``.

    Inbound datagrams become BINARY messages; outbound audio is queued and sent
    one 20 ms datagram per tick on a monotonic schedule (FreeSWITCH writes what
    arrives at once, so the pacing must happen here).
    """

    def __init__(self, bind: tuple[str, int], peer: tuple[str, int], frame_bytes: int) -> None:
        self.bind = bind
        self.peer = peer
        self.frame_bytes = frame_bytes
        self.close_code: int | None = None
        # True when the switch side ended the media (hangup, left park), not us.
        self.ended_by_switch = False
        # Until then, no media is expected (the channel left park for a transfer).
        self.away_until = 0.0
        self.errors = 0
        self.datagrams_in = 0
        self.dropped_in = 0
        self.datagrams_out = 0
        self.first_in_at: float | None = None
        self._inbox: asyncio.Queue[WSMessage] = asyncio.Queue()
        self._out: deque[bytes] = deque()
        self._pending = b""
        self._transport: asyncio.DatagramTransport | None = None
        self._pacer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._closed = False
        self._last_in = time.monotonic()

    async def open(self) -> None:
        """Bind the socket and start the pacer."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=self.bind
        )
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._pacer = asyncio.ensure_future(self._pace())

    @property
    def closed(self) -> bool:
        """Whether sending is over (the WebSocket ``closed`` the transport reads)."""
        return self._closed

    # -- inbound ---------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self._closed:
            return
        now = time.monotonic()
        if self.first_in_at is None:
            self.first_in_at = now
        self._last_in = now
        self.datagrams_in += 1
        if self._inbox.qsize() >= MAX_QUEUED_IN:  # a stalled call: keep the newest audio
            self._inbox.get_nowait()
            self.dropped_in += 1
        self._inbox.put_nowait(WSMessage(WSMsgType.BINARY, data, None))

    async def receive(self) -> WSMessage:
        """The next caller datagram, or CLOSE once the call's media is over."""
        while True:
            if not self._inbox.empty():
                return self._inbox.get_nowait()
            try:
                async with asyncio.timeout(NO_MEDIA_SECS):  # no task per datagram
                    return await self._inbox.get()
            except TimeoutError:
                now = time.monotonic()
                if now < self.away_until:
                    continue  # the channel is out of park (a transfer is ringing)
                if now - max(self._last_in, self.away_until) >= NO_MEDIA_SECS:
                    self.peer_closed(1001, "no media from the switch")

    def peer_closed(self, code: int, reason: str) -> None:
        """The call ended on the switch side (hangup, transfer, media gone)."""
        if self.close_code is None:
            self.close_code = code
            self.ended_by_switch = True
            self._inbox.put_nowait(WSMessage(WSMsgType.CLOSE, code, reason))
        self._closed = True
        self._wake.set()

    # -- outbound --------------------------------------------------------------------------

    async def send_bytes(self, data: bytes) -> None:
        """Queue bot audio (whole 20 ms datagrams; a partial tail waits for more)."""
        if self._closed:
            raise ConnectionResetError("unicast media closed")
        buf = self._pending + data
        n = len(buf) - len(buf) % self.frame_bytes
        for i in range(0, n, self.frame_bytes):
            self._out.append(buf[i : i + self.frame_bytes])
        self._pending = buf[n:]
        if self._out:
            self._drained.clear()
        self._wake.set()

    async def send_str(self, data: str) -> None:
        """The only text a transport sends here is the binary dialect's clear."""
        if data == CLEAR_AUDIO:
            self._out.clear()
            self._pending = b""
            self._drained.set()

    @property
    def queued_secs(self) -> float:
        """Bot audio waiting in the pacer."""
        return len(self._out) * TICK_SECS

    async def _pace(self) -> None:
        """One datagram every 20 ms while there is audio; idle otherwise."""
        next_at = 0.0
        last_sent = 0.0
        while not self._closed:
            if not self._out:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            if next_at < now - 4 * TICK_SECS:  # idle before (or far behind): fresh clock
                next_at = now
            # FreeSWITCH writes each datagram as it arrives and a burst comes out garbled:
            # a late tick is caught up at most a quarter faster than real time.
            next_at = max(next_at, last_sent + MIN_GAP_SECS)
            if next_at > now:
                await asyncio.sleep(next_at - now)
            if not self._out or self._transport is None:
                continue
            self._transport.sendto(self._out.popleft(), self.peer)
            last_sent = time.monotonic()
            self.datagrams_out += 1
            if not self._out:
                self._drained.set()
            next_at += TICK_SECS

    async def close(self, code: int = 1000, message: bytes = b"") -> bool:
        """Let queued audio play out (bounded), then stop."""
        if self._out and not self._closed:
            try:
                await asyncio.wait_for(self._drained.wait(), 1.0)
            except TimeoutError:
                pass
        if self.close_code is None:
            self.close_code = code
        self._closed = True
        self._wake.set()
        if self._pacer is not None and self._pacer is not asyncio.current_task():
            self._pacer.cancel()
        if self._transport is not None:
            self._transport.close()
        return True


class UnicastCallTransport(FreeSwitchCallTransport):
    """The per-call Pipecat transport over :class:`UdpMedia` instead of a WebSocket.

    Everything above the socket - greeting playback, pacing with a lead, barge-in
    and the playback facts the context is built from - is the WebSocket
    transport's own code; only the socket differs.
    """

    def __init__(
        self,
        media: UdpMedia,
        serializer: ModAudioStreamSerializer,
        params: TransportParams,
        call: CallInfo,
        *,
        log_context: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            media,
            serializer,
            params,
            call,
            log_context=log_context,
        )
        self.media = media


def make_unicast_transport(
    media: UdpMedia, call: CallInfo, tenant: Tenant, rate: int, max_text_bytes: int = 8192
) -> UnicastCallTransport:
    """Serializer (raw L16 at the channel rate, clear = drop the pacer queue) + transport."""
    ctx = {"call": call.call_uuid, "tenant": tenant.name}
    serializer = ModAudioStreamSerializer(
        stream_rate=rate,
        channels=1,
        dialect=make_dialect("binary", lead_secs=LEAD_SECS),
        max_text_bytes=max_text_bytes,
        log_context=ctx,
    )
    prate = pipeline_rate_for(rate)
    params = TransportParams(
        audio_in_enabled=True,
        audio_in_sample_rate=prate,
        audio_out_enabled=True,
        audio_out_sample_rate=prate,
        audio_out_10ms_chunks=2,
        audio_out_end_silence_secs=0,
    )
    return UnicastCallTransport(media, serializer, params, call, log_context=ctx)


# Live unicast calls of this process, by call uuid: a transfer (processors/tools.py) takes
# the channel out of park, which tears unicast down on the switch; these hooks let it say
# so, and restart the media when the caller is parked again.
_ACTIVE: dict[str, tuple[UnicastMedia, UdpMedia]] = {}


def media_leaving(call_uuid: str, secs: float) -> None:
    """The channel leaves park for up to ``secs`` (a transfer rings): no media meanwhile."""
    entry = _ACTIVE.get(call_uuid)
    if entry is not None:
        entry[1].away_until = time.monotonic() + secs


async def media_back(call_uuid: str) -> None:
    """The channel is parked again: start unicast anew (same ports)."""
    entry = _ACTIVE.get(call_uuid)
    if entry is not None:
        owner, media = entry
        media.away_until = time.monotonic() + 2.0  # grace until the first datagram
        await owner.control.sendmsg(call_uuid, owner.headers_for(media))


def media_handed_over(call_uuid: str, reason: str = "transferred") -> None:
    """The caller is with someone else now: the agent's call ends (no fallback)."""
    entry = _ACTIVE.get(call_uuid)
    if entry is not None:
        entry[1].peer_closed(1000, reason)


class UnicastMedia:
    """Starts and ends unicast media for calls on one FreeSWITCH (over ESL)."""

    def __init__(self, control: CallControl, settings: Settings) -> None:
        self.control = control
        self.settings = settings
        self.ports = PortPool(settings.unicast_port_min, settings.unicast_port_max)

    async def open(self, call: CallInfo, tenant: Tenant) -> UnicastCallTransport:
        """Bind our port, ask FreeSWITCH to stream the parked channel to it."""
        rate = call.rate or tenant.audio_rate
        s = self.settings
        media, port = await self._bind(rate)
        try:
            transport = make_unicast_transport(media, call, tenant, rate, s.max_text_bytes)

            def on_event(ev: CallEvent) -> None:
                if ev.name in (EVENT_CHANNEL_HANGUP, EVENT_CHANNEL_HANGUP_COMPLETE):
                    media.peer_closed(1000, f"hangup {ev.hangup_cause or ''}".strip())

            unsubscribe = self.control.subscribe(call.call_uuid, on_event)
            transport.event_handler("on_client_disconnected")(
                _released(self, port, call.call_uuid, unsubscribe)
            )
            _ACTIVE[call.call_uuid] = (self, media)
            await self.control.sendmsg(call.call_uuid, self.headers_for(media))
        except BaseException:
            await media.close(1011, b"setup failed")
            self.ports.give_back(port)
            raise
        return transport

    async def _bind(self, rate: int, attempts: int = 8) -> tuple[UdpMedia, int]:
        """An opened socket on the next free pair; a port some other program holds on this
        host is skipped (it goes to the back of the pool) rather than failing the call."""
        s = self.settings
        for attempt in range(attempts):
            port = self.ports.take()
            media = UdpMedia(
                bind=(s.unicast_media_ip, port),
                peer=(s.unicast_switch_ip, port + 1),
                frame_bytes=rate // 50 * 2,
            )
            try:
                await media.open()
                return media, port
            except OSError as exc:
                self.ports.give_back(port)
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                logger.warning("unicast port {} is in use on this host; trying the next", port)
        raise AssertionError("unreachable")

    def headers_for(self, media: UdpMedia) -> dict[str, str]:
        """The ``sendmsg`` headers for this call's port pair."""
        s = self.settings
        return unicast_headers(
            s.unicast_switch_ip, media.peer[1], s.unicast_media_ip, media.bind[1]
        )

    async def finish(self, transport: UnicastCallTransport, fallback: str | None) -> None:
        """After the pipeline: a caller still parked goes to ``fallback`` or is hung up.

        Never dead air: when the agent stops for any reason other than the caller
        hanging up or a transfer, the caller is not left parked in silence.
        """
        if transport.media.ended_by_switch:
            return  # hung up, transferred, or the switch is gone: nothing to rescue
        uuid = transport.call.call_uuid
        try:
            exists = (await self.control.api(f"uuid_exists {uuid}")).strip() == "true"
            if not exists:
                return
            if fallback:
                context = transport.call.domain or "default"
                await self.control.transfer(uuid, fallback, "XML", context)
            else:
                await self.control.hangup(uuid, "NORMAL_CLEARING")
        except CallControlError as exc:
            logger.bind(call=uuid).warning("unicast call wrap-up failed: {}", exc)


def _released(
    owner: UnicastMedia, port: int, call_uuid: str, unsubscribe: Callable[[], None]
) -> Any:
    async def handler(_: Any, code: int | None, reason: str) -> None:
        unsubscribe()
        if call_uuid in _ACTIVE and _ACTIVE[call_uuid][0] is owner:
            del _ACTIVE[call_uuid]
        owner.ports.give_back(port)

    return handler


class UnicastEndpoint:
    """``POST /unicast/{call_uuid}``: the dialplan's request for an agent over unicast.

    Answers at once (200 = the agent is coming, park now; 404/503 = do not park,
    fall back), then sets the call up in the background and runs it with the same
    call handler as WebSocket calls. ``run_call(call, tenant, transport)`` and
    ``accepting()`` come from the call server.
    """

    def __init__(
        self,
        media: UnicastMedia,
        resolver: TenantResolver,
        run_call: Callable[[CallInfo, Tenant, FreeSwitchCallTransport], Any],
        accepting: Callable[[], bool],
        stats: Any = None,
        authorize: Authorize | None = None,
    ) -> None:
        self.media = media
        # Same rule as WebSocket calls (signed URL, token, or the unsigned policy):
        # anyone who can trigger unicast could point a call's media somewhere.
        self.authorize = authorize
        self.resolver = resolver
        self.run_call = run_call
        self.accepting = accepting
        # The call server's counters (calls_total / calls_active), so capacity covers both.
        self.stats = stats
        self.active: dict[str, asyncio.Task[None]] = {}

    def add_routes(self, app: web.Application, prefix: str = "/unicast") -> None:
        """Register the trigger (``prefix`` "" for a sub-application mounted there)."""
        app.router.add_post(prefix + "/{call_uuid}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        """Validate, answer, then start the call's media and pipeline."""
        try:
            call = parse_call_request(request.path, request.query_string)
        except BadCallRequest as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        log = logger.bind(call=call.call_uuid, tenant=call.domain or "-")
        if not self.media.control.connected:
            log.warning("unicast refused: no ESL connection to the switch")
            return web.json_response({"ok": False, "error": "switch not connected"}, status=503)
        if not self.accepting() or call.call_uuid in self.active:
            return web.json_response({"ok": False, "error": "not accepting"}, status=503)
        try:
            tenant = await self.resolver.resolve(call.domain)
        except TenantNotFound as exc:
            log.warning("unicast refused: {}", exc)
            return web.json_response({"ok": False, "error": str(exc)}, status=404)
        if self.authorize is not None:
            refusal = self.authorize(request, call.call_uuid, call.domain, tenant)
            if refusal:
                log.warning("unicast refused: not authorized: {}", refusal)
                return web.json_response({"ok": False, "error": "not authorized"}, status=403)
        rate = call.rate or tenant.audio_rate
        if rate not in (8000, 16000, 32000, 48000):
            return web.json_response({"ok": False, "error": f"rate {rate}"}, status=400)
        fallback = call.extra.get("fallback") or None
        task = asyncio.ensure_future(self._run(call, tenant, fallback))
        self.active[call.call_uuid] = task
        task.add_done_callback(lambda _: self.active.pop(call.call_uuid, None))
        return web.json_response({"ok": True, "call_uuid": call.call_uuid})

    async def _run(self, call: CallInfo, tenant: Tenant, fallback: str | None) -> None:
        log = logger.bind(call=call.call_uuid, tenant=tenant.name)
        try:
            transport = await self.media.open(call, tenant)
        except Exception as exc:
            log.error("unicast setup failed: {}", exc)
            return
        log.info("unicast call up: rate={} port={}", call.rate, transport.media.bind[1])
        # DTMF into the pipeline, caller hangup, bot-ended hangup: as for WebSocket calls.
        bridge = CallEventBridge(self.media.control, transport).attach()
        if self.stats is not None:
            self.stats.calls_total += 1
            self.stats.calls_active += 1
        try:
            with logger.contextualize(call=call.call_uuid, tenant=tenant.name):
                await self.run_call(call, tenant, transport)
        except Exception as exc:
            log.exception("unicast call failed: {}", exc)
        finally:
            if self.stats is not None:
                self.stats.calls_active -= 1
            if not transport.media.closed:
                await transport.close(1000, "call ended")
            await bridge.finish()
            if not (bridge.caller_gone or bridge.transferred or transport.ended_by_bot):
                await self.media.finish(transport, fallback)
            log.info("unicast call down")
