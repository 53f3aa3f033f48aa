"""Multi-tenant wiring: PostgreSQL tenants, Redis call state, call records, the admin API.

:class:`Tenancy` is what :class:`~pipeswitch.pipelines.app.Pipeswitch` starts next to the call
server. With neither ``PIPESWITCH_DATABASE_URL`` nor ``PIPESWITCH_REDIS_URL`` it adds only an
in-process per-tenant limit (file tenants, no records, as before).

Per call, :class:`TenancyCallHandler` wraps the call controller: it takes a slot in the
tenant's concurrent-call limit (shared across instances through Redis) before the pipeline is
built - over the limit the call is closed with 4503 and a reason FreeSWITCH's
``mod_audio_stream::disconnect`` handler can act on (e.g. transfer to a human queue) - and
releases it when the call ends. Call records are handed to the batched writer from the call
controller's finished hook, after the call, never on the audio path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from aiohttp import web
from loguru import logger
from pipecat.observers.base_observer import BaseObserver

from pipeswitch.config.call_state import CallState, default_instance_id, make_call_state
from pipeswitch.config.db import SecretBox
from pipeswitch.config.pg_loader import DomainEntry, PgTenantLoader
from pipeswitch.config.records import RecordWriter, call_rows
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenant_store import TenantStore
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.piper_client import synthesize
from pipeswitch.pipelines.services import ProviderEndpoints
from pipeswitch.pipelines.turn_recorder import TurnRecorder
from pipeswitch.transports import metrics
from pipeswitch.transports.call_info import CallInfo
from pipeswitch.transports.serializer import pipeline_rate_for
from pipeswitch.transports.server import CLOSE_TRY_AGAIN, CallHandler, Refusal, ServerStats
from pipeswitch.transports.transport import FreeSwitchCallTransport

if TYPE_CHECKING:
    from pipeswitch.pipelines.compose import CallPipeline
    from pipeswitch.pipelines.session import CallRecord, CallSessions


def secret(value: Any) -> str:
    """A SecretStr (or None) setting as a plain string; '' when unset."""
    return value.get_secret_value() if value is not None else ""


def endpoints_for_tenant(ep: ProviderEndpoints, tenant: Tenant) -> ProviderEndpoints:
    """The deployment's endpoints with the tenant's own provider keys in place of its keys.

    A key stored for provider ``x`` replaces ``ProviderEndpoints.x_api_key`` (deepgram, groq,
    openai, google, elevenlabs, and any provider that gains such a field); others are ignored.
    """
    if not tenant.provider_keys:
        return ep
    changes = {
        f"{p}_api_key": key.get_secret_value()
        for p, key in tenant.provider_keys.items()
        # (never the per-run key of this host's own model servers)
        if p != "local" and p.isidentifier() and hasattr(ep, f"{p}_api_key")
    }
    return replace(ep, **changes) if changes else ep  # type: ignore[arg-type]


def transcript_turns(
    messages: list[dict[str, Any]],
    latencies: list[float],
    interruptions: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The conversation as turns (system prompt left out); latencies go to the assistant turns
    that answered a caller turn, in order. A turn a barge-in cut (``interruptions``, from
    the call record) is marked: ``text`` is what the bot was saying, ``heard_text`` what
    the caller heard of it."""
    cuts = {int(c["index"]): c for c in interruptions or [] if int(c.get("index", -1)) >= 0}
    out: list[dict[str, Any]] = []
    lat = iter(latencies)
    after_user = False
    for index, m in enumerate(messages):
        role = str(m.get("role", ""))
        if role not in ("user", "assistant"):
            continue
        content = m.get("content", "")
        if isinstance(content, list):
            content = " ".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
            )
        turn: dict[str, Any] = {"role": role, "text": str(content or "")}
        if role == "assistant":
            # The context keeps what the caller heard (barge-in trims it), so this is heard text.
            turn["heard_text"] = turn["text"]
            cut = cuts.get(index)
            if cut is not None:
                heard, said = str(cut.get("heard", "")), turn["text"]
                before = said[: len(said) - len(heard)] if heard and said.endswith(heard) else said
                turn["text"] = f"{before.rstrip()} {cut.get('sentence', '')}".strip()
                turn["interrupted"] = True
            if after_user:
                secs = next(lat, None)
                turn["latency_ms"] = None if secs is None else secs * 1000.0
        after_user = role == "user"
        out.append(turn)
    return out


def taken_messages(record: Any, cp: Any) -> list[dict[str, Any]]:
    """Messages the receptionist tools took on this call, as dicts.

    Looked up where the call controller may keep them (``record.taken_messages``, or the
    pipeline's ``receptionist.state.messages``) until the record carries them directly.
    """
    found = getattr(record, "taken_messages", None)
    if found is None:
        receptionist = getattr(cp, "receptionist", None) or getattr(cp, "tools", None)
        found = getattr(getattr(receptionist, "state", None), "messages", None)
    out = []
    for m in found or []:
        out.append(dict(m) if isinstance(m, dict) else dict(vars(m)))
    return out


@dataclass
class _LiveCall:
    tenant: Tenant
    started_wall: float


class TenancyCallHandler:
    """Per-tenant admission around the call controller (a ``CallHandler`` itself)."""

    def __init__(
        self,
        inner: CallHandler,
        state: CallState,
        on_end: Callable[[str], None] | None = None,
    ) -> None:
        self.inner = inner
        self.state = state
        self.on_end = on_end
        self.stats: ServerStats | None = None  # the server's counters, once bound
        self.live: dict[str, _LiveCall] = {}
        self._admitted: set[str] = set()

    async def admit(self, call: CallInfo, tenant: Tenant) -> Refusal | None:
        """Take a slot of the tenant's limit before the call counts as started."""
        info = {
            "domain_uuid": tenant.domain_uuid or "",
            "agent": tenant.agent_name,
            "agent_uuid": tenant.agent_uuid or "",
        }
        admission = await self.state.admit(call.call_uuid, tenant, info)
        if not admission.allowed:
            kind = "state_unavailable" if admission.degraded else "tenant_limit"
            return Refusal(kind, admission.reason, CLOSE_TRY_AGAIN)
        self._admitted.add(call.call_uuid)
        return None

    async def withdraw(self, call: CallInfo, tenant: Tenant) -> None:
        """The admitted call never ran (it failed before its pipeline): free its slot."""
        self._admitted.discard(call.call_uuid)
        await self.state.release(call.call_uuid, tenant)

    async def run_call(
        self, call: CallInfo, tenant: Tenant, transport: FreeSwitchCallTransport
    ) -> None:
        if call.call_uuid not in self._admitted:  # not through the server's admission seam
            refusal = await self.admit(call, tenant)
            if refusal is not None:
                if self.stats is not None:
                    self.stats.refused[refusal.kind] += 1
                metrics.call_refused(refusal.kind, tenant.name)
                logger.bind(call=call.call_uuid, tenant=tenant.name).warning(
                    "call refused ({}): {}", refusal.kind, refusal.reason
                )
                await transport.close(refusal.code, refusal.reason)
                return
        self._admitted.discard(call.call_uuid)
        self.live[call.call_uuid] = _LiveCall(tenant, time.time())
        try:
            await self.inner.run_call(call, tenant, transport)
        finally:
            self.live.pop(call.call_uuid, None)
            if self.on_end is not None:
                self.on_end(call.call_uuid)
            await self.state.release(call.call_uuid, tenant)


class Tenancy:
    """Everything multi-tenant for one server process; inert when nothing is configured."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.instance_id = settings.instance_id or default_instance_id()
        self.box = SecretBox(secret(settings.secrets_key) or None)
        dsn = secret(settings.database_url)
        self.loader: PgTenantLoader | None = PgTenantLoader(dsn, self.box) if dsn else None
        self.state: CallState = make_call_state(
            secret(settings.redis_url) or None,
            instance_id=self.instance_id,
            degrade=settings.limits_degrade,
        )
        self.records: RecordWriter | None = None
        self.handler: TenancyCallHandler | None = None
        self._closed = False
        self.recorders: dict[str, TurnRecorder] = {}
        self.warmed_greetings: set[tuple[str, int, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, sessions: CallSessions) -> TenancyCallHandler:
        """Start the stores and return the call handler wrapping ``sessions``."""
        if self.loader is not None:
            # Greetings are synthesized ahead (Piper caches them), as for file tenants, and
            # again when an agent's greeting changes.
            self.loader.on_refresh.append(lambda entry: self._warm(sessions, entry))
            await self.loader.start()
            self.records = RecordWriter(self.loader.store)
            await self.records.start()
            sessions.finished_hooks.append(self._on_call_finished)
            sessions.observer_factories.append(self._turn_recorder)
        await self.state.start()
        self.handler = TenancyCallHandler(sessions, self.state, self._call_over)
        return self.handler

    def _warm(self, sessions: CallSessions, entry: DomainEntry) -> None:
        todo = []
        for t in entry.agents.values():
            key = (t.voice, pipeline_rate_for(t.audio_rate), t.first_message or "")
            if t.first_message and key not in self.warmed_greetings:
                self.warmed_greetings.add(key)
                todo.append(key)
        if not todo:
            return

        async def warm() -> None:
            for voice, rate, text in todo:
                try:
                    await synthesize(
                        sessions.http, sessions.endpoints.piper_for_rate(rate), text, voice=voice
                    )
                except Exception as exc:  # the call will synthesize it then
                    logger.bind(tenant=entry.name).debug("greeting warm-up failed: {}", exc)

        task = asyncio.ensure_future(warm())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _turn_recorder(self, call: CallInfo, tenant: Tenant) -> list[BaseObserver]:
        """Per call: the observer that collects its turns for the record (DB tenants only)."""
        if not tenant.domain_uuid:
            return []
        rec = TurnRecorder()
        self.recorders[call.call_uuid] = rec
        return [rec]

    def _call_over(self, call_uuid: str) -> None:
        self.recorders.pop(call_uuid, None)

    def bind(self, stats: ServerStats) -> None:
        """Count refusals with the server's other refusals (/metrics)."""
        if self.handler is not None:
            self.handler.stats = stats

    def mounts(self) -> dict[str, web.Application]:
        """The admin API at /admin when tenants live in PostgreSQL."""
        if self.loader is None:
            return {}
        from pipeswitch.pipelines.admin_api import admin_app

        return {
            "/admin": admin_app(
                lambda: self.loader.store if self.loader else None, self.settings, self.state
            )
        }

    async def _on_call_finished(self, record: CallRecord, cp: CallPipeline) -> None:
        """Hand the finished call to the record writer (an append, no I/O here)."""
        if self.records is None or self.handler is None:
            return
        live = self.handler.live.get(record.call.call_uuid)
        if live is None or not live.tenant.domain_uuid:
            return
        ended = record.ended_at if record.ended_at is not None else time.monotonic()
        ended_wall = time.time() - (time.monotonic() - ended)
        started_wall = ended_wall - (ended - record.started_at)
        taken = taken_messages(record, cp)
        recorder = self.recorders.pop(record.call.call_uuid, None)
        turns = recorder.turns if recorder is not None else []
        if not turns:  # no frames seen (e.g. a builder without the transport's facts)
            turns = transcript_turns(
                record.messages, record.turn_latencies, getattr(record, "interruptions", None)
            )
        rows = call_rows(
            domain_uuid=live.tenant.domain_uuid,
            call_uuid=record.call.call_uuid,
            agent_uuid=live.tenant.agent_uuid,
            caller=record.call.caller,
            destination=record.call.destination,
            instance=self.instance_id,
            started_wall=started_wall,
            ended_wall=ended_wall,
            end_reason=record.end_reason or "pipeline ended",
            metadata=record.metadata,
            turns=turns,
            messages=taken,
        )
        self.records.submit(rows)

    @property
    def store(self) -> TenantStore | None:
        return self.loader.store if self.loader is not None else None

    async def close(self) -> None:
        """Flush call records, then close Redis and PostgreSQL (after the calls have ended)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self.records is not None:
            await self.records.close()
        await self.state.close()
        if self.loader is not None:
            await self.loader.stop()
