"""Tenant (FusionPBX domain) and agent configuration: plain data, validated.

A tenant is what a FusionPBX ``domain_uuid`` owns: how its calls are answered
(pipeline kind and providers), what the agent says, and how audio goes back to
FreeSWITCH (the playback dialect, which depends on the mod_audio_stream build).
"""

from __future__ import annotations

import re
import uuid as uuidlib
from datetime import date
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

PlaybackDialect = Literal["json-stream", "binary", "file"]
# Built-in pipeline kinds; which of them this build serves is checked when tenants are
# loaded (pipelines.compose). A tenant may also name a Python builder
# ("python:package.module:function") or an entry point ("entrypoint:NAME").
PipelineKind = Literal["cascade", "openai-realtime", "gemini-live", "elevenlabs-agent"]
PIPELINE_KINDS: tuple[str, ...] = ("cascade", "openai-realtime", "gemini-live", "elevenlabs-agent")
_PIPELINE_REF_RE = re.compile(
    r"^(python:[A-Za-z_][\w.]*:[A-Za-z_][\w.]*|entrypoint:[A-Za-z0-9_.-]+)$"
)

DEFAULT_TENANT_NAME = "default"
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}$")


class TurnSettings(BaseModel):
    """Turn-taking knobs (seconds). Defaults are the measured 8 kHz choice (README)."""

    model_config = ConfigDict(extra="forbid")

    vad_confidence: float = 0.7
    vad_start_secs: float = 0.15
    vad_stop_secs: float = 0.2
    # Pipecat's loudness gate (default 0.6) lags speech onset by 150-300 ms on 8 kHz
    # telephone audio (measured: SPEAKING at 0.50 s vs 0.18-0.24 s without it); Silero's
    # confidence alone already rejects noise and tones.
    vad_min_volume: float = 0.0
    # Extra wait after the VAD stop when the transcript looks complete / incomplete.
    complete_wait_secs: float = 0.0
    incomplete_wait_secs: float = 0.6
    # Give up waiting for a final transcript after this long past the VAD stop.
    stt_timeout_secs: float = 0.8
    # Caller speech shorter than this while the bot talks is not a barge-in.
    barge_in_min_secs: float = 0.2
    # Cascade turn watchdog (processors/turn_watchdog.py): no bot audio this long after the
    # caller's speech ends -> a cached holding phrase; LLM retry and apology follow. 0 = off.
    watchdog_secs: float = Field(default=1.2, ge=0, le=10)
    # Start the LLM on a complete-looking final transcript before the turn is certain
    # (its reply is held until the turn ends on the same words; discarded otherwise).
    speculate: bool = True
    # Speech-to-speech: while the bot talks, caller audio must clear the estimated echo of
    # the bot's own voice to reach the provider's VAD (processors/echo_guard.py).
    echo_guard: bool = True
    # The same guard in front of the cascade's VAD and STT (greeting included): without
    # it a -20 dB line echo cut the bot ~40 times a minute of its speech (README
    # "Echo-safe barge-in"); behind it a barge-in needs Silero's start window only.
    echo_guard_cascade: bool = True


class ProviderSettings(BaseModel):
    """Provider choices for the cascade and speech-to-speech pipelines."""

    model_config = ConfigDict(extra="forbid")

    # "deepgram-flux": Deepgram Flux (/v2/listen) decides the turns itself; with
    # turns.speculate its EagerEndOfTurn starts the LLM early (Pipecat's eager end of turn).
    stt: Literal["deepgram", "deepgram-flux", "whisper-local"] = "deepgram"
    # A Nova model for "deepgram"; for "deepgram-flux" a flux-* model ("flux-general-en"
    # when this names a non-Flux model).
    stt_model: str = "nova-3-general"
    # Flux's confidence for an EagerEndOfTurn (0.3-0.9: lower = earlier, more withdrawn).
    stt_eager_eot_threshold: float = Field(default=0.5, ge=0.3, le=0.9)
    llm: Literal["groq", "openai", "local"] = "groq"
    # Groq is retiring llama-3.3-70b-versatile; gpt-oss-120b is Pipecat 1.14's Groq
    # default (published TTFT p50 98 ms / p95 217 ms). For llm = "openai" set a model
    # such as "gpt-4.1-mini". Ignored for llm = "local" (the embedded model).
    llm_model: str = "openai/gpt-oss-120b"
    # gpt-oss reasons before it answers; "low" keeps a phone turn's first token early.
    llm_reasoning_effort: Literal["low", "medium", "high"] | None = "low"
    llm_temperature: float | None = 0.6
    llm_max_tokens: int | None = 200
    # A second LLM for when the first is down (refused, 5xx, rate-limited, stalled): the
    # turn is asked again on it at once and the call stays on it (Pipecat's LLMSwitcher).
    # None: no fallback (the turn watchdog retries once, then apologises).
    llm_fallback: Literal["groq", "openai", "local"] | None = None
    # The fallback's model; None: the provider's default (see DEFAULT_FALLBACK_MODELS).
    llm_fallback_model: str | None = None
    # A second Deepgram endpoint (another region, or self-hosted, same API) the STT moves
    # to when the first refuses or keeps failing; ws(s):// or http(s)://.
    stt_fallback_url: str | None = None
    tts: Literal["piper"] = "piper"
    # A second Piper HTTP endpoint (same API) tried when the first refuses, fails or stalls.
    tts_fallback_url: str | None = None
    realtime_model: str | None = None
    # Speech-to-speech (pipeline = "openai-realtime" | "gemini-live"): the provider's voice
    # (None = the provider's default), and who ends the caller's turn: the provider's server
    # VAD, or local Silero with the provider's VAD off.
    realtime_voice: str | None = None
    turn_detection: Literal["server", "local"] = "server"
    # Server VAD: silence that ends the caller's turn (OpenAI's default is 500 ms).
    realtime_silence_ms: int = Field(default=500, ge=100, le=3000)
    # When the provider refuses, does not connect within the budget or drops mid-call, the
    # call continues on this tenant's cascade after a short apology (False: the call ends).
    s2s_fallback: bool = True
    s2s_connect_timeout_secs: float = Field(default=3.0, gt=0, le=30)
    s2s_apology: str = "Sorry, one moment please."
    # A provider that takes the caller's turn and says nothing for this long has stalled.
    s2s_reply_timeout_secs: float = Field(default=15.0, gt=0, le=120)
    # ElevenLabs Agents (pipeline = "elevenlabs-agent"): the agent, the audio formats it is
    # configured with on ElevenLabs (pcm_<rate> or ulaw_8000), and whether to connect
    # through a one-use signed URL (the key then never rides on the WebSocket).
    elevenlabs_agent_id: str | None = None
    elevenlabs_input_format: str = Field(default="pcm_16000", pattern=r"^(pcm_\d{4,5}|ulaw_8000)$")
    elevenlabs_output_format: str = Field(default="pcm_16000", pattern=r"^(pcm_\d{4,5}|ulaw_8000)$")
    elevenlabs_signed_url: bool = False

    @model_validator(mode="after")
    def _check_fallbacks(self) -> ProviderSettings:
        if (
            self.llm_fallback is not None
            and self.llm_fallback == self.llm
            and (self.llm_fallback_model in (None, self.llm_model))
        ):
            raise ValueError("llm_fallback names the same provider and model as llm")
        if self.stt_fallback_url is not None and self.stt == "whisper-local":
            raise ValueError("stt_fallback_url is a Deepgram endpoint; stt is whisper-local")
        return self


ToolName = Literal["transfer_call", "end_call", "send_dtmf", "take_message", "business_hours"]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_HOURS_RE = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


class TransferTarget(BaseModel):
    """Where ``transfer_call`` may send a caller: an extension, ring group or queue number."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    destination: str = Field(pattern=r"^[A-Za-z0-9*#+_.@-]{1,64}$")
    kind: Literal["extension", "ring_group", "queue", "voicemail"] = "extension"
    description: str = ""


class ToolSettings(BaseModel):
    """Receptionist tools (LLM function calls) a tenant allows, and the data they use.

    ``business_hours`` maps a weekday to ranges like ``"09:00-12:30"`` in the
    tenant's ``timezone``; ``holidays`` are closed all day.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: list[ToolName] = Field(default_factory=list)
    transfer_targets: dict[str, TransferTarget] = Field(default_factory=dict)
    # FusionPBX dialplan context for transfers; None = the tenant's domain name.
    dialplan_context: str | None = None
    timezone: str = "UTC"
    business_hours: dict[Weekday, list[str]] = Field(default_factory=dict)
    holidays: list[date] = Field(default_factory=list)
    # A tool call that runs longer than this is cancelled (the LLM is told so).
    timeout_secs: float = Field(default=5.0, gt=0, le=60)
    # How long a transferred caller rings the target before the agent takes them back.
    transfer_ring_secs: float = Field(default=25.0, gt=0, le=300)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {v!r} (use an IANA name such as Europe/Prague)"
            ) from exc
        return v

    @field_validator("business_hours")
    @classmethod
    def _check_hours(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for day, ranges in v.items():
            for r in ranges:
                m = _HOURS_RE.match(r.replace(" ", ""))
                if m is None:
                    raise ValueError(f"{day}: {r!r} is not a range like '09:00-17:30'")
                start = int(m[1]) * 60 + int(m[2])
                end = int(m[3]) * 60 + int(m[4])
                if not 0 <= start < end <= 24 * 60:
                    raise ValueError(f"{day}: {r!r} must start before it ends, within 00:00-24:00")
        return v

    @model_validator(mode="after")
    def _check_targets(self) -> ToolSettings:
        if "transfer_call" in self.enabled and not self.transfer_targets:
            raise ValueError("transfer_call is enabled but transfer_targets is empty")
        return self


class StreamAccess(BaseModel):
    """Who may open a call for this tenant (checked before any pipeline is built).

    ``signing_secret`` verifies ``sig=`` (HMAC-SHA256 over call uuid, domain and ``exp``);
    ``token_sha256`` is the sha256 of a static stream token (URL ``token=`` or a header).
    Neither set: the deployment's ``accept_unsigned`` policy decides.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    signing_secret: SecretStr | None = None
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class Tenant(BaseModel):
    """One tenant's agent. Immutable once loaded; reloads build a new object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="FusionPBX domain name, e.g. pbx.example.com")
    domain_uuid: str | None = None
    agent_name: str = "Receptionist"
    system_prompt: str = (
        "You are a friendly telephone receptionist. Answer in one or two short spoken "
        "sentences. No lists, no markdown, no emojis."
    )
    first_message: str | None = "Hello, thanks for calling. How can I help you today?"
    language: str = "en"
    voice: str = "en_US-joe-medium"
    pipeline: str = "cascade"
    providers: ProviderSettings = Field(default_factory=ProviderSettings)
    turns: TurnSettings = Field(default_factory=TurnSettings)
    playback: PlaybackDialect = "json-stream"
    audio_rate: int = 8000
    audio_mix: Literal["mono", "mixed", "stereo"] = "mono"
    max_call_secs: float = 3600.0
    enabled: bool = True
    tools: ToolSettings = Field(default_factory=ToolSettings)
    # Tenancy (issue 9): filled by the PostgreSQL loader (config/pg_loader.py) or the file.
    agent_uuid: str | None = None
    access: StreamAccess = Field(default_factory=StreamAccess)
    max_concurrent_calls: int | None = Field(default=None, ge=0)  # across all instances
    # Per-tenant provider keys (``deepgram``, ``groq``, ...) overriding the deployment's.
    provider_keys: dict[str, SecretStr] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _DOMAIN_RE.match(v):
            raise ValueError(f"invalid domain name {v!r}")
        return v.lower()

    @field_validator("pipeline")
    @classmethod
    def _check_pipeline(cls, v: str) -> str:
        if v in PIPELINE_KINDS or _PIPELINE_REF_RE.match(v):
            return v
        raise ValueError(
            f"unknown pipeline {v!r}: one of {', '.join(PIPELINE_KINDS)}, "
            "'python:package.module:function' or 'entrypoint:NAME'"
        )

    @field_validator("domain_uuid")
    @classmethod
    def _check_uuid(cls, v: str | None) -> str | None:
        return None if v is None else str(uuidlib.UUID(v))

    @field_validator("audio_rate")
    @classmethod
    def _check_rate(cls, v: int) -> int:
        if v <= 0 or v % 8000:
            raise ValueError("audio_rate must be a positive multiple of 8000 (mod_audio_stream)")
        return v


def builtin_default_tenant() -> Tenant:
    """The tenant that answers when no configuration exists (domain ``default``)."""
    return Tenant(name=DEFAULT_TENANT_NAME)
