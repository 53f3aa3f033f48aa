"""OpenAI-compatible chat-completions emulator (Groq, OpenAI, any ``base_url`` LLM).

Pipecat's ``GroqLLMService`` / ``OpenAILLMService`` talk to it through the
unmodified ``openai`` SDK (``AsyncOpenAI(base_url=…)``), so it serves exactly what
the SDK requests and parses:

* ``POST {prefix}/chat/completions`` with ``Authorization: Bearer <key>`` (401
  with an OpenAI error body otherwise). ``prefix`` is ``/openai/v1`` (Groq's
  layout: ``base_url=http://127.0.0.1:P/openai/v1``) or ``/v1`` (OpenAI's).
* ``stream: true`` (what Pipecat always sends, with
  ``stream_options: {"include_usage": true}``) answers ``text/event-stream``:
  ``data: <chat.completion.chunk JSON>\\n\\n`` events, a role chunk first, one
  chunk per token, a ``finish_reason`` chunk, a ``choices: []`` usage chunk
  when ``include_usage`` is set, then ``data: [DONE]``.
* ``stream: false`` answers one ``chat.completion`` object.
* ``GET {prefix}/models`` lists models.

Timing: the first token goes out ``ttft`` after the request arrived (default
Groq gpt-oss-120b, p50 98 / p95 217 ms), then tokens (words with their leading
space) at ``tokens_per_s`` (default 500/s, Groq-like). Several due tokens are
written per wake-up (at most one wake-up per ``min_write_interval_s``) so that a
hundred concurrent streams don't mean fifty thousand timer wake-ups a second.

Replies come from a script (:data:`ChatScript`). Every request is recorded in
:attr:`OpenAIChatEmulator.requests` with its parsed body, so tests can check what
the LLM context contained, and with what was actually streamed before the client
went away (``sent_text``), which is what a barge-in leaves the caller having
heard at most.

Faults (:class:`ChatFaults`): an HTTP error status (500, 429 with ``retry-after``,
…), optionally only for the next N requests; or a connection drop after N
streamed tokens. The SDK retries 408/409/429/5xx twice by itself (honouring
``retry-after`` up to 60 s) unless the response says ``x-should-retry: false``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from aiohttp import web

from pipeswitch.bench.emulators.latency import GROQ_TTFT, LatencyModel
from pipeswitch.bench.emulators.serving import add_admin_routes


@dataclass
class ToolCall:
    """A scripted function call; ``arguments`` may be a dict or a JSON string."""

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str | None = None

    def arguments_json(self) -> str:
        """The arguments as the JSON string the API carries."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments)


# A reply: text, tool call(s), or (text, tool call(s)) - the text streamed first and the
# calls after it in the same response, as the real API does ("Let me transfer you." + call).
ChatReply = str | ToolCall | Sequence[ToolCall] | tuple[str, ToolCall | Sequence[ToolCall]]
ChatScript = Callable[[list[dict[str, Any]]], ChatReply] | Mapping[str, ChatReply]

Outcome = Literal["pending", "completed", "client_disconnected", "dropped", "error"]


@dataclass
class ChatFaults:
    """Faults for upcoming requests.

    Attributes:
        status: Answer with this HTTP status and an OpenAI-style error body.
        retry_after_s: ``retry-after`` header value (seconds) for the error.
        should_retry: Send ``x-should-retry: true/false`` to force or stop the
            SDK's own retries (False makes a 500 fail fast).
        drop_after_tokens: Abort the TCP connection after streaming this many
            tokens (0: right after the headers).
        count: Apply to this many upcoming requests only; None means all.
        first_token_delay_s: Add this to the time to first token (slow first byte; a
            long one is a stalled provider).
        malformed: Answer 200 with an event stream whose first event is not JSON.
        model: Fault only requests for this model (one provider of two down, the
            other answering: a tenant's fallback LLM); None means every request.
    """

    status: int | None = None
    retry_after_s: float | None = None
    should_retry: bool | None = None
    drop_after_tokens: int | None = None
    count: int | None = None
    first_token_delay_s: float | None = None
    malformed: bool = False
    model: str | None = None

    @property
    def active(self) -> bool:
        """Whether any fault is configured."""
        return (
            self.status is not None
            or self.drop_after_tokens is not None
            or self.first_token_delay_s is not None
            or self.malformed
        )


@dataclass
class ChatRequestRecord:
    """One chat-completions request as received, and what was sent back.

    ``received_at``, ``first_token_at`` and ``finished_at`` are ``time.monotonic()``.
    """

    index: int
    path: str
    received_at: float
    body: dict[str, Any]
    model: str
    stream: bool
    status: int = 200
    fault: str | None = None
    ttft_s: float = 0.0
    reply_text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tokens_total: int = 0
    tokens_sent: int = 0
    sent_text: str = ""
    first_token_at: float | None = None
    finished_at: float | None = None
    outcome: Outcome = "pending"

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The request's ``messages`` (the LLM context as sent)."""
        msgs = self.body.get("messages")
        return msgs if isinstance(msgs, list) else []

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the admin endpoint and the bench report)."""
        return dataclasses.asdict(self)


# -- scripts ------------------------------------------------------------------


def message_text(message: Mapping[str, Any]) -> str:
    """Text of a message whose content is a string or a list of content parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("text")
        )
    return ""


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """Text of the last ``user`` message, or ""."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""


def _clip_words(text: str, n: int) -> str:
    words = text.split()
    clipped = " ".join(words[:n])
    return clipped + ("…" if len(words) > n else "")


def default_reply(messages: list[dict[str, Any]]) -> str:
    """A multi-sentence reply built from the last user message.

    Several sentences so sentence-streaming TTS gets more than one chunk; the
    echoed topic lets a test see which turn the reply belongs to.
    """
    if messages and messages[-1].get("role") == "tool":
        result = _clip_words(message_text(messages[-1]), 20)
        return f"Thanks for waiting. The result is {result}. Is there anything else?"
    user = last_user_text(messages).strip()
    if not user:
        return "Hello, thanks for calling. How can I help you today?"
    topic = _clip_words(user.rstrip(" .?!"), 12)
    topic = topic[:1].lower() + topic[1:]
    return (
        f"Sure. You asked about {topic}. "
        "Our office is open nine to five, Monday to Friday. Is there anything else?"
    )


def keyword_script(table: Mapping[str, ChatReply]) -> Callable[[list[dict[str, Any]]], ChatReply]:
    """Turn ``{keyword: reply}`` into a script.

    The first keyword found (case-insensitively) in the last user message picks
    the reply; otherwise :func:`default_reply`. Only a user turn is matched, so
    the request that carries a tool result gets the default tool-result reply
    instead of calling the tool again.
    """
    items = [(k.lower(), v) for k, v in table.items()]

    def script(messages: list[dict[str, Any]]) -> ChatReply:
        if messages and messages[-1].get("role") == "user":
            text = message_text(messages[-1]).lower()
            for key, reply in items:
                if key in text:
                    return reply
        return default_reply(messages)

    return script


def tokenize(text: str) -> list[str]:
    """Split into "tokens": words with their leading whitespace; joins back to ``text``."""
    tokens = re.findall(r"\s*\S+", text)
    tail = text[len("".join(tokens)) :]
    if tail:
        if tokens:
            tokens[-1] += tail
        else:
            tokens = [tail]
    return tokens


def _fragments(text: str, size: int = 12) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


# -- the emulator -------------------------------------------------------------


class OpenAIChatEmulator:
    """Serves chat completions under ``/v1`` and ``/openai/v1``."""

    PREFIXES = ("/v1", "/openai/v1")

    def __init__(
        self,
        *,
        ttft: LatencyModel | None = None,
        tokens_per_s: float = 500.0,
        script: ChatScript | None = None,
        faults: ChatFaults | None = None,
        api_key: str | None = None,
        models: Sequence[str] = ("openai/gpt-oss-120b", "llama-3.3-70b-versatile", "gpt-4o-mini"),
        min_write_interval_s: float = 0.01,
    ) -> None:
        """Create the emulator; ``api_key`` None accepts any non-empty bearer token."""
        self.ttft = ttft or GROQ_TTFT.model(seed=0)
        self.tokens_per_s = tokens_per_s
        self.script: Callable[[list[dict[str, Any]]], ChatReply] = (
            keyword_script(script) if isinstance(script, Mapping) else script or default_reply
        )
        self.faults = faults or ChatFaults()
        self.api_key = api_key
        self.models = list(models)
        self.min_write_interval_s = min_write_interval_s
        self.requests: list[ChatRequestRecord] = []
        self.active_streams = 0

    # -- public helpers -------------------------------------------------------

    @property
    def last_request(self) -> ChatRequestRecord | None:
        """The most recent request, if any."""
        return self.requests[-1] if self.requests else None

    def set_faults(self, faults: ChatFaults) -> None:
        """Replace the faults for upcoming requests."""
        self.faults = faults

    def clear(self) -> None:
        """Forget recorded requests."""
        self.requests = []

    def add_routes(self, app: web.Application) -> None:
        """Register the API and admin endpoints on ``app``."""
        for prefix in self.PREFIXES:
            app.router.add_post(f"{prefix}/chat/completions", self.handle_chat)
            app.router.add_get(f"{prefix}/models", self.handle_models)
        add_admin_routes(
            app,
            self,
            ChatFaults,
            "requests",
            lambda: {
                "active": self.active_streams,
                "requests": [r.to_dict() for r in self.requests],
            },
        )

    # -- handlers -------------------------------------------------------------

    def _auth_error(self, request: web.Request) -> web.Response | None:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return _error(401, "Missing or invalid Authorization header.", "invalid_api_key")
        if self.api_key is not None and key.strip() != self.api_key:
            return _error(401, "Invalid API Key", "invalid_api_key")
        return None

    async def handle_models(self, request: web.Request) -> web.Response:
        """``GET /models``."""
        if (err := self._auth_error(request)) is not None:
            return err
        created = int(time.time())
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "emulator"}
            for m in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    def _take_faults(self, model: str) -> ChatFaults | None:
        f = self.faults
        if not f.active or (f.model is not None and f.model != model):
            return None
        if f.count is not None:
            if f.count <= 0:
                return None
            f.count -= 1
        return f

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /chat/completions``: record, maybe fail, then answer after TTFT."""
        received = time.monotonic()
        if (err := self._auth_error(request)) is not None:
            return err
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "Request body is not valid JSON.", "invalid_request_error")
        except ConnectionResetError:
            # The client gave up mid-upload (a barge-in or a hang-up cancelled the
            # request): nobody to answer, and not the emulator's error to log.
            raise web.HTTPBadRequest() from None
        if not isinstance(body, dict):
            return _error(400, "Request body must be a JSON object.", "invalid_request_error")
        rec = ChatRequestRecord(
            index=len(self.requests),
            path=request.path,
            received_at=received,
            body=body,
            model=str(body.get("model", "")),
            stream=bool(body.get("stream", False)),
        )
        self.requests.append(rec)
        if not rec.model or not isinstance(body.get("messages"), list) or not body["messages"]:
            rec.status, rec.outcome = 400, "error"
            return _error(
                400, "'model' and a non-empty 'messages' are required.", "invalid_request_error"
            )

        faults = self._take_faults(rec.model)
        if faults is not None and faults.status is not None:
            rec.status, rec.outcome, rec.fault = faults.status, "error", f"status {faults.status}"
            return _fault_response(faults)

        try:
            reply = self.script(rec.messages)
        except Exception as e:  # a broken script is a 500, as a provider bug would be
            rec.status, rec.outcome, rec.fault = 500, "error", f"script error: {e!r}"
            return _error(500, f"Emulator script failed: {e!r}", "server_error")

        preamble = ""
        if isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[0], str):
            preamble, reply = reply[0], reply[1]
        calls = (
            [reply]
            if isinstance(reply, ToolCall)
            else (None if isinstance(reply, str) else [c for c in reply if isinstance(c, ToolCall)])
        )
        rec.ttft_s = self.ttft.sample_s()
        if faults is not None and faults.first_token_delay_s:
            rec.ttft_s += faults.first_token_delay_s
            rec.fault = f"first token +{faults.first_token_delay_s}s"
        if faults is not None and faults.malformed:
            rec.outcome, rec.fault = "error", "malformed event stream"
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: {this is not json\n\n")
            await resp.write_eof()
            return resp
        drop_after = faults.drop_after_tokens if faults is not None else None
        if calls:
            rec.tool_calls = [
                {
                    "id": c.id or f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments_json()},
                }
                for c in calls
            ]
            rec.reply_text = preamble
        else:
            rec.reply_text = str(reply)
        if rec.stream:
            return await self._stream(request, rec, drop_after)
        return await self._complete(rec)

    async def _complete(self, rec: ChatRequestRecord) -> web.Response:
        n = len(tokenize(rec.reply_text)) + sum(
            len(_fragments(c["function"]["arguments"])) + 1 for c in rec.tool_calls
        )
        rec.tokens_total = n
        await _sleep_until(rec.received_at + rec.ttft_s + n / self.tokens_per_s)
        message: dict[str, Any] = {"role": "assistant", "content": rec.reply_text or None}
        if rec.tool_calls:
            message["tool_calls"] = rec.tool_calls
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": rec.model,
            "system_fingerprint": "fp_emulator",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if rec.tool_calls else "stop",
                }
            ],
            "usage": _usage(rec, n),
        }
        rec.tokens_sent, rec.sent_text = n, rec.reply_text
        rec.first_token_at = rec.finished_at = time.monotonic()
        rec.outcome = "completed"
        return web.json_response(body)

    async def _stream(
        self, request: web.Request, rec: ChatRequestRecord, drop_after: int | None
    ) -> web.StreamResponse:
        chunk_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        include_usage = bool((rec.body.get("stream_options") or {}).get("include_usage"))
        base: dict[str, Any] = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": rec.model,
            "system_fingerprint": "fp_emulator",
        }

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            chunk = {
                **base,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                chunk["usage"] = None
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        # Each slot is what goes out for one "token"; slot 0 carries the role too.
        slots: list[tuple[bytes, str]] = []
        if rec.tool_calls:
            for i, tok in enumerate(tokenize(rec.reply_text)):  # text before the calls
                data = event({"content": tok})
                if i == 0:
                    data = event({"role": "assistant", "content": ""}) + data
                slots.append((data, tok))
            for idx, call in enumerate(rec.tool_calls):
                head: dict[str, Any] = {
                    "tool_calls": [
                        {
                            "index": idx,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ]
                }
                if idx == 0 and not slots:
                    head = {"role": "assistant", "content": None, **head}
                slots.append((event(head), ""))
                for frag in _fragments(call["function"]["arguments"]):
                    delta = {"tool_calls": [{"index": idx, "function": {"arguments": frag}}]}
                    slots.append((event(delta), ""))
        else:
            for i, tok in enumerate(tokenize(rec.reply_text)):
                data = event({"content": tok})
                if i == 0:
                    data = event({"role": "assistant", "content": ""}) + data
                slots.append((data, tok))
            if not slots:
                slots.append((event({"role": "assistant", "content": ""}), ""))
        rec.tokens_total = len(slots)

        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "x-request-id": f"req_{uuid.uuid4().hex[:26]}",
            },
        )
        self.active_streams += 1
        try:
            await resp.prepare(request)
            first_at = rec.received_at + rec.ttft_s
            interval = 1.0 / self.tokens_per_s if self.tokens_per_s > 0 else 0.0
            sent = 0
            while sent < len(slots):
                if drop_after is not None and sent >= drop_after:
                    self._abort(request, rec)
                now = await _sleep_until(first_at + sent * interval)
                due = len(slots) if interval == 0 else int((now - first_at) / interval) + 1
                due = min(len(slots), max(due, sent + 1))
                if drop_after is not None:
                    due = min(due, max(drop_after, sent + 1))
                batch = slots[sent:due]
                await resp.write(b"".join(data for data, _ in batch))
                if rec.first_token_at is None:
                    rec.first_token_at = time.monotonic()
                rec.sent_text += "".join(tok for _, tok in batch)
                sent = due
                rec.tokens_sent = sent
                if sent < len(slots) and interval > 0:
                    await asyncio.sleep(self.min_write_interval_s)
            tail = event({}, "tool_calls" if rec.tool_calls else "stop")
            if include_usage:
                usage_chunk = {**base, "choices": [], "usage": _usage(rec, len(slots))}
                tail += b"data: " + json.dumps(usage_chunk).encode() + b"\n\n"
            tail += b"data: [DONE]\n\n"
            await resp.write(tail)
            await resp.write_eof()
            rec.outcome = "completed"
        except ConnectionError:
            rec.outcome = "client_disconnected"
        except asyncio.CancelledError:
            if rec.outcome == "pending":
                rec.outcome = "client_disconnected"
            raise
        finally:
            rec.finished_at = time.monotonic()
            self.active_streams -= 1
        return resp

    def _abort(self, request: web.Request, rec: ChatRequestRecord) -> NoReturn:
        rec.outcome, rec.fault = "dropped", f"dropped after {rec.tokens_sent} tokens"
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise asyncio.CancelledError  # nothing more can be written; let aiohttp wind down


async def _sleep_until(deadline: float) -> float:
    """Sleep until the monotonic ``deadline``; returns the time on waking."""
    now = time.monotonic()
    if deadline > now:
        await asyncio.sleep(deadline - now)
        now = time.monotonic()
    return now


def _usage(rec: ChatRequestRecord, completion_tokens: int) -> dict[str, Any]:
    prompt_chars = sum(len(message_text(m)) for m in rec.messages if isinstance(m, dict))
    prompt_tokens = max(1, prompt_chars // 4)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _error(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    kind = {401: "invalid_request_error", 429: "rate_limit_exceeded"}.get(status, "api_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _fault_response(f: ChatFaults) -> web.Response:
    status = f.status or 500
    headers: dict[str, str] = {}
    if f.retry_after_s is not None:
        headers["retry-after"] = f"{f.retry_after_s:g}"
    if f.should_retry is not None:
        headers["x-should-retry"] = "true" if f.should_retry else "false"
    if status == 429:
        return _error(429, "Rate limit reached (emulated).", "rate_limit_exceeded", headers)
    return _error(status, f"Emulated upstream failure ({status}).", "server_error", headers)
