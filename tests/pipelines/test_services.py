"""Service factory: the LLM services a call gets, against the chat emulator."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from pipecat.frames.frames import LLMContextFrame, LLMFullResponseEndFrame, LLMTextFrame
from pipecat.processors.aggregators.llm_context import LLMContext

from pipeswitch.bench.emulators import EmulatorConfig, run_emulators
from pipeswitch.bench.emulators.openai_chat import default_reply
from pipeswitch.config.tenants import ProviderSettings, Tenant
from pipeswitch.pipelines.emulated import endpoints_for
from pipeswitch.pipelines.services import (
    DEFAULT_FALLBACK_MODELS,
    ProviderEndpoints,
    make_fallback_llm,
    make_llm,
    make_stt,
    release_sdk_client,
    tls_context,
)
from tests.emulators.helpers import running_pipeline


def _ssl_context(llm: Any) -> object:
    """The TLS context in the service's openai client's connection pool."""
    return llm._client._client._transport._pool._ssl_context


def _tenant() -> Tenant:
    return Tenant(name="t", providers=ProviderSettings(llm="groq", llm_fallback="openai"))


async def test_calls_share_one_tls_context_and_still_stream() -> None:
    """Calls share the process's LLM client per provider key (one TLS context, one
    connection pool: no CA load and no handshake per call), and the services still
    stream from the wire."""
    async with run_emulators(EmulatorConfig(llm_ttft_median_ms=20.0)) as emu:
        ep = endpoints_for(emu)
        first, second = make_llm(_tenant(), ep), make_llm(_tenant(), ep)
        backup = make_fallback_llm(_tenant(), ep)
        assert backup is not None
        # One client (and connection pool) per process and provider key, not per call.
        assert first._client is second._client
        for llm in (first, second, backup):
            assert _ssl_context(llm) is tls_context()
        question: list[Any] = [{"role": "user", "content": "What time do you close today?"}]
        for llm in (first, backup):
            async with running_pipeline(llm) as h:
                await h.worker.queue_frame(LLMContextFrame(LLMContext(messages=list(question))))
                await h.down.wait_for(LLMFullResponseEndFrame, 5.0)
            text = "".join(f.text for _, f in h.down.of_type(LLMTextFrame))
            assert text == default_reply(question)
    groq, openai = emu.openai.requests
    assert groq.model == _tenant().providers.llm_model
    assert openai.model == DEFAULT_FALLBACK_MODELS["openai"]
    assert groq.messages[0] == {"role": "system", "content": _tenant().system_prompt}


def test_a_finished_calls_deepgram_client_is_freed_without_a_collection() -> None:
    """Pipecat builds a Deepgram SDK client per call (an HTTP client and its TLS context);
    the SDK's wrapper and that client point at each other. Released, it goes as soon
    as the call lets go of it; left as it is, only a full collection frees it."""
    ep = ProviderEndpoints(
        mode="real", piper_url="", deepgram_api_key="k", deepgram_url="http://127.0.0.1:9"
    )
    tenant = Tenant(name="t")
    freed: dict[bool, bool] = {}
    gc.collect()
    gc.disable()
    try:
        for release in (True, False):
            stt = make_stt(tenant, ep, 8000)
            wrapper = stt._client._client_wrapper  # type: ignore[attr-defined]
            http = weakref.ref(wrapper.httpx_client.httpx_client)
            del wrapper
            if release:
                release_sdk_client(stt)
            stt._client = None  # type: ignore[attr-defined]  # what taking the call apart does
            freed[release] = http() is None
    finally:
        gc.enable()
    assert freed == {True: True, False: False}
    gc.collect()
