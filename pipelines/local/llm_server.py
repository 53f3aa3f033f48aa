"""Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) on xllamacpp, served OpenAI-compatibly on loopback.

Two modes:

``--mode front`` (default)
    llama.cpp's server engine runs in this process through xllamacpp's native server API
    (``xllamacpp.Server.handle_chat_completions`` with a streaming callback: continuous
    batching, ``--parallel`` slots, prompt cache). A small aiohttp front serves:

    * ``POST /v1/chat/completions`` (``stream`` true or false; SSE ``data: {chunk}`` ...
      ``data: [DONE]``), which is what Pipecat's ``OpenAILLMService`` (openai SDK) sends;
    * ``GET /v1/models``;
    * ``POST /warm`` ``{"system_prompt": str}`` or ``{"messages": [...], "tools": [...]}``: a
      ``max_tokens=1`` completion with ``cache_prompt`` so a call's first turn finds the
      tenant's system prompt (and tools, which the template renders into it) already in
      the KV cache;
    * ``GET /metrics`` (JSON: TTFT, tokens/s, queue), ``GET /health`` (public).

    It adds what llama.cpp's HTTP server lacks: a bounded wait queue (``503`` when full),
    stopping generation when the client disconnects (barge-in), JSON metrics, an allowlist of
    endpoints. xllamacpp always starts its own HTTP listener too; here it is bound to
    127.0.0.1 and locked with a random API key that is never disclosed, with the web UI,
    ``/slots``, ``/props`` and ``/metrics`` disabled.

``--mode native``
    Serve xllamacpp's own llama.cpp HTTP server directly (127.0.0.1, ``api_keys`` = our key,
    UI/slots/props off). Warm-up is then the documented request
    ``POST /v1/chat/completions {"messages": [{"role": "system", ...}], "max_tokens": 1}``.

Both require ``Authorization: Bearer <key>`` (``$PIPESWITCH_LOCAL_API_KEY`` or
``--api-key``). Run: ``python -m pipeswitch.pipelines.local.llm_server --host 127.0.0.1 --port 0``;
prints ``{"ready": true, "port": N}`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlparse

from aiohttp import web
from loguru import logger

from pipeswitch.pipelines.local import models
from pipeswitch.pipelines.local._common import (
    LatencyStat,
    bearer_auth_middleware,
    claim_stdout,
    configure_logging,
    print_ready,
    require_loopback,
    resolve_api_key,
    rss_mb,
    run_main,
    run_server,
)

MODEL_ID = "qwen2.5-coder-0.5b-instruct"
MAX_BODY_BYTES = 4 * 1024 * 1024
_DONE = object()


@dataclass
class LLMServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    api_key: str = ""
    mode: str = "front"
    model_path: str | None = None
    threads: int = 2
    batch_threads: int | None = None  # prompt processing; None: ``threads``
    parallel: int = 2
    ctx_size: int = 2048  # per slot
    max_tokens: int = 512
    max_queue: int = 4
    cache_ram_mib: int = 256
    watch_parent: bool = False
    verbosity: int = 0


@dataclass
class Metrics:
    requests: int = 0
    streamed: int = 0
    warm_requests: int = 0
    errors: int = 0
    bad_requests: int = 0
    rejected: int = 0
    disconnects: int = 0
    queue_waits: int = 0
    queue_wait_seconds: float = 0.0
    max_queue_depth: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    ttft: LatencyStat = field(default_factory=LatencyStat)
    total: LatencyStat = field(default_factory=LatencyStat)
    last_decode_tps: float = 0.0
    last_prompt_tps: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0


def build_params(cfg: LLMServerConfig, http_api_key: str, http_port: int) -> Any:
    """xllamacpp ``CommonParams`` with everything non-essential switched off."""
    try:
        import xllamacpp
    except ImportError as exc:
        raise models.LocalModelsMissingError(
            f"xllamacpp is not installed ({exc}); {models.INSTALL_HINT}"
        ) from exc
    p = xllamacpp.CommonParams()
    p.model.path = cfg.model_path or str(models.qwen_gguf_path())
    p.model_alias = {MODEL_ID}
    p.n_parallel = cfg.parallel
    p.n_ctx = cfg.ctx_size * cfg.parallel  # llama.cpp splits n_ctx across slots
    p.n_predict = cfg.max_tokens  # upper bound for any request
    p.cpuparams.n_threads = cfg.threads
    p.cpuparams_batch.n_threads = cfg.batch_threads or cfg.threads
    p.n_threads_http = 2
    p.cache_prompt = True
    p.cache_ram_mib = cfg.cache_ram_mib
    p.cont_batching = True
    p.warmup = True
    p.verbosity = cfg.verbosity
    # Lock down the embedded HTTP listener.
    p.hostnames = ["127.0.0.1"]
    p.port = http_port
    p.api_keys = [http_api_key]
    p.ui = False
    p.ui_mcp_proxy = False
    p.endpoint_slots = False
    p.endpoint_props = False
    p.endpoint_metrics = False
    p.slot_save_path = ""
    p.server_tools = []
    p.mcp_servers_config = ""
    p.mcp_servers_json = ""
    p.models_autoload = False
    p.sleep_idle_seconds = -1
    return p


class LLMServer:
    """aiohttp front over an in-process ``xllamacpp.Server``."""

    def __init__(self, cfg: LLMServerConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.engine: Any = None
        self.load_seconds = 0.0
        self._executor = ThreadPoolExecutor(max_workers=cfg.parallel + 1, thread_name_prefix="llm")
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._active = 0
        self._started = time.time()

    def load(self, http_api_key: str, http_port: int = 0) -> None:
        import xllamacpp

        params = build_params(self.cfg, http_api_key, http_port)
        t0 = time.perf_counter()
        self.engine = xllamacpp.Server(params)
        self.load_seconds = time.perf_counter() - t0
        logger.info(
            f"{MODEL_ID} loaded in {self.load_seconds:.2f}s (threads={self.cfg.threads}, "
            f"prompt threads={self.cfg.batch_threads or self.cfg.threads}, "
            f"slots={self.cfg.parallel}, ctx/slot={self.cfg.ctx_size}); "
            f"embedded llama.cpp listener {self.engine.listening_address} (key-locked)"
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _error(status: int, message: str, etype: str = "invalid_request_error") -> web.Response:
        return web.json_response({"error": {"message": message, "type": etype}}, status=status)

    def _sanitize(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise ValueError("'messages' must be a non-empty array")
        req = dict(body)
        if "max_tokens" not in req and "max_completion_tokens" in req:
            req["max_tokens"] = req.pop("max_completion_tokens")
        req.pop("max_completion_tokens", None)
        # Options that must not be steered per request on a shared local server.
        for key in ("slot_id", "id_slot", "lora", "n_probs", "post_sampling_probs"):
            req.pop(key, None)
        req["model"] = MODEL_ID
        req.setdefault("cache_prompt", True)
        return req

    async def _acquire(self) -> bool:
        """Wait for a slot; False when the wait queue is full."""
        assert self._slots is not None
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        if self._waiting >= self.cfg.max_queue:
            return False
        self.metrics.queue_waits += 1
        self._waiting += 1
        self.metrics.max_queue_depth = max(self.metrics.max_queue_depth, self._waiting)
        t0 = time.perf_counter()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self.metrics.queue_wait_seconds += time.perf_counter() - t0
        return True

    def _record_final(self, chunk: dict[str, Any]) -> None:
        usage = chunk.get("usage") or {}
        timings = chunk.get("timings") or {}
        self.metrics.completion_tokens += int(usage.get("completion_tokens") or 0)
        self.metrics.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        self.metrics.prompt_tokens_cached += int(details.get("cached_tokens") or 0)
        if timings:
            n = int(timings.get("predicted_n") or 0)
            ms = float(timings.get("predicted_ms") or 0.0)
            if n > 1 and ms > 0:
                self.metrics.decode_tokens += n
                self.metrics.decode_seconds += ms / 1000.0
                self.metrics.last_decode_tps = float(timings.get("predicted_per_second") or 0.0)
            if timings.get("prompt_per_second"):
                self.metrics.last_prompt_tps = float(timings["prompt_per_second"])
        # One line per request: where a turn's LLM time went (prompt reuse, prefill, decode).
        logger.info(
            "request: prompt {} tokens ({} cached), prefill {:.0f} ms, {} tokens in {:.0f} ms",
            usage.get("prompt_tokens"),
            details.get("cached_tokens"),
            float(timings.get("prompt_ms") or 0.0),
            timings.get("predicted_n"),
            float(timings.get("predicted_ms") or 0.0),
        )

    # ------------------------------------------------------------------ handlers
    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        t_start = time.perf_counter()
        self.metrics.requests += 1
        try:
            req = self._sanitize(await request.json())
        except ValueError as exc:
            self.metrics.bad_requests += 1
            return self._error(400, str(exc))
        if not await self._acquire():
            self.metrics.rejected += 1
            resp = self._error(503, "LLM queue full", "server_error")
            resp.headers["Retry-After"] = "1"
            return resp
        self._active += 1
        try:
            if req.get("stream"):
                self.metrics.streamed += 1
                return await self._stream(request, req, t_start)
            return await self._complete(req, t_start)
        finally:
            self._active -= 1
            assert self._slots is not None
            self._slots.release()

    async def _complete(self, req: dict[str, Any], t_start: float) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(
                self._executor, self.engine.handle_chat_completions, req
            )
        except ValueError as exc:
            self.metrics.bad_requests += 1
            return self._error(400, str(exc))
        except Exception as exc:
            self.metrics.errors += 1
            logger.exception("completion failed")
            return self._error(500, f"completion failed: {exc}", "server_error")
        if isinstance(result, dict) and "error" in result:
            self.metrics.errors += 1
            err = result["error"]
            status = int(err.get("code", 500)) if isinstance(err, dict) else 500
            return web.json_response(result, status=status if 400 <= status < 600 else 500)
        if isinstance(result, dict):
            self._record_final(result)
        self.metrics.total.add(time.perf_counter() - t_start)
        return web.json_response(result)

    async def _stream(
        self, request: web.Request, req: dict[str, Any], t_start: float
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def on_chunk(chunk: Any) -> bool:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
            return cancelled.is_set()  # True stops generation

        def run() -> None:
            try:
                self.engine.handle_chat_completions(req, on_chunk)
            except BaseException as exc:  # delivered to the event loop below
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self._executor, run)
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        first_token = False
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    if not resp.prepared:
                        if isinstance(item, ValueError):
                            self.metrics.bad_requests += 1
                            return self._error(400, str(item))
                        self.metrics.errors += 1
                        return self._error(500, f"completion failed: {item}", "server_error")
                    self.metrics.errors += 1
                    payload: Any = {"error": {"message": str(item), "type": "server_error"}}
                else:
                    payload = item
                    if isinstance(item, dict):
                        if "error" in item:
                            self.metrics.errors += 1
                        elif item.get("usage") or item.get("timings"):
                            self._record_final(item)
                        if not first_token and _has_content(item):
                            first_token = True
                            self.metrics.ttft.add(time.perf_counter() - t_start)
                if not resp.prepared:
                    await resp.prepare(request)
                await resp.write(f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode())
            if not resp.prepared:
                await resp.prepare(request)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.metrics.total.add(time.perf_counter() - t_start)
            return resp
        except ConnectionResetError:
            # Caller hung up (barge-in): the callback's next return value stops llama.cpp.
            self.metrics.disconnects += 1
            cancelled.set()
            return resp
        except asyncio.CancelledError:
            self.metrics.disconnects += 1
            cancelled.set()
            raise
        finally:
            cancelled.set()
            # Hold the slot until llama.cpp has really finished with this request.
            with contextlib.suppress(Exception):
                await asyncio.shield(future)

    async def handle_warm(self, request: web.Request) -> web.StreamResponse:
        """Prefill the prompt cache with a system prompt (or a message prefix)."""
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "body must be JSON")
        if not isinstance(body, dict):
            return self._error(400, "body must be a JSON object")
        messages = body.get("messages")
        if messages is None and isinstance(body.get("system_prompt"), str):
            messages = [{"role": "system", "content": body["system_prompt"]}]
        if not isinstance(messages, list) or not messages:
            return self._error(400, "expected {'system_prompt': str} or {'messages': [...]}")
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            return self._error(400, "'tools' must be an array")
        self.metrics.warm_requests += 1
        if not await self._acquire():
            self.metrics.rejected += 1
            return self._error(503, "LLM queue full", "server_error")
        t0 = time.perf_counter()
        try:
            req = {"messages": messages, "max_tokens": 1, "cache_prompt": True, "temperature": 0}
            if tools:  # rendered into the system turn: part of the prefix to cache
                req["tools"] = tools
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.engine.handle_chat_completions, req
            )
        except ValueError as exc:
            return self._error(400, str(exc))
        finally:
            assert self._slots is not None
            self._slots.release()
        usage = result.get("usage", {}) if isinstance(result, dict) else {}
        timings = result.get("timings", {}) if isinstance(result, dict) else {}
        return web.json_response(
            {
                "seconds": round(time.perf_counter() - t0, 3),
                "prompt_tokens": usage.get("prompt_tokens"),
                "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                "prompt_ms": timings.get("prompt_ms"),
            }
        )

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": MODEL_ID, "object": "model", "owned_by": "pipeswitch-local"}],
            }
        )

    async def handle_health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok", "model": MODEL_ID})

    async def handle_metrics(self, request: web.Request) -> web.StreamResponse:
        m = self.metrics
        return web.json_response(
            {
                "model": MODEL_ID,
                "threads": self.cfg.threads,
                "batch_threads": self.cfg.batch_threads or self.cfg.threads,
                "slots": self.cfg.parallel,
                "ctx_per_slot": self.cfg.ctx_size,
                "load_seconds": round(self.load_seconds, 3),
                "requests": m.requests,
                "streamed": m.streamed,
                "warm_requests": m.warm_requests,
                "errors": m.errors,
                "bad_requests": m.bad_requests,
                "rejected_queue_full": m.rejected,
                "disconnects": m.disconnects,
                "active": self._active,
                "queue_depth": self._waiting,
                "max_queue": self.cfg.max_queue,
                "max_queue_depth": m.max_queue_depth,
                "queue_waits": m.queue_waits,
                "queue_wait_seconds": round(m.queue_wait_seconds, 4),
                "prompt_tokens": m.prompt_tokens,
                "prompt_tokens_cached": m.prompt_tokens_cached,
                "completion_tokens": m.completion_tokens,
                "decode_tokens_per_second": round(m.decode_tokens / m.decode_seconds, 2)
                if m.decode_seconds
                else None,
                "last_decode_tokens_per_second": round(m.last_decode_tps, 2),
                "last_prompt_tokens_per_second": round(m.last_prompt_tps, 2),
                "ttft": m.ttft.as_dict(),
                "request_total": m.total.as_dict(),
                "rss_mb": round(rss_mb(), 1),
                "uptime_s": round(time.time() - self._started, 1),
            }
        )

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY_BYTES,
            middlewares=[bearer_auth_middleware(self.cfg.api_key, frozenset({"/health"}))],
        )
        app.router.add_post("/v1/chat/completions", self.handle_chat)
        app.router.add_post("/chat/completions", self.handle_chat)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_post("/warm", self.handle_warm)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)

        async def on_startup(_: web.Application) -> None:
            self._slots = asyncio.Semaphore(self.cfg.parallel)

        async def on_cleanup(_: web.Application) -> None:
            self._executor.shutdown(wait=False, cancel_futures=True)

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return app


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls"):
            return True
    return False


def run_native(cfg: LLMServerConfig, ready_out: IO[str], started: float) -> None:
    """Serve xllamacpp's own llama.cpp HTTP server on ``cfg.port`` with our API key."""
    import xllamacpp

    engine = xllamacpp.Server(build_params(cfg, cfg.api_key, cfg.port))
    address = engine.listening_address
    port = urlparse(address if "://" in address else f"http://{address}").port
    if port is None:
        raise SystemExit(f"could not determine the llama.cpp listening port from {address!r}")
    logger.info(
        f"native llama.cpp server on {address} (start-up {time.monotonic() - started:.2f}s, "
        f"RSS {rss_mb():.0f} MiB)"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if cfg.watch_parent:

        def watch() -> None:
            with contextlib.suppress(OSError):
                while os.read(0, 4096):
                    pass
            logger.warning("stdin closed (parent gone); shutting down")
            stop.set()

        threading.Thread(target=watch, daemon=True).start()
    print_ready(ready_out, port)
    stop.wait()
    logger.info("shutting down")
    del engine


def parse_args(argv: list[str] | None = None) -> LLMServerConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = ephemeral")
    p.add_argument("--api-key", default=None, help="prefer $PIPESWITCH_LOCAL_API_KEY (not in ps)")
    p.add_argument("--mode", choices=["front", "native"], default="front")
    p.add_argument("--model", default=None, help="GGUF path (default: the packaged Qwen 0.5B)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("LLM_THREADS", "2")))
    p.add_argument(
        "--batch-threads", type=int, default=None, help="prompt threads (default: --threads)"
    )
    p.add_argument("--parallel", type=int, default=2, help="llama.cpp slots")
    p.add_argument("--ctx-size", type=int, default=2048, help="context tokens per slot")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on tokens per reply")
    p.add_argument("--max-queue", type=int, default=4, help="waiting requests before 503")
    p.add_argument("--cache-ram-mib", type=int, default=256, help="host prompt-cache size")
    p.add_argument("--watch-parent", action="store_true", help="exit when stdin closes")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--llama-verbosity", type=int, default=0)
    a = p.parse_args(argv)
    configure_logging("llm", a.log_level)
    api_key = resolve_api_key(a.api_key)
    if not api_key:
        raise SystemExit("an API key is required: set PIPESWITCH_LOCAL_API_KEY or --api-key")
    return LLMServerConfig(
        host=require_loopback(a.host),
        port=a.port,
        api_key=api_key,
        mode=a.mode,
        model_path=a.model,
        threads=max(1, a.threads),
        batch_threads=max(1, a.batch_threads) if a.batch_threads else None,
        parallel=max(1, a.parallel),
        ctx_size=max(256, a.ctx_size),
        max_tokens=max(1, a.max_tokens),
        max_queue=max(0, a.max_queue),
        cache_ram_mib=max(0, a.cache_ram_mib),
        watch_parent=a.watch_parent,
        verbosity=a.llama_verbosity,
    )


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    ready_out = claim_stdout()
    models.set_offline_env()
    cfg = parse_args(argv)
    if cfg.mode == "native":
        run_native(cfg, ready_out, started)
        return
    server = LLMServer(cfg)
    # The embedded listener gets a key nobody knows: effectively closed.
    server.load(http_api_key=secrets.token_urlsafe(32), http_port=0)
    run_server(server.app(), cfg, ready_out, started)


if __name__ == "__main__":
    run_main("llm", main)
