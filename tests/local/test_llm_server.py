"""LLM server through Pipecat's unmodified ``OpenAILLMService``."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from openai import AsyncOpenAI, AuthenticationError
from pipecat.frames.frames import (
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.tests.utils import run_test

from pipeswitch.config.tenants import ToolSettings
from pipeswitch.pipelines.local.llm_server import MODEL_ID
from pipeswitch.pipelines.local.supervisor import LocalModelServers
from pipeswitch.pipelines.local.warm import llm_warm_body
from pipeswitch.processors.tools import tools_schema

pytestmark = [pytest.mark.local_models, pytest.mark.asyncio(loop_scope="session")]

SYSTEM = (
    "You are the friendly receptionist of Riverside Dental Clinic. "
    "Reply in one or two short spoken sentences. Do not use lists or markdown."
)
ENGLISH_WORDS = {"i", "you", "the", "a", "to", "can", "we", "your", "help", "appointment", "be"}


def auth(servers: LocalModelServers) -> dict[str, str]:
    return {"Authorization": f"Bearer {servers.api_key}"}


async def llm_metrics(servers: LocalModelServers) -> dict:
    base = servers.llm_base_url.removesuffix("/v1")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base}/metrics", headers=auth(servers)) as resp,
    ):
        assert resp.status == 200
        return await resp.json()


async def test_openai_llm_service_streams_english_reply(local_servers: LocalModelServers) -> None:
    await local_servers.warm_llm(SYSTEM)
    llm = OpenAILLMService(
        api_key=local_servers.api_key,
        base_url=local_servers.llm_base_url,
        settings=OpenAILLMService.Settings(
            model=MODEL_ID, system_instruction=SYSTEM, temperature=0.0, max_tokens=60
        ),
    )
    context = LLMContext(
        messages=[{"role": "user", "content": "Hi, I would like to book a cleaning for next week."}]
    )
    down, _ = await run_test(llm, frames_to_send=[LLMContextFrame(context=context)])
    types = [type(f) for f in down]
    assert LLMFullResponseStartFrame in types and LLMFullResponseEndFrame in types
    chunks = [f.text for f in down if isinstance(f, LLMTextFrame)]
    assert len(chunks) > 3, "expected a streamed (multi-chunk) reply"
    reply = "".join(chunks).strip()
    words = set(re.findall(r"[a-z']+", reply.lower()))
    assert reply and len(words & ENGLISH_WORDS) >= 2, reply
    assert reply.isascii(), reply


async def test_warm_caches_system_prompt(local_servers: LocalModelServers) -> None:
    system = SYSTEM + " The clinic is closed on Sundays."
    warm = await local_servers.warm_llm(system)
    assert warm["prompt_tokens"] and warm["prompt_tokens"] > 20
    client = AsyncOpenAI(api_key=local_servers.api_key, base_url=local_servers.llm_base_url)
    stream = await client.chat.completions.create(
        model=MODEL_ID,
        messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": "Are you open on Sunday?"},
        ],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=30,
        temperature=0,
    )
    usage = None
    text = ""
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text.strip()
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    assert cached >= warm["prompt_tokens"] - 5, (cached, warm)


async def test_warm_with_tools_caches_the_first_turns_prefix(
    local_servers: LocalModelServers,
) -> None:
    """The chat template renders the tools into the system turn: a call start warms them
    too, so the first turn (sent by Pipecat's service) prefills only the caller's words."""
    tools = tools_schema(ToolSettings(enabled=["end_call", "take_message", "business_hours"]))
    system = SYSTEM + " Take a message when nobody can help."
    greeting = "Riverside Dental, how can I help?"
    body = await llm_warm_body(system, greeting, tools)
    warm = await local_servers._post_json(
        f"{local_servers.llm_base_url.removesuffix('/v1')}/warm", body, auth=True
    )
    assert warm["prompt_tokens"] > 200, warm  # the tools' schemas are in it
    before = await llm_metrics(local_servers)
    llm = OpenAILLMService(
        api_key=local_servers.api_key,
        base_url=local_servers.llm_base_url,
        settings=OpenAILLMService.Settings(
            model=MODEL_ID, system_instruction=system, temperature=0.0, max_tokens=20
        ),
    )
    context = LLMContext(
        messages=[
            {"role": "assistant", "content": greeting},
            {"role": "user", "content": "When do you open tomorrow?"},
        ],
        tools=tools,
    )
    await run_test(llm, frames_to_send=[LLMContextFrame(context=context)])
    after = await llm_metrics(local_servers)
    cached = after["prompt_tokens_cached"] - before["prompt_tokens_cached"]
    new = after["prompt_tokens"] - before["prompt_tokens"] - cached
    assert cached >= warm["prompt_tokens"] - 5 and new < 30, (cached, new, warm)


async def test_auth_models_and_bad_request(local_servers: LocalModelServers) -> None:
    bad = AsyncOpenAI(api_key="wrong-key", base_url=local_servers.llm_base_url)
    with pytest.raises(AuthenticationError):
        await bad.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    client = AsyncOpenAI(api_key=local_servers.api_key, base_url=local_servers.llm_base_url)
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    base = local_servers.llm_base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/health") as resp:
            assert resp.status == 200
        async with session.post(
            f"{base}/v1/chat/completions", json={"messages": "nope"}, headers=auth(local_servers)
        ) as resp:
            assert resp.status == 400
        # Only the allowlisted routes exist on the front.
        async with session.post(
            f"{base}/v1/completions", json={"prompt": "x"}, headers=auth(local_servers)
        ) as resp:
            assert resp.status in (404, 405)


async def test_non_streaming_completion(local_servers: LocalModelServers) -> None:
    client = AsyncOpenAI(api_key=local_servers.api_key, base_url=local_servers.llm_base_url)
    result = await client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"}],
        max_completion_tokens=12,
        temperature=0,
    )
    assert result.choices[0].message.content
    assert result.usage is not None and 0 < result.usage.completion_tokens <= 12


async def test_client_disconnect_stops_generation(local_servers: LocalModelServers) -> None:
    before = await llm_metrics(local_servers)
    base = local_servers.llm_base_url
    payload = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse."}],
        "max_tokens": 400,
        "stream": True,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/chat/completions", json=payload, headers=auth(local_servers)) as resp,
    ):
        assert resp.status == 200
        lines = 0
        async for _ in resp.content:
            lines += 1
            if lines >= 6:
                break  # hang up mid-reply, like a barge-in
    after = before
    for _ in range(50):
        await asyncio.sleep(0.1)
        after = await llm_metrics(local_servers)
        if after["disconnects"] > before["disconnects"] and after["active"] == 0:
            break
    assert after["disconnects"] == before["disconnects"] + 1
    assert after["active"] == 0
    # Generation stopped early: far fewer than 400 tokens were produced.
    assert after["completion_tokens"] - before["completion_tokens"] < 100
