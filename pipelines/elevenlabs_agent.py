"""ElevenLabs Agents (speech-to-speech) pipeline, ``tenant.pipeline = "elevenlabs-agent"``.

Pipeline: transport in -> echo guard (barge-in over the bot's own echo) ->
:class:`~pipeswitch.pipelines.services_elevenlabs.ElevenLabsAgentService` (caller
audio resampled once to the agent's input format) -> echo reference (the bot's
outgoing audio, for the guard) -> transport out (agent rate -> stream rate, once) ->
assistant aggregator -> heard-context.

Turn detection is ElevenLabs' (server side, always on: ConvAI has no switch for it
from the client). The echo guard is what stops the bot's own voice, echoed by the
phone line, from reaching that server VAD as "the caller talking": while the bot
speaks, caller audio that does not clear the echo estimate is replaced by silence,
and a real barge-in is released to the agent and stops local playback at once.

The greeting is the tenant's, played from Piper's cache by the call controller the
moment the call connects, so the agent is told to say nothing first
(``first_message = ""``) and that it has already greeted the caller.
"""

from __future__ import annotations

from typing import Any

from pipecat.frames.frames import Frame, TranscriptionFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.compose import CallContext, CallPipeline, register_builder
from pipeswitch.pipelines.services import ProviderEndpoints, ProviderUnavailable
from pipeswitch.pipelines.services_elevenlabs import ElevenLabsAgentService
from pipeswitch.processors.echo_guard import EchoGuard, EchoGuardParams


class UserTranscriptRecorder(FrameProcessor):
    """Adds the agent's user transcripts to the call's context, as the cascade has them.

    Placed after the echo guard's reference tap, so a backchannel it swapped for a
    ``UserBackchannelFrame`` never enters the context.
    """

    def __init__(self, context: LLMContext, **kwargs: Any) -> None:
        """Record into ``context``."""
        super().__init__(**kwargs)
        self._context = context

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Record final transcripts; pass everything on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame) and frame.text.strip():
            self._context.add_message({"role": "user", "content": frame.text.strip()})
        await self.push_frame(frame, direction)


def _instructions(tenant: Tenant) -> str:
    if not tenant.first_message:
        return tenant.system_prompt
    return (
        f"{tenant.system_prompt}\n\nThe call has started and you have already greeted the "
        f'caller with: "{tenant.first_message}". Do not greet them again.'
    )


def elevenlabs_key(tenant: Tenant, ep: ProviderEndpoints) -> str:
    """The tenant's own key if it has one, else the deployment's."""
    own = tenant.provider_keys.get("elevenlabs")
    return own.get_secret_value() if own is not None else ep.elevenlabs_api_key


def make_elevenlabs_agent(
    tenant: Tenant,
    ep: ProviderEndpoints,
    context: LLMContext,
    *,
    playout: Any = None,
    call_uuid: str = "",
) -> ElevenLabsAgentService:
    """The agent service for one call (no I/O: it connects when the pipeline starts)."""
    p = tenant.providers
    if not p.elevenlabs_agent_id:
        raise ProviderUnavailable("pipeline elevenlabs-agent needs providers.elevenlabs_agent_id")
    key = elevenlabs_key(tenant, ep)
    if p.elevenlabs_signed_url and not key:
        raise ProviderUnavailable("a signed ElevenLabs URL needs an API key")
    return ElevenLabsAgentService(
        agent_id=p.elevenlabs_agent_id,
        api_key=key or None,
        base_url=ep.elevenlabs_url,
        use_signed_url=p.elevenlabs_signed_url,
        input_format=p.elevenlabs_input_format,
        output_format=p.elevenlabs_output_format,
        context=context,
        connect_timeout_secs=p.s2s_connect_timeout_secs,
        playout=playout,
        log_context={"call": call_uuid, "tenant": tenant.name},
        settings=ElevenLabsAgentService.Settings(
            system_instruction=_instructions(tenant),
            first_message="" if tenant.first_message else None,
            language=tenant.language,
            voice_id=p.realtime_voice,
        ),
    )


def register_client_tools(
    ctx: CallContext, service: ElevenLabsAgentService, context: LLMContext
) -> None:
    """The receptionist tools' handlers, by the names the agent's client tools use.

    ConvAI keeps the tool *definitions* on the agent (ElevenLabs' side); the client
    only answers ``client_tool_call`` by name, with the same handlers the cascade runs
    (the agent speaks the announcement; transfer and hangup wait until it was heard).
    """
    ctx.receptionist_tools(service, context, provider_voice=True)


def echo_guard_params(tenant: Tenant) -> EchoGuardParams:
    """The measured defaults (``bench/echo.py``).

    The guard counts speech from its first frame above the echo, where the cascade's
    ``barge_in_min_secs`` counts on top of Silero's own start window, so the two are
    not the same number: 150 ms here keeps the stop under 250 ms on the wire.
    """
    return EchoGuardParams()


async def build_elevenlabs_agent(ctx: CallContext) -> CallPipeline:
    """Compose the ElevenLabs Agents pipeline for one call (with the cascade on standby)."""
    from pipeswitch.pipelines.s2s_fallback import (
        TransportPlayout,
        s2s_pipeline,
        standby_cascade,
    )

    context = LLMContext()
    service = make_elevenlabs_agent(
        ctx.tenant,
        ctx.endpoints,
        context,
        playout=TransportPlayout(ctx.transport),
        call_uuid=ctx.call.call_uuid,
    )
    register_client_tools(ctx, service, context)
    on = ctx.tenant.turns.echo_guard
    guard = EchoGuard(echo_guard_params(ctx.tenant)) if on else None
    if guard is not None and ctx.transport.params.audio_out_filter is None:
        # Time the bot's audio where the transport writes it (see EchoGuard.output_filter).
        ctx.transport.params.audio_out_filter = guard.output_filter()
    if guard is not None:
        ctx.transport.output().prompt_tap = guard.prompt_tap  # the greeting's echo too
    # The agent and what must sit right after it on the speech-to-speech branch: the
    # guard's bot-audio tap (and backchannel filter), then the transcript recorder.
    agent = Pipeline(
        [
            service,
            *([guard.reference()] if guard is not None else []),
            UserTranscriptRecorder(context),
        ]
    )
    pipeline, fallback = s2s_pipeline(
        ctx,
        context=context,
        # ElevenLabs ends the caller's turns itself; this pair's assistant half records
        # what was played, its user half has nothing to do.
        rt_pair=LLMContextAggregatorPair(context),
        edge=[guard.input()] if guard is not None else [],
        llm=agent,  # type: ignore[arg-type]  # a pipeline around the service, see above
        connected=lambda: service.connected,
        cascade=await standby_cascade(ctx, context),
    )
    service.fallback = fallback
    parts: dict[str, FrameProcessor] = {"llm": service}
    if guard is not None:
        parts["echo_guard"] = guard.input()
    return CallPipeline(pipeline, context, parts=parts)


register_builder("elevenlabs-agent", build_elevenlabs_agent)
