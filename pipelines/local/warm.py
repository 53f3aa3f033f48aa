"""What a call's start prefills into the local LLM's prompt cache.

The first turn only reuses the cache up to the first token that differs from what was
warmed. The chat template renders the tools into the system turn, so a warm-up of the
system prompt alone left the receptionist tools' schemas (~300 tokens) to the first
turn: its first token came 3.1 s after the caller stopped instead of 0.29 s
(``pipeswitch demo`` with three tools). The body is built by Pipecat's own OpenAI
adapter, the code that builds the turn's request, so the two prefixes are the same.
"""

from __future__ import annotations

from typing import Any

from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.adapters.llm.services.open_ai_adapter import OpenAILLMAdapter
from pipecat.processors.aggregators.llm_context import LLMContext, LLMContextMessage
from pipecat.utils.types import NOT_GIVEN, NotGiven


async def llm_warm_body(
    system_prompt: str,
    first_message: str | None,
    tools: ToolsSchema | NotGiven = NOT_GIVEN,
) -> dict[str, Any]:
    """``POST /warm`` body: the system prompt, the greeting and the call's tools, as the
    first turn's request will carry them."""
    messages: list[LLMContextMessage] = []
    if first_message:
        messages.append({"role": "assistant", "content": first_message})
    params = await OpenAILLMAdapter().get_llm_invocation_params(
        LLMContext(messages=messages, tools=tools),
        system_instruction=system_prompt,
        convert_developer_to_user=True,
    )
    body: dict[str, Any] = {"messages": list(params["messages"])}
    if isinstance(params["tools"], list) and params["tools"]:
        body["tools"] = params["tools"]
    return body
