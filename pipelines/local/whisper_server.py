"""faster-whisper (Whisper tiny.en, CTranslate2) behind an OpenAI-compatible transcription API.

Speaks what Pipecat's ``OpenAISTTService`` sends through the ``openai`` SDK
(``client.audio.transcriptions.create``): ``POST /v1/audio/transcriptions``, multipart form
with ``file`` (the VAD segment as a WAV at the pipeline rate, e.g. 8 kHz), ``model``
(ignored: there is one model), ``language``, ``prompt``, ``response_format``
(``json`` | ``text`` | ``verbose_json``) and ``temperature``. The reply is
``{"text": ...}`` (json), plain text, or a Whisper-style ``verbose_json`` with segments.

Audio is resampled to 16 kHz with soxr. Decoding: ``beam_size=1``, ``language="en"``,
``without_timestamps=True``, ``vad_filter=False``, one temperature (no fallback re-decodes,
which would add latency). The encoder sees the turn padded to ``--min-window`` seconds
(10), not Whisper's 30 s window (:class:`ShortWindowWhisper`). Requires ``Authorization: Bearer <key>`` (key from
``$PIPESWITCH_LOCAL_API_KEY`` or ``--api-key``); ``GET /health`` is public.
One transcription runs at a time; up to ``--max-queue`` wait, more get ``503``.

Run: ``python -m pipeswitch.pipelines.local.whisper_server --host 127.0.0.1 --port 0``;
prints ``{"ready": true, "port": N}`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web
from loguru import logger

from pipeswitch.pipelines.local import models
from pipeswitch.pipelines.local._common import (
    LatencyStat,
    bearer_auth_middleware,
    claim_stdout,
    configure_logging,
    require_loopback,
    resolve_api_key,
    rss_mb,
    run_main,
    run_server,
)

MODEL_ID = "tiny.en"
TARGET_RATE = 16000
FRAMES_PER_SECOND = 100  # Whisper's mel frames (10 ms hop)
FULL_WINDOW_FRAMES = 3000
# The shortest encoder window. Measured on 2 cores (tiny.en int8, 2 threads, 16 caller
# sentences and 8 pairs of them, Piper and espeak-ng voices through an 8 kHz telephone
# channel, with and without noise): a 10 s window gave the same WER as 30 s (Piper 0.024
# both, espeak 0.333 vs 0.357, pairs 0.267 vs 0.328) at 0.09-0.12 s median per turn
# instead of 0.36-0.43 s. Windows of 7 s or less made the decoder repeat the sentence
# until its token limit (up to 1.9 s; "no no no ...").
MIN_WINDOW_SECS = 10.0
# Padding after the audio when it is longer than the minimum window.
WINDOW_TAIL_FRAMES = 100
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
ENGLISH = {"", "en", "eng", "english"}


@dataclass
class WhisperServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    api_key: str = ""
    threads: int = 2
    compute_type: str = "int8"
    beam_size: int = 1
    max_queue: int = 8
    min_window_secs: float = MIN_WINDOW_SECS
    watch_parent: bool = False


@dataclass
class Metrics:
    requests: int = 0
    errors: int = 0
    rejected: int = 0
    bad_requests: int = 0
    abandoned: int = 0  # requests whose client had gone when their turn came
    queue_waits: int = 0
    queue_wait_seconds: float = 0.0
    max_queue_depth: int = 0
    audio_seconds: float = 0.0
    transcribe: LatencyStat = field(default_factory=LatencyStat)
    total: LatencyStat = field(default_factory=LatencyStat)


class BadAudioError(ValueError):
    """The uploaded file could not be decoded."""


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an upload to mono float32 and its sample rate.

    PCM WAV (what Pipecat sends) is parsed with the stdlib; anything else falls back to
    faster-whisper's PyAV decoder (which resamples to 16 kHz itself).
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            with wave.open(io.BytesIO(data)) as w:
                rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
                frames = w.readframes(w.getnframes())
        except (wave.Error, EOFError) as exc:
            raise BadAudioError(f"bad WAV: {exc}") from exc
        if width == 2:
            audio = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
        elif width == 1:
            audio = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
        elif width == 4:
            audio = np.frombuffer(frames, dtype="<i4").astype(np.float32) / 2147483648.0
        else:
            raise BadAudioError(f"unsupported WAV sample width {width}")
        if channels > 1:
            audio = audio[: len(audio) - len(audio) % channels].reshape(-1, channels).mean(axis=1)
        return audio, rate
    try:
        from faster_whisper.audio import decode_audio as av_decode

        return av_decode(io.BytesIO(data), sampling_rate=TARGET_RATE), TARGET_RATE
    except Exception as exc:
        raise BadAudioError(f"could not decode audio: {exc}") from exc


def to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    if rate == TARGET_RATE:
        return audio.astype(np.float32, copy=False)
    import soxr

    return np.asarray(soxr.resample(audio, rate, TARGET_RATE), dtype=np.float32)


def normalize_language(value: str | None) -> str:
    lang = (value or "").strip().lower().replace("_", "-")
    if lang.startswith("language."):
        lang = lang.split(".", 1)[1]
    base = lang.split("-", 1)[0]
    if lang not in ENGLISH and base not in ENGLISH:
        raise web.HTTPBadRequest(
            text=f"model {MODEL_ID} transcribes English only (got language={value!r})"
        )
    return "en"


def window_frames(samples: int, min_window_secs: float) -> int:
    """Encoder frames for ``samples`` of 16 kHz audio: the audio plus a tail, at least
    ``min_window_secs``, at most Whisper's 30 s (longer audio is cut into 30 s windows)."""
    content = samples * FRAMES_PER_SECOND // TARGET_RATE + 1
    frames = max(int(min_window_secs * FRAMES_PER_SECOND), content + WINDOW_TAIL_FRAMES)
    frames = -(-frames // FRAMES_PER_SECOND) * FRAMES_PER_SECOND  # whole seconds
    return min(FULL_WINDOW_FRAMES, frames)


def short_window_model_class() -> type[Any]:
    """``WhisperModel`` whose encoder runs on ``encode_frames`` of each 30 s window.

    faster-whisper pads every window to 30 s of mel frames before the encoder (its
    ``chunk_length`` does not change that), and the encoder's cost grows faster than
    linearly with its length: 0.31 s for 30 s, 0.03 s for 10 s on this CPU. A caller's
    turn is a few seconds, so most of that work was on padding. The padded frames past
    ``encode_frames`` are dropped; decoding, prompts and results are faster-whisper's own.
    """
    from faster_whisper import WhisperModel

    class ShortWindowWhisper(WhisperModel):
        encode_frames = FULL_WINDOW_FRAMES  # set per request (one runs at a time)

        def encode(self, features: np.ndarray) -> Any:
            if features.shape[-1] > self.encode_frames:
                features = np.ascontiguousarray(features[..., : self.encode_frames])
            return super().encode(features)

    return ShortWindowWhisper


class WhisperServer:
    def __init__(self, cfg: WhisperServerConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.model: Any = None
        self.load_seconds = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisper")
        self._slot: asyncio.Semaphore | None = None
        self._waiting = 0
        self._running = 0
        self._started = time.time()

    def load(self) -> None:
        try:
            model_class = short_window_model_class()
        except ImportError as exc:
            raise models.LocalModelsMissingError(
                f"faster-whisper is not installed ({exc}); {models.INSTALL_HINT}"
            ) from exc
        model_dir = models.whisper_model_dir()
        t0 = time.perf_counter()
        self.model = model_class(
            str(model_dir),
            device="cpu",
            compute_type=self.cfg.compute_type,
            cpu_threads=self.cfg.threads,
            num_workers=1,
            local_files_only=True,
        )
        self.load_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        self._transcribe(np.zeros(TARGET_RATE, dtype=np.float32), None, 0.0)
        logger.info(
            f"{MODEL_ID} loaded from {model_dir} in {self.load_seconds:.2f}s "
            f"(compute_type={self.cfg.compute_type}, threads={self.cfg.threads}); "
            f"warm-up {time.perf_counter() - t1:.2f}s"
        )

    def _transcribe(
        self, audio: np.ndarray, prompt: str | None, temperature: float
    ) -> tuple[str, list[dict[str, Any]], Any]:
        self.model.encode_frames = window_frames(len(audio), self.cfg.min_window_secs)
        segments, info = self.model.transcribe(
            audio,
            language="en",
            task="transcribe",
            beam_size=self.cfg.beam_size,
            best_of=1,
            temperature=[temperature],
            without_timestamps=True,
            vad_filter=False,
            condition_on_previous_text=False,
            initial_prompt=prompt or None,
        )
        out: list[dict[str, Any]] = []
        for i, s in enumerate(segments):
            out.append(
                {
                    "id": i,
                    "seek": int(s.seek),
                    "start": round(float(s.start), 3),
                    "end": round(float(s.end), 3),
                    "text": s.text,
                    "tokens": list(s.tokens),
                    "temperature": float(s.temperature),
                    "avg_logprob": float(s.avg_logprob),
                    "compression_ratio": float(s.compression_ratio),
                    "no_speech_prob": float(s.no_speech_prob),
                }
            )
        text = "".join(seg["text"] for seg in out).strip()
        return text, out, info

    async def handle_transcriptions(self, request: web.Request) -> web.StreamResponse:
        t_start = time.perf_counter()
        self.metrics.requests += 1
        fields: dict[str, str] = {}
        data: bytes | None = None
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError):
            self.metrics.bad_requests += 1
            raise web.HTTPBadRequest(text="expected multipart/form-data") from None
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            if part.name == "file":
                data = bytes(await part.read(decode=False))
            else:
                fields[part.name] = await part.text()
        if not data:
            self.metrics.bad_requests += 1
            raise web.HTTPBadRequest(text="missing 'file'")
        response_format = fields.get("response_format", "json") or "json"
        if response_format not in ("json", "text", "verbose_json"):
            self.metrics.bad_requests += 1
            raise web.HTTPBadRequest(text=f"response_format {response_format!r} not supported")
        normalize_language(fields.get("language"))
        try:
            temperature = float(fields.get("temperature") or 0.0)
        except ValueError:
            raise web.HTTPBadRequest(text="bad temperature") from None
        prompt = fields.get("prompt") or None

        loop = asyncio.get_running_loop()
        try:
            raw, rate = await loop.run_in_executor(None, decode_audio, data)
        except BadAudioError as exc:
            self.metrics.bad_requests += 1
            raise web.HTTPBadRequest(text=str(exc)) from None
        duration = len(raw) / rate if rate else 0.0

        segments: list[dict[str, Any]] = []
        if duration < 0.1:
            text = ""
        else:
            assert self._slot is not None
            if self._slot.locked():
                if self._waiting >= self.cfg.max_queue:
                    self.metrics.rejected += 1
                    return web.json_response(
                        {"error": {"message": "transcription queue full", "type": "server_error"}},
                        status=503,
                        headers={"Retry-After": "1"},
                    )
                self.metrics.queue_waits += 1
                self._waiting += 1
                self.metrics.max_queue_depth = max(self.metrics.max_queue_depth, self._waiting)
                t_wait = time.perf_counter()
                try:
                    await self._slot.acquire()
                finally:
                    self._waiting -= 1
                    self.metrics.queue_wait_seconds += time.perf_counter() - t_wait
            else:
                await self._slot.acquire()
            transport = request.transport
            if transport is None or transport.is_closing():
                # The caller withdrew the request while it waited (a speculative transcription
                # of a turn that went on): don't make the requests behind it wait for it too.
                self._slot.release()
                self.metrics.abandoned += 1
                return web.Response(status=499)
            self._running += 1
            try:
                t0 = time.perf_counter()
                audio = to_16k(raw, rate)
                text, segments, _ = await loop.run_in_executor(
                    self._executor, self._transcribe, audio, prompt, temperature
                )
                self.metrics.transcribe.add(time.perf_counter() - t0)
                self.metrics.audio_seconds += duration
            except Exception:
                self.metrics.errors += 1
                logger.exception("transcription failed")
                return web.json_response(
                    {"error": {"message": "transcription failed", "type": "server_error"}},
                    status=500,
                )
            finally:
                self._running -= 1
                self._slot.release()
        self.metrics.total.add(time.perf_counter() - t_start)

        if response_format == "text":
            return web.Response(text=text + "\n", content_type="text/plain")
        if response_format == "verbose_json":
            return web.json_response(
                {
                    "task": "transcribe",
                    "language": "english",
                    "duration": round(duration, 3),
                    "text": text,
                    "segments": segments,
                }
            )
        return web.json_response({"text": text})

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": MODEL_ID, "object": "model", "owned_by": "pipeswitch-local"}],
            }
        )

    async def handle_health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"status": "ok" if self.model is not None else "loading", "model": MODEL_ID}
        )

    async def handle_metrics(self, request: web.Request) -> web.StreamResponse:
        m = self.metrics
        busy = m.transcribe.total
        return web.json_response(
            {
                "model": MODEL_ID,
                "compute_type": self.cfg.compute_type,
                "threads": self.cfg.threads,
                "min_window_secs": self.cfg.min_window_secs,
                "load_seconds": round(self.load_seconds, 3),
                "requests": m.requests,
                "errors": m.errors,
                "bad_requests": m.bad_requests,
                "abandoned": m.abandoned,
                "rejected_queue_full": m.rejected,
                "queue_depth": self._waiting,
                "running": self._running,
                "max_queue": self.cfg.max_queue,
                "max_queue_depth": m.max_queue_depth,
                "queue_waits": m.queue_waits,
                "queue_wait_seconds": round(m.queue_wait_seconds, 4),
                "audio_seconds": round(m.audio_seconds, 3),
                "rtf": round(busy / m.audio_seconds, 4) if m.audio_seconds else None,
                "transcribe": m.transcribe.as_dict(),
                "request_total": m.total.as_dict(),
                "rss_mb": round(rss_mb(), 1),
                "uptime_s": round(time.time() - self._started, 1),
            }
        )

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_UPLOAD_BYTES,
            middlewares=[bearer_auth_middleware(self.cfg.api_key, frozenset({"/health"}))],
        )
        app.router.add_post("/v1/audio/transcriptions", self.handle_transcriptions)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)

        async def on_startup(_: web.Application) -> None:
            self._slot = asyncio.Semaphore(1)

        async def on_cleanup(_: web.Application) -> None:
            self._executor.shutdown(wait=False, cancel_futures=True)

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return app


def parse_args(argv: list[str] | None = None) -> WhisperServerConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = ephemeral")
    p.add_argument("--api-key", default=None, help="prefer $PIPESWITCH_LOCAL_API_KEY (not in ps)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("WHISPER_THREADS", "2")))
    p.add_argument("--compute-type", default="int8", choices=["int8", "float32", "int8_float32"])
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument(
        "--min-window",
        type=float,
        default=float(os.environ.get("WHISPER_MIN_WINDOW", MIN_WINDOW_SECS)),
        help="shortest encoder window in seconds (30 = Whisper's full window)",
    )
    p.add_argument("--max-queue", type=int, default=8, help="waiting requests before 503")
    p.add_argument("--watch-parent", action="store_true", help="exit when stdin closes")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    configure_logging("whisper", a.log_level)
    api_key = resolve_api_key(a.api_key)
    if not api_key:
        raise SystemExit("an API key is required: set PIPESWITCH_LOCAL_API_KEY or --api-key")
    return WhisperServerConfig(
        host=require_loopback(a.host),
        port=a.port,
        api_key=api_key,
        threads=max(1, a.threads),
        compute_type=a.compute_type,
        beam_size=max(1, a.beam_size),
        min_window_secs=min(30.0, max(1.0, a.min_window)),
        max_queue=max(0, a.max_queue),
        watch_parent=a.watch_parent,
    )


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    ready_out = claim_stdout()
    models.set_offline_env()
    cfg = parse_args(argv)
    server = WhisperServer(cfg)
    server.load()
    run_server(server.app(), cfg, ready_out, started)


if __name__ == "__main__":
    run_main("whisper", main)
