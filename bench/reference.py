"""The reference: a plain Pipecat 1.14 telephone server, built the way the templates build it.

This is the set-up a plain Pipecat deployment uses - about 10 calls per process
on a 2-core machine, the number Pipeswitch has to beat - run under the same load, in the same bench run, so every
capacity and overhead figure can be reported as a ratio against it:

* an aiohttp WebSocket endpoint; per connection one ``Pipeline``, one
  ``PipelineWorker(enable_rtvi=False, idle_timeout_secs=None)``, one
  ``WorkerRunner``; ``PipelineParams(audio_in/out_sample_rate = stream rate)``;
* Pipecat's own ``FastAPIWebsocketTransport`` (``audio_out_10ms_chunks=2``: paced
  20 ms messages) over a ~30-line Starlette-style shim on aiohttp's
  ``WebSocketResponse`` (fastapi/starlette are not installed here; pipecat only
  needs the ``WebSocket`` duck type and the ``WebSocketState`` enum from them);
* ``[transport.input(), stt, user_aggregator, llm, tts, transport.output(),
  assistant_aggregator]`` with ``SileroVADAnalyzer(VADParams(stop_secs=0.2))``
  in ``LLMContextAggregatorPair`` and
  ``SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.2)``;
* the real ``DeepgramSTTService`` / ``GroqLLMService`` pointed at the same
  emulators, Piper through ``PiperHttpTTSService`` (its own Piper process,
  configured like Pipeswitch's);
* a minimal serializer for the same wire format as Pipeswitch's default
  tenant: binary L16 in, ``streamAudio`` JSON out (``json-stream`` dialect).

Greeting, system prompt and provider settings are the default tenant's.
Run: ``python -m pipeswitch.bench.reference --emulators '{…}'``; prints one JSON ready
line on stdout, then serves until SIGTERM / stdin EOF.
"""

from __future__ import annotations

import argparse
import base64
import enum
import json
import os
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from pipeswitch.bench.probe import BenchProbe, breakdown_dict, user_texts, wait_for_stop_signal
from pipeswitch.pipelines import event_loop

VAD_STOP_SECS = 0.2
USER_SPEECH_TIMEOUT = 0.2


# -- Starlette-style shim over aiohttp ------------------------------------------------


class WebSocketState(enum.Enum):
    """Starlette's ``WebSocketState`` values."""

    CONNECTING = 0
    CONNECTED = 1
    DISCONNECTED = 2
    RESPONSE = 3


def install_fastapi_stubs() -> None:
    """Make ``pipecat.transports.websocket.fastapi`` importable without fastapi/starlette.

    Only done when the real packages are missing; the transport needs nothing
    from them but the ``WebSocket`` name (type hints) and ``WebSocketState``.
    """
    try:
        import fastapi  # noqa: F401
        import starlette.websockets  # noqa: F401

        return
    except ImportError:
        pass
    fastapi_mod = types.ModuleType("fastapi")
    fastapi_mod.WebSocket = AiohttpStarletteWebSocket  # type: ignore[attr-defined]
    starlette_mod = types.ModuleType("starlette")
    ws_mod = types.ModuleType("starlette.websockets")
    ws_mod.WebSocketState = WebSocketState  # type: ignore[attr-defined]
    starlette_mod.websockets = ws_mod  # type: ignore[attr-defined]
    sys.modules.setdefault("fastapi", fastapi_mod)
    sys.modules.setdefault("starlette", starlette_mod)
    sys.modules.setdefault("starlette.websockets", ws_mod)


class AiohttpStarletteWebSocket:
    """The slice of Starlette's ``WebSocket`` that ``FastAPIWebsocketClient`` uses."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self._ws = ws
        self.headers = request.headers
        self.client_state: Any = _state().CONNECTED
        self.application_state: Any = _state().CONNECTED

    async def receive(self) -> dict[str, Any]:
        msg = await self._ws.receive()
        if msg.type == WSMsgType.BINARY:
            return {"type": "websocket.receive", "bytes": msg.data, "text": None}
        if msg.type == WSMsgType.TEXT:
            return {"type": "websocket.receive", "bytes": None, "text": msg.data}
        self.client_state = _state().DISCONNECTED
        return {"type": "websocket.disconnect", "code": self._ws.close_code or 1000}

    async def send_bytes(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    async def send_text(self, data: str) -> None:
        await self._ws.send_str(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.application_state = _state().DISCONNECTED
        await self._ws.close(code=code, message=(reason or "").encode())
        self.client_state = _state().DISCONNECTED


def _state() -> Any:
    from starlette.websockets import WebSocketState as State

    return State


# -- serializer -------------------------------------------------------------------------


def _make_serializer(rate: int) -> Any:
    from pipecat.frames.frames import AudioRawFrame, Frame, InputAudioRawFrame
    from pipecat.serializers.base_serializer import FrameSerializer

    class StreamAudioSerializer(FrameSerializer):
        """Binary L16 in; ``streamAudio`` JSON (base64 raw PCM) out."""

        def __init__(self, sample_rate: int) -> None:
            super().__init__()
            self.sample_rate = sample_rate

        async def serialize(self, frame: Frame) -> str | bytes | None:
            if isinstance(frame, AudioRawFrame):
                b64 = base64.b64encode(frame.audio).decode("ascii")
                return json.dumps(
                    {
                        "type": "streamAudio",
                        "data": {
                            "audioDataType": "raw",
                            "sampleRate": self.sample_rate,
                            "audioData": b64,
                        },
                    }
                )
            return None

        async def deserialize(self, data: str | bytes) -> Frame | None:
            if isinstance(data, bytes):
                return InputAudioRawFrame(audio=data, sample_rate=self.sample_rate, num_channels=1)
            return None  # metadata / send_text: nothing the reference uses

    return StreamAudioSerializer(rate)


# -- the server ---------------------------------------------------------------------------


@dataclass
class RefCallRecord:
    """What one reference call did (same shape as Pipeswitch's CallRecord export)."""

    call_uuid: str
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    turn_latencies: list[float] = field(default_factory=list)
    breakdowns: list[Any] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    end_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "call_uuid": self.call_uuid,
            "tenant": "reference",
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "turn_latencies": list(self.turn_latencies),
            "breakdowns": [breakdown_dict(b) for b in list(self.breakdowns)],
            "user_texts": user_texts(self.messages),
            "end_reason": self.end_reason,
        }


class ReferenceServer:
    """aiohttp endpoint; one plain Pipecat pipeline per connection."""

    def __init__(self, urls: dict[str, str], piper_url: str, http: aiohttp.ClientSession) -> None:
        from pipeswitch.config.tenants import builtin_default_tenant

        self.urls = urls
        self.piper_url = piper_url
        self.http = http
        self.tenant = builtin_default_tenant()
        self.active: dict[str, RefCallRecord] = {}
        self.finished: list[RefCallRecord] = []
        self.upgrade_ms: list[float] = []
        self.calls_total = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        ws = web.WebSocketResponse(compress=False, heartbeat=None)
        await ws.prepare(request)
        self.upgrade_ms.append((time.monotonic() - t0) * 1000.0)
        self.calls_total += 1
        rate = int(request.query.get("rate", "8000") or 8000)
        call_uuid = request.path.rstrip("/").rsplit("/", 1)[-1] or f"ref-{self.calls_total}"
        rec = RefCallRecord(call_uuid=call_uuid)
        self.active[call_uuid] = rec
        try:
            await self.run_call(ws, request, rate, rec)
        finally:
            rec.ended_at = time.monotonic()
            self.active.pop(call_uuid, None)
            self.finished.append(rec)
            if not ws.closed:
                await ws.close()
        return ws

    async def run_call(
        self, ws: web.WebSocketResponse, request: web.Request, rate: int, rec: RefCallRecord
    ) -> None:
        from pipecat.audio.vad.silero import SileroVADAnalyzer
        from pipecat.audio.vad.vad_analyzer import VADParams
        from pipecat.frames.frames import TTSSpeakFrame
        from pipecat.observers.user_bot_latency_observer import UserBotLatencyObserver
        from pipecat.pipeline.pipeline import Pipeline
        from pipecat.pipeline.worker import PipelineParams, PipelineWorker
        from pipecat.processors.aggregators.llm_context import LLMContext
        from pipecat.processors.aggregators.llm_response_universal import (
            LLMContextAggregatorPair,
            LLMUserAggregatorParams,
        )
        from pipecat.services.deepgram.stt import DeepgramSTTService
        from pipecat.services.groq.llm import GroqLLMService
        from pipecat.services.piper.tts import PiperHttpTTSService
        from pipecat.transports.websocket.fastapi import (
            FastAPIWebsocketParams,
            FastAPIWebsocketTransport,
        )
        from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import (
            SpeechTimeoutUserTurnStopStrategy,
        )
        from pipecat.turns.user_turn_strategies import UserTurnStrategies
        from pipecat.workers.runner import WorkerRunner

        t = self.tenant
        p = t.providers
        transport = FastAPIWebsocketTransport(
            websocket=AiohttpStarletteWebSocket(ws, request),
            params=FastAPIWebsocketParams(
                audio_in_enabled=True,
                audio_out_enabled=True,
                audio_out_10ms_chunks=2,
                add_wav_header=False,
                serializer=_make_serializer(rate),
            ),
        )
        stt = DeepgramSTTService(
            api_key="emulated",
            base_url=self.urls["deepgram_url"],
            sample_rate=rate,
            settings=DeepgramSTTService.Settings(
                model=p.stt_model,
                language=t.language,
                interim_results=True,
                punctuate=True,
                smart_format=True,
            ),
        )
        llm = GroqLLMService(
            api_key="emulated",
            base_url=self.urls["groq_base_url"],
            settings=GroqLLMService.Settings(
                model=p.llm_model,
                system_instruction=t.system_prompt,
                temperature=p.llm_temperature,
                max_tokens=p.llm_max_tokens,
            ),
        )
        tts = PiperHttpTTSService(
            base_url=f"{self.piper_url}?rate={rate}",
            aiohttp_session=self.http,
            sample_rate=rate,
            settings=PiperHttpTTSService.Settings(voice=t.voice),
        )
        context = LLMContext()
        user_aggregator, assistant_aggregator = LLMContextAggregatorPair(
            context,
            user_params=LLMUserAggregatorParams(
                vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=VAD_STOP_SECS)),
                user_turn_strategies=UserTurnStrategies(
                    stop=[
                        SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=USER_SPEECH_TIMEOUT)
                    ]
                ),
            ),
        )
        pipeline = Pipeline(
            [
                transport.input(),
                stt,
                user_aggregator,
                llm,
                tts,
                transport.output(),
                assistant_aggregator,
            ]
        )
        latency = UserBotLatencyObserver()
        worker = PipelineWorker(
            pipeline,
            params=PipelineParams(
                audio_in_sample_rate=rate,
                audio_out_sample_rate=rate,
                enable_metrics=True,
                enable_usage_metrics=True,
            ),
            observers=[latency],
            enable_rtvi=False,
            idle_timeout_secs=None,
        )

        @latency.event_handler("on_latency_measured")
        async def _on_latency(_: Any, secs: float) -> None:
            rec.turn_latencies.append(secs)

        @latency.event_handler("on_latency_breakdown")
        async def _on_breakdown(_: Any, breakdown: Any) -> None:
            rec.breakdowns.append(breakdown)

        @transport.event_handler("on_client_connected")
        async def _on_connected(_t: Any, _ws: Any) -> None:
            if t.first_message:
                await worker.queue_frame(TTSSpeakFrame(t.first_message))

        @transport.event_handler("on_client_disconnected")
        async def _on_disconnected(_t: Any, _ws: Any) -> None:
            rec.end_reason = "caller closed"
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        try:
            await runner.run()
        finally:
            rec.messages = [dict(m.items()) for m in context.get_messages() if isinstance(m, dict)]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeswitch.bench.reference", description=__doc__)
    p.add_argument("--emulators", required=True, help="JSON with deepgram_url, groq_base_url")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--loop", default="auto", choices=event_loop.EVENT_LOOP_KINDS)
    return p.parse_args(argv)


async def _amain(args: argparse.Namespace) -> None:
    from pipeswitch.config.logging import configure_logging
    from pipeswitch.config.tenants import builtin_default_tenant
    from pipeswitch.pipelines.local.supervisor import LocalModelServers

    configure_logging(args.log_level)
    install_fastapi_stubs()
    urls = json.loads(args.emulators)
    greeting = builtin_default_tenant().first_message
    # Piper exactly as Pipeswitch starts it (its own process, greeting pre-synthesized).
    local = LocalModelServers.piper_only(
        piper_warm=[greeting] if greeting else None, piper_warm_rates=(8000,), log_level="WARNING"
    )
    await local.start()
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
    )
    server = ReferenceServer(urls, local.piper_url(None), http)
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])

    def calls() -> list[dict[str, Any]]:
        return [r.to_dict() for r in [*server.finished, *server.active.values()]]

    def health() -> dict[str, Any]:
        return {
            "calls_active": len(server.active),
            "calls_total": server.calls_total,
            "refused": {},
            "upgrade_ms": list(server.upgrade_ms),
        }

    def reset() -> None:
        server.finished.clear()
        server.upgrade_ms.clear()

    probe = BenchProbe(calls, health, reset, active=lambda: len(server.active))
    stats_port = await probe.start()
    ready = {
        "ready": True,
        "kind": "reference",
        "port": port,
        "stats_port": stats_port,
        "pid": os.getpid(),
        "piper_url": local.piper_url(None),
        "vad_stop_secs": VAD_STOP_SECS,
        "policy_wait_secs": USER_SPEECH_TIMEOUT,
    }
    print(json.dumps(ready), flush=True)
    try:
        await wait_for_stop_signal()
    finally:
        await probe.stop()
        await runner.cleanup()
        await http.close()
        await local.stop()


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = _parse(argv)
    # auto: what uvicorn (Pipecat's runner) does, uvloop where installed.
    event_loop.run(_amain(args), args.loop)


if __name__ == "__main__":
    main()
