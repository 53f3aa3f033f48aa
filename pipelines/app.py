"""Assemble and run the whole server: tenants, model processes, providers, sockets.

:class:`Pipeswitch` is what ``pipeswitch serve``, the demo, the tests and the
bench all start, so they exercise the same wiring.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web
from loguru import logger

from pipeswitch.config.loaders import (
    StaticTenantLoader,
    TenantLoader,
    TenantResolver,
    builtin_loader,
    load_tenant_file,
)
from pipeswitch.config.settings import Settings
from pipeswitch.pipelines.local.supervisor import LocalModelServers
from pipeswitch.pipelines.services import ProviderEndpoints
from pipeswitch.pipelines.session import CallSessions
from pipeswitch.pipelines.tracing import setup_tracing
from pipeswitch.pipelines.vad import shared_batcher
from pipeswitch.transports import metrics
from pipeswitch.transports.esl import EslClient
from pipeswitch.transports.server import CallServer


def load_tenants(settings: Settings) -> tuple[TenantLoader, str | None]:
    """The tenant loader for this deployment and its default tenant, if any."""
    if settings.config_file is None:
        loader = builtin_loader()
        return loader, loader.default
    static = load_tenant_file(settings.config_file)
    return static, static.default


def settings_endpoints(settings: Settings) -> ProviderEndpoints:
    """Cloud endpoints and keys from the settings; model servers are filled in later."""
    return ProviderEndpoints(
        mode=settings.providers,
        piper_url="",
        deepgram_url=settings.deepgram_url,
        deepgram_api_key=settings.deepgram_api_key,
        groq_base_url=settings.groq_base_url,
        groq_api_key=settings.groq_api_key,
    )


def needs_local_models(ep: ProviderEndpoints) -> bool:
    """Whether this process must start model servers (none were handed to it)."""
    if not ep.piper_url:
        return True
    return ep.mode == "local" and not (ep.local_stt_base_url and ep.local_llm_base_url)


def start_local_models(settings: Settings, greetings: list[str]) -> LocalModelServers:
    """The model processes this deployment needs (Piper always; STT/LLM when local)."""
    local = settings.providers == "local"
    return LocalModelServers(
        piper=True,
        whisper=local,
        llm=local,
        piper_warm=greetings,
        piper_warm_rate=8000,
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
    ) -> None:
        self.settings = settings
        if loader is None:
            loader, default_tenant = load_tenants(settings)
        self.loader = loader
        self.resolver = TenantResolver(loader, default=default_tenant)
        self._endpoints = endpoints
        self._local = local_servers
        self._own_local = False
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.sessions: CallSessions | None = None
        self.server: CallServer | None = None
        self.port: int = settings.port
        # One ESL connection per process, shared by all calls (call control).
        self.esl: EslClient | None = None

    @property
    def endpoints(self) -> ProviderEndpoints:
        """Where the providers are (valid after start())."""
        assert self._endpoints is not None, "start() first"
        return self._endpoints

    def _greetings(self) -> list[str]:
        if isinstance(self.loader, StaticTenantLoader):
            return sorted({t.first_message for t in self.loader.all() if t.first_message})
        return []

    async def start(self) -> None:
        """Start model processes, then listen. Returns once calls can be taken."""
        s = self.settings
        ep = self._endpoints or settings_endpoints(s)
        if self._local is None and needs_local_models(ep):
            self._local = start_local_models(s, self._greetings())
            self._own_local = True
        if self._local is not None:
            if self._own_local:
                await self._local.start()
            ep = endpoints_with_local(ep, self._local)
        self._endpoints = ep
        shared_batcher()  # build the Silero session now, not on the first call
        setup_tracing(s)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
        )
        self.sessions = CallSessions(s, self._endpoints, self._http)
        self.esl = await self._start_esl()
        self.server = CallServer(s, self.resolver, self.sessions, call_control=self.esl)
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
        self._runner = web.AppRunner(self.server.app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.host, s.port, reuse_port=True)
        await site.start()
        if self._runner.addresses:
            self.port = int(self._runner.addresses[0][1])
        # Start-up garbage (imports, model servers' handles) never needs collecting again;
        # freezing it keeps gen-2 pauses short while calls run (capacity baseline).
        gc.collect()
        gc.freeze()
        logger.info(
            "pipeswitch listening on {}:{} (providers={}, models: {})",
            s.host,
            self.port,
            s.providers,
            ", ".join(self._local.children) if self._local else "shared",
        )

    async def _start_esl(self) -> EslClient | None:
        """The event socket client, when enabled or a tenant plays files (community build).

        It connects in the background (and keeps reconnecting); calls placed while it
        is down keep their audio and lose only ESL playback and call control.
        """
        s = self.settings
        tenants = self.loader.all() if isinstance(self.loader, StaticTenantLoader) else []
        if not (s.esl_enabled or any(t.playback == "file" for t in tenants)):
            return None
        esl = EslClient(s.esl_host, s.esl_port, s.esl_password.get_secret_value())
        await esl.start()  # the client logs whether (and when) it gets through
        return esl

    async def stop(self, drain_secs: float = 0.0) -> None:
        """Stop taking calls, let active ones finish up to ``drain_secs``, then shut down."""
        if self.server is not None:
            self.server.draining = True
            deadline = asyncio.get_running_loop().time() + drain_secs
            while self.server.stats.calls_active and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # bounded drain poll
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            metrics.remove_external_source(self._metrics_source)
        if self.esl is not None:
            await self.esl.close()
            self.esl = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._local is not None and self._own_local:
            await self._local.stop()

    async def __aenter__(self) -> Pipeswitch:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


async def serve_forever(app: Pipeswitch, drain_secs: float = 30.0) -> None:
    """Run until SIGINT/SIGTERM, then drain active calls."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    try:
        await stop.wait()
        logger.info(
            "shutting down: draining {} active calls",
            app.server.stats.calls_active if app.server else 0,
        )
    finally:
        await app.stop(drain_secs=drain_secs)
