"""The cascade: Silero VAD (in the user aggregator) -> STT -> LLM -> Piper TTS.

Built per call from the tenant's configuration. Barge-in is Pipecat's own: a
user-turn start broadcasts an InterruptionFrame; the output transport stops
playback in the tenant's dialect, and the assistant aggregator only ever sees
the text of audio that was actually written to the caller.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMAssistantAggregator,
    LLMContextAggregatorPair,
    LLMUserAggregator,
    LLMUserAggregatorParams,
)
from pipecat.services.openai.base_llm import BaseOpenAILLMService
from pipecat.services.stt_service import STTService
from pipecat.services.tts_service import TTSService
from pipecat.turns.user_start.transcription_user_turn_start_strategy import (
    TranscriptionUserTurnStartStrategy,
)
from pipecat.turns.user_start.vad_user_turn_start_strategy import VADUserTurnStartStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.services import ProviderEndpoints, make_llm, make_stt, make_tts
from pipeswitch.pipelines.vad import BatchedSileroVADAnalyzer
from pipeswitch.processors.caller_audio import CallerAudioSink
from pipeswitch.processors.heard_context import HeardContextProcessor
from pipeswitch.processors.turn_taking import AdaptiveTurnStopStrategy, TurnParams
from pipeswitch.transports.transport import FreeSwitchCallTransport


@dataclass
class CallPipeline:
    """Everything a call controller needs to run and inspect one call."""

    pipeline: Pipeline
    context: LLMContext
    user: LLMUserAggregator
    assistant: LLMAssistantAggregator
    stt: STTService
    llm: BaseOpenAILLMService
    tts: TTSService


async def make_vad(tenant: Tenant, sample_rate: int) -> BatchedSileroVADAnalyzer:
    """Silero for one call: per-call state on the process's shared, batched session."""
    t = tenant.turns
    params = VADParams(
        confidence=t.vad_confidence,
        start_secs=t.vad_start_secs,
        stop_secs=t.vad_stop_secs,
        min_volume=t.vad_min_volume,
    )
    return BatchedSileroVADAnalyzer(sample_rate=sample_rate, params=params)


def turn_strategies(tenant: Tenant) -> UserTurnStrategies:
    """Start on speech (VAD) or words (STT); stop with the adaptive 8 kHz-safe strategy."""
    t = tenant.turns
    return UserTurnStrategies(
        start=[VADUserTurnStartStrategy(), TranscriptionUserTurnStartStrategy()],
        stop=[
            AdaptiveTurnStopStrategy(
                TurnParams(
                    complete_wait=t.complete_wait_secs,
                    incomplete_wait=t.incomplete_wait_secs,
                    stt_timeout=t.stt_timeout_secs,
                )
            )
        ],
    )


def _make_stt_llm(
    tenant: Tenant, endpoints: ProviderEndpoints, sample_rate: int
) -> tuple[STTService, BaseOpenAILLMService]:
    return make_stt(tenant, endpoints, sample_rate), make_llm(tenant, endpoints)


async def build_cascade(
    tenant: Tenant,
    transport: FreeSwitchCallTransport,
    endpoints: ProviderEndpoints,
    http: aiohttp.ClientSession,
    sample_rate: int,
) -> CallPipeline:
    """Compose the cascade pipeline for one call."""
    # Service constructors build HTTP clients, and each client loads the CA bundle
    # (~65 ms per client, measured); that work releases the GIL, so doing it in a
    # thread keeps every other call's 20 ms audio flowing while this one is set up.
    stt, llm = await asyncio.to_thread(_make_stt_llm, tenant, endpoints, sample_rate)
    tts = make_tts(tenant, endpoints, http, sample_rate, transport.call.call_uuid)
    vad = await make_vad(tenant, sample_rate)
    context = LLMContext()
    pair = LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(
            vad_analyzer=vad,
            user_turn_strategies=turn_strategies(tenant),
        ),
    )
    user, assistant = pair.user(), pair.assistant()
    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            user,
            CallerAudioSink(),
            llm,
            tts,
            transport.output(),
            assistant,
            HeardContextProcessor(context),
        ]
    )
    return CallPipeline(pipeline, context, user, assistant, stt, llm, tts)
