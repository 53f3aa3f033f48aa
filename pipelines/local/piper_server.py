# SPDX-License-Identifier: GPL-3.0-or-later
#
# This module imports ``piper`` (piper-tts, GPL-3.0-or-later) and is therefore licensed
# GPL-3.0-or-later. It only ever runs as its own process (``python -m
# pipelines.local.piper_server``) and talks to the rest of Pipeswitch (BSD-2-Clause) over
# HTTP; no other Pipeswitch module imports it.
"""Piper TTS over loopback HTTP, speaking what Pipecat's ``PiperHttpTTSService`` expects.

Protocol (``PiperHttpTTSService.run_tts`` in pipecat 1.14):

* ``POST /`` (the service's ``base_url``) with JSON ``{"text": str, "voice": str | null}``.
* Response ``200 audio/wav``, chunked: a 44-byte RIFF/WAVE header (streaming placeholder
  sizes ``0xFFFFFFFF``) immediately followed by 16-bit mono PCM, written and flushed per
  sentence as Piper produces it. The service reads the rate from header bytes 24..28 and
  strips the first 44 bytes; the header always travels in the same write as the first
  sentence so the first chunk the client reads is never shorter than 44 bytes.
* ``?rate=8000`` (or 16000, ...) on the URL resamples with soxr inside this process, so the
  header carries the telephone rate and the pipeline does no resampling.

Also: ``POST /warm`` (pre-synthesize and pin fixed phrases), ``GET /health``,
``GET /metrics`` (JSON).

Run: ``python -m pipeswitch.pipelines.local.piper_server --host 127.0.0.1 --port 0 --voice joe``;
prints ``{"ready": true, "port": N}`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web
from loguru import logger

from pipeswitch.pipelines.local import models
from pipeswitch.pipelines.local._common import (
    LatencyStat,
    claim_stdout,
    configure_logging,
    require_loopback,
    rss_mb,
    run_main,
    run_server,
)
from pipeswitch.pipelines.local.scheduling import DeadlineSlots

ALLOWED_RATES = frozenset({8000, 16000, 22050, 24000, 32000, 44100, 48000})
MAX_TEXT_CHARS = 5000
STREAM_SIZE = 0xFFFFFFFF


def wav_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """44-byte PCM WAV header with placeholder (streaming) RIFF and data sizes."""
    block_align = channels * bits // 8
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        STREAM_SIZE,
        b"WAVE",
        b"fmt ",
        16,
        1,
        channels,
        sample_rate,
        sample_rate * block_align,
        block_align,
        bits,
        b"data",
        STREAM_SIZE,
    )


def normalize_text(text: str) -> str:
    """Cache-key normalisation: collapse whitespace. Case is kept (it can change espeak's
    reading of acronyms)."""
    return " ".join(text.split())


@dataclass
class PiperServerConfig:
    """Server options (CLI flags map 1:1)."""

    host: str = "127.0.0.1"
    port: int = 0
    voices: list[str] = field(default_factory=lambda: ["joe"])
    threads: int = 1
    max_concurrent: int = 1
    max_queue: int = 16
    cache_entries: int = 64
    cache_mb: float = 32.0
    cache_max_chars: int = 200
    warm_texts: list[str] = field(default_factory=list)
    # Rates to pre-synthesize at (None = the voice's own): every rate a tenant's calls use.
    warm_rates: list[int | None] = field(default_factory=lambda: [None])
    watch_parent: bool = False


class PcmCache:
    """LRU of synthesized PCM, bounded by entries and bytes. Pinned entries (from
    ``/warm``) are never evicted by ordinary traffic."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int, str], tuple[bytes, bool]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[str, int, str]) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: tuple[str, int, str], pcm: bytes, *, pinned: bool = False) -> bool:
        if self.max_entries <= 0 or len(pcm) > self.max_bytes:
            return False
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= len(old[0])
            pinned = pinned or old[1]
        self._items[key] = (pcm, pinned)
        self.bytes += len(pcm)
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            victim = next((k for k, (_, p) in self._items.items() if not p), None)
            if victim is None or victim == key:
                # Only pinned entries left (or the new one): drop the new unpinned entry.
                if not pinned:
                    self.bytes -= len(self._items.pop(key)[0])
                    return False
                break
            self.bytes -= len(self._items.pop(victim)[0])
            self.evictions += 1
        return True


@dataclass
class Metrics:
    requests: int = 0
    errors: int = 0
    rejected: int = 0
    disconnects: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    coalesced: int = 0
    queue_waits: int = 0
    queue_wait_seconds: float = 0.0
    sentences: int = 0
    synth_seconds: float = 0.0
    audio_seconds: float = 0.0
    ttfa: LatencyStat = field(default_factory=LatencyStat)
    ttfa_cached: LatencyStat = field(default_factory=LatencyStat)


class LoadedVoice:
    """A Piper voice with an ONNX session using our own thread settings."""

    def __init__(self, name: str, spec: str, threads: int) -> None:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        model_path, config_path = models.piper_voice_paths(spec)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        # Spinning worker threads would steal the 2 shared cores from Whisper / the LLM.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        with open(config_path, encoding="utf-8") as f:
            config = PiperConfig.from_dict(json.load(f))
        session = onnxruntime.InferenceSession(
            str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.name = name
        self.voice = PiperVoice(session=session, config=config, download_dir=models.cache_dir())
        self.sample_rate = int(config.sample_rate)
        # espeak-ng is not thread-safe; ONNX inference is. Serialise only phonemisation.
        phonemize = self.voice.phonemize
        lock = threading.Lock()

        def locked_phonemize(text: str) -> list[list[str]]:
            with lock:
                return phonemize(text)

        self.voice.phonemize = locked_phonemize  # type: ignore[method-assign]

    def sentences(self, text: str) -> Iterator[np.ndarray]:
        """Float32 audio, one array per sentence (``PiperVoice.synthesize``)."""
        for chunk in self.voice.synthesize(text):
            yield chunk.audio_float_array


def to_pcm16(audio: np.ndarray, in_rate: int, out_rate: int) -> bytes:
    """Resample (soxr, HQ) and convert float32 [-1, 1] to little-endian int16 bytes."""
    if in_rate != out_rate:
        import soxr

        audio = soxr.resample(audio, in_rate, out_rate)
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class QueueFullError(Exception):
    """Too many requests are waiting for a synthesis slot."""


class Flight:
    """One synthesis that every request for the same text shares while it runs.

    Many calls ask for the same sentence at once ("Anything else?", a tenant's stock
    answer): without this each missed the cache until the first finished, and all
    synthesized it, filling the queue until callers got 503s. The synthesis runs in
    its own task, so a requester that hangs up (a barge-in) does not cut the audio
    short for the others; it stops when the last one leaves.
    """

    __slots__ = ("_changed", "done", "error", "listeners", "parts", "task")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done = False
        self.error: str | None = None  # "full" (not admitted) or "failed"
        self.listeners = 0
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def add(self, pcm: bytes) -> None:
        self.parts.append(pcm)
        self._wake()

    def finish(self, error: str | None = None) -> None:
        self.done, self.error = True, error
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[bytes]:
        """The synthesis's PCM from its start, then as it is produced."""
        i = 0
        while True:
            while i < len(self.parts):
                yield self.parts[i]
                i += 1
            if self.done:
                return
            await self._changed.wait()


class PiperServer:
    """aiohttp application around one or more loaded Piper voices."""

    def __init__(self, cfg: PiperServerConfig) -> None:
        self.cfg = cfg
        self.voices: dict[str, LoadedVoice] = {}
        self.default_voice = ""
        self.cache = PcmCache(cfg.cache_entries, int(cfg.cache_mb * 1024 * 1024))
        self.metrics = Metrics()
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, cfg.max_concurrent), thread_name_prefix="piper-synth"
        )
        self._slots: DeadlineSlots | None = None
        self._waiting = 0
        self._in_flight = 0
        self._in_flight_synth = 0
        self._flights: dict[tuple[str, int, str], Flight] = {}
        self._started = time.time()

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        for spec in self.cfg.voices:
            name = models.piper_voice_name(spec)
            t0 = time.perf_counter()
            self.voices[name] = LoadedVoice(name, spec, self.cfg.threads)
            logger.info(
                f"voice {name} loaded in {time.perf_counter() - t0:.2f}s "
                f"({self.voices[name].sample_rate} Hz, {self.cfg.threads} intra-op thread(s))"
            )
        self.default_voice = models.piper_voice_name(self.cfg.voices[0])
        # First ONNX run allocates; do it now rather than on the first caller.
        t0 = time.perf_counter()
        for v in self.voices.values():
            for _ in v.sentences("Hello."):
                pass
        logger.info(f"warm-up inference {time.perf_counter() - t0:.2f}s")

    def resolve_voice(self, requested: Any) -> LoadedVoice:
        if requested in (None, "", "default"):
            return self.voices[self.default_voice]
        if not isinstance(requested, str):
            raise web.HTTPBadRequest(text="'voice' must be a string")
        name = models.piper_voice_name(requested)
        voice = self.voices.get(name)
        if voice is None:
            raise web.HTTPBadRequest(
                text=f"unknown voice {requested!r}; loaded: {sorted(self.voices)}"
            )
        return voice

    @staticmethod
    def parse_rate(request: web.Request, voice: LoadedVoice) -> int:
        raw = request.query.get("rate") or request.query.get("sample_rate")
        if not raw:
            return voice.sample_rate
        try:
            rate = int(raw)
        except ValueError:
            raise web.HTTPBadRequest(text=f"bad rate {raw!r}") from None
        if rate not in ALLOWED_RATES:
            raise web.HTTPBadRequest(text=f"rate must be one of {sorted(ALLOWED_RATES)}")
        return rate

    # ------------------------------------------------------------------ synthesis
    @contextlib.asynccontextmanager
    async def _slot(self, *, admit: bool, call: str | None = None) -> AsyncIterator[None]:
        assert self._slots is not None
        deadline = self._slots.deadline(call)
        if self._slots.waiting or self._in_flight_synth >= max(1, self.cfg.max_concurrent):
            if admit and self._waiting >= self.cfg.max_queue:
                raise QueueFullError
            self.metrics.queue_waits += 1
            self._waiting += 1
            t0 = time.perf_counter()
            try:
                await self._slots.acquire(deadline)
            finally:
                self._waiting -= 1
                self.metrics.queue_wait_seconds += time.perf_counter() - t0
        else:
            await self._slots.acquire(deadline)
        self._in_flight_synth += 1
        try:
            yield
        finally:
            self._in_flight_synth -= 1
            self._slots.release()

    async def synthesize(
        self, voice: LoadedVoice, text: str, rate: int, call: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Yield PCM16 at ``rate`` per sentence; each sentence holds a synth slot only
        while it is being computed, so concurrent calls interleave sentence by sentence."""
        loop = asyncio.get_running_loop()
        sentences = voice.sentences(text)
        sentinel = object()
        first = True
        while True:
            async with self._slot(admit=first, call=call):
                t0 = time.perf_counter()

                def step() -> Any:
                    audio = next(sentences, sentinel)
                    if audio is sentinel:
                        return sentinel
                    assert isinstance(audio, np.ndarray)
                    return audio, to_pcm16(audio, voice.sample_rate, rate)

                result = await loop.run_in_executor(self._executor, step)
                dt = time.perf_counter() - t0
            first = False
            if result is sentinel:
                return
            audio, pcm = result
            self.metrics.sentences += 1
            self.metrics.synth_seconds += dt
            self.metrics.audio_seconds += len(audio) / voice.sample_rate
            assert self._slots is not None
            self._slots.produced(call, len(audio) / voice.sample_rate)
            yield pcm

    # ------------------------------------------------------------------ handlers
    async def handle_tts(self, request: web.Request) -> web.StreamResponse:
        t_start = time.perf_counter()
        self.metrics.requests += 1
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text="body must be JSON {'text': ..., 'voice': ...}") from None
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise web.HTTPBadRequest(text="missing 'text'")
        text = normalize_text(body["text"])
        if len(text) > MAX_TEXT_CHARS:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_TEXT_CHARS, actual_size=len(text), text="text too long"
            )
        voice = self.resolve_voice(body.get("voice"))
        rate = self.parse_rate(request, voice)
        header = wav_header(rate)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "audio/wav"})
        resp.enable_chunked_encoding()

        key = (voice.name, rate, text)
        cached = self.cache.get(key)
        if cached is not None or not text:
            self.metrics.cache_hits += cached is not None
            await resp.prepare(request)
            await resp.write(header + (cached or b""))
            self.metrics.ttfa_cached.add(time.perf_counter() - t_start)
            await resp.write_eof()
            return resp

        flight = self._flights.get(key)
        if flight is None:
            self.metrics.cache_misses += 1
            flight = Flight()
            self._flights[key] = flight
            flight.task = asyncio.create_task(
                self._produce(flight, key, voice, request.query.get("call"))
            )
        else:
            self.metrics.coalesced += 1
        self._in_flight += 1
        flight.listeners += 1
        try:
            async for pcm in flight.follow():
                if not resp.prepared:
                    await resp.prepare(request)
                    await resp.write(header + pcm)
                    self.metrics.ttfa.add(time.perf_counter() - t_start)
                else:
                    await resp.write(pcm)
        except ConnectionResetError:
            # Caller hung up (e.g. barge-in): the others sharing the synthesis go on.
            self.metrics.disconnects += 1
            return resp
        except asyncio.CancelledError:
            self.metrics.disconnects += 1
            raise
        finally:
            self._in_flight -= 1
            flight.listeners -= 1
            if not flight.listeners and not flight.done and flight.task is not None:
                flight.task.cancel()  # nobody left to hear the remaining sentences
        if flight.error is not None and resp.prepared:
            # Cut short: abort the chunked body rather than end it as if it were whole.
            raise RuntimeError(f"synthesis of {len(text)} chars failed mid-stream")
        if not resp.prepared:
            if flight.error == "full":
                self.metrics.rejected += 1
                return web.json_response(
                    {"error": "piper queue full"}, status=503, headers={"Retry-After": "1"}
                )
            if flight.error is not None:
                return web.json_response({"error": "synthesis failed"}, status=500)
            await resp.prepare(request)  # text had no speakable sentences
            await resp.write(header)
        await resp.write_eof()
        return resp

    async def _produce(
        self, flight: Flight, key: tuple[str, int, str], voice: LoadedVoice, call: str | None
    ) -> None:
        """Synthesize into ``flight``; cache the whole audio when it completes."""
        _, rate, text = key
        try:
            gen = self.synthesize(voice, text, rate, call)
            try:
                async for pcm in gen:
                    flight.add(pcm)
            finally:
                await gen.aclose()
        except QueueFullError:
            flight.finish("full")
            return
        except asyncio.CancelledError:
            flight.finish("failed")
            raise
        except Exception:
            self.metrics.errors += 1
            logger.exception("synthesis failed")
            flight.finish("failed")
            return
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.finish()
        if len(text) <= self.cfg.cache_max_chars:
            self.cache.put(key, b"".join(flight.parts))

    async def warm(self, texts: list[str], rate: int | None, voice_name: Any) -> dict[str, Any]:
        voice = self.resolve_voice(voice_name)
        rate = rate or voice.sample_rate
        t0 = time.perf_counter()
        synthesized = already = 0
        for raw in texts:
            text = normalize_text(raw)
            if not text:
                continue
            key = (voice.name, rate, text)
            pcm = self.cache.get(key)
            if pcm is None:
                pcm = b"".join([p async for p in self.synthesize(voice, text, rate)])
                synthesized += 1
            else:
                already += 1
            self.cache.put(key, pcm, pinned=True)
        return {
            "voice": voice.name,
            "rate": rate,
            "synthesized": synthesized,
            "already_cached": already,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    async def handle_warm(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if isinstance(body, list):
            body = {"texts": body}
        texts = body.get("texts") if isinstance(body, dict) else None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise web.HTTPBadRequest(text="expected {'texts': [str, ...], 'rate': int?}")
        voice_name = body.get("voice")
        rates: list[int | None] = []
        raw_rates = body.get("rates", [body.get("rate") or request.query.get("rate")])
        for r in raw_rates if isinstance(raw_rates, list) else [raw_rates]:
            if r in (None, ""):
                rates.append(None)
                continue
            try:
                rate = int(r)
            except (TypeError, ValueError):
                raise web.HTTPBadRequest(text=f"bad rate {r!r}") from None
            if rate not in ALLOWED_RATES:
                raise web.HTTPBadRequest(text=f"rate must be one of {sorted(ALLOWED_RATES)}")
            rates.append(rate)
        try:
            results = [await self.warm(texts, r, voice_name) for r in rates]
        except QueueFullError:
            self.metrics.rejected += 1
            return web.json_response({"error": "piper queue full"}, status=503)
        return web.json_response({"warmed": results, "cache_entries": len(self.cache)})

    async def handle_health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "status": "ok",
                "voices": sorted(self.voices),
                "default_voice": self.default_voice,
                "native_rate": self.voices[self.default_voice].sample_rate,
                "in_flight": self._in_flight,
                "waiting": self._waiting,
            }
        )

    async def handle_metrics(self, request: web.Request) -> web.StreamResponse:
        m = self.metrics
        return web.json_response(
            {
                "requests": m.requests,
                "errors": m.errors,
                "rejected_queue_full": m.rejected,
                "disconnects": m.disconnects,
                "cache_hits": m.cache_hits,
                "cache_misses": m.cache_misses,
                "coalesced": m.coalesced,
                "cache_entries": len(self.cache),
                "cache_bytes": self.cache.bytes,
                "cache_evictions": self.cache.evictions,
                "queue_waits": m.queue_waits,
                "queue_wait_seconds": round(m.queue_wait_seconds, 4),
                "waiting": self._waiting,
                "in_flight": self._in_flight,
                "sentences": m.sentences,
                "synth_seconds": round(m.synth_seconds, 4),
                "audio_seconds": round(m.audio_seconds, 4),
                "rtf": round(m.synth_seconds / m.audio_seconds, 4) if m.audio_seconds else None,
                "ttfa": m.ttfa.as_dict(),
                "ttfa_cached": m.ttfa_cached.as_dict(),
                "threads": self.cfg.threads,
                "max_concurrent": self.cfg.max_concurrent,
                "rss_mb": round(rss_mb(), 1),
                "uptime_s": round(time.time() - self._started, 1),
            }
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024)
        app.router.add_post("/", self.handle_tts)
        app.router.add_post("/tts", self.handle_tts)
        app.router.add_post("/warm", self.handle_warm)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)

        async def on_startup(_: web.Application) -> None:
            self._slots = DeadlineSlots(max(1, self.cfg.max_concurrent))
            if self.cfg.warm_texts:
                for rate in self.cfg.warm_rates:
                    result = await self.warm(self.cfg.warm_texts, rate, None)
                    logger.info(f"warmed {result}")

        async def on_cleanup(_: web.Application) -> None:
            self._executor.shutdown(wait=False, cancel_futures=True)

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return app


def parse_args(argv: list[str] | None = None) -> PiperServerConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = ephemeral")
    p.add_argument(
        "--voice",
        action="append",
        help="'joe' (packaged en_US-joe-medium) or a path to an .onnx voice; repeatable, "
        "the first is the default",
    )
    p.add_argument("--threads", type=int, default=int(os.environ.get("PIPER_THREADS", "1")))
    p.add_argument("--max-concurrent", type=int, default=1, help="parallel syntheses")
    p.add_argument("--max-queue", type=int, default=16, help="waiting requests before 503")
    p.add_argument("--cache-entries", type=int, default=64)
    p.add_argument("--cache-mb", type=float, default=32.0)
    p.add_argument("--cache-max-chars", type=int, default=200, help="longer texts aren't cached")
    p.add_argument("--warm", action="append", default=[], help="text to pre-synthesize; repeatable")
    p.add_argument(
        "--warm-rate", type=int, action="append", default=[], help="rate to warm at; repeatable"
    )
    p.add_argument("--watch-parent", action="store_true", help="exit when stdin closes")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    configure_logging("piper", a.log_level)
    return PiperServerConfig(
        host=require_loopback(a.host),
        port=a.port,
        voices=a.voice or ["joe"],
        threads=max(1, a.threads),
        max_concurrent=max(1, a.max_concurrent),
        max_queue=max(0, a.max_queue),
        cache_entries=a.cache_entries,
        cache_mb=a.cache_mb,
        cache_max_chars=a.cache_max_chars,
        warm_texts=a.warm,
        warm_rates=list(a.warm_rate) or [None],
        watch_parent=a.watch_parent,
    )


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    ready_out = claim_stdout()
    models.set_offline_env()
    cfg = parse_args(argv)
    server = PiperServer(cfg)
    server.load()
    run_server(server.app(), cfg, ready_out, started)


if __name__ == "__main__":
    run_main("piper", main)
