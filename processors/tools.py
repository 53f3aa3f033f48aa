"""Receptionist tools: LLM function calls a tenant enables in its ``tools`` settings.

Defined once, provider-neutrally: :func:`tools_schema` gives Pipecat
``FunctionSchema``/``ToolsSchema`` objects (any Pipecat LLM service, the
speech-to-speech ones included, turns them into its own wire format) and
:class:`ReceptionistTools` holds one handler per tool. What a tool asks of the
call goes through :class:`CallActions`: FreeSWITCH commands over ESL for
streamed calls (:class:`EslCallActions`), or an action handed back in the reply
for the turn-based endpoint (:class:`DeferredCallActions`).

Tools never block the audio: every handler is async, switch commands go through
the shared ESL connection (``bgapi`` for anything slow), and each tool runs under
a timeout (Pipecat cancels it and tells the LLM).

Wiring (one call): ``register_tools(llm, context, call_control, tenant, call_uuid)``
when the cascade is built; keep the returned object's ``state`` with the call record
(the messages taken, transfers and DTMF sent, as plain data).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndWorkerFrame,
    FunctionCallResultProperties,
    LLMMessagesAppendFrame,
    TTSSpeakFrame,
    TTSStoppedFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.llm_service import FunctionCallParams, LLMService

from pipeswitch.config.tenants import Tenant, ToolName, ToolSettings
from pipeswitch.processors.tools_hours import hours_status
from pipeswitch.transports.call_control import (
    EVENT_CHANNEL_BRIDGE,
    EVENT_CHANNEL_HANGUP,
    EVENT_CHANNEL_HANGUP_COMPLETE,
    CallControl,
    CallControlError,
    CallEvent,
)
from pipeswitch.transports.unicast import media_back, media_handed_over, media_leaving

# Extension in the tenant's context that parks a caller again after an unanswered
# transfer (freeswitch-conf ships it); the call's media stream survives the transfer.
RETURN_EXTENSION = "pipeswitch_return"
DTMF_RE = r"^[0-9*#A-DwW]{1,32}$"
# Extra time a transfer handler gets beyond the ring time (announcement, return).
TRANSFER_SLACK_SECS = 20.0
# How long end_call waits for the goodbye to play before hanging up anyway.
GOODBYE_MAX_SECS = 15.0

# A speech-to-speech provider answers a tool result within this (else the action goes on).
REPLY_START_MAX_SECS = 10.0
# Longest wait for the far end to play what it still holds after the bot stopped.
DRAIN_MAX_SECS = 2.0
SWITCH_TOOLS: tuple[ToolName, ...] = ("transfer_call", "end_call", "send_dtmf")

TransferOutcome = Literal["answered", "no_answer", "caller_hung_up", "failed", "handed_off"]
Speak = Callable[[str], Awaitable[None]]


@dataclass
class ProviderVoice:
    """The call's voice is a speech-to-speech provider's: it says announcements itself.

    A tool then tells the model what to say in its result, and acts once that reply
    was heard: the bot stopped speaking, and the far end played what it still held
    (``queued_secs``: the output transport's estimate).
    """

    queued_secs: Callable[[], float] = lambda: 0.0


# -- what a call keeps ---------------------------------------------------------------------


@dataclass
class TakenMessage:
    """A message the agent took for someone (kept with the call record)."""

    name: str
    number: str
    reason: str
    taken_at: str  # ISO 8601, UTC


@dataclass
class CallToolState:
    """What the tools did on one call: plain data for the call record and its store."""

    messages: list[TakenMessage] = field(default_factory=list)
    transfers: list[dict[str, str]] = field(default_factory=list)
    dtmf_sent: list[str] = field(default_factory=list)
    hangup_requested: bool = False
    # For the turn-based endpoint: what the switch should do after playing the reply.
    action: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (call records, logs, the turn-based reply)."""
        return asdict(self)


# -- what a tool may ask of the call -------------------------------------------------------


class CallActions(Protocol):
    """The switch-side effects of the tools, for one call."""

    async def transfer(self, destination: str, context: str, ring_secs: float) -> TransferOutcome:
        """Send the caller to ``destination``; say how it went."""
        ...

    async def hangup(self) -> None:
        """End the call (after the goodbye has played)."""
        ...

    async def send_dtmf(self, digits: str) -> None:
        """Send DTMF digits to the far end of the call."""
        ...


class EslCallActions:
    """Tools' effects on a FreeSWITCH call over the shared ESL connection.

    A transfer is ``uuid_transfer <uuid> <dest> XML <context>``; the call's media
    stream stays attached to the channel meanwhile. A ``CHANNEL_BRIDGE`` means the
    target answered (the agent's stream is then stopped so it does not listen in);
    no bridge within the ring time means nobody answered, and the caller is
    transferred back to :data:`RETURN_EXTENSION` (which parks them with the agent).
    """

    def __init__(
        self,
        control: CallControl,
        call_uuid: str,
        *,
        return_extension: str = RETURN_EXTENSION,
        log: Any = None,
    ) -> None:
        self.control = control
        self.call_uuid = call_uuid
        self.return_extension = return_extension
        self.log = log or logger.bind(call=call_uuid)

    async def transfer(self, destination: str, context: str, ring_secs: float) -> TransferOutcome:
        """Transfer and watch the call's events for the outcome."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[TransferOutcome] = loop.create_future()

        def on_event(ev: CallEvent) -> None:
            if outcome.done():
                return
            if ev.name == EVENT_CHANNEL_BRIDGE:
                outcome.set_result("answered")
            elif ev.name in (EVENT_CHANNEL_HANGUP, EVENT_CHANNEL_HANGUP_COMPLETE):
                outcome.set_result("caller_hung_up")  # the first: a stuck channel never completes

        unsubscribe = self.control.subscribe(self.call_uuid, on_event)
        # A unicast call's media stops while the channel is out of park (no-op otherwise).
        media_leaving(self.call_uuid, ring_secs + TRANSFER_SLACK_SECS)
        try:
            try:
                await self.control.transfer(self.call_uuid, destination, "XML", context)
            except CallControlError as exc:
                self.log.warning("transfer to {} failed: {}", destination, exc)
                media_leaving(self.call_uuid, 0.0)  # never left park
                return "failed"
            try:
                result = await asyncio.wait_for(asyncio.shield(outcome), ring_secs)
            except TimeoutError:
                result = "no_answer"
        finally:
            unsubscribe()
        if result == "answered":
            # The bridged humans talk now; the agent must not listen in or answer.
            await self._quietly(f"uuid_audio_stream {self.call_uuid} stop")
            media_handed_over(self.call_uuid)
        elif result == "no_answer":
            self.log.info(
                "transfer to {} not answered in {:.0f}s; taking the caller back",
                destination,
                ring_secs,
            )
            try:
                await self.control.transfer(
                    self.call_uuid, self.return_extension, "XML", context, hand_over=False
                )
                await media_back(self.call_uuid)  # unicast restarts once parked again
            except CallControlError as exc:
                self.log.warning("taking the caller back failed: {}", exc)
                return "failed"
        return result

    async def _quietly(self, cmd: str) -> None:
        try:
            await self.control.bgapi(cmd)
        except CallControlError as exc:  # unicast calls have no stream to stop
            self.log.debug("{} -> {}", cmd, exc)

    async def hangup(self) -> None:
        """``uuid_kill <uuid> NORMAL_CLEARING``."""
        await self.control.hangup(self.call_uuid, "NORMAL_CLEARING")

    async def send_dtmf(self, digits: str) -> None:
        """``uuid_send_dtmf <uuid> <digits>``."""
        await self.control.send_dtmf(self.call_uuid, digits)


class DeferredCallActions:
    """For calls the switch drives turn by turn: effects become the reply's action.

    The switch script plays the reply, then acts (transfer / hang up) itself.
    """

    def __init__(self, state: CallToolState) -> None:
        self.state = state

    async def transfer(self, destination: str, context: str, ring_secs: float) -> TransferOutcome:
        """Ask the switch script to transfer after the reply."""
        self.state.action = {"action": "transfer", "transfer_to": destination, "context": context}
        return "handed_off"

    async def hangup(self) -> None:
        """Ask the switch script to hang up after the reply."""
        self.state.action = {"action": "hangup"}

    async def send_dtmf(self, digits: str) -> None:
        """Ask the switch script to send digits."""
        self.state.action = {"action": "dtmf", "digits": digits}


# -- saying something and knowing it was heard ---------------------------------------------


class _PlayedOut(BaseObserver):
    """Sets ``done`` at the first bot-stopped-speaking after a TTS run ends."""

    def __init__(self) -> None:
        super().__init__(observe_every_push=False)
        self.tts_done = False
        self.done = asyncio.Event()

    async def on_push_frame(self, data: FramePushed) -> None:
        if isinstance(data.frame, TTSStoppedFrame):
            self.tts_done = True
        elif isinstance(data.frame, BotStoppedSpeakingFrame) and self.tts_done:
            self.done.set()


class _ReplyHeard(BaseObserver):
    """Sets ``done`` when the next bot reply (one that starts after now) stops playing."""

    def __init__(self) -> None:
        super().__init__(observe_every_push=False)
        self.started = asyncio.Event()
        self.done = asyncio.Event()

    async def on_push_frame(self, data: FramePushed) -> None:
        if isinstance(data.frame, BotStartedSpeakingFrame):
            self.started.set()
        elif isinstance(data.frame, BotStoppedSpeakingFrame) and self.started.is_set():
            self.done.set()


def pipeline_speaker(llm: LLMService[Any], worker: Any) -> Speak:
    """Speak through the call's own TTS and output; return once the caller heard it.

    The text goes downstream from the LLM as a ``TTSSpeakFrame``; "heard" is the
    output transport's bot-stopped-speaking after that synthesis ended (capped,
    so a lost frame cannot hold a transfer or a hangup forever).
    """

    async def say(text: str) -> None:
        watcher = _PlayedOut()
        worker.add_observer(watcher)
        try:
            await llm.push_frame(TTSSpeakFrame(text))
            cap = 3.0 + len(text) / 8.0
            try:
                await asyncio.wait_for(watcher.done.wait(), min(cap, GOODBYE_MAX_SECS))
            except TimeoutError:
                logger.debug("no bot-stopped-speaking after {!r}; going on", text[:40])
        finally:
            await worker.remove_observer(watcher)

    return say


# -- the schemas ---------------------------------------------------------------------------


def tool_schemas(settings: ToolSettings) -> list[FunctionSchema]:
    """Provider-neutral definitions of the tenant's enabled tools, in a stable order."""
    out: list[FunctionSchema] = []
    enabled = set(settings.enabled)
    if "transfer_call" in enabled:
        names = sorted(settings.transfer_targets)
        lines = "; ".join(
            f"{n}: {t.description or t.kind.replace('_', ' ')}"
            for n, t in sorted(settings.transfer_targets.items())
        )
        out.append(
            FunctionSchema(
                name="transfer_call",
                description=(
                    "Transfer the caller to a person or team. Only when the caller asks for "
                    f"one or the request needs a human. Targets: {lines}."
                ),
                properties={
                    "target": {
                        "type": "string",
                        "enum": names,
                        "description": "Who to transfer to.",
                    },
                    "announcement": {
                        "type": "string",
                        "description": "One short sentence to say before transferring.",
                    },
                },
                required=["target"],
            )
        )
    if "end_call" in enabled:
        out.append(
            FunctionSchema(
                name="end_call",
                description="Hang up after saying goodbye, when the caller is done.",
                properties={
                    "goodbye": {"type": "string", "description": "The last sentence to say."}
                },
                required=[],
            )
        )
    if "send_dtmf" in enabled:
        out.append(
            FunctionSchema(
                name="send_dtmf",
                description="Send touch-tone digits on the line (e.g. to reach a menu option).",
                properties={
                    "digits": {
                        "type": "string",
                        "pattern": DTMF_RE,
                        "description": "Digits 0-9, *, #, A-D; w = half-second pause.",
                    }
                },
                required=["digits"],
            )
        )
    if "take_message" in enabled:
        out.append(
            FunctionSchema(
                name="take_message",
                description=(
                    "Record a message for the team once you have the caller's name, a "
                    "call-back number and the reason for the call."
                ),
                properties={
                    "name": {"type": "string", "description": "The caller's name."},
                    "number": {"type": "string", "description": "Call-back number."},
                    "reason": {"type": "string", "description": "What the call is about."},
                },
                required=["name", "number", "reason"],
            )
        )
    if "business_hours" in enabled:
        out.append(
            FunctionSchema(
                name="business_hours",
                description="Whether the office is open right now, and when it opens next.",
                properties={},
                required=[],
            )
        )
    return out


def usable_settings(settings: ToolSettings, *, has_switch: bool) -> ToolSettings:
    """The tenant's tools less those that need the switch when the call has none."""
    if has_switch:
        return settings
    keep = [n for n in settings.enabled if n not in SWITCH_TOOLS]
    if keep == list(settings.enabled):
        return settings
    return settings.model_copy(update={"enabled": keep})


def tools_schema(settings: ToolSettings) -> ToolsSchema:
    """The ``ToolsSchema`` for an ``LLMContext`` (empty when no tool is enabled)."""
    return ToolsSchema(standard_tools=list(tool_schemas(settings)))


# -- the handlers --------------------------------------------------------------------------

Handler = Callable[[FunctionCallParams], Awaitable[None]]


class ReceptionistTools:
    """One call's tool handlers and what they did (:attr:`state`)."""

    def __init__(
        self,
        tenant: Tenant,
        call_uuid: str,
        actions: CallActions,
        speak: Speak | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        state: CallToolState | None = None,
        voice: ProviderVoice | None = None,
    ) -> None:
        self.tenant = tenant
        self.voice = voice
        self.settings = tenant.tools
        self.call_uuid = call_uuid
        self.actions = actions
        self.speak = speak
        self.clock = clock
        self.state = state if state is not None else CallToolState()
        self.log = logger.bind(call=call_uuid, tenant=tenant.name)
        self._background: set[asyncio.Task[None]] = set()

    @property
    def context_name(self) -> str:
        """FusionPBX dialplan context for transfers (the domain name unless configured)."""
        return self.settings.dialplan_context or self.tenant.name

    def handlers(self) -> dict[ToolName, tuple[Handler, float]]:
        """Handler and timeout (seconds) per enabled tool."""
        s = self.settings
        table: dict[ToolName, tuple[Handler, float]] = {
            "transfer_call": (self.transfer_call, s.transfer_ring_secs + TRANSFER_SLACK_SECS),
            "end_call": (self.end_call, GOODBYE_MAX_SECS + s.timeout_secs),
            "send_dtmf": (self.send_dtmf, s.timeout_secs),
            "take_message": (self.take_message, s.timeout_secs),
            "business_hours": (self.business_hours, s.timeout_secs),
        }
        return {name: table[name] for name in s.enabled}

    async def _say(self, text: str, params: FunctionCallParams) -> None:
        """Say ``text`` and return once heard: through ``speak`` if one was given,
        else through the calling pipeline's own TTS and output (:func:`pipeline_speaker`)."""
        if not text:
            return
        if self.speak is not None:
            await self.speak(text)
        elif getattr(params, "pipeline_worker", None) is not None:
            await pipeline_speaker(params.llm, params.pipeline_worker)(text)

    # Each handler reports through params.result_callback; run_llm=False where the
    # tool itself already spoke (a transfer that connected, a goodbye).

    async def transfer_call(self, params: FunctionCallParams) -> None:
        """Announce, ``uuid_transfer``, and come back if nobody answers."""
        name = str(params.arguments.get("target", ""))
        target = self.settings.transfer_targets.get(name)
        if target is None:
            await params.result_callback(
                {
                    "status": "error",
                    "error": f"unknown target {name!r}",
                    "targets": sorted(self.settings.transfer_targets),
                }
            )
            return
        label = target.description or name
        announcement = str(params.arguments.get("announcement") or "").strip() or (
            f"Please hold, I'm transferring you to {label}."
        )
        record = {"target": name, "destination": target.destination, "outcome": "pending"}
        self.state.transfers.append(record)
        self.log.info("transfer to {} ({} {})", name, target.kind, target.destination)
        if self.voice is not None:
            await self._announce_then(
                params,
                {
                    "status": "transferring",
                    "instructions": f'Say exactly this to the caller: "{announcement}" '
                    "Nothing else: the transfer starts once it has been said.",
                },
                lambda: self._provider_transfer(target.destination, record, params, label),
            )
            return
        # The outcome may arrive after this handler was cancelled (the caller spoke over
        # the ringback); the work goes on in its own task and reports either way.
        work = asyncio.ensure_future(self._transfer(announcement, target.destination, params))
        try:
            outcome = await asyncio.shield(work)
        except asyncio.CancelledError:
            self._late_report(work, record, params, label)
            raise
        record["outcome"] = outcome
        await params.result_callback(
            self._transfer_result(outcome, label),
            properties=FunctionCallResultProperties(
                run_llm=outcome not in ("answered", "handed_off")
            ),
        )

    async def _announce_then(
        self,
        params: FunctionCallParams,
        result: dict[str, str],
        act: Callable[[], Awaitable[None]],
    ) -> None:
        """Speech-to-speech "announce then act": the result asks the model to say the
        announcement; ``act`` runs once that reply was heard, in a task of its own (a
        barge-in over the announcement cancels Pipecat's handler, never the action)."""
        worker = getattr(params, "pipeline_worker", None)
        watcher = _ReplyHeard()
        if worker is not None:
            worker.add_observer(watcher)
        await params.result_callback(result, properties=FunctionCallResultProperties(run_llm=True))

        async def later() -> None:
            try:
                await self._reply_heard(watcher)
            finally:
                if worker is not None:
                    await worker.remove_observer(watcher)
            await act()

        task = asyncio.ensure_future(later())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reply_heard(self, watcher: _ReplyHeard) -> None:
        """Until the provider's reply to the result stopped and the far end played it."""
        assert self.voice is not None
        try:
            await asyncio.wait_for(watcher.started.wait(), REPLY_START_MAX_SECS)
            await asyncio.wait_for(watcher.done.wait(), GOODBYE_MAX_SECS)
        except TimeoutError:
            self.log.warning("the provider's announcement was not heard in time; acting anyway")
            return
        queued = min(DRAIN_MAX_SECS, self.voice.queued_secs())
        if queued > 0:
            await asyncio.sleep(queued)

    async def _provider_transfer(
        self,
        destination: str,
        record: dict[str, str],
        params: FunctionCallParams,
        label: str,
    ) -> None:
        try:
            outcome = await self.actions.transfer(
                destination, self.context_name, self.settings.transfer_ring_secs
            )
        except Exception as exc:
            self.log.warning("transfer failed: {}", exc)
            outcome = "failed"
        await self._report_outcome(record, outcome, params, label)

    async def _report_outcome(
        self,
        record: dict[str, str],
        outcome: TransferOutcome,
        params: FunctionCallParams,
        label: str,
    ) -> None:
        """Record how the transfer ended; a caller who is back with the agent gets advice."""
        record["outcome"] = outcome
        if outcome in ("no_answer", "failed"):
            note = self._transfer_result(outcome, label)["instructions"]
            await params.llm.push_frame(
                LLMMessagesAppendFrame(
                    messages=[{"role": "system", "content": note}], run_llm=True
                ),
                FrameDirection.UPSTREAM,
            )

    async def _transfer(
        self, announcement: str, destination: str, params: FunctionCallParams
    ) -> TransferOutcome:
        await self._say(announcement, params)
        return await self.actions.transfer(
            destination, self.context_name, self.settings.transfer_ring_secs
        )

    @staticmethod
    def _transfer_result(outcome: TransferOutcome, label: str) -> dict[str, str]:
        advice = {
            "answered": "The caller is now talking to them. Say nothing more.",
            "handed_off": "The caller will be transferred after your reply. Say nothing more.",
            "no_answer": f"{label} did not answer. The caller is back with you: apologise "
            "and offer to take a message.",
            "failed": "The transfer could not be started. Apologise and offer to take a message.",
            "caller_hung_up": "The caller hung up.",
        }
        return {"status": outcome, "instructions": advice[outcome]}

    def _late_report(
        self,
        work: asyncio.Future[TransferOutcome],
        record: dict[str, str],
        params: FunctionCallParams,
        label: str,
    ) -> None:
        async def report() -> None:
            try:
                outcome = await work
            except Exception as exc:
                self.log.warning("transfer failed: {}", exc)
                return
            await self._report_outcome(record, outcome, params, label)

        task = asyncio.ensure_future(report())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def end_call(self, params: FunctionCallParams) -> None:
        """Say goodbye, let it play out, then hang up."""
        goodbye = (
            str(params.arguments.get("goodbye") or "").strip() or "Thanks for calling. Goodbye!"
        )
        self.state.hangup_requested = True
        if self.voice is not None:
            await self._announce_then(
                params,
                {
                    "status": "ending",
                    "instructions": f'Say exactly this goodbye to the caller: "{goodbye}" '
                    "Nothing else: the call ends once it has been said.",
                },
                lambda: self._hang_up(params),
            )
            return
        await params.result_callback(
            {"status": "ending"}, properties=FunctionCallResultProperties(run_llm=False)
        )
        await self._say(goodbye, params)
        await self._hang_up(params)

    async def _hang_up(self, params: FunctionCallParams) -> None:
        """``uuid_kill``, then end this pipeline (the goodbye was heard)."""
        try:
            await self.actions.hangup()
        except CallControlError as exc:
            self.log.warning("hangup over ESL failed ({}); ending the pipeline", exc)
        if not isinstance(self.actions, DeferredCallActions):
            await params.llm.push_frame(EndWorkerFrame(), FrameDirection.UPSTREAM)

    async def send_dtmf(self, params: FunctionCallParams) -> None:
        """``uuid_send_dtmf`` with validated digits."""
        digits = str(params.arguments.get("digits", ""))
        if not re.match(DTMF_RE, digits):
            await params.result_callback(
                {"status": "error", "error": "digits must be 0-9 * # A-D w"}
            )
            return
        try:
            await self.actions.send_dtmf(digits)
        except CallControlError as exc:
            await params.result_callback({"status": "error", "error": str(exc)})
            return
        self.state.dtmf_sent.append(digits)
        await params.result_callback({"status": "sent", "digits": digits})

    async def take_message(self, params: FunctionCallParams) -> None:
        """Keep the message with the call (the call record persists it)."""
        a = params.arguments
        msg = TakenMessage(
            name=str(a.get("name", "")).strip()[:200],
            number=str(a.get("number", "")).strip()[:64],
            reason=str(a.get("reason", "")).strip()[:2000],
            taken_at=self.clock().astimezone(UTC).isoformat(timespec="seconds"),
        )
        missing = [k for k in ("name", "number", "reason") if not getattr(msg, k)]
        if missing:
            await params.result_callback(
                {"status": "error", "error": f"still needed: {', '.join(missing)}"}
            )
            return
        self.state.messages.append(msg)
        self.log.info("message taken ({} chars)", len(msg.reason))
        await params.result_callback({"status": "saved"})

    async def business_hours(self, params: FunctionCallParams) -> None:
        """Open/closed now and the next opening, in the tenant's time zone."""
        await params.result_callback(hours_status(self.settings, self.clock()).as_dict())


def register_tools(
    llm: LLMService[Any],
    context: LLMContext,
    call_control: CallControl | None,
    tenant: Tenant,
    call_uuid: str,
    *,
    speak: Speak | None = None,
    actions: CallActions | None = None,
    state: CallToolState | None = None,
    voice: ProviderVoice | None = None,
) -> ReceptionistTools | None:
    """Give one call's LLM the tenant's tools; None when the tenant enables none.

    ``speak`` says a sentence and returns once it was heard; None (streamed calls)
    speaks through the pipeline the LLM runs in (:func:`pipeline_speaker`).
    ``actions`` defaults to ESL through ``call_control``; without either, tools
    that need the switch are left out (they could only fail). ``state`` is where
    the call keeps what the tools did (turn-based calls keep one across turns).
    ``voice`` says the call speaks with a speech-to-speech provider's voice: tools
    then announce through their result and act once the reply was heard.
    """
    if not tenant.tools.enabled:
        return None
    if actions is None and call_control is not None:
        actions = EslCallActions(call_control, call_uuid)
    settings = usable_settings(tenant.tools, has_switch=actions is not None)
    if not settings.enabled:
        return None
    if settings is not tenant.tools:
        tenant = tenant.model_copy(update={"tools": settings})
    if state is None and isinstance(actions, DeferredCallActions):
        state = actions.state
    state = state if state is not None else CallToolState()
    tools = ReceptionistTools(
        tenant, call_uuid, actions or DeferredCallActions(state), speak, state=state, voice=voice
    )
    for name, (handler, timeout) in tools.handlers().items():
        llm.register_function(name, handler, timeout_secs=timeout)
    context.set_tools(tools_schema(settings))
    return tools
