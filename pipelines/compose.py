"""Compose a call's pipeline in Python: the one way every pipeline is built.

A *builder* is ``async def build(ctx: CallContext) -> CallPipeline``. It gets
everything one call needs - the tenant, the call's identity and transport, a
factory for the tenant's provider services, the process's shared VAD, and the
standard processors (turn-taking, barge-in, heard-context, caller-audio sink) -
and returns the Pipecat pipeline. The built-in cascade is written this way
(:mod:`pipeswitch.pipelines.cascade`), and so is anything a developer writes.

A tenant names its builder with ``pipeline``:

* a built-in kind (``"cascade"``, and the speech-to-speech kinds this build has);
* ``"python:package.module:function"`` - a builder in the developer's own code;
* ``"entrypoint:NAME"`` - a builder another package registered in the entry-point
  group ``pipeswitch.pipelines``.

Builders are resolved and checked when tenants are loaded (an import error or a
wrong signature is a one-line configuration error), never at call time.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import aiohttp
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.llm_service import LLMService
from pipecat.services.openai.base_llm import BaseOpenAILLMService
from pipecat.services.stt_service import STTService
from pipecat.services.tts_service import TTSService
from pipecat.turns.user_start.transcription_user_turn_start_strategy import (
    TranscriptionUserTurnStartStrategy,
)
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.local.incremental_stt import TURN_STOP_TIMEOUT_SECS
from pipeswitch.pipelines.media_fast_path import CallerMediaFastPath, fast_path_supported
from pipeswitch.pipelines.services import (
    ProviderEndpoints,
    make_fallback_llm,
    make_llm,
    make_stt,
    make_tts,
)
from pipeswitch.pipelines.vad import BatchedSileroVADAnalyzer
from pipeswitch.processors.barge_in import BargeInStartStrategy
from pipeswitch.processors.caller_audio import CallerAudioSink
from pipeswitch.processors.heard_context import HeardContextProcessor
from pipeswitch.processors.tools import (
    ProviderVoice,
    ReceptionistTools,
    register_tools,
    tools_schema,
    usable_settings,
)
from pipeswitch.processors.turn_taking import (
    AdaptiveTurnStopStrategy,
    TurnParams,
    provider_turn_strategies,
)
from pipeswitch.transports import metrics
from pipeswitch.transports.call_control import CallControl
from pipeswitch.transports.call_info import CallInfo

if TYPE_CHECKING:
    from pipeswitch.transports.transport import FreeSwitchCallTransport

ENTRY_POINT_GROUP = "pipeswitch.pipelines"


class BuilderError(ValueError):
    """A tenant's ``pipeline`` names no usable builder (raised at load, not per call)."""


@dataclass
class CallPipeline:
    """What a builder returns: the pipeline, and what the call controller inspects.

    ``context`` is the conversation the call keeps (transcripts, records); a
    pipeline without one (e.g. a pure IVR) leaves it None.
    """

    pipeline: Pipeline
    context: LLMContext | None = None
    # Named processors a test or a hook may want to reach (e.g. "stt", "llm", "tts").
    parts: dict[str, FrameProcessor] = field(default_factory=dict)


class ServiceFactory:
    """The tenant's provider services, built on demand for one call.

    Emulated and local deployments swap base URLs, never classes: the services
    are Pipecat's own, pointed where :class:`ProviderEndpoints` says.
    """

    def __init__(
        self,
        tenant: Tenant,
        endpoints: ProviderEndpoints,
        http: aiohttp.ClientSession,
        sample_rate: int,
        call_uuid: str,
    ) -> None:
        self._tenant = tenant
        self._endpoints = endpoints
        self._http = http
        self._rate = sample_rate
        self._call_uuid = call_uuid

    async def stt(self) -> STTService:
        """Speech-to-text at the call's pipeline rate."""
        # Service constructors build HTTP clients, and each client loads the CA bundle
        # (~65 ms per client, measured); that releases the GIL, so a thread keeps every
        # other call's 20 ms audio flowing while this one is set up.
        return await asyncio.to_thread(make_stt, self._tenant, self._endpoints, self._rate)

    async def llm(self) -> BaseOpenAILLMService:
        """The text LLM, with the tenant's system prompt in its settings."""
        return await asyncio.to_thread(make_llm, self._tenant, self._endpoints)

    async def stt_and_llm(self) -> tuple[STTService, BaseOpenAILLMService]:
        """Both, built in one worker-thread hop (the cascade needs both)."""

        def both() -> tuple[STTService, BaseOpenAILLMService]:
            return (
                make_stt(self._tenant, self._endpoints, self._rate),
                make_llm(self._tenant, self._endpoints),
            )

        return await asyncio.to_thread(both)

    async def fallback_llm(self) -> BaseOpenAILLMService | None:
        """The tenant's second LLM (``providers.llm_fallback``), or None."""
        if self._tenant.providers.llm_fallback is None:
            return None
        return await asyncio.to_thread(make_fallback_llm, self._tenant, self._endpoints)

    def tts(self) -> TTSService:
        """Text-to-speech at the call's pipeline rate (Piper over loopback HTTP)."""
        return make_tts(self._tenant, self._endpoints, self._http, self._rate, self._call_uuid)


@dataclass
class CallContext:
    """Everything a builder may use to compose one call's pipeline."""

    tenant: Tenant
    call: CallInfo
    transport: FreeSwitchCallTransport
    sample_rate: int
    services: ServiceFactory
    endpoints: ProviderEndpoints
    http: aiohttp.ClientSession
    # The switch's event socket, when this process has one (transfer, hangup, DTMF).
    call_control: CallControl | None = None
    # Heard-context processors this call's builder created (for the call record).
    heard: list[HeardContextProcessor] = field(default_factory=list)
    # The receptionist tools on this call's LLM, once registered (for the call record).
    tools: ReceptionistTools | None = None

    # -- standard pieces ---------------------------------------------------------------

    def vad(self) -> BatchedSileroVADAnalyzer:
        """Silero for this call: per-call state on the process's shared, batched session."""
        t = self.tenant.turns
        params = VADParams(
            confidence=t.vad_confidence,
            start_secs=t.vad_start_secs,
            stop_secs=t.vad_stop_secs,
            min_volume=t.vad_min_volume,
        )
        return BatchedSileroVADAnalyzer(sample_rate=self.sample_rate, params=params)

    def barge_in_secs(self) -> float:
        """Caller speech over the bot, as Silero counts it, before the bot stops.

        Behind the cascade's echo guard the count starts later: the guard holds a
        candidate until ``min_speech_secs`` of it cleared the echo, then releases that
        onset at once, so Silero's start window has already run over speech the guard
        vetted for echo. Asking for more on top only adds real time (measured 230-270 ms
        stop at -15/-20 dB echo, over the 250 ms budget); Silero's own start window is the
        second, independent check (voice, not energy).
        """
        t = self.tenant.turns
        if t.echo_guard_cascade:
            return min(t.barge_in_min_secs, t.vad_start_secs)
        return t.barge_in_min_secs

    def turn_strategies(self) -> UserTurnStrategies:
        """Start on speech (longer over the bot: barge-in) or words; stop 8 kHz-safely.

        Deepgram Flux decides turns itself: Pipecat's external (or eager, when the tenant
        speculates) strategies instead.
        """
        t = self.tenant.turns
        count = partial(metrics.turn_speculation, self.tenant.name)
        if self.tenant.providers.stt == "deepgram-flux" and self.endpoints.mode != "local":
            return provider_turn_strategies(t.speculate, count)
        return UserTurnStrategies(
            start=[
                BargeInStartStrategy(self.barge_in_secs()),
                TranscriptionUserTurnStartStrategy(),
            ],
            stop=[
                AdaptiveTurnStopStrategy(
                    TurnParams(
                        complete_wait=t.complete_wait_secs,
                        incomplete_wait=t.incomplete_wait_secs,
                        stt_timeout=t.stt_timeout_secs,
                        speculate=t.speculate,
                        segmented_stt=self.endpoints.mode == "local"
                        or self.tenant.providers.stt == "whisper-local",
                    ),
                    on_speculation=count,
                )
            ],
        )

    def context_aggregators(
        self, context: LLMContext, *, vad: bool = True
    ) -> LLMContextAggregatorPair:
        """User/assistant aggregators with the shared VAD and the tenant's turn-taking.

        ``vad=False`` when the media fast path runs the VAD in the transport (its
        events reach the aggregator as frames).
        """
        return LLMContextAggregatorPair(
            context,
            user_params=LLMUserAggregatorParams(
                vad_analyzer=self.vad() if vad else None,
                user_turn_strategies=self.turn_strategies(),
                # One local Whisper serves every call: let it answer before Pipecat gives up.
                user_turn_stop_timeout=TURN_STOP_TIMEOUT_SECS
                if self.endpoints.mode == "local" or self.tenant.providers.stt == "whisper-local"
                else 5.0,
            ),
        )

    def media_fast_path(self, stt: STTService) -> CallerMediaFastPath | None:
        """Caller audio straight from the transport to the VAD and ``stt``'s socket.

        Set on this call's input transport; None (Pipecat's frame path) when the STT
        needs the audio in the pipeline or ``PIPESWITCH_MEDIA_FAST_PATH=0``.
        """
        if os.environ.get("PIPESWITCH_MEDIA_FAST_PATH", "1") == "0":
            return None
        if not fast_path_supported(stt):
            return None
        fast = CallerMediaFastPath(self.transport.input(), stt, self.vad())
        self.transport.input().set_media_sink(fast)
        return fast

    def heard_context(self, context: LLMContext) -> HeardContextProcessor:
        """Keeps only what the caller heard in ``context`` (place after the assistant aggregator).

        The call controller reads its interruptions for the call record.
        """
        processor = HeardContextProcessor(context)
        self.heard.append(processor)
        return processor

    def receptionist_tools(
        self, llm: LLMService[Any], context: LLMContext, *, provider_voice: bool = False
    ) -> ReceptionistTools | None:
        """Give this call's LLM the tenant's receptionist tools (None when none are enabled).

        The same definitions serve the cascade and the speech-to-speech pipelines; tools
        that need the switch act through ESL when this process has it. ``provider_voice``
        (speech-to-speech): the provider says the announcements, the tools act once the
        caller heard them. A second registration on the same call (the standby cascade)
        shares the first one's record.
        """
        voice = (
            ProviderVoice(queued_secs=self.transport.output().queued_secs)
            if provider_voice
            else None
        )
        tools = register_tools(
            llm,
            context,
            self.call_control,
            self.tenant,
            self.call.call_uuid,
            state=self.tools.state if self.tools is not None else None,
            voice=voice,
        )
        if self.tools is None:
            self.tools = tools
        return tools

    def tool_schema(self) -> ToolsSchema | None:
        """The tools this call's LLM gets, for services that declare them at connect
        (speech-to-speech sessions); identical to what :meth:`receptionist_tools` sets."""
        settings = usable_settings(self.tenant.tools, has_switch=self.call_control is not None)
        return tools_schema(settings) if settings.enabled else None

    def caller_audio_sink(self) -> CallerAudioSink:
        """Drops caller audio where nothing downstream needs it (after the user aggregator)."""
        return CallerAudioSink()


Builder = Callable[[CallContext], Awaitable[CallPipeline]]

_BUILTIN: dict[str, Builder] = {}
# Modules whose import registers built-in kinds (each calls register_builder).
BUILTIN_MODULES: tuple[str, ...] = (
    "pipeswitch.pipelines.cascade",
    "pipeswitch.pipelines.openai_realtime",
    "pipeswitch.pipelines.gemini_live",
    "pipeswitch.pipelines.elevenlabs_agent",
)


def register_builder(kind: str, builder: Builder) -> None:
    """Register a built-in pipeline kind (the cascade, speech-to-speech providers)."""
    check_signature(builder, kind)
    _BUILTIN[kind] = builder


def builtin_kinds() -> list[str]:
    """Pipeline kinds this build can serve without developer code."""
    _load_builtins()
    return sorted(_BUILTIN)


def check_signature(obj: Any, spec: str) -> Builder:
    """``obj`` must be ``async def f(ctx)``; anything else is a configuration error."""
    if not callable(obj):
        raise BuilderError(f"pipeline {spec!r}: {obj!r} is not callable")
    fn = obj
    if not inspect.iscoroutinefunction(fn):
        raise BuilderError(f"pipeline {spec!r}: the builder must be an async function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise BuilderError(f"pipeline {spec!r}: cannot read its signature ({exc})") from exc
    try:
        sig.bind(object())
    except TypeError as exc:
        raise BuilderError(
            f"pipeline {spec!r}: the builder must take one argument (the CallContext): {exc}"
        ) from exc
    return fn


def _load_builtins() -> None:
    # Import for the registration side effect; the builders live beside their services.
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


def load_builtin_builders() -> None:
    """Import every built-in pipeline kind now (server start-up), not on the first call.

    Importing them is ~0.3-0.6 s of CPU (google-genai's types alone ~0.4 s): done by the
    first call's ``resolve_builder``, it held that call's greeting back 0.6 s and stalled
    the event loop, every other call's audio included, for as long.
    """
    _load_builtins()


def check_tenant(tenant: Tenant) -> None:
    """Refuse, at load, a tenant this build cannot serve (raises :class:`BuilderError`).

    Called for every tenant a loader produces (file at start-up, database on change),
    so a call never meets an unknown pipeline or provider.
    """
    resolve_builder(tenant.pipeline)


def resolve_builder(spec: str) -> Builder:
    """The builder a tenant's ``pipeline`` value names (raises :class:`BuilderError`)."""
    _load_builtins()
    if spec in _BUILTIN:
        return _BUILTIN[spec]
    if spec.startswith("python:"):
        target = spec.removeprefix("python:")
        module_name, _, attr = target.partition(":")
        if not module_name or not attr:
            raise BuilderError(f"pipeline {spec!r}: expected 'python:package.module:function'")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any import-time failure is the developer's config error
            raise BuilderError(
                f"pipeline {spec!r}: cannot import {module_name}: {type(exc).__name__}: {exc}"
            ) from exc
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise BuilderError(f"pipeline {spec!r}: {module_name} has no {attr!r}")
            obj = getattr(obj, part)
        return check_signature(obj, spec)
    if spec.startswith("entrypoint:"):
        name = spec.removeprefix("entrypoint:")
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise BuilderError(
                f"pipeline {spec!r}: no entry point {name!r} in group {ENTRY_POINT_GROUP!r}"
            )
        try:
            obj = found[0].load()
        except Exception as exc:
            raise BuilderError(
                f"pipeline {spec!r}: loading the entry point failed: {type(exc).__name__}: {exc}"
            ) from exc
        return check_signature(obj, spec)
    raise BuilderError(
        f"pipeline {spec!r} is not available in this build "
        f"(built-in: {', '.join(sorted(_BUILTIN))}; or 'python:module:function')"
    )
