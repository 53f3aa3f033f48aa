"""The mod_audio_stream WebSocket server (aiohttp).

FreeSWITCH's libwsc gives the upgrade 1 s, so nothing slow happens before the
101: the handler upgrades first, then parses the call identity from the URL,
resolves the tenant, builds the per-call transport and hands it to the call
handler (which lives in :mod:`pipelines`; this module knows no providers).

``GET /health`` - the process is alive. ``GET /ready`` - accepting calls.
``GET /metrics`` - Prometheus text (:mod:`transports.metrics`); ``GET /metrics.json`` -
this process's counters as JSON (the bench reads it). Any other path with an upgrade
is a call.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from loguru import logger
from pipecat.transports.base_transport import TransportParams

from pipeswitch.config.loaders import TenantNotFound, TenantResolver
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.transports import metrics
from pipeswitch.transports.auth import check_access
from pipeswitch.transports.call_control import CallControl
from pipeswitch.transports.call_events import CallEventBridge
from pipeswitch.transports.call_info import BadCallRequest, CallInfo, parse_call_request
from pipeswitch.transports.dialects import make_dialect
from pipeswitch.transports.handshake import HandshakeWatchdog
from pipeswitch.transports.serializer import ModAudioStreamSerializer, pipeline_rate_for
from pipeswitch.transports.transport import (
    BOT_CHUNK_10MS,
    FreeSwitchCallTransport,
    PlaybackControl,
)

if TYPE_CHECKING:
    from loguru import Logger

# WebSocket close codes we use (sent to FreeSWITCH, which echoes them and fires
# mod_audio_stream::disconnect with the reason).
CLOSE_POLICY = 1008  # unknown tenant / bad URL
# libwsc accepts only 1000-1011 (not 1004-1006) and 3000-4999: 1012-1014 would come
# back as a 1002 protocol error, so "try again later" is an application code.
CLOSE_TRY_AGAIN = 4503  # over capacity or draining
CLOSE_INTERNAL = 1011


class CallHandler(Protocol):
    """Runs one call to completion on an upgraded, identified transport."""

    async def run_call(
        self, call: CallInfo, tenant: Tenant, transport: FreeSwitchCallTransport
    ) -> None:
        """Return when the call is over (the transport is closed afterwards)."""
        ...


@dataclass(frozen=True)
class Refusal:
    """Why a handler will not take a call (the server refuses it before counting it)."""

    kind: str
    reason: str
    code: int = CLOSE_TRY_AGAIN


class AdmittingHandler(CallHandler, Protocol):
    """A handler that admits calls first (per-tenant limits): a refused call is never
    counted as started, and its socket closes with the refusal's code and reason."""

    async def admit(self, call: CallInfo, tenant: Tenant) -> Refusal | None:
        """``None`` to take the call (``run_call`` or ``withdraw`` follows), else why not."""
        ...

    async def withdraw(self, call: CallInfo, tenant: Tenant) -> None:
        """An admitted call failed before ``run_call``: give its slot back."""
        ...


@dataclass
class ServerStats:
    """Process-level counters for /metrics and the bench."""

    calls_total: int = 0
    calls_active: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    upgrade_ms: list[float] = field(default_factory=list)

    def record_upgrade(self, ms: float) -> None:
        metrics.UPGRADE.observe(ms / 1000.0)
        self.upgrade_ms.append(ms)
        if len(self.upgrade_ms) > 10000:  # bounded: keep the recent half
            del self.upgrade_ms[:5000]


class CallServer:
    """Accepts mod_audio_stream connections and supervises their calls."""

    def __init__(
        self,
        settings: Settings,
        resolver: TenantResolver,
        handler: CallHandler,
        *,
        playback_control: PlaybackControl | None = None,
        call_control: CallControl | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.handler = handler
        self.playback_control = playback_control
        # The switch's event socket (ESL), shared by all calls: each call gets a
        # CallEventBridge (ESL playback, DTMF, hangup; transports/call_events.py).
        self.call_control = call_control
        self.stats = ServerStats()
        self.draining = False
        self.ready = True
        self.sampler = metrics.RuntimeSampler()
        self.handshakes = HandshakeWatchdog(
            settings.handshake_timeout_secs, settings.handshake_max_per_peer
        )

    def app(self, mounts: dict[str, web.Application] | None = None) -> web.Application:
        """The aiohttp application (routes for health, readiness, metrics, calls).

        ``mounts``: sub-applications by path prefix (the admin API), matched before calls.
        """
        app = web.Application(
            client_max_size=self.settings.max_message_bytes,
            middlewares=[self.handshakes.middleware],
        )
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._prometheus)
        app.router.add_get("/metrics.json", self._metrics)
        for prefix, sub in (mounts or {}).items():
            app.add_subapp(prefix, sub)
        app.router.add_get("/{tail:.*}", self._call)
        app.on_startup.append(self._start_sampler)
        app.on_cleanup.append(self._stop_sampler)
        return app

    async def _start_sampler(self, _: web.Application) -> None:
        self.sampler.start()

    async def _stop_sampler(self, _: web.Application) -> None:
        await self.handshakes.stop()
        await self.sampler.stop()

    def watch_handshakes(self, runner: web.BaseRunner) -> None:
        """Close connections that do not finish a request in time (after ``runner.setup()``;
        transports/handshake.py)."""
        self.handshakes.watch(runner.server)

    async def _prometheus(self, _: web.Request) -> web.Response:
        body, content_type = await metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "calls_active": self.stats.calls_active})

    def accepting(self) -> bool:
        """Whether a new call would be taken right now."""
        return (
            self.ready and not self.draining and self.stats.calls_active < self.settings.max_calls
        )

    async def _ready(self, _: web.Request) -> web.Response:
        ok = self.accepting()
        return web.json_response(
            {"ready": ok, "calls_active": self.stats.calls_active}, status=200 if ok else 503
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        ups = sorted(self.stats.upgrade_ms)
        p99 = ups[min(len(ups) - 1, int(len(ups) * 0.99))] if ups else None
        return web.json_response(
            {
                "calls_total": self.stats.calls_total,
                "calls_active": self.stats.calls_active,
                "refused": dict(self.stats.refused),
                "upgrade_ms_p99": p99,
            }
        )

    async def _call(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        ws = web.WebSocketResponse(
            autoclose=True,
            autoping=True,
            compress=False,  # decline permessage-deflate: deterministic wire format
            max_msg_size=self.settings.max_message_bytes,
            heartbeat=None,
        )
        if not ws.can_prepare(request).ok:
            return web.json_response({"error": "WebSocket upgrade expected"}, status=426)
        try:
            await ws.prepare(request)  # the 101 goes out here, before any slow work
        except ConnectionResetError:  # the switch gave up waiting (libwsc: 1 s)
            self.stats.refused["gone"] += 1
            metrics.call_refused("gone")
            logger.bind(call="-", tenant="-").warning(
                "{} closed before the upgrade answer ({:.0f} ms)",
                request.remote,
                (time.monotonic() - t0) * 1000.0,
            )
            return web.Response(status=400)  # aiohttp's write of it fails quietly
        self.stats.record_upgrade((time.monotonic() - t0) * 1000.0)
        log = logger.bind(call="-", tenant="-")
        try:
            call = parse_call_request(request.path, request.query_string)
        except BadCallRequest as exc:
            return await self._refuse(ws, log, "bad_url", str(exc))
        log = logger.bind(call=call.call_uuid, tenant=call.domain or "-")
        if not self.accepting():
            reason = "draining" if self.draining else "over capacity"
            return await self._refuse(ws, log, "capacity", reason, CLOSE_TRY_AGAIN)
        try:
            with logger.contextualize(call=call.call_uuid):  # the resolver's lines name the call
                tenant = await self.resolver.resolve(call.domain, call.destination)
        except TenantNotFound as exc:
            return await self._refuse(ws, log, "unknown_tenant", str(exc))
        except Exception as exc:  # the tenant store is down: refuse this call, keep serving
            return await self._refuse(
                ws, log, "tenant_error", f"tenant lookup failed: {exc}", CLOSE_INTERNAL
            )
        log = logger.bind(call=call.call_uuid, tenant=tenant.name)
        access = check_access(  # before any pipeline or provider connection (transports/auth.py)
            call_uuid=call.call_uuid,
            domain=call.domain,
            query=call.extra,
            headers=request.headers,
            peer=request.remote,
            access=tenant.access,
            policy=self.settings.accept_unsigned,
            now=time.time(),
        )
        if not access.allowed:
            return await self._refuse(ws, log, "auth", f"not authorized: {access.reason}")
        return await self.serve_call(ws, call, tenant, log, t0)

    async def serve_call(
        self,
        ws: web.WebSocketResponse,
        call: CallInfo,
        tenant: Tenant,
        log: Logger,
        t0: float,
    ) -> web.WebSocketResponse:
        """Run an upgraded, identified and authorized call until it ends (the web console's
        browser calls enter here too, after their own session check)."""
        admitting: AdmittingHandler | None = (
            self.handler if hasattr(self.handler, "admit") else None  # type: ignore[assignment]
        )
        if admitting is not None:
            refusal = await admitting.admit(call, tenant)
            if refusal is not None:
                return await self._refuse(
                    ws, log, refusal.kind, refusal.reason, refusal.code, tenant=tenant.name
                )
        self.stats.calls_total += 1
        self.stats.calls_active += 1
        metrics.call_started(tenant.name, tenant.pipeline)
        transport: FreeSwitchCallTransport | None = None
        bridge: CallEventBridge | None = None
        ran = False
        try:
            transport = self._transport(ws, call, tenant, log)
            if self.call_control is not None:
                bridge = CallEventBridge(self.call_control, transport).attach()
            log.info(
                "call up: rate={} mix={} dialect={} caller={} upgrade={:.1f}ms",
                transport.serializer.stream_rate,
                call.mix or tenant.audio_mix,
                tenant.playback,
                call.caller or "-",
                (time.monotonic() - t0) * 1000.0,
            )
            # Every log line of the call, Pipecat's own included (its tasks inherit the
            # context), carries the call uuid, the tenant and the pipeline kind.
            with logger.contextualize(
                call=call.call_uuid, tenant=tenant.name, pipeline=tenant.pipeline
            ):
                ran = True
                await self.handler.run_call(call, tenant, transport)
        except Exception as exc:
            log.exception("call failed: {}", exc)
            metrics.call_failed(tenant.name, tenant.pipeline, "exception")
            if transport is not None:
                await transport.close(CLOSE_INTERNAL, "internal error")
        finally:
            self.stats.calls_active -= 1
            metrics.call_ended(tenant.name, tenant.pipeline)
            if admitting is not None and not ran:
                await admitting.withdraw(call, tenant)
            if transport is not None and not ws.closed:
                await transport.close(1000, "call ended")
            elif not ws.closed:
                await ws.close(code=1000, message=b"call ended")
            if bridge is not None:
                await bridge.finish()
            log.info("call down after {:.1f}s", time.monotonic() - t0)
            if transport is not None:
                transport.release()
        return ws

    def _transport(
        self, ws: web.WebSocketResponse, call: CallInfo, tenant: Tenant, log: Logger
    ) -> FreeSwitchCallTransport:
        rate = call.rate or tenant.audio_rate
        mix = call.mix or tenant.audio_mix
        channels = 2 if mix == "stereo" else 1
        ctx = {"call": call.call_uuid, "tenant": tenant.name}
        serializer = ModAudioStreamSerializer(
            stream_rate=rate,
            channels=channels,
            dialect=make_dialect(tenant.playback),
            max_text_bytes=self.settings.max_text_bytes,
            log_context=ctx,
        )
        prate = pipeline_rate_for(rate)
        params = TransportParams(
            audio_in_enabled=True,
            audio_in_sample_rate=prate,
            audio_out_enabled=True,
            audio_out_sample_rate=prate,
            audio_out_10ms_chunks=BOT_CHUNK_10MS,  # written as 20 ms wire frames
            audio_out_end_silence_secs=0,
        )
        return FreeSwitchCallTransport(
            ws,
            serializer,
            params,
            call,
            playback_control=self.playback_control,
            log_context=ctx,
        )

    async def _refuse(
        self,
        ws: web.WebSocketResponse,
        log: Logger,
        kind: str,
        reason: str,
        code: int = CLOSE_POLICY,
        *,
        tenant: str | None = None,
    ) -> web.WebSocketResponse:
        self.stats.refused[kind] += 1
        metrics.call_refused(kind, tenant)
        log.warning("call refused ({}): {}", kind, reason)
        # Close reasons are limited to 123 bytes by RFC 6455.
        await ws.close(code=code, message=reason.encode("utf-8")[:120])
        return ws
