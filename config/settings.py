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
    # OpenTelemetry: one trace per call, a span per turn, exported over OTLP (the [otel]
    # extra; OTEL_EXPORTER_OTLP_ENDPOINT alone also turns it on).
    tracing: bool = False
    # Upper bound on one WebSocket message. FreeSWITCH sends 20 ms frames (320-1920 B, x2 for
    # stereo, x N/20 with STREAM_BUFFER_SIZE); anything far beyond that is not audio we want.
    max_message_bytes: int = 512 * 1024
    # Largest metadata / send_text payload (mod_audio_stream copies metadata into 8 KiB).
    max_text_bytes: int = 8192
    max_calls: int = 200
    # Seconds of caller silence / no activity after which a call ends itself.
    idle_timeout_secs: float = 120.0
    cache_dir: Path = Path.home() / ".cache" / "pipeswitch"
    deepgram_api_key: str = ""
    groq_api_key: str = ""
    openai_api_key: str = ""
    google_api_key: str = ""
    elevenlabs_api_key: str = ""
    deepgram_url: str = ""
    groq_base_url: str = "https://api.groq.com/openai/v1"
    # FreeSWITCH Event Socket (call control: playback for the community build, DTMF,
    # hangup, transfer). One connection per server process, shared by all calls.
    esl_enabled: bool = False
    esl_host: str = "127.0.0.1"
    esl_port: int = 8021
    esl_password: SecretStr = SecretStr("ClueCon")
