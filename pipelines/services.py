"""Service factory: tenant provider settings -> Pipecat service instances.

The only module that imports provider services. Emulated and local modes swap
base URLs, never classes: the same unmodified Pipecat services talk to Deepgram
or to the Deepgram emulator, to Groq or to the local llama.cpp server.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import threading
import zlib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx2
from loguru import logger
from openai import AsyncOpenAI, DefaultAsyncHttpxClient
from pipecat.services.deepgram.flux.stt import DeepgramFluxSTTService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.groq.llm import GroqLLMService
from pipecat.services.openai.base_llm import BaseOpenAILLMService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.openai.stt import OpenAISTTService
from pipecat.services.piper.tts import PiperHttpTTSService
from pipecat.services.stt_service import STTService
from pipecat.services.tts_service import TTSService
from pipecat.transcriptions.language import Language
from pipecat.utils.http import connection_limits
from websockets.extensions.permessage_deflate import PerMessageDeflate
from yarl import URL

from pipeswitch.config.settings import ProviderMode
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.local.incremental_stt import IncrementalWhisperSTTService
from pipeswitch.pipelines.piper_client import resume_on_drop
from pipeswitch.processors.clause_aggregator import FirstClauseAggregator

LOCAL_LLM_MODEL = "qwen2.5-0.5b-instruct"
LOCAL_STT_MODEL = "whisper-tiny.en"


class ProviderUnavailable(RuntimeError):
    """A tenant asks for a provider this deployment cannot reach (no key, no server)."""


@dataclass
class ProviderEndpoints:
    """Where each provider lives in this deployment (cloud, emulator or loopback)."""

    mode: ProviderMode
    piper_url: str  # Piper HTTP server base, without query
    deepgram_url: str = ""  # "" = Deepgram cloud
    deepgram_api_key: str = field(default="", repr=False)
    groq_base_url: str = "https://api.groq.com/openai/v1"
    groq_api_key: str = field(default="", repr=False)
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str = field(default="", repr=False)
    # Speech-to-speech: OpenAI Realtime's WebSocket base, Gemini Live's API base (https;
    # google-genai derives wss:// from it) and, for a private endpoint (the emulator), the
    # PEM CA file that signs its certificate.
    openai_realtime_url: str = "wss://api.openai.com/v1/realtime"
    gemini_url: str = ""
    google_api_key: str = field(default="", repr=False)
    gemini_ca_file: str = ""
    # ElevenLabs Agents: the API origin (ws:// for the emulator) and the xi-api-key.
    elevenlabs_url: str = "wss://api.elevenlabs.io"
    elevenlabs_api_key: str = field(default="", repr=False)
    local_stt_base_url: str = ""
    local_llm_base_url: str = ""
    local_api_key: str = field(default="", repr=False)

    @property
    def local_llm_root(self) -> str:
        """The local LLM server without the OpenAI ``/v1`` suffix (for ``/warm``)."""
        return self.local_llm_base_url.removesuffix("/v1")

    def piper_for_rate(self, rate: int) -> str:
        """Piper resamples in its own process when told the telephone rate."""
        return f"{self.piper_url}?rate={rate}"


def _language(code: str) -> Language:
    try:
        return Language(code)
    except ValueError:
        return Language.EN


def flux_url(deepgram_url: str) -> str:
    """Flux's ``/v2/listen`` WebSocket URL on the deployment's Deepgram base."""
    base = (deepgram_url or "wss://api.deepgram.com").rstrip("/")
    if base.startswith("http"):
        base = "ws" + base.removeprefix("http")
    elif "://" not in base:
        base = f"wss://{base}"
    return f"{base}/v2/listen"


def make_stt(tenant: Tenant, ep: ProviderEndpoints, sample_rate: int) -> STTService:
    """Speech-to-text for a cascade call."""
    if ep.mode == "local" or tenant.providers.stt == "whisper-local":
        if not ep.local_stt_base_url:
            raise ProviderUnavailable("local Whisper server is not running")
        # Pipecat's OpenAISTTService, sending each pause's audio while the caller speaks.
        return IncrementalWhisperSTTService(
            api_key=ep.local_api_key,
            base_url=ep.local_stt_base_url,
            settings=OpenAISTTService.Settings(
                model=LOCAL_STT_MODEL, language=_language(tenant.language)
            ),
        )
    if not ep.deepgram_api_key:
        raise ProviderUnavailable("Deepgram needs PIPESWITCH_DEEPGRAM_API_KEY")
    if tenant.providers.stt == "deepgram-flux":
        model = tenant.providers.stt_model
        return DeepgramFluxSTTService(
            api_key=ep.deepgram_api_key,
            url=flux_url(ep.deepgram_url),
            sample_rate=sample_rate,
            # Eager end of turn is Flux's speculation: on when the tenant speculates.
            enable_eager_end_of_turn=tenant.turns.speculate,
            settings=DeepgramFluxSTTService.Settings(
                model=model if model.startswith("flux") else "flux-general-en",
                eager_eot_threshold=(
                    tenant.providers.stt_eager_eot_threshold if tenant.turns.speculate else None
                ),
            ),
        )
    return DeepgramSTTService(
        api_key=ep.deepgram_api_key,
        base_url=ep.deepgram_url,
        sample_rate=sample_rate,
        settings=DeepgramSTTService.Settings(
            model=tenant.providers.stt_model,
            language=tenant.language,
            interim_results=True,
            punctuate=True,
            smart_format=True,
        ),
    )


def release_sdk_client(stt: object) -> None:
    """Let a finished call's Deepgram SDK client be freed by reference counting.

    Pipecat's ``DeepgramSTTService`` builds an SDK client per call (an httpx client
    and its TLS context, ~1 MB) that the streaming socket never uses. The SDK's
    wrapper holds that HTTP client, which holds the wrapper's bound methods: a
    reference cycle, so each call's client waited for a full collection, which
    stalls every other call. Unlinking the HTTP client breaks the cycle. Only for a
    call whose pipeline is over (the client is not shared).
    """
    if type(stt) is not DeepgramSTTService:
        return
    wrapper = getattr(getattr(stt, "_client", None), "_client_wrapper", None)
    if wrapper is not None and hasattr(wrapper, "httpx_client"):
        wrapper.httpx_client = None


def send_uncompressed(connection: object) -> bool:
    """Stop compressing what we send on a Deepgram SDK stream; True when it did.

    The SDK's ``websockets`` client offers permessage-deflate, and where the server
    accepts it every message is deflated: caller audio does not compress, and zlib
    cost ~5 % of the main thread at 40 calls (profile, against the emulator, which
    accepts). Deflate level 0 sends the audio as stored blocks, valid on the stream
    as negotiated (RFC 7692); what the server sends is still inflated as before.
    Call it on a new connection before anything is sent on it.
    """
    ws = getattr(connection, "_websocket", None)
    for ext in getattr(ws, "extensions", None) or ():
        if isinstance(ext, PerMessageDeflate):
            ext.compress_settings = {**ext.compress_settings, "level": 0}
            if not ext.local_no_context_takeover:
                ext.encoder = zlib.compressobj(
                    wbits=-ext.local_max_window_bits, **ext.compress_settings
                )
            return True
    return False


def stt_failover(stt: STTService, tenant: Tenant, ep: ProviderEndpoints, sample_rate: int) -> Any:
    """A ``() -> awaitable[bool]`` that moves ``stt`` to ``providers.stt_fallback_url``
    (once; False when there is none or it already moved), or None.

    The call keeps its ``DeepgramSTTService`` (the media fast path and the pipeline hold
    it); only its SDK client is exchanged for one built, by Pipecat's own constructor,
    at the second endpoint. The caller-facing service, its settings and its buffering of
    audio during the reconnect are unchanged.
    """
    url = tenant.providers.stt_fallback_url
    if not url or type(stt) is not DeepgramSTTService or not ep.deepgram_api_key:
        return None
    moved = False

    async def move() -> bool:
        nonlocal moved
        if moved:
            return False
        moved = True
        at_url = replace(ep, deepgram_url=url)
        twin = await asyncio.to_thread(make_stt, tenant, at_url, sample_rate)
        release_sdk_client(stt)  # the first endpoint's client is done with
        stt._client = twin._client  # type: ignore[attr-defined]
        return True

    return move


# The fallback LLM's model when the tenant names none.
DEFAULT_FALLBACK_MODELS = {"groq": "openai/gpt-oss-120b", "openai": "gpt-4.1-mini"}


def make_llm(tenant: Tenant, ep: ProviderEndpoints) -> BaseOpenAILLMService:
    """The text LLM for a cascade call; the system prompt goes in its settings."""
    p = tenant.providers
    kind = "local" if ep.mode == "local" else p.llm
    return _llm(kind, p.llm_model, tenant, ep)


def make_fallback_llm(tenant: Tenant, ep: ProviderEndpoints) -> BaseOpenAILLMService | None:
    """The tenant's second LLM (``providers.llm_fallback``), or None when it has none."""
    p = tenant.providers
    if p.llm_fallback is None or ep.mode == "local":
        return None
    model = p.llm_fallback_model or DEFAULT_FALLBACK_MODELS.get(p.llm_fallback, "")
    return _llm(p.llm_fallback, model, tenant, ep)


def _llm(kind: str, model: str, tenant: Tenant, ep: ProviderEndpoints) -> BaseOpenAILLMService:
    p = tenant.providers
    if kind == "local":
        if not ep.local_llm_base_url:
            raise ProviderUnavailable("local LLM server is not running")
        return OpenAILLM(
            api_key=ep.local_api_key,
            base_url=ep.local_llm_base_url,
            settings=OpenAILLMService.Settings(
                model=LOCAL_LLM_MODEL,
                system_instruction=tenant.system_prompt,
                temperature=p.llm_temperature,
                max_tokens=min(p.llm_max_tokens or 80, 80),
            ),
        )
    # Groq speaks OpenAI's API: the same service family, another base URL and key.
    common: dict[str, Any] = {
        "model": model,
        "system_instruction": tenant.system_prompt,
        "temperature": p.llm_temperature,
        "max_tokens": p.llm_max_tokens,
    }
    if kind == "openai":
        if not ep.openai_api_key:
            raise ProviderUnavailable("OpenAI needs PIPESWITCH_OPENAI_API_KEY")
        return OpenAILLM(
            api_key=ep.openai_api_key,
            base_url=ep.openai_base_url,
            settings=OpenAILLMService.Settings(**common),
        )
    if not ep.groq_api_key:
        raise ProviderUnavailable("Groq needs PIPESWITCH_GROQ_API_KEY")
    return GroqLLM(
        api_key=ep.groq_api_key,
        base_url=ep.groq_base_url,
        settings=GroqLLMService.Settings(**common, reasoning_effort=p.llm_reasoning_effort),
    )


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's one verified TLS context for the LLM clients.

    The openai SDK's HTTP client loads the CA bundle into a new context per client:
    ~18 ms of CPU per call (measured: 18.4 ms per ``GroqLLMService``), for a context
    that is the same for every call. Built as the SDK's default (``verify=True``).
    """
    return httpx2.create_ssl_context()


# The event loop a call's services are built for. They are built in a worker thread
# (``asyncio.to_thread`` copies this into it); clients are shared per loop.
CALL_LOOP: ContextVar[asyncio.AbstractEventLoop | None] = ContextVar(
    "pipeswitch_call_loop", default=None
)
_OPENAI_CLIENTS: dict[asyncio.AbstractEventLoop, dict[tuple[Any, ...], AsyncOpenAI]] = {}
_OPENAI_CLIENTS_LOCK = threading.Lock()


def openai_client(
    api_key: str | None,
    base_url: str | None,
    organization: str | None = None,
    project: str | None = None,
    default_headers: Mapping[str, str] | None = None,
) -> AsyncOpenAI:
    """Pipecat's ``BaseOpenAILLMService.create_client``, one client per process and key.

    Pipecat builds a client per service, so per call: a new HTTP connection pool (a TCP
    and TLS handshake before each call's first reply) and a reference cycle (~50
    objects, the pool included) that only a full collection frees. Pipecat never
    closes its client, so calls with the same provider, key and headers share one, on
    the loop they run on (connections belong to a loop).
    """
    loop = CALL_LOOP.get()
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return _new_openai_client(api_key, base_url, organization, project, default_headers)
    key = (api_key, base_url, organization, project, tuple(sorted((default_headers or {}).items())))
    with _OPENAI_CLIENTS_LOCK:
        for gone in [lp for lp in _OPENAI_CLIENTS if lp.is_closed()]:
            del _OPENAI_CLIENTS[gone]
        clients = _OPENAI_CLIENTS.setdefault(loop, {})
        client = clients.get(key)
        if client is None or client.is_closed():
            client = _new_openai_client(api_key, base_url, organization, project, default_headers)
            clients[key] = client
        return client


async def close_shared_clients() -> None:
    """Close the shared LLM clients of the running loop (server shutdown)."""
    loop = asyncio.get_running_loop()
    with _OPENAI_CLIENTS_LOCK:
        clients = list(_OPENAI_CLIENTS.pop(loop, {}).values())
    for client in clients:
        await client.close()


def _new_openai_client(
    api_key: str | None,
    base_url: str | None,
    organization: str | None,
    project: str | None,
    default_headers: Mapping[str, str] | None,
) -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key=api_key,
        base_url=base_url,
        organization=organization,
        project=project,
        http_client=DefaultAsyncHttpxClient(
            verify=tls_context(),
            limits=connection_limits(
                max_keepalive_connections=100, max_connections=1000, keepalive_expiry=None
            ),
        ),
        default_headers=default_headers,
    )


class _SharedTLSClient:
    """Mixed in before a Pipecat OpenAI-style LLM service: its client (Pipecat builds one
    per service, so per call) is the process's shared one (:func:`openai_client`)."""

    def create_client(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        organization: str | None = None,
        project: str | None = None,
        default_headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> AsyncOpenAI:
        return openai_client(api_key, base_url, organization, project, default_headers)


class OpenAILLM(_SharedTLSClient, OpenAILLMService):
    """Pipecat's ``OpenAILLMService``; its client is shared by the process's calls."""


class GroqLLM(_SharedTLSClient, GroqLLMService):
    """Pipecat's ``GroqLLMService``; its client is shared by the process's calls."""


# A Piper request with no response headers after this long has stalled. Piper's first
# byte is ~0.1-0.3 s for a sentence, but over 2 s on a loaded box (measured, load average
# ~20), and a retry then only adds load; the turn watchdog covers the caller meanwhile.
TTS_FIRST_BYTE_SECS = 5.0
# With a second Piper to go to, a stall is left sooner: the retry does not add load to
# the stalled server, and the holding phrase (1.2 s) has covered the caller meanwhile.
TTS_FIRST_BYTE_SECS_WITH_FALLBACK = 1.5
_TTS_SESSIONS: dict[tuple[int, str | None], aiohttp.ClientSession] = {}


def tts_retry(fallback_url: str | None, first_byte_secs: float = TTS_FIRST_BYTE_SECS) -> Any:
    """aiohttp middleware: a refused, 5xx or stalled TTS request is retried once (on the
    tenant's fallback Piper when it has one), so one failure is not a silent sentence;
    a body cut after some audio is resumed (``piper_client.resume_on_drop``).

    Pipecat's Piper service is unmodified: it gets a session with this middleware. A
    second failure reaches the service as before (an ErrorFrame: the watchdog apologises).
    """

    async def middleware(
        req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        # make_tts puts them in the URL: the session is shared by every call and tenant.
        log = logger.bind(call=req.url.query.get("call", "-"), tenant=req.url.query.get("tenant"))
        try:
            resp = await asyncio.wait_for(handler(req), first_byte_secs)
            if resp.status < 500:
                # A body cut mid-stream is resumed where the caller's audio broke off.
                return resume_on_drop(resp, req, fallback_url, log)
            resp.release()
            why = f"HTTP {resp.status}"
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        where = "the fallback TTS" if fallback_url else "once"
        log.warning("TTS request failed ({}); retrying {}", why, where)
        if fallback_url:
            url = URL(fallback_url).with_query(req.url.query)
            return await asyncio.wait_for(
                req.session.request(
                    req.method, url, data=req.body, headers=req.headers, middlewares=()
                ),
                max(first_byte_secs, TTS_FIRST_BYTE_SECS),  # the last chance: be patient
            )
        return resume_on_drop(await asyncio.wait_for(handler(req), first_byte_secs), req, None, log)

    return middleware


def tts_session(base: aiohttp.ClientSession, fallback_url: str | None) -> aiohttp.ClientSession:
    """``base``'s connection pool with the TTS retry middleware (one per pool and fallback)."""
    key = (id(base), fallback_url)
    session = _TTS_SESSIONS.get(key)
    if session is None or session.closed or session.connector is not base.connector:
        session = aiohttp.ClientSession(
            connector=base.connector,
            connector_owner=False,
            middlewares=(
                tts_retry(
                    fallback_url,
                    TTS_FIRST_BYTE_SECS_WITH_FALLBACK if fallback_url else TTS_FIRST_BYTE_SECS,
                ),
            ),
        )
        _TTS_SESSIONS[key] = session
    return session


def make_tts(
    tenant: Tenant,
    ep: ProviderEndpoints,
    session: aiohttp.ClientSession,
    sample_rate: int,
    call_uuid: str = "",
) -> TTSService:
    """Piper (in its own GPL process, reached over loopback HTTP)."""
    tts = PiperHttpTTSService(
        # The call id lets the Piper server synthesize earliest-needed sentences first.
        base_url=ep.piper_for_rate(sample_rate)
        + (f"&call={call_uuid}" if call_uuid else "")
        + f"&tenant={quote(tenant.name, safe='')}",
        aiohttp_session=tts_session(session, tenant.providers.tts_fallback_url),
        sample_rate=sample_rate,
        settings=PiperHttpTTSService.Settings(voice=tenant.voice),
    )
    # Pipecat 1.14 builds its sentence aggregator internally and offers no parameter
    # for another one; the first-clause aggregator is a SimpleTextAggregator subclass.
    tts._text_aggregator = FirstClauseAggregator()
    return tts
