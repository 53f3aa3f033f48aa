"""Process-wide settings, read from the environment (``PIPESWITCH_*``).

Settings are deployment knobs (where to listen, where tenants come from, which
providers are real); per-tenant behaviour lives in :mod:`config.tenants`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ProviderMode = Literal["real", "emulated", "local"]
# auto: uvloop where installed (pipelines/event_loop.py says why), else asyncio's own.
EventLoopKind = Literal["auto", "uvloop", "asyncio"]


class Settings(BaseSettings):
    """Deployment settings; every field can be set as ``PIPESWITCH_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="PIPESWITCH_", env_file=None, extra="ignore")

    host: str = "0.0.0.0"
    port: int = 8080
    config_file: Path | None = Field(
        default=None, description="TOML or YAML tenant file; none = built-in default tenant"
    )
    providers: ProviderMode = Field(
        default="local",
        description="real: cloud providers with keys; emulated: loopback emulators; "
        "local: the embedded offline models",
    )
    log_level: str = "INFO"
    log_json: bool = False
    event_loop: EventLoopKind = Field(
        default="auto",
        description="auto: uvloop where installed, else asyncio's own loop",
    )
    # OpenTelemetry: one trace per call, a span per turn, exported over OTLP (the [otel]
    # extra; OTEL_EXPORTER_OTLP_ENDPOINT alone also turns it on).
    tracing: bool = False
    # Upper bound on one WebSocket message. FreeSWITCH sends 20 ms frames (320-1920 B, x2 for
    # stereo, x N/20 with STREAM_BUFFER_SIZE); anything far beyond that is not audio we want.
    max_message_bytes: int = 512 * 1024
    # Largest metadata / send_text payload (mod_audio_stream copies metadata into 8 KiB).
    max_text_bytes: int = 8192
    max_calls: int = 200
    # A connection must finish its HTTP upgrade request's headers this soon (libwsc sends
    # them at once), else it is closed as a slow-loris socket (0 = aiohttp's 75 s only).
    handshake_timeout_secs: float = Field(default=5.0, ge=0)
    # Connections one peer may hold waiting over 1 s for their first request.
    handshake_max_per_peer: int = Field(default=64, ge=1)
    # Seconds of caller silence / no activity after which a call ends itself.
    idle_timeout_secs: float = 120.0
    # On SIGTERM/SIGINT: active calls may finish for this long, then the bot says goodbye and
    # the call is closed (1000). A second signal skips the wait.
    drain_timeout_secs: float = Field(default=30.0, ge=0)
    # What the bot says to calls still up when the drain timeout ends them ("" = nothing).
    shutdown_goodbye: str = "Goodbye."
    # A fresh install's dialplan sends domain=${domain_name}: with this on, the default tenant
    # answers every domain no tenant claims (logged loudly). Off in a multi-tenant deployment,
    # where a wrong dialplan must not land on someone else's agent.
    default_tenant_answers_any_domain: bool = False
    cache_dir: Path = Path.home() / ".cache" / "pipeswitch"
    # Keys are SecretStr: repr/str print '**********', so a settings object in a log line or a
    # traceback never shows them; readers call .get_secret_value().
    deepgram_api_key: SecretStr = SecretStr("")
    groq_api_key: SecretStr = SecretStr("")
    openai_api_key: SecretStr = SecretStr("")
    google_api_key: SecretStr = SecretStr("")
    elevenlabs_api_key: SecretStr = SecretStr("")
    # Local models (``--providers local``): each defaults to the embedded, sha256-checked weights
    # (pipelines/local/README.md); a path to your own file/directory or a Hugging Face hub id
    # replaces it (hub downloads only with ``allow_model_download``).
    local_llm_model: str = ""  # GGUF file, or hub id "owner/repo/file.gguf"
    local_stt_model: str = ""  # CTranslate2 Whisper directory, or hub id "owner/repo"
    piper_voice: str = ""  # Piper .onnx (config next to it as .onnx.json)
    allow_model_download: bool = False
    deepgram_url: str = ""
    groq_base_url: str = "https://api.groq.com/openai/v1"
    openai_base_url: str = "https://api.openai.com/v1"
    # Tenancy (issue 9). Neither URL set = tenants from the file and call state in-process.
    database_url: SecretStr | None = Field(
        default=None, description="PostgreSQL DSN (FusionPBX's database): tenants, call records"
    )
    redis_url: SecretStr | None = Field(
        default=None, description="Redis URL: call registry and per-tenant limits across instances"
    )
    # Fernet key (``pipeswitch admin gen-key``) encrypting provider keys and signing secrets.
    secrets_key: SecretStr | None = None
    # Calls without a signature/token: never, only from a loopback peer (FreeSWITCH on this
    # host), or always.
    accept_unsigned: Literal["never", "loopback", "always"] = "loopback"
    admin_token: SecretStr | None = Field(default=None, description="super-admin API token")
    # Redis unreachable: admit calls without a limit check (open) or refuse them (closed).
    limits_degrade: Literal["open", "closed"] = "open"
    instance_id: str = ""  # names this process in the call registry; "" = host:pid
    # FreeSWITCH Event Socket (call control: playback for the community build, DTMF,
    # hangup, transfer). One connection per server process, shared by all calls.
    esl_enabled: bool = False
    esl_host: str = "127.0.0.1"
    esl_port: int = 8021
    esl_password: SecretStr = SecretStr("ClueCon")
    # Unicast media (stock FreeSWITCH without mod_audio_stream): UDP ports Pipeswitch takes
    # in pairs (even = ours, odd = the port FreeSWITCH binds for the call), the address
    # FreeSWITCH sends the caller's audio to, and the address FreeSWITCH binds.
    unicast_port_min: int = Field(default=24000, ge=1024, le=65534)
    unicast_port_max: int = Field(default=24999, ge=1025, le=65535)
    unicast_media_ip: str = "127.0.0.1"
    unicast_switch_ip: str = "127.0.0.1"
    # Turn-based fallback: one call's conversation is kept this long after its last turn.
    turn_context_ttl_secs: float = Field(default=600.0, gt=0)
