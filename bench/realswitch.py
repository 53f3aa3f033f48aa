"""``python -m pipeswitch.bench.realswitch``: Pipeswitch against a real FreeSWITCH, by hand.

Not for CI (CI has no FreeSWITCH): this confirms on the real thing what the
emulator claims. It needs a FreeSWITCH with its event socket on loopback and an
extension ``9001`` that answers, plays a spoken question and parks (the test
build of FreeSWITCH 1.10.12 made for this project has exactly that), with the
mod_audio_stream build named by ``--build`` loaded, or none for ``--mode unicast``.

Per call: ``originate {vars}loopback/9001 &park`` (the A-leg, parked, hears the
question the B-leg plays), FreeSWITCH records what it *writes* to the A-leg
(``uuid_record`` write-only, no pre-buffer), the stream (or unicast media) goes
to an in-process Pipeswitch with emulated Deepgram/Groq and real Piper, and
after the reply the call is hung up. Reported: ESL round trips through our own
client, what the caller heard (voiced seconds, when), the server's turn
latency, hangup clean-up on both sides (the voxcom deadlock shows as a channel
that never goes away), and the ESL events seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid as uuidlib
import wave
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from pipeswitch.bench.emulators.openai_chat import ToolCall
from pipeswitch.bench.emulators.runner import EmulatorConfig, run_emulators
from pipeswitch.bench.fakeswitch.esl import recommended_variables
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import PlaybackDialect, Tenant, ToolSettings, TransferTarget
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.emulated import endpoints_for
from pipeswitch.transports.call_control import CallEvent
from pipeswitch.transports.esl import EslClient

DIALECT_FOR_BUILD: dict[str, PlaybackDialect] = {
    "community": "file",
    "voxcom": "json-stream",
    "cloudfieldcz": "binary",
}


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))], 2)


async def esl_round_trips(esl: EslClient, n: int, bg_command: str = "status") -> dict[str, Any]:
    """``api status`` and ``bgapi <bg_command>`` (until its BACKGROUND_JOB), through our client.

    The real switch here and the emulated one (``fakeswitch.esl_measure``) alike."""
    api: list[float] = []
    bg: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        await esl.api("status")
        api.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        await esl.bgapi(bg_command)
        bg.append((time.perf_counter() - t) * 1000)
    return {
        "n": n,
        "api_p50_ms": _pct(api, 50),
        "api_p99_ms": _pct(api, 99),
        "bgapi_p50_ms": _pct(bg, 50),
        "bgapi_p99_ms": _pct(bg, 99),
    }


def voiced_segments(path: Path, threshold: float = 300.0) -> list[tuple[float, float]]:
    """(start, end) seconds of the recording's voiced stretches (20 ms RMS, 200 ms gaps merge)."""
    with wave.open(str(path)) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        a = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32)
    if channels == 2:
        a = a[1::2]  # write leg
    step = rate // 50
    n = len(a) // step
    rms = np.sqrt(np.mean(a[: n * step].reshape(n, step) ** 2, axis=1)) if n else np.array([])
    segs: list[tuple[float, float]] = []
    for i, v in enumerate(rms):
        if v < threshold:
            continue
        t = i * 0.02
        if segs and t - segs[-1][1] <= 0.2:
            segs[-1] = (segs[-1][0], t + 0.02)
        else:
            segs.append((t, t + 0.02))
    return segs


async def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


async def one_call(
    app: Pipeswitch, esl: EslClient, args: argparse.Namespace, i: int
) -> dict[str, Any]:
    """One call through the real switch; what the caller heard and how it ended."""
    a = str(uuidlib.uuid4())
    rec = Path(args.out) / f"{args.build or 'unicast'}-{i}.wav"
    events: list[str] = []

    def on_event(ev: CallEvent) -> None:
        events.append(ev.name if not ev.subclass else ev.subclass)

    unsubscribe = esl.subscribe(a, on_event)
    variables = {
        "origination_uuid": a,
        "RECORD_WRITE_ONLY": "true",
        "RECORD_PRE_BUFFER_FRAMES": "0",
    }
    if args.build:
        variables.update(recommended_variables(args.build))
    vars_s = ",".join(f"{k}={v}" for k, v in variables.items())
    t_orig = time.monotonic()
    reply = await esl.bgapi(f"originate {{{vars_s}}}loopback/9001 &park")
    if not reply.startswith("+OK"):
        raise RuntimeError(f"originate failed: {reply.strip()}")
    domain = f"{args.dialect}.real"
    t_start = time.monotonic()
    if args.mode == "unicast":
        url = f"http://127.0.0.1:{app.port}/unicast/{a}?domain={domain}&rate={args.rate}"
        async with aiohttp.ClientSession() as http, http.post(url) as r:
            started = await r.json()
        if not started.get("ok"):
            raise RuntimeError(f"unicast refused: {started}")
    else:
        ws = f"ws://127.0.0.1:{app.port}/fs/{a}?domain={domain}&rate={args.rate}"
        reply = await esl.api(f'uuid_audio_stream {a} start {ws} mono 8k {{"uuid":"{a}"}}')
        if not reply.startswith("+OK"):
            raise RuntimeError(f"uuid_audio_stream failed: {reply.strip()}")
    # Recorded after the stream starts: a media bug added later sees what the stream's
    # WRITE_REPLACE bug (cloudfieldcz) has already put in the frame.
    await esl.api(f"uuid_record {a} start {rec}")
    assert app.sessions is not None
    sessions = app.sessions
    up = await _wait(lambda: a in sessions.active, 5.0)
    answered = up and await _wait(
        lambda: a in sessions.active and bool(sessions.active[a].turn_latencies), 20.0
    )
    latencies = list(sessions.active[a].turn_latencies) if a in sessions.active else []
    record = sessions.active.get(a)
    dtmf_seen: bool | None = None
    if args.dtmf and record is not None:
        # Keys pressed on the far leg arrive as DTMF on the A-leg the stream is on.
        b = (await esl.api(f"uuid_getvar {a} other_loopback_leg_uuid")).strip()
        await esl.api(f"uuid_send_dtmf {b} {args.dtmf}")
        dtmf_seen = await _wait(lambda: "DTMF" in events, 3.0)
    await asyncio.sleep(args.listen_s)  # let the reply play
    await esl.api(f"uuid_record {a} stop {rec}")
    transfer_history = ""
    if args.transfer_to:
        got = (await esl.api(f"uuid_getvar {a} transfer_history")).strip()
        transfer_history = "" if got in ("", "_undef_") or got.startswith("-ERR") else got
    t_kill = time.monotonic()
    await esl.api(f"uuid_kill {a}")
    server_done = await _wait(lambda: a not in sessions.active, 10.0)
    server_done_s = time.monotonic() - t_kill
    gone = await _wait(lambda: False, 0.5) or (await esl.api(f"uuid_exists {a}")).strip() == "false"
    channels = (await esl.api("show channels count")).strip()
    unsubscribe()
    segs = voiced_segments(rec) if rec.exists() else []
    said = [str(m.get("content", "")) for m in (record.messages if record else [])]
    transferred = bool(transfer_history) if args.transfer_to else None
    return {
        "call": a,
        "originate_ms": round((t_start - t_orig) * 1000),
        "pipeline_up": up,
        "answered_a_turn": answered,
        "server_turn_latency_ms": [round(x * 1000) for x in latencies],
        "heard_voiced_secs": round(sum(e - s for s, e in segs), 2),
        "heard_segments": [(round(s, 2), round(e, 2)) for s, e in segs[:12]],
        "server_call_ended_after_kill_ms": round(server_done_s * 1000) if server_done else None,
        "channel_gone": gone,
        "channels_after": channels,
        "events": sorted(set(events)),
        "play_events": sum(1 for e in events if e.endswith("::play")),
        "dtmf_event_seen": dtmf_seen,
        "transferred": transferred,
        "transfer_history": transfer_history or None,
        "dtmf_in_context": any(args.dtmf in m and "pressed" in m for m in said)
        if args.dtmf
        else None,
        "recording": str(rec),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start emulated providers and Pipeswitch, then place the calls."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.mode == "stream" and not args.dialect:
        args.dialect = DIALECT_FOR_BUILD[args.build]
    if args.mode == "unicast":
        args.dialect = args.dialect or "binary"
    async with run_emulators(
        EmulatorConfig(llm_script="office", stt_script="office", seed=1)
    ) as emu:
        tenant = Tenant(name=f"{args.dialect}.real", playback=args.dialect)
        if args.transfer_to:
            # The receptionist's transfer tool, asked for by the (emulated) LLM on the
            # caller's first turn: uuid_transfer over ESL into the switch's dialplan.
            tools = ToolSettings(
                enabled=["transfer_call"],
                transfer_targets={"front": TransferTarget(destination=args.transfer_to)},
                dialplan_context="default",
            )
            tenant = tenant.model_copy(update={"tools": tools})

            def script(messages: list[dict[str, Any]]) -> Any:
                done = any(m.get("role") == "tool" for m in messages)
                return (
                    "Connecting you now."
                    if done
                    else ToolCall("transfer_call", {"target": "front"})
                )

            emu.openai.script = script
        settings = Settings(
            host="127.0.0.1",
            port=0,
            providers="emulated",
            esl_enabled=True,
            esl_host=args.esl_host,
            esl_port=args.esl_port,
        )
        app = Pipeswitch(
            settings,
            loader=StaticTenantLoader([tenant], default=tenant.name),
            default_tenant=tenant.name,
            endpoints=endpoints_for(emu),
        )
        await app.start()
        try:
            assert app.esl is not None
            if not await app.esl.wait_connected(5.0):
                raise SystemExit("no ESL connection to the switch")
            out: dict[str, Any] = {
                "build": args.build,
                "mode": args.mode,
                "dialect": args.dialect,
                "esl": await esl_round_trips(app.esl, args.rtt),
                "calls": [],
            }
            for i in range(args.calls):
                out["calls"].append(await one_call(app, app.esl, args, i))
                await asyncio.sleep(0.5)
            lat = [x for c in out["calls"] for x in c["server_turn_latency_ms"]]
            out["server_turn_latency_median_ms"] = statistics.median(lat) if lat else None
            return out
        finally:
            await app.stop(drain_secs=1.0)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m pipeswitch.bench.realswitch", description=__doc__)
    p.add_argument("--build", choices=sorted(DIALECT_FOR_BUILD), default=None)
    p.add_argument("--mode", choices=["stream", "unicast"], default="stream")
    p.add_argument("--dialect", choices=["json-stream", "binary", "file"], default=None)
    p.add_argument("--rate", type=int, default=8000)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--rtt", type=int, default=200, help="ESL round trips to time")
    p.add_argument("--listen-s", type=float, default=6.0, help="after the first answer")
    p.add_argument("--dtmf", default="", help="keys to press on the far leg after the answer")
    p.add_argument(
        "--transfer-to", default="", help="the LLM transfers the caller to this extension"
    )
    p.add_argument("--esl-host", default="127.0.0.1")
    p.add_argument("--esl-port", type=int, default=8021)
    p.add_argument("--out", default="bench/results/realswitch")
    args = p.parse_args(argv)
    if args.mode == "stream" and not args.build:
        p.error("--build is required with --mode stream")
    print(json.dumps(asyncio.run(run(args)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
