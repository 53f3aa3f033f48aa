"""``python -m pipeswitch.bench.realswitch``: Pipeswitch against a real FreeSWITCH, by hand.

Not for CI (CI has no FreeSWITCH): this confirms on the real thing what the
emulator claims. It needs a FreeSWITCH with its event socket on loopback and an
extension ``9001`` that answers, plays a spoken question and parks (the test
build of FreeSWITCH 1.10.12 made for this project has exactly that), with the
mod_audio_stream build named by ``--build`` loaded, or none for ``--mode unicast``.

Per call: ``originate {vars}loopback/9001 &park`` (the A-leg, parked, hears the
question the B-leg plays), FreeSWITCH records the A-leg in stereo (left: what the
caller said, right: what FreeSWITCH *writes* to the caller; no pre-buffer), the
stream (or unicast media) goes to an in-process Pipeswitch with emulated
Deepgram/Groq and real Piper, and after the reply the call is hung up. Reported:
ESL round trips through our own client; from the recording, when the greeting
was heard after the stream start, when the reply was heard after the question's
last voiced sample, and (``--barge-in-after``) how long the bot went on after the
caller talked over it; the server's turn latency; hangup clean-up on both sides
(the voxcom deadlock shows as a channel that never goes away) with the ESL events
and their times. ``--slow-loris N`` trickles N incomplete upgrade requests at the
server during each call (the handshake reaper must close them and leave the
switch's call alone). ``--no-direct-first`` and ``--untrimmed-greeting`` turn two
playback shortcuts off in this process, for an A/B on the same switch.
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
from pipecat.frames.frames import OutputAudioRawFrame

from pipeswitch.bench.emulators.openai_chat import ToolCall
from pipeswitch.bench.emulators.runner import EmulatorConfig, run_emulators
from pipeswitch.bench.fakeswitch.esl import recommended_variables
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import PlaybackDialect, Tenant, ToolSettings, TransferTarget
from pipeswitch.pipelines import greeting_cache
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.emulated import endpoints_for
from pipeswitch.transports.call_control import CallEvent, CommandFailed
from pipeswitch.transports.esl import EslClient
from pipeswitch.transports.transport import FreeSwitchOutputTransport

DIALECT_FOR_BUILD: dict[str, PlaybackDialect] = {
    "community": "file",
    "voxcom": "json-stream",
    "cloudfieldcz": "binary",
}


QUIET_SECS = 0.5  # silence that ends a reply (its own pauses measured 50-350 ms, §15)


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


def voiced_segments(
    path: Path, threshold: float = 300.0, channel: int = 1
) -> list[tuple[float, float]]:
    """(start, end) seconds of the recording's voiced stretches (20 ms RMS, 200 ms gaps merge).

    A stereo ``uuid_record`` holds the read leg (what the caller said) in channel 0 and
    the write leg (what FreeSWITCH wrote to the caller) in channel 1; a mono one is read
    as it is."""
    with wave.open(str(path)) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        a = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32)
    if channels == 2:
        a = a[channel::2]
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


def first_loud_sample(path: Path, channel: int = 1, peak: int = 300) -> float | None:
    """Seconds to the first sample above ``peak`` (about -40 dBFS, as the greeting trim
    counts it) in one leg of a stereo recording: the greeting's onset to the sample,
    where ``voiced_segments`` has 20 ms steps."""
    with wave.open(str(path)) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        a = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    if channels == 2:
        a = a[channel::2]
    loud = np.flatnonzero(np.abs(a.astype(np.int32)) > peak)
    return float(loud[0]) / rate if loud.size else None


def heard_timeline(
    said: list[tuple[float, float]],
    heard: list[tuple[float, float]],
    *,
    offset_s: float,
    barge_at: float | None = None,
    length_s: float | None = None,
) -> dict[str, Any]:
    """When the caller heard what, from a stereo recording's voiced stretches.

    ``said``/``heard``: read and write leg segments in recording seconds; ``offset_s``:
    the recording's start after the stream (or unicast) start; ``barge_at``: recording
    time the barge-in utterance was sent to the caller's leg. The question is the first
    run of caller speech (pauses under 1 s belong to it); the barge-in stop is how long
    the bot's audio went on after the caller's barge-in onset (until it fell quiet for
    ``QUIET_SECS``), and the silence that followed it.
    """
    out: dict[str, Any] = {
        "greeting_heard_after_start_ms": None,
        "question_end_s": None,
        "reply_heard_after_question_ms": None,
        "barge_onset_s": None,
        "barge_in_stop_ms": None,
        "bot_silent_after_stop_ms": None,
        "bot_talking_at_end": None,
    }
    if heard:
        out["greeting_heard_after_start_ms"] = round((heard[0][0] + offset_s) * 1000)
    question: tuple[float, float] | None = None
    for s, e in said:
        if barge_at is not None and s >= barge_at:
            break
        if question is None:
            question = (s, e)
        elif s - question[1] < 1.0:
            question = (question[0], e)
        else:
            break
    if question is not None:
        q_end = question[1]
        out["question_end_s"] = round(q_end, 2)
        after = [s for s, _ in heard if s >= q_end]
        if after:
            out["reply_heard_after_question_ms"] = round((after[0] - q_end) * 1000)
    if barge_at is not None:
        onset = next((s for s, _ in said if s >= barge_at - 0.05), None)
        if onset is not None:
            out["barge_onset_s"] = round(onset, 2)
            # The bot "stopped" when its audio after the onset falls quiet for QUIET_SECS
            # (longer than the pauses inside a reply); the stretch may start in a pause.
            stop: float | None = None
            nxt: float | None = length_s
            for s, e in heard:
                if e <= onset:
                    continue
                if s - (stop if stop is not None else onset) >= QUIET_SECS:
                    nxt = s
                    break
                stop = e
            if stop is not None:
                out["barge_in_stop_ms"] = round((stop - onset) * 1000)
                if nxt is not None:
                    out["bot_silent_after_stop_ms"] = round((nxt - stop) * 1000)
            else:
                out["barge_in_stop_ms"] = 0  # the bot was already quiet at the onset
    if heard and length_s is not None:
        out["bot_talking_at_end"] = heard[-1][1] >= length_s - 0.3
    return out


def _wav_secs(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


async def slow_loris(port: int, n: int, hold_s: float) -> list[float | None]:
    """``n`` connections trickling an upgrade request, a byte every 0.5 s.

    Returns, per connection, the seconds until the server closed it (``None``: still
    open after ``hold_s``) - the handshake reaper's view of a peer that never
    finishes its request, measured while a real switch's call runs beside it."""

    async def one() -> float | None:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return 0.0
        try:
            writer.write(b"GET /fs/slow-loris HTTP/1.1\r\nHost:127.0.0.1\r\nX-Slow:")
            while time.monotonic() - t0 < hold_s:
                try:
                    writer.write(b"a")
                    await writer.drain()
                    data = await asyncio.wait_for(reader.read(256), 0.5)
                except TimeoutError:
                    continue
                except OSError:
                    return round(time.monotonic() - t0, 2)
                # EOF (reaped), or an answer to half a request: either way it is over.
                return round(time.monotonic() - t0, 2) if not data else -1.0
            return None
        finally:
            writer.close()

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


async def _getvar(esl: EslClient, uuid: str, name: str) -> str:
    try:
        got = (await esl.api(f"uuid_getvar {uuid} {name}")).strip()
    except CommandFailed:
        return ""
    return "" if got in ("", "_undef_") or got.startswith("-ERR") else got


async def one_call(
    app: Pipeswitch, esl: EslClient, args: argparse.Namespace, i: int, watcher: EslClient
) -> dict[str, Any]:
    """One call through the real switch; what the caller heard and how it ended."""
    a = str(uuidlib.uuid4())
    rec = Path(args.out) / f"{args.build or 'unicast'}-{i}.wav"
    events: list[tuple[str, float]] = []
    watched: list[tuple[str, float]] = []

    def on_event(ev: CallEvent) -> None:
        events.append((ev.kind, ev.t))

    def on_watched(ev: CallEvent) -> None:
        watched.append((ev.kind, ev.t))

    unsubscribe = esl.subscribe(a, on_event)
    unwatch = watcher.subscribe(a, on_watched)
    variables = {
        "origination_uuid": a,
        "RECORD_STEREO": "true",
        "RECORD_PRE_BUFFER_FRAMES": "0",
    }
    if args.build:
        variables.update(recommended_variables(args.build))
    for kv in args.var:
        k, _, v = kv.partition("=")
        variables[k] = v
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
        reply = await esl.api(
            f'uuid_audio_stream {a} start {ws} mono {args.rate // 1000}k {{"uuid":"{a}"}}'
        )
        if not reply.startswith("+OK"):
            raise RuntimeError(f"uuid_audio_stream failed: {reply.strip()}")
    # Recorded after the stream starts: a media bug added later sees what the stream's
    # WRITE_REPLACE bug (cloudfieldcz) has already put in the frame.
    await esl.api(f"uuid_record {a} start {rec}")
    t_rec = time.monotonic()
    loris = (
        asyncio.ensure_future(
            slow_loris(app.port, args.slow_loris, app.settings.handshake_timeout_secs + 3.0)
        )
        if args.slow_loris
        else None
    )
    assert app.sessions is not None
    sessions = app.sessions
    if args.hangup_at is not None:
        # The caller hangs up this soon after the stream start (during the greeting, or
        # before Pipeswitch has even built the call's pipeline).
        await asyncio.sleep(max(0.0, args.hangup_at - (time.monotonic() - t_start)))
        up, answered = a in sessions.active, False
    else:
        up = await _wait(lambda: a in sessions.active, 5.0)
        answered = up and await _wait(
            lambda: a in sessions.active and bool(sessions.active[a].turn_latencies), 20.0
        )
    t_answered = time.monotonic()
    record = sessions.active.get(a)
    b = await _getvar(esl, a, "other_loopback_leg_uuid")
    dtmf_seen: bool | None = None
    if args.dtmf and record is not None:
        # Keys pressed on the far leg arrive as DTMF on the A-leg the stream is on.
        await esl.api(f"uuid_send_dtmf {b} {args.dtmf}")
        dtmf_seen = await _wait(lambda: any(k == "DTMF" for k, _ in events), 3.0)
    barge_at: float | None = None
    if args.barge_in_after is not None and answered and b:
        # The far leg talks over the reply: what it plays is what the caller says.
        await asyncio.sleep(max(0.0, args.barge_in_after - (time.monotonic() - t_answered)))
        barge_at = time.monotonic() - t_rec
        await esl.api(f"uuid_broadcast {b} {args.barge_file} aleg")
    if args.hangup_at is None:
        await asyncio.sleep(max(0.0, args.listen_s - (time.monotonic() - t_answered)))
    latencies = list(record.turn_latencies) if record is not None else []
    await esl.api(f"uuid_record {a} stop {rec}")
    transfer_history = await _getvar(esl, a, "transfer_history") if args.transfer_to else ""
    t_kill = time.monotonic()
    await esl.api(f"uuid_kill {a}")
    stats = app.server.stats if app.server is not None else None
    # Not yet in `active` is not "ended" (a hangup before the pipeline was built): the
    # server's count of live calls says when it let go (calls here are one at a time).
    server_done = await _wait(
        lambda: a not in sessions.active and (stats is None or stats.calls_active == 0), 10.0
    )
    server_done_s = time.monotonic() - t_kill
    hangup_done = await _wait(lambda: any(k == "CHANNEL_HANGUP_COMPLETE" for k, _ in events), 10.0)
    gone = (await esl.api(f"uuid_exists {a}")).strip() == "false"
    t_channels = time.monotonic()
    while True:  # both legs destroyed, not just hung up
        channels = (await esl.api("show channels count")).strip()
        if channels.startswith("0 total") or time.monotonic() - t_channels > 5.0:
            break
        await asyncio.sleep(0.02)
    no_channels_s = time.monotonic() - t_kill
    loris_closed = await loris if loris is not None else None
    unsubscribe()
    unwatch()
    length = _wav_secs(rec) if rec.exists() else None
    said_segs = voiced_segments(rec, channel=0) if rec.exists() else []
    heard_segs = voiced_segments(rec, channel=1) if rec.exists() else []
    timeline = heard_timeline(
        said_segs, heard_segs, offset_s=t_rec - t_start, barge_at=barge_at, length_s=length
    )
    onset = first_loud_sample(rec) if rec.exists() else None
    if onset is not None and heard_segs and onset < heard_segs[0][1]:
        timeline["greeting_heard_after_start_ms"] = round((onset + t_rec - t_start) * 1000)
    said = [str(m.get("content", "")) for m in (record.messages if record else [])]
    transferred = bool(transfer_history) if args.transfer_to else None

    def first(kind: str, since: float) -> int | None:
        t = next((t for k, t in events + watched if k == kind and t >= since), None)
        return None if t is None else round((t - since) * 1000)

    connect_ms = first("mod_audio_stream::connect", t_start)
    greeting_ms = timeline["greeting_heard_after_start_ms"]
    return {
        "call": a,
        "originate_ms": round((t_start - t_orig) * 1000),
        "recording_offset_ms": round((t_rec - t_start) * 1000),
        "pipeline_up": up,
        "answered_a_turn": answered,
        "server_turn_latency_ms": [round(x * 1000) for x in latencies],
        **timeline,
        "heard_voiced_secs": round(sum(e - s for s, e in heard_segs), 2),
        "heard_segments": [(round(s, 2), round(e, 2)) for s, e in heard_segs[:12]],
        "said_segments": [(round(s, 2), round(e, 2)) for s, e in said_segs[:8]],
        "server_call_ended_after_kill_ms": round(server_done_s * 1000) if server_done else None,
        "hangup_complete_after_kill_ms": first("CHANNEL_HANGUP_COMPLETE", t_kill)
        if hangup_done
        else None,
        # seen by a second ESL connection that also asks for these (the server does not)
        "channel_hangup_after_kill_ms": first("CHANNEL_HANGUP", t_kill),
        "channel_destroy_after_kill_ms": first("CHANNEL_DESTROY", t_kill),
        "connect_event_after_start_ms": connect_ms,
        # the 101 as FreeSWITCH saw it (its ::connect event, ~1-20 ms of ESL delay later)
        "greeting_heard_after_connect_ms": greeting_ms - connect_ms
        if greeting_ms is not None and connect_ms is not None
        else None,
        # uuid_exists says false as soon as the hangup starts; a stuck channel (the voxcom
        # deadlock) still shows in `show channels`, so both must agree.
        "channel_gone": gone and channels.startswith("0 total"),
        "channels_after": channels,
        "no_channels_after_kill_ms": round(no_channels_s * 1000)
        if channels.startswith("0 total")
        else None,
        "events": sorted({k for k, _ in events}),
        "play_events": sum(1 for k, _ in events if k.endswith("::play")),
        "dtmf_event_seen": dtmf_seen,
        "transferred": transferred,
        "transfer_history": transfer_history or None,
        "dtmf_in_context": any(args.dtmf in m and "pressed" in m for m in said)
        if args.dtmf
        else None,
        "slow_loris_closed_after_s": loris_closed,
        "recording": str(rec),
    }


async def _never_first(self: FreeSwitchOutputTransport, frame: OutputAudioRawFrame) -> bool:
    """``--no-direct-first``: every bot chunk goes through Pipecat's media sender."""
    return False


def _untrimmed(pcm: bytes, rate: int, keep_secs: float = 0.0, peak: int = 0) -> bytes:
    """``--untrimmed-greeting``: the greeting as Piper made it, leading silence and all."""
    return pcm


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start emulated providers and Pipeswitch, then place the calls."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.mode == "stream" and not args.dialect:
        args.dialect = DIALECT_FOR_BUILD[args.build]
    if args.mode == "unicast":
        args.dialect = args.dialect or "binary"
    if args.no_direct_first:
        FreeSwitchOutputTransport._write_first_now = _never_first  # type: ignore[method-assign]
    if args.untrimmed_greeting:
        greeting_cache.trim_leading_silence = _untrimmed
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
            handshake_timeout_secs=args.handshake_timeout,
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
            # A second connection that sees the hangup's first and last events too.
            watcher = EslClient(
                args.esl_host,
                args.esl_port,
                events=("CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY"),
            )
            await watcher.start()
            if not await watcher.wait_connected(5.0):
                raise SystemExit("no second ESL connection to the switch")
            out: dict[str, Any] = {
                "build": args.build,
                "mode": args.mode,
                "dialect": args.dialect,
                "direct_first_chunk": not args.no_direct_first,
                "greeting_trimmed": not args.untrimmed_greeting,
                "esl": await esl_round_trips(app.esl, args.rtt),
                "calls": [],
            }
            for i in range(args.calls):
                out["calls"].append(await one_call(app, app.esl, args, i, watcher))
                await asyncio.sleep(0.5)
            lat = [x for c in out["calls"] for x in c["server_turn_latency_ms"]]
            out["server_turn_latency_median_ms"] = statistics.median(lat) if lat else None
            for key in (
                "greeting_heard_after_start_ms",
                "greeting_heard_after_connect_ms",
                "reply_heard_after_question_ms",
                "barge_in_stop_ms",
            ):
                xs = [c[key] for c in out["calls"] if c[key] is not None]
                out[f"{key}_median"] = statistics.median(xs) if xs else None
            out["handshakes_reaped"] = dict(app.server.handshakes.reaped) if app.server else {}
            await watcher.close()
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
    p.add_argument(
        "--barge-in-after",
        type=float,
        default=None,
        help="seconds after the first answer the far leg talks over the reply",
    )
    p.add_argument(
        "--barge-file",
        default="/usr/local/freeswitch/sounds/pipeswitch/question-8k.wav",
        help="what the far leg says when it barges in (a file on the switch)",
    )
    p.add_argument("--var", action="append", default=[], help="extra channel variable NAME=VALUE")
    p.add_argument(
        "--hangup-at",
        type=float,
        default=None,
        help="hang up this many seconds after the stream start (no answer awaited)",
    )
    p.add_argument("--slow-loris", type=int, default=0, help="trickling sockets per call")
    p.add_argument("--handshake-timeout", type=float, default=5.0)
    p.add_argument("--no-direct-first", action="store_true")
    p.add_argument("--untrimmed-greeting", action="store_true")
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
