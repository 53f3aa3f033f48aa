"""The call controller: owns one call's pipeline worker from connect to hangup.

It builds the tenant's pipeline after the upgrade, speaks the first message when
the call connects, ends the call when the caller hangs up (or goes idle, or the
call runs past its limit), and reports what happened. Every failure stays inside
the call: an exception here is logged and ends this call only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from loguru import logger
from pipecat.frames.frames import TTSSpeakFrame
from pipecat.observers.user_bot_latency_observer import UserBotLatencyObserver
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.workers.runner import WorkerRunner

from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.cascade import CallPipeline, build_cascade
from pipeswitch.pipelines.services import ProviderEndpoints
from pipeswitch.transports import metrics
from pipeswitch.transports.call_info import CallInfo
from pipeswitch.transports.frames import CallMetadataFrame
from pipeswitch.transports.transport import FreeSwitchCallTransport


@dataclass
class CallRecord:
    """What one call did: kept for tests, the bench and the closing log line."""

    call: CallInfo
    tenant: str
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    metadata: dict[str, Any] | None = None
    turn_latencies: list[float] = field(default_factory=list)
    breakdowns: list[Any] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    end_reason: str = ""


CallFinishedHook = Callable[[CallRecord, CallPipeline], Awaitable[None]]


async def _post_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str) -> None:
    async with http.post(
        url,
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=aiohttp.ClientTimeout(total=30),
    ) as r:
        r.raise_for_status()


class CallSessions:
    """Runs calls for the server (implements :class:`transports.server.CallHandler`)."""

    def __init__(
        self,
        settings: Settings,
        endpoints: ProviderEndpoints,
        http: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.http = http
        self.active: dict[str, CallRecord] = {}
        self.finished_hooks: list[CallFinishedHook] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def _background(self, coro: Any, log: Any) -> None:
        """Fire-and-forget work that must never fail the call (kept referenced)."""

        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                log.warning("background task failed: {}", exc)

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _play_greeting(
        self, tenant: Tenant, transport: FreeSwitchCallTransport, rate: int, log: Any
    ) -> bool:
        """Fetch the (pre-synthesized, cached) greeting and start it; False = not played."""
        if not tenant.first_message:
            return False
        url = self.endpoints.piper_for_rate(rate)
        try:
            async with self.http.post(
                url,
                json={"text": tenant.first_message, "voice": tenant.voice},
                timeout=aiohttp.ClientTimeout(total=3),
            ) as r:
                r.raise_for_status()
                wav = await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("greeting fast path failed ({}); speaking it through the pipeline", exc)
            return False
        transport.output().play_prompt(wav[44:], rate, tenant.first_message)
        metrics.GREETING.labels(metrics.tenant_label(tenant.name)).observe(
            time.monotonic() - transport.stats.started_at
        )
        return True

    async def _warm_llm(self, tenant: Tenant) -> None:
        messages: list[dict[str, str]] = [{"role": "system", "content": tenant.system_prompt}]
        if tenant.first_message:
            messages.append({"role": "assistant", "content": tenant.first_message})
        ep = self.endpoints
        await _post_json(
            self.http, f"{ep.local_llm_root}/warm", {"messages": messages}, ep.local_api_key
        )

    async def run_call(
        self, call: CallInfo, tenant: Tenant, transport: FreeSwitchCallTransport
    ) -> None:
        """Build and run the call's pipeline until the call ends."""
        log = logger.bind(call=call.call_uuid, tenant=tenant.name)
        record = CallRecord(call=call, tenant=tenant.name)
        if tenant.pipeline != "cascade":
            log.error("pipeline kind {!r} is not available in this build", tenant.pipeline)
            metrics.call_failed(tenant.name, tenant.pipeline, "pipeline_unavailable")
            await transport.close(1011, f"pipeline {tenant.pipeline} unavailable")
            return
        rate = transport.params.audio_in_sample_rate or 8000
        # The greeting starts while the pipeline is still being built and connected.
        greeting = asyncio.ensure_future(self._play_greeting(tenant, transport, rate, log))
        cp = await build_cascade(tenant, transport, self.endpoints, self.http, rate)
        latency = UserBotLatencyObserver()
        provider_metrics = metrics.ProviderMetricsObserver(tenant.name)
        worker = PipelineWorker(
            cp.pipeline,
            params=PipelineParams(
                audio_in_sample_rate=rate,
                audio_out_sample_rate=rate,
                enable_metrics=True,
                send_initial_empty_metrics=False,
            ),
            observers=[latency, provider_metrics],
            enable_rtvi=False,
            # Pipecat's turn tracker observes every frame push; nothing here reads it.
            enable_turn_tracking=False,
            idle_timeout_secs=self.settings.idle_timeout_secs,
            name=f"call-{call.call_uuid}",
        )

        @latency.event_handler("on_latency_measured")
        async def _on_latency(_: Any, secs: float) -> None:
            record.turn_latencies.append(secs)
            metrics.TURN_LATENCY.labels(metrics.tenant_label(tenant.name), tenant.pipeline).observe(
                secs
            )
            log.info("turn latency {:.0f} ms (end of speech -> first bot audio)", secs * 1000)

        @latency.event_handler("on_first_bot_speech_latency")
        async def _on_first_speech(_: Any, secs: float) -> None:
            if greeting.done() and not greeting.result():  # spoken through the pipeline
                metrics.GREETING.labels(metrics.tenant_label(tenant.name)).observe(secs)

        @latency.event_handler("on_latency_breakdown")
        async def _on_breakdown(_: Any, breakdown: Any) -> None:
            record.breakdowns.append(breakdown)
            log.debug("turn breakdown: {}", "; ".join(breakdown.turn_contribution_lines()))

        @transport.event_handler("on_client_connected")
        async def _on_connected(_: Any) -> None:
            if tenant.first_message and not await greeting:
                await worker.queue_frame(TTSSpeakFrame(tenant.first_message))
            if self.endpoints.mode == "local" or tenant.providers.llm == "local":
                # Prefill the tenant's prompt while the greeting plays, so the first
                # turn's prompt is already in llama.cpp's cache.
                self._background(self._warm_llm(tenant), log)

        @transport.event_handler("on_call_metadata")
        async def _on_metadata(_: Any, frame: CallMetadataFrame) -> None:
            record.metadata = frame.data
            log.info("metadata: {}", frame.text[:200])

        @transport.event_handler("on_client_disconnected")
        async def _on_disconnected(_: Any, code: int | None, reason: str) -> None:
            record.end_reason = record.end_reason or f"caller closed ({code})"
            await worker.cancel(reason=f"caller hung up: {reason}")

        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(worker)
        limit = asyncio.get_running_loop().call_later(
            tenant.max_call_secs,
            lambda: asyncio.ensure_future(worker.end(reason="call time limit")),
        )
        self.active[call.call_uuid] = record
        try:
            await runner.run()
        finally:
            limit.cancel()
            self.active.pop(call.call_uuid, None)
            record.ended_at = time.monotonic()
            record.messages = [
                dict(m.items()) for m in cp.context.get_messages() if isinstance(m, dict)
            ]
            log.info(
                "call finished: {:.1f}s, {} turns, reason={}",
                record.ended_at - record.started_at,
                len(record.turn_latencies),
                record.end_reason or "pipeline ended",
            )
            for hook in self.finished_hooks:
                try:
                    await hook(record, cp)
                except Exception as exc:
                    log.warning("call-finished hook failed: {}", exc)
