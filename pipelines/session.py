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
from pipecat.frames.frames import EndFrame, ErrorFrame, TTSSpeakFrame
from pipecat.observers.base_observer import BaseObserver
from pipecat.observers.user_bot_latency_observer import UserBotLatencyObserver
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.types import NOT_GIVEN
from pipecat.workers.runner import WorkerRunner

from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.call_worker import CallWorker
from pipeswitch.pipelines.compose import (
    BuilderError,
    CallContext,
    CallPipeline,
    ServiceFactory,
    resolve_builder,
)
from pipeswitch.pipelines.dismantle import dismantle
from pipeswitch.pipelines.greeting_cache import GreetingCache
from pipeswitch.pipelines.local.warm import llm_warm_body
from pipeswitch.pipelines.piper_client import WavError
from pipeswitch.pipelines.recovery import install_apology, is_provider, watchdog_of
from pipeswitch.pipelines.services import CALL_LOOP, ProviderEndpoints, release_sdk_client
from pipeswitch.pipelines.tenancy import endpoints_for_tenant
from pipeswitch.pipelines.tracing import tracing_wanted
from pipeswitch.transports import metrics
from pipeswitch.transports.call_control import CallControl
from pipeswitch.transports.call_info import CallInfo
from pipeswitch.transports.frames import CallMetadataFrame
from pipeswitch.transports.transport import FreeSwitchCallTransport


async def _reap_leftover_tasks(runner: WorkerRunner, log: Any, rounds: int = 3) -> None:
    """Cancel what the call's processors left running after its pipeline finished.

    Pipecat only warns about such tasks ("dangling tasks"); a service reconnect that
    raced the call's end leaves a provider stream and its reconnect loop alive, holding
    the whole pipeline in memory and a socket open, for as long as the process runs.
    A few rounds, since cancelling one task can be what started another.
    """
    for _ in range(rounds):
        left = [t for t in runner.task_manager.current_tasks() if not t.done()]
        if not left:
            break
        log.warning(
            "call left {} task(s) running after its pipeline ended; cancelling: {}",
            len(left),
            ", ".join(t.get_name() for t in left),
        )
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=2.0)


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
    # Barge-ins: {"index": position in ``messages``, "sentence": what the bot was
    # saying, "heard": what of it the caller heard}.
    interruptions: list[dict[str, Any]] = field(default_factory=list)
    # Messages the receptionist's take_message tool took (name, number, reason).
    taken_messages: list[dict[str, Any]] = field(default_factory=list)
    end_reason: str = ""


CallFinishedHook = Callable[[CallRecord, CallPipeline], Awaitable[None]]

# Take each finished call apart (pipelines/dismantle.py) so it needs no full collection.
# Off only for the bench's A/B (experiment ``keep-call-cycles``).
DISMANTLE_CALLS = True


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
        self.greetings = GreetingCache()
        self.active: dict[str, CallRecord] = {}
        # The running worker of each active call, so shutdown can end them (end_all).
        self._workers: dict[str, PipelineWorker] = {}
        self.finished_hooks: list[CallFinishedHook] = []
        # The switch's event socket (ESL), when this process has one: the receptionist
        # tools transfer, hang up and send DTMF through it.
        self.call_control: CallControl | None = None
        # Extra Pipecat observers per call (the web console's live transcript and latency).
        self.observer_factories: list[Callable[[CallInfo, Tenant], list[BaseObserver]]] = []
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
            pcm, pcm_rate = self.greetings.get(
                url, tenant.first_message, tenant.voice
            ) or await self.greetings.fetch(self.http, url, tenant.first_message, tenant.voice)
        except (aiohttp.ClientError, TimeoutError, WavError) as exc:
            log.warning("greeting fast path failed ({}); speaking it through the pipeline", exc)
            return False
        transport.output().play_prompt(pcm, pcm_rate, tenant.first_message)
        metrics.GREETING.labels(metrics.tenant_label(tenant.name)).observe(
            time.monotonic() - transport.stats.started_at
        )
        return True

    async def _warm_llm(self, tenant: Tenant, context: LLMContext | None) -> None:
        tools = context.tools if context is not None else NOT_GIVEN
        body = await llm_warm_body(tenant.system_prompt, tenant.first_message, tools)
        ep = self.endpoints
        await _post_json(self.http, f"{ep.local_llm_root}/warm", body, ep.local_api_key)

    async def end_all(self, goodbye: str, grace_secs: float, cancel_wait_secs: float = 0.5) -> int:
        """End every active call (shutdown): a short goodbye where the pipeline can speak it,
        then EndFrame; calls still up after ``grace_secs`` are cancelled, waiting at most
        ``cancel_wait_secs`` for that (shutdown has a deadline). Returns how many calls had
        to be cancelled."""
        workers = dict(self._workers)
        for uuid, worker in workers.items():
            rec = self.active.get(uuid)
            if rec is not None:
                rec.end_reason = "server shutting down"
            frames: list[Any] = [TTSSpeakFrame(goodbye)] if goodbye else []
            try:
                await worker.queue_frames([*frames, EndFrame()])
            except Exception as exc:
                logger.bind(call=uuid).warning("could not queue the goodbye: {}", exc)
        deadline = asyncio.get_running_loop().time() + grace_secs
        while self._workers and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # bounded: the goodbye is a second or two
        stuck = dict(self._workers)
        cancels = []
        for uuid, worker in stuck.items():
            logger.bind(call=uuid).warning(
                "goodbye did not finish in {:.1f}s; cancelling", grace_secs
            )
            task = asyncio.ensure_future(worker.cancel(reason="server shutting down"))
            self._tasks.add(task)  # may outlive the wait below; keep it referenced
            task.add_done_callback(self._tasks.discard)
            cancels.append(task)
        if cancels:
            await asyncio.wait(cancels, timeout=cancel_wait_secs)
        return len(stuck)

    async def run_call(
        self, call: CallInfo, tenant: Tenant, transport: FreeSwitchCallTransport
    ) -> None:
        """Build and run the call's pipeline until the call ends."""
        log = logger.bind(call=call.call_uuid, tenant=tenant.name)
        record = CallRecord(call=call, tenant=tenant.name)
        try:
            # Checked when tenants are loaded; a tenant store may still hand us a new one.
            builder = resolve_builder(tenant.pipeline)
        except BuilderError as exc:
            log.error("call refused: {}", exc)
            metrics.call_failed(tenant.name, tenant.pipeline, "pipeline_unavailable")
            await transport.close(1011, f"pipeline {tenant.pipeline} unavailable")
            return
        rate = transport.params.audio_in_sample_rate or 8000
        # Services are built in worker threads; their shared clients belong to this loop.
        CALL_LOOP.set(asyncio.get_running_loop())
        # The greeting starts while the pipeline is still being built and connected.
        greeting = asyncio.ensure_future(self._play_greeting(tenant, transport, rate, log))
        endpoints = endpoints_for_tenant(self.endpoints, tenant)  # the tenant's own keys win
        ctx = CallContext(
            tenant=tenant,
            call=call,
            transport=transport,
            sample_rate=rate,
            services=ServiceFactory(tenant, endpoints, self.http, rate, call.call_uuid),
            endpoints=endpoints,
            http=self.http,
            call_control=self.call_control,
        )
        cp = await builder(ctx)
        latency = UserBotLatencyObserver()
        provider_metrics = metrics.ProviderMetricsObserver(tenant.name)
        traced = tracing_wanted(self.settings)
        # Observers from outside (the console, tests) may be read after the call: taking
        # the call apart leaves their data (pipelines/dismantle.py, ``inspect``).
        extra_observers = [o for make in self.observer_factories for o in make(call, tenant)]
        worker = CallWorker(
            cp.pipeline,
            params=PipelineParams(
                audio_in_sample_rate=rate,
                audio_out_sample_rate=rate,
                enable_metrics=True,
                send_initial_empty_metrics=False,
            ),
            observers=[
                latency,
                provider_metrics,
                *extra_observers,
            ],
            enable_rtvi=False,
            # Pipecat's turn tracker observes every frame push; only tracing reads it.
            enable_turn_tracking=traced,
            enable_tracing=traced,
            conversation_id=call.call_uuid,
            additional_span_attributes={"tenant": tenant.name, "pipeline": tenant.pipeline},
            idle_timeout_secs=self.settings.idle_timeout_secs,
            name=f"call-{call.call_uuid}",
        )
        install_apology(worker, log, watchdog=watchdog_of(cp.parts))

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

        @worker.event_handler("on_pipeline_error")
        async def _on_error(_: Any, frame: ErrorFrame) -> None:
            # Pipecat logs an uncaught exception in a processor and carries on; for a
            # phone call a processor that raised (ours or a developer's) is a broken
            # call: end this call, and only this one.
            # A provider's failure (connection refused, a dropped or malformed stream) is not
            # a broken call: recovery.py apologises and the next turn tries again.
            uncaught = frame.category is ErrorCategory.UNKNOWN and frame.exception is not None
            if uncaught and not frame.fatal and not is_provider(frame.processor):
                where = frame.processor.name if frame.processor is not None else "pipeline"
                log.opt(exception=frame.exception).error(
                    "call ends: {} raised {}: {}",
                    where,
                    type(frame.exception).__name__,
                    frame.exception,
                )
                record.end_reason = f"error in {where}"
                await worker.cancel(reason=f"error in {where}")

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
                self._background(self._warm_llm(tenant, cp.context), log)

        @transport.event_handler("on_call_metadata")
        async def _on_metadata(_: Any, frame: CallMetadataFrame) -> None:
            record.metadata = frame.data
            log.info("metadata: {}", frame.text[:200])

        @transport.event_handler("on_client_disconnected")
        async def _on_disconnected(_: Any, code: int | None, reason: str) -> None:
            record.end_reason = record.end_reason or f"caller closed ({code})"
            await worker.cancel(reason=f"caller hung up: {reason}")

        @worker.event_handler("on_pipeline_started")
        async def _on_started(*_: Any) -> None:
            # ESL's CHANNEL_HANGUP can come 0-3 ms after the hangup, before the pipeline
            # was built and the handler above existed (a real FreeSWITCH, a caller who
            # hangs up during the greeting): that call must not run until its idle timeout.
            if transport.closed.is_set():
                record.end_reason = record.end_reason or "caller closed (before start)"
                await worker.cancel(reason="caller hung up before the pipeline started")

        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(worker)
        # An EndFrame, not worker.end(): the runner answers end() by cancelling, which
        # cuts the bot off mid-word and (with ESL) leaves the channel parked in silence.
        limit = asyncio.get_running_loop().call_later(
            tenant.max_call_secs,
            lambda: asyncio.ensure_future(worker.queue_frame(EndFrame(reason="call time limit"))),
        )
        self.active[call.call_uuid] = record
        self._workers[call.call_uuid] = worker
        try:
            await runner.run()
        finally:
            limit.cancel()
            await _reap_leftover_tasks(runner, log)
            self.active.pop(call.call_uuid, None)
            self._workers.pop(call.call_uuid, None)
            record.ended_at = time.monotonic()
            if cp.context is not None:
                # Positions kept (a provider-specific message becomes {}), so the
                # interruptions' indexes still point at their messages.
                record.messages = [
                    dict(m.items()) if isinstance(m, dict) else {}
                    for m in cp.context.get_messages()
                ]
            if ctx.tools is not None:
                record.taken_messages = [dict(vars(m)) for m in ctx.tools.state.messages]
            record.interruptions = [
                {"index": i.index, "sentence": i.sentence, "heard": i.heard}
                for h in ctx.heard
                for i in h.interruptions
            ]
            wire_in, wire_out = transport.serializer.stats, transport.stats
            log.info(
                "call finished: {:.1f}s, {} turns, reason={}; in: {} audio msgs, {} misaligned, "
                "{} text ({} bad, {} oversized), {} dtmf; out: {:.1f}s audio in {} msgs, {} clears, "
                "{} underruns",
                record.ended_at - record.started_at,
                len(record.turn_latencies),
                record.end_reason or "pipeline ended",
                wire_in.audio_messages,
                wire_in.misaligned_messages,
                wire_in.text_messages,
                wire_in.bad_text,
                wire_in.oversized_text,
                wire_in.dtmf,
                wire_out.audio_out_secs,
                wire_out.messages_out,
                wire_out.clears,
                wire_out.underruns,
            )
            for hook in self.finished_hooks:
                try:
                    await hook(record, cp)
                except Exception as exc:
                    log.warning("call-finished hook failed: {}", exc)
            if DISMANTLE_CALLS:
                # Freed by reference counting as this returns, not by a full collection
                # that would stall every other call (pipelines/dismantle.py). The
                # transport stays whole: the server closes it after this returns.
                for part in cp.parts.values():
                    release_sdk_client(part)
                roots = (worker, runner, cp, transport.input(), transport.output())
                readable = [*cp.parts.values(), *extra_observers]
                dismantle(roots, keep=(transport,), inspect=readable)
