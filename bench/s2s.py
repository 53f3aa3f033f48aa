"""``pipeswitch bench latency --pipeline openai-realtime|gemini-live|elevenlabs-agent``: S2S figures.

One Pipeswitch server (in this process, with its Piper child for the greeting and
the fallback cascade) answers emulated FreeSWITCH calls; the OpenAI Realtime and
Gemini Live emulators run in their own process at the providers' published
first-audio medians (voice-like tones as reply audio, so synthesis time does not
blur the injected latency). Per turn, on one monotonic clock shared by the
processes:

* **wire turn latency**: last voiced caller frame sent -> first bot audio received;
* **provider share**: the emulator's last loud caller audio received -> its first
  audio delta sent (its VAD silence wait plus the injected first-audio latency);
* **server overhead** = wire - provider share: resampling in and out, the pipeline,
  pacing and both loopback hops;
* **barge-in stop**: caller onset -> the bot's audio stops arriving;
* **fallback switch**: the provider dropping the connection mid-reply -> the
  cascade's apology arriving on the wire (and the server's own measure: failure
  noticed -> the cascade's first audio frame).

The load generator shares this process's event loop with the server: figures for
one call at a time, not a capacity measure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from pipeswitch.bench.caller_speech import load_caller_audio
from pipeswitch.bench.emulators.runner import EmulatorConfig, start_emulator_process
from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, Playback, StreamConfig
from pipeswitch.bench.stats import summarize

S2S_PIPELINES = ("openai-realtime", "gemini-live", "elevenlabs-agent")
PLAYBACK: dict[str, Playback] = {"json-stream": "voxcom", "binary": "cloudfieldcz"}


@dataclass
class S2STurn:
    """One measured question/answer turn."""

    wire_ms: float
    provider_ms: float | None
    overhead_ms: float | None
    # The overhead's two halves: caller's last voiced frame sent -> the provider has it;
    # the provider's first audio sent -> the caller has it.
    inbound_ms: float | None = None
    outbound_ms: float | None = None


@dataclass
class S2SResult:
    """Everything one run measured."""

    pipeline: str
    rate: int
    dialect: str
    ttfa_ms: tuple[float, float]
    turns: list[S2STurn] = field(default_factory=list)
    barge_in_stop_ms: list[float] = field(default_factory=list)
    fallback_wire_ms: float | None = None
    fallback_server_ms: float | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """p50/p95 of each figure (ms)."""
        wire = [t.wire_ms for t in self.turns]
        over = [t.overhead_ms for t in self.turns if t.overhead_ms is not None]
        prov = [t.provider_ms for t in self.turns if t.provider_ms is not None]
        inb = [t.inbound_ms for t in self.turns if t.inbound_ms is not None]
        outb = [t.outbound_ms for t in self.turns if t.outbound_ms is not None]
        return {
            "pipeline": self.pipeline,
            "rate": self.rate,
            "dialect": self.dialect,
            "injected_ttfa_ms": {"median": self.ttfa_ms[0], "p95": self.ttfa_ms[1]},
            "turns": len(self.turns),
            "wire_ms": asdict(summarize(wire)),
            "provider_ms": asdict(summarize(prov)),
            "server_overhead_ms": asdict(summarize(over)),
            "overhead_inbound_ms": asdict(summarize(inb)),
            "overhead_outbound_ms": asdict(summarize(outb)),
            "barge_in_stop_ms": self.barge_in_stop_ms,
            "fallback_switch_wire_ms": self.fallback_wire_ms,
            "fallback_switch_server_ms": self.fallback_server_ms,
            "notes": self.notes,
        }


def add_s2s_arguments(p: argparse.ArgumentParser) -> None:
    """``--pipeline`` for ``bench latency`` (cascade = the existing harness)."""
    p.add_argument(
        "--pipeline",
        default="cascade",
        choices=["cascade", *S2S_PIPELINES],
        help="speech-to-speech pipelines run their own wire-level bench (bench/s2s.py)",
    )
    p.add_argument(
        "--no-fallback", action="store_true", help="S2S: skip the provider-drop fallback call"
    )
    p.add_argument(
        "--silence-ms",
        type=int,
        default=500,
        help="S2S: the provider VAD's end-of-turn silence (OpenAI's default 500)",
    )


_ADMIN_CA: dict[int, str] = {}


def _admin(port: int, path: str, payload: dict[str, Any] | None = None) -> Any:
    """The emulator's admin endpoint (over TLS, trusting the test CA, for Gemini's)."""
    ca = _ADMIN_CA.get(port)
    scheme = "https" if ca else "http"
    url = f"{scheme}://127.0.0.1:{port}/_emulator/{path}"
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    req.add_header("Content-Type", "application/json")
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
        return json.loads(resp.read())


def _stop_after(stream: FakeSwitchStream, onset: float) -> float | None:
    """When the bot's audio stopped arriving after ``onset`` (first gap > 200 ms)."""
    _, rx = stream.received_audio()
    times = [a.t for a in rx if a.non_silent and a.t > onset - 0.5]
    if not times:
        return None
    for t, nxt in zip(times, times[1:], strict=False):
        if nxt - t > 0.2:
            return t
    return times[-1]


async def run_s2s_latency(args: argparse.Namespace) -> int:
    """Run the S2S bench for ``args.pipeline``; prints and saves the figures."""
    import aiohttp

    from pipeswitch.config.loaders import StaticTenantLoader
    from pipeswitch.config.settings import Settings
    from pipeswitch.config.tenants import ProviderSettings, Tenant
    from pipeswitch.pipelines import gemini_live, openai_realtime  # noqa: F401  (builders)
    from pipeswitch.pipelines.app import Pipeswitch
    from pipeswitch.pipelines.compose import CallPipeline
    from pipeswitch.pipelines.emulated import endpoints_for
    from pipeswitch.pipelines.session import CallRecord

    pipeline: str = args.pipeline
    if pipeline == "elevenlabs-agent":
        # The ConvAI emulator's bench lives with the echo harness (same call set-up).
        from pipeswitch.bench.echo import elevenlabs_latency

        return await elevenlabs_latency(
            args.turns, Path(getattr(args, "out", None) or "bench/results")
        )
    rate: int = args.rate
    dialect = args.dialect if args.dialect in PLAYBACK else "binary"
    cfg = EmulatorConfig(seed=1, stt_script="office", s2s_script="office")
    ttfa = (
        (cfg.realtime_ttfa_median_ms, cfg.realtime_ttfa_p95_ms)
        if pipeline == "openai-realtime"
        else (cfg.gemini_ttfa_median_ms, cfg.gemini_ttfa_p95_ms)
    )
    result = S2SResult(pipeline=pipeline, rate=rate, dialect=dialect, ttfa_ms=ttfa)
    audio = await load_caller_audio(rate)
    emu = await asyncio.to_thread(start_emulator_process, cfg)
    port = int(emu.info["realtime_port" if pipeline == "openai-realtime" else "gemini_port"])
    if pipeline == "gemini-live":
        _ADMIN_CA[port] = str(emu.info["gemini_ca_file"])
    tenant = Tenant(
        name="s2s.bench",
        pipeline=pipeline,
        playback=dialect,  # type: ignore[arg-type]
        providers=ProviderSettings(realtime_silence_ms=args.silence_ms),
    )
    settings = Settings(host="127.0.0.1", port=0, providers="emulated", idle_timeout_secs=60)
    app = Pipeswitch(
        settings,
        loader=StaticTenantLoader([tenant], default="s2s.bench"),
        default_tenant="s2s.bench",
        endpoints=endpoints_for(emu),
    )
    kept: dict[str, CallPipeline] = {}

    async def keep(rec: CallRecord, cp: CallPipeline) -> None:
        kept[rec.call.call_uuid] = cp

    try:
        await app.start()
        assert app.sessions is not None
        app.sessions.finished_hooks.append(keep)
        url = f"ws://127.0.0.1:{app.port}/fs/{{uuid}}?rate={rate}&mix=mono&domain=s2s.bench"
        async with aiohttp.ClientSession():
            await _measure_call(url.format(uuid="s2s-turns"), audio, args.turns, port, result)
            if not args.no_fallback:
                got = await _measure_fallback(url.format(uuid="s2s-fallback"), audio, port, result)
                await asyncio.sleep(0.5)
                fb = getattr(kept.get("s2s-fallback"), "parts", {}).get("llm")
                events = getattr(getattr(fb, "fallback", None), "events", [])
                if events and events[0].switch_secs is not None:
                    result.fallback_server_ms = events[0].switch_secs * 1000
                if events and got is not None:
                    dropped, times = got
                    # The apology: the first bot audio on the wire once the cascade's TTS
                    # produced it (the cut reply was stopped when the failure was noticed).
                    ev = events[0]
                    cascade_at = ev.failed_at + (ev.switch_secs or 0.0)
                    after = [t for t in times if t >= cascade_at]
                    if after:
                        result.fallback_wire_ms = (after[0] - dropped) * 1000
                    else:
                        result.notes.append("fallback: no apology heard after the switch")
    finally:
        await app.stop(drain_secs=2.0)
        await asyncio.to_thread(emu.stop)
    doc = result.summary()
    out = Path(args.out) if getattr(args, "out", None) else Path("bench/results")
    out_dir = out / f"{time.strftime('%Y%m%d-%H%M%S')}-s2s-{pipeline}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    logger.info("S2S bench results in {}", out_dir)
    return 0


async def _measure_call(url: str, audio: Any, turns: int, port: int, result: S2SResult) -> None:
    rate = audio.rate
    stream = FakeSwitchStream(StreamConfig(url=url, rate=rate, playback=PLAYBACK[result.dialect]))
    n_sessions = len(_admin(port, "sessions")["sessions"])
    wires: list[float] = []
    marks: list[tuple[float, float] | None] = []
    await stream.start()
    try:
        if not await stream.wait_connected(5.0):
            raise RuntimeError("the bench call did not connect")
        await stream.wait_bot_quiet(0.6, 10.0)  # the greeting
        for i in range(turns):
            stream.queue_caller_audio(audio.questions[i % len(audio.questions)])
            stream.queue_caller_silence(0.3)
            await stream.wait_caller_drained(timeout_s=15.0)
            end = stream.last_voiced_sent_at()
            first = await stream.wait_bot_audio_after(end or time.monotonic(), 10.0)
            if end is None or first is None:
                result.notes.append(f"turn {i}: no answer")
                wires.append(float("nan"))
                marks.append(None)
            else:
                wires.append((first - end) * 1000)
                marks.append((end, first))
            await stream.wait_bot_quiet(0.6, 20.0)
            await asyncio.sleep(0.3)
        # Barge-in: talk over the next reply once it is playing.
        stream.queue_caller_audio(audio.questions[0])
        stream.queue_caller_silence(0.3)
        await stream.wait_caller_drained(timeout_s=15.0)
        end = stream.last_voiced_sent_at() or time.monotonic()
        first = await stream.wait_bot_audio_after(end, 10.0)
        if first is not None:
            await asyncio.sleep(1.0)
            t_barge = time.monotonic()
            stream.queue_caller_audio(audio.barge_in)
            stream.queue_caller_silence(0.5)
            await asyncio.sleep(1.5)
            onset = next((f.t for f in stream.sent_frames if f.voiced and f.t >= t_barge), None)
            stop = _stop_after(stream, onset) if onset is not None else None
            if onset is not None and stop is not None:
                result.barge_in_stop_ms.append(max(0.0, stop - onset) * 1000)
                _, rx = stream.received_audio()
                logger.debug(
                    "barge-in: onset {:.3f}, bot audio around it: {}",
                    onset,
                    [round(a.t - onset, 3) for a in rx if a.non_silent and abs(a.t - onset) < 1.0],
                )
            await stream.wait_bot_quiet(0.6, 20.0)
    finally:
        await stream.hangup()
    await asyncio.sleep(0.3)
    sessions = _admin(port, "sessions")["sessions"][n_sessions:]
    replies = [
        r
        for s in sessions
        for r in (s.get("responses") or s.get("turns") or [])
        if r.get("trigger") == "speech_stopped"
    ]
    for i, wire in enumerate(wires):
        r = replies[i] if i < len(replies) else None
        prov = None
        if r and r.get("first_audio_at") and r.get("speech_end_at"):
            prov = (r["first_audio_at"] - r["speech_end_at"]) * 1000
        over = wire - prov if prov is not None and wire == wire else None
        inb = outb = None
        m = marks[i]
        if r and m and r.get("first_audio_at") and r.get("speech_end_at"):
            inb = (r["speech_end_at"] - m[0]) * 1000
            outb = (m[1] - r["first_audio_at"]) * 1000
        result.turns.append(
            S2STurn(
                wire_ms=wire, provider_ms=prov, overhead_ms=over, inbound_ms=inb, outbound_ms=outb
            )
        )


async def _measure_fallback(
    url: str, audio: Any, port: int, result: S2SResult
) -> tuple[float, list[float]] | None:
    """One call whose provider drops mid-reply: (drop time, non-silent bot audio times)."""
    rate = audio.rate
    faults: dict[str, Any] = {"drop_after_audio_ms": 1500, "count": 1}
    if result.pipeline == "gemini-live":
        # Gemini's client resumes a dropped session by itself (measured by the long-call
        # test); the fallback is for a provider that cannot take the call back.
        faults["refuse_after_drop"] = True
    _admin(port, "faults", faults)
    n_sessions = len(_admin(port, "sessions")["sessions"])
    stream = FakeSwitchStream(StreamConfig(url=url, rate=rate, playback=PLAYBACK[result.dialect]))
    await stream.start()
    try:
        if not await stream.wait_connected(5.0):
            raise RuntimeError("the fallback call did not connect")
        await stream.wait_bot_quiet(0.6, 10.0)
        stream.queue_caller_audio(audio.questions[0])
        stream.queue_caller_silence(0.3)
        await stream.wait_caller_drained(timeout_s=15.0)
        await asyncio.sleep(6.0)  # the reply, the drop, the apology
    finally:
        await stream.hangup()
        _admin(port, "faults", {})
    sess = _admin(port, "sessions")["sessions"][n_sessions:]
    dropped = next((s["aborted_at"] for s in sess if s.get("aborted_at")), None)
    if dropped is None:
        result.notes.append("fallback: the provider connection was not dropped")
        return None
    _, rx = stream.received_audio()
    return dropped, [a.t for a in rx if a.non_silent]
