"""Assemble and run the whole server: tenants, model processes, providers, sockets.

:class:`Pipeswitch` is what ``pipeswitch serve``, the demo, the tests and the
bench all start, so they exercise the same wiring.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web
from loguru import logger

from pipeswitch.config.loaders import (
    ConfigError,
    StaticTenantLoader,
    TenantLoader,
    TenantResolver,
    builtin_loader,
    load_tenant_file,
)
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines import event_loop
from pipeswitch.pipelines.collector import CallTimeCollector
from pipeswitch.pipelines.compose import BuilderError, check_tenant, load_builtin_builders
from pipeswitch.pipelines.local.models import (
    STT_MODEL_ENV,
    ModelSourceError,
    ModelSources,
    piper_voice_name,
    resolve_model_sources,
)
from pipeswitch.pipelines.local.supervisor import LocalModelServers
from pipeswitch.pipelines.memtrim import trim_free_memory
from pipeswitch.pipelines.services import ProviderEndpoints, close_shared_clients
from pipeswitch.pipelines.session import CallSessions
from pipeswitch.pipelines.startup import (
    StartupError,
    check_port_free,
    check_provider_keys,
)
from pipeswitch.pipelines.tenancy import Tenancy
from pipeswitch.pipelines.tracing import setup_tracing
from pipeswitch.pipelines.turn_based import fallback_mounts
from pipeswitch.pipelines.vad import shared_batcher
from pipeswitch.processors.turn_watchdog import RECOVERY_PHRASES
from pipeswitch.transports import metrics
from pipeswitch.transports.esl import EslClient
from pipeswitch.transports.handoff import BalanceConfig, BalancedSite, ConnectionBalancer
from pipeswitch.transports.server import CallServer


def load_tenants(settings: Settings) -> tuple[TenantLoader, str | None]:
    """The tenant loader for this deployment and its default tenant, if any.

    Raises :class:`~pipeswitch.config.loaders.ConfigError` (one line) for an unusable file.
    """
    if settings.config_file is None:
        loader = builtin_loader()
        if settings.piper_voice:
            # The user's own voice replaces the embedded one for the built-in tenant.
            voice = piper_voice_name(settings.piper_voice)
            loader = StaticTenantLoader(
                [t.model_copy(update={"voice": voice}) for t in loader.all()],
                default=loader.default,
            )
        return loader, loader.default
    static = load_tenant_file(settings.config_file)
    for tenant in static.all():
        try:
            check_tenant(tenant)
        except BuilderError as exc:
            raise ConfigError(f"{settings.config_file}: tenant {tenant.name!r}: {exc}") from None
    return static, static.default


def settings_endpoints(settings: Settings) -> ProviderEndpoints:
    """Cloud endpoints and keys from the settings; model servers are filled in later."""
    return ProviderEndpoints(
        mode=settings.providers,
        piper_url="",
        deepgram_url=settings.deepgram_url,
        deepgram_api_key=settings.deepgram_api_key.get_secret_value(),
        groq_base_url=settings.groq_base_url,
        groq_api_key=settings.groq_api_key.get_secret_value(),
        openai_base_url=settings.openai_base_url,
        openai_api_key=settings.openai_api_key.get_secret_value(),
        google_api_key=settings.google_api_key.get_secret_value(),
        elevenlabs_api_key=settings.elevenlabs_api_key.get_secret_value(),
    )


def needs_local_models(ep: ProviderEndpoints) -> bool:
    """Whether this process must start model servers (none were handed to it)."""
    if not ep.piper_url:
        return True
    return ep.mode == "local" and not (ep.local_stt_base_url and ep.local_llm_base_url)


def model_sources(settings: Settings) -> ModelSources:
    """The user's own model files (settings), checked or fetched; StartupError if unusable."""
    local = settings.providers == "local"
    try:
        return resolve_model_sources(
            llm=settings.local_llm_model if local else "",
            stt=settings.local_stt_model if local else "",
            piper=settings.piper_voice,
            allow_download=settings.allow_model_download,
        )
    except ModelSourceError as exc:
        raise StartupError(str(exc)) from None


def start_local_models(
    settings: Settings,
    greetings: list[str],
    rates: tuple[int, ...] = (8000, 16000),
    sources: ModelSources | None = None,
) -> LocalModelServers:
    """The model processes this deployment needs (Piper always; STT/LLM when local)."""
    local = settings.providers == "local"
    if sources is None:
        sources = model_sources(settings)
    extra: dict[str, list[str]] = {}
    if sources.llm is not None:
        extra["llm"] = ["--model", str(sources.llm)]
    if sources.stt is not None:
        # The Whisper server finds its model through the environment it inherits.
        os.environ[STT_MODEL_ENV] = str(sources.stt)
    if sources.piper is not None:
        # The user's voice is the default; the embedded one stays loaded for tenants naming it.
        extra["piper"] = ["--voice", "joe"]
    return LocalModelServers(
        piper=True,
        whisper=local,
        llm=local,
        piper_voice=str(sources.piper) if sources.piper is not None else "joe",
        extra_args=extra,
        # Shutdown must end within the drain timeout + 2 s; model servers keep no state, and
        # llama.cpp may sit in a generation for seconds after SIGTERM.
        stop_timeout=0.7,
        piper_warm=greetings,
        # Every rate a call can arrive at: a greeting synthesized on demand at 16 kHz cost
        # 170-210 ms before the first word; from the cache it is tens of ms at any rate.
        piper_warm_rates=rates,
        # Piper alone on the CPU: 2 ONNX threads cut time to first audio ~20 %; next to
        # the local LLM, 1 thread was faster (both measured).
        piper_threads=1 if local else 2,
    )


def endpoints_with_local(ep: ProviderEndpoints, models: LocalModelServers) -> ProviderEndpoints:
    """Fill the endpoints this deployment's model servers provide."""
    children = models.children
    return replace(
        ep,
        piper_url=ep.piper_url or models.piper_url(None),
        local_stt_base_url=ep.local_stt_base_url
        or (models.whisper_base_url if "whisper" in children else ""),
        local_llm_base_url=ep.local_llm_base_url
        or (models.llm_base_url if "llm" in children else ""),
        local_api_key=ep.local_api_key or models.api_key,
    )


class Pipeswitch:
    """One server process: start(), then calls are answered until stop()."""

    def __init__(
        self,
        settings: Settings,
        *,
        loader: TenantLoader | None = None,
        default_tenant: str | None = None,
        endpoints: ProviderEndpoints | None = None,
        local_servers: LocalModelServers | None = None,
        port_shared: bool = False,
    ) -> None:
        self.settings = settings
        # PostgreSQL tenants, Redis call state, records, admin API - when configured.
        self.tenancy = Tenancy(settings)
        if loader is None and self.tenancy.loader is not None:
            loader, default_tenant = self.tenancy.loader, None
        if loader is None:
            loader, default_tenant = load_tenants(settings)
        self.loader = loader
        self.resolver = TenantResolver(
            loader,
            default=default_tenant,
            answer_any_domain=settings.default_tenant_answers_any_domain,
        )
        self._default_tenant = default_tenant
        self._endpoints = endpoints
        self._local = local_servers
        self._own_local = False
        # True in a worker of ``serve --workers N``: its siblings hold the port on purpose.
        self._port_shared = port_shared
        self._checked = False
        self._sources: ModelSources | None = None
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        # A worker of ``serve --workers N``: connections handed to and from its siblings.
        self.balancer: ConnectionBalancer | None = None
        self.sessions: CallSessions | None = None
        # While calls are up, automatic collection is paused (pipelines/collector.py).
        self.collector = CallTimeCollector(self._calls_up)
        self.server: CallServer | None = None
        self.port: int = settings.port
        # One ESL connection per process, shared by all calls (call control).
        self.esl: EslClient | None = None

    def _calls_up(self) -> int:
        return len(self.sessions.active) if self.sessions is not None else 0

    @property
    def endpoints(self) -> ProviderEndpoints:
        """Where the providers are (valid after start())."""
        assert self._endpoints is not None, "start() first"
        return self._endpoints

    def _tenants(self) -> list[Tenant]:
        if isinstance(self.loader, StaticTenantLoader):
            return self.loader.all()
        return []

    def _greetings(self) -> list[str]:
        """Phrases Piper synthesizes at start-up: greetings, and the shutdown goodbye."""
        texts = {t.first_message for t in self._tenants() if t.first_message}
        # A speech-to-speech call that falls back to the cascade apologizes first: have it
        # ready (synthesized on demand it cost ~0.8 s of the switch).
        texts |= {
            t.providers.s2s_apology
            for t in self._tenants()
            if t.pipeline != "cascade" and t.providers.s2s_fallback and t.providers.s2s_apology
        }
        if self.settings.shutdown_goodbye:
            texts.add(self.settings.shutdown_goodbye)
        # The turn watchdog's holding phrase and apologies (cached per call at its start).
        if any(t.turns.watchdog_secs > 0 for t in self._tenants()):
            texts |= set(RECOVERY_PHRASES)
        return sorted(texts)

    def _log_tenants(self) -> None:
        tenants = self._tenants()
        if isinstance(self.loader, StaticTenantLoader):
            logger.info(
                "tenants loaded from {}: {} (default: {})",
                self.settings.config_file or "built-in configuration",
                ", ".join(sorted(t.name for t in tenants)) or "none",
                self._default_tenant or "none",
            )
        else:
            logger.info("tenants come from {}", type(self.loader).__name__)
        if self.settings.default_tenant_answers_any_domain:
            if self._default_tenant:
                logger.warning(
                    "PIPESWITCH_DEFAULT_TENANT_ANSWERS_ANY_DOMAIN is on: tenant {!r} answers "
                    "calls for every domain no tenant claims (single-tenant installs only)",
                    self._default_tenant,
                )
            else:
                logger.warning(
                    "PIPESWITCH_DEFAULT_TENANT_ANSWERS_ANY_DOMAIN is on but there is no "
                    "default tenant; unknown domains are still refused"
                )

    def check_startup(self) -> None:
        """Fail fast, before any process starts: port taken, keys missing (StartupError)."""
        if not self._port_shared:
            check_port_free(self.settings.host, self.settings.port)
        ep = self._endpoints or settings_endpoints(self.settings)
        if ep.mode == "real":
            check_provider_keys(self.settings, self._tenants())
        if self._local is None and needs_local_models(ep):
            self._sources = model_sources(self.settings)
        self._checked = True

    def use_endpoints(self, endpoints: ProviderEndpoints) -> None:
        """Providers started after construction (the emulators of ``--providers emulated``)."""
        self._endpoints = endpoints

    async def start(self) -> None:
        """Start model processes, then listen. Returns once calls can be taken.

        Raises :class:`StartupError` (one line for the operator) when the port is taken or
        a key the tenants need is missing, before any model process starts.
        """
        s = self.settings
        if not self._checked:
            self.check_startup()
        ep = self._endpoints or settings_endpoints(s)
        self._log_tenants()
        if self._local is None and needs_local_models(ep):
            # Greetings are fetched at the call's pipeline rate: 8 or 16 kHz, whatever the
            # stream rate (pipeline_rate_for).
            self._local = start_local_models(s, self._greetings(), (8000, 16000), self._sources)
            self._own_local = True
        if self._local is not None:
            if self._own_local:
                await self._local.start()
            ep = endpoints_with_local(ep, self._local)
        self._endpoints = ep
        shared_batcher()  # build the Silero session now, not on the first call
        load_builtin_builders()  # likewise the pipeline kinds' imports (0.3-0.6 s)
        setup_tracing(s)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
        )
        self.sessions = CallSessions(s, self._endpoints, self._http)
        self.sessions.finished_hooks.append(self._collect_after_calls)
        handler = await self.tenancy.start(self.sessions)
        self.esl = await self._start_esl()
        self.sessions.call_control = self.esl
        self.server = CallServer(s, self.resolver, handler, call_control=self.esl)
        self.tenancy.bind(self.server.stats)
        self._metrics_source = metrics.model_queue_source(
            self._http,
            {
                "piper": self._endpoints.piper_url.split("?", 1)[0].removesuffix("/tts"),
                "whisper": self._endpoints.local_stt_base_url.removesuffix("/v1"),
                "llm": self._endpoints.local_llm_root,
            },
            self._endpoints.local_api_key,
        )
        metrics.add_external_source(self._metrics_source)
        mounts = self.tenancy.mounts()
        mounts.update(fallback_mounts(self))  # /turn (turn-based), /unicast (needs ESL)
        if self.tenancy.loader is not None:  # the web console needs the tenant database
            from pipeswitch.pipelines.console.app import mount_console

            mounts["/console"] = mount_console(self)
        self._runner = web.AppRunner(
            self.server.app(mounts=mounts),
            handle_signals=False,
            access_log=None,
            # Calls are ended before the runner closes; a handler still closing its socket
            # after that is cut (shutdown ends within the drain timeout + 2 s).
            shutdown_timeout=RUNNER_SHUTDOWN_SECS,
        )
        await self._runner.setup()
        self.server.watch_handshakes(self._runner)  # slow-loris sockets (transports/handshake.py)
        # Only the workers of one ``serve --workers N`` share a port (SO_REUSEPORT); a single
        # server binds exclusively, so nothing else can join its port either.
        balance = BalanceConfig.from_env() if self._port_shared else None
        site: web.TCPSite
        if balance is not None:
            # The workers even out their calls at accept (transports/handoff.py).
            self.balancer = ConnectionBalancer(balance)
            site = BalancedSite(self._runner, s.host, s.port, self.balancer)
        else:
            site = web.TCPSite(self._runner, s.host, s.port, reuse_port=self._port_shared)
        await site.start()
        if self._runner.addresses:
            self.port = int(self._runner.addresses[0][1])
        # Start-up garbage (imports, model servers' handles) never needs collecting again;
        # freezing it keeps gen-2 pauses short while calls run.
        gc.collect()
        gc.freeze()
        # While calls are up, automatic collection is paused and full collections run on
        # the collector's schedule (pipelines/collector.py): young collections found nothing
        # but stalled audio.
        self.collector.start()
        logger.info(
            "pipeswitch listening on {}:{} (providers={}, models: {}, event loop: {})",
            s.host,
            self.port,
            s.providers,
            ", ".join(self._local.children) if self._local else "shared",
            event_loop.describe(),
        )

    async def _start_esl(self) -> EslClient | None:
        """The event socket client, when enabled or a tenant plays files (community build).

        It connects in the background (and keeps reconnecting); calls placed while it
        is down keep their audio and lose only ESL playback and call control.
        """
        s = self.settings
        if not (s.esl_enabled or any(t.playback == "file" for t in self._tenants())):
            return None
        esl = EslClient(s.esl_host, s.esl_port, s.esl_password.get_secret_value())
        await esl.start()  # the client logs whether (and when) it gets through
        return esl

    def stop_accepting(self) -> None:
        """From now on /ready answers 503 and new calls are refused with 4503 (and sibling
        workers hand this one no more connections)."""
        if self.server is not None:
            self.server.draining = True
        if self.balancer is not None:
            self.balancer.stop()
            self.balancer = None

    async def drain(self, timeout_secs: float, now: asyncio.Event | None = None) -> None:
        """Let active calls finish on their own for up to ``timeout_secs`` (or until ``now``)."""
        if self.server is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_secs
        while self.server.stats.calls_active and loop.time() < deadline:  # noqa: ASYNC110
            if now is not None and now.is_set():
                return
            await asyncio.sleep(0.1)  # bounded drain poll

    async def end_calls(self, goodbye: str, grace_secs: float, settle_secs: float = 0.5) -> None:
        """End the calls still up: goodbye + EndFrame, cancelled after ``grace_secs``; then
        up to ``settle_secs`` for their handlers to close the sockets (1000)."""
        if self.sessions is None or self.server is None or not self.server.stats.calls_active:
            return
        n = self.server.stats.calls_active
        cancelled = await self.sessions.end_all(goodbye, grace_secs, settle_secs)
        logger.info("ended {} calls at shutdown ({} cancelled)", n, cancelled)
        # Let each call's handler close its socket (1000) before the runner goes away.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle_secs
        while self.server.stats.calls_active and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def stop(self, drain_secs: float = 0.0) -> None:
        """Stop taking calls, let active ones finish up to ``drain_secs``, end the rest."""
        self.stop_accepting()
        await self.drain(drain_secs)
        await self.end_calls("", GOODBYE_GRACE_SECS)
        await self.close()

    async def close(self) -> None:
        """Release the socket, the HTTP pool and the model processes this server started."""
        models: asyncio.Future[None] | None = None
        if self._local is not None and self._own_local:
            # The calls are over; the model processes' exit is the slow part of a shutdown,
            # so it runs alongside the rest.
            models = asyncio.ensure_future(self._local.stop())
            self._own_local = False
        await self.collector.stop()  # automatic collection as it was before start()
        if self.balancer is not None:
            self.balancer.stop()
            self.balancer = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            metrics.remove_external_source(self._metrics_source)
        await self.tenancy.close()  # calls are over: flush their records
        if self.esl is not None:
            await self.esl.close()
            self.esl = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        await close_shared_clients()
        if models is not None:
            await models

    async def _collect_after_calls(self, _record: Any, _cp: Any) -> None:
        """Collect finished calls' reference cycles when the last call ends.

        A call used to leave ~1,700 objects in cycles (Pipecat processors, tasks, event
        handlers) holding its buffers and sockets; taken apart (pipelines/dismantle.py) it
        leaves ~20. While other calls run, :class:`CallTimeCollector` collects them every so
        many ended calls and on its clock; at the idle point a full collection costs nobody's
        audio.
        """
        if self.sessions is None:
            return
        if self.sessions.active:
            self.collector.call_ended()
            return
        self.collector.collect_now("idle")
        await trim_free_memory()  # what glibc kept free in its per-thread arenas

    async def __aenter__(self) -> Pipeswitch:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


# How long a call ended by shutdown may take to say its goodbye before it is cancelled.
GOODBYE_GRACE_SECS = 1.2
# After the drain timeout, everything must be over within this (the goodbye included).
SHUTDOWN_AFTER_DRAIN_SECS = 2.0
# What closing takes after the calls: the sockets, the HTTP pool, the model processes.
CLOSE_RESERVE_SECS = 0.8
RUNNER_SHUTDOWN_SECS = 0.3


async def serve_forever(app: Pipeswitch, drain_secs: float | None = None) -> None:
    """Run until SIGINT/SIGTERM, then shut down within ``drain_secs`` + ~2 s.

    First signal: stop accepting (/ready 503, new calls 4503), let active calls finish up
    to the drain timeout, end the rest with a short goodbye, close. A second signal skips
    the waits: calls are cancelled and closed at once.
    """
    drain = app.settings.drain_timeout_secs if drain_secs is None else drain_secs
    stop = asyncio.Event()
    now = asyncio.Event()
    loop = asyncio.get_running_loop()

    signalled_at: list[float] = []

    def _on_signal() -> None:
        if not signalled_at:
            signalled_at.append(time.monotonic())
        if stop.is_set():
            if not now.is_set():
                logger.warning("second signal: ending all calls now")
            now.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal)
    try:
        await app.start()
        await stop.wait()
        t0 = signalled_at[0] if signalled_at else time.monotonic()
        active = app.server.stats.calls_active if app.server else 0
        logger.info("shutting down: {} active calls may finish for up to {:.0f}s", active, drain)
        app.stop_accepting()
        await app.drain(drain, now)
        # What is left of the 2 s after the drain, minus what closing needs.
        left = t0 + drain + SHUTDOWN_AFTER_DRAIN_SECS - CLOSE_RESERVE_SECS - time.monotonic()
        grace = 0.0 if now.is_set() else max(0.0, min(GOODBYE_GRACE_SECS, left - 0.3))
        await app.end_calls(
            "" if now.is_set() else app.settings.shutdown_goodbye,
            grace,
            settle_secs=max(0.1, min(0.5, left - grace)),
        )
        logger.info("calls ended after {:.1f}s; closing", time.monotonic() - t0)
    finally:
        await app.close()
        if signalled_at:
            logger.info(
                "stopped {:.2f}s after the signal (drain timeout {:.0f}s)",
                time.monotonic() - signalled_at[0],
                drain,
            )
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
