"""``pipeswitch call``: place one emulated FreeSWITCH call and report what happened.

Why here: the command only needs the emulator, so it lives with it;
``pipelines/cli.py`` mounts it with ``add_call_arguments`` + ``run_call``.
Standalone: ``python -m pipeswitch.bench.fakeswitch.cli --url … --wav q.wav [--out a.wav]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

from loguru import logger

from pipeswitch.bench.fakeswitch.audio import decode_audio_file, load_wav, resample, write_wav
from pipeswitch.bench.fakeswitch.records import EVENT_ERROR, EVENT_PLAY
from pipeswitch.bench.fakeswitch.stream import ConnState, FakeSwitchStream, Playback, StreamConfig

__all__ = ["DIALECT_PLAYBACK", "add_call_arguments", "main", "run_call"]

DIALECT_PLAYBACK: dict[str, Playback] = {
    "json-stream": "voxcom",
    "binary": "cloudfieldcz",
    "file": "community",
}
_POLL_S = 0.05
# A greeting that has not started this long after the 101 is not coming.
GREETING_START_S = 2.0


def add_call_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``call`` options to ``parser``."""
    parser.add_argument(
        "--url", required=True, help="ws://host:port/path[?query]; '{uuid}' is replaced"
    )
    parser.add_argument("--wav", required=True, type=Path, help="the caller's question (WAV)")
    parser.add_argument(
        "--out", type=Path, default=None, help="write what the caller heard to this WAV file"
    )
    parser.add_argument(
        "--rate", type=int, choices=(8000, 16000), default=8000, help="stream sample rate"
    )
    parser.add_argument(
        "--mix",
        choices=("mono", "stereo"),
        default="mono",
        help="stereo sends nothing while nothing is played to the caller, as FreeSWITCH does",
    )
    parser.add_argument(
        "--dialect",
        choices=tuple(DIALECT_PLAYBACK),
        default="json-stream",
        help="json-stream: voxcom fork; binary: cloudfieldcz fork; file: community + ::play files",
    )
    parser.add_argument("--metadata", default=None, help="metadata TEXT (JSON); '{uuid}' replaced")
    parser.add_argument(
        "--hold",
        type=float,
        default=None,
        help="stay this many seconds after the question instead of waiting for the answer",
    )
    parser.add_argument("--uuid", default=None, help="channel UUID (default: random)")
    parser.add_argument(
        "--lead-in",
        type=float,
        default=0.2,
        help="silence before the question (after the greeting)",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.8,
        help="bot silence (nothing left to play) that ends a turn",
    )
    parser.add_argument(
        "--answer-timeout", type=float, default=30.0, help="longest wait for each bot turn"
    )
    parser.add_argument(
        "--turn-gap", type=float, default=0.8, help="caller pause that splits turns"
    )


def _server_closed(stream: FakeSwitchStream) -> bool:
    return stream.close_record.server_close_code is not None or stream.state in (
        ConnState.REMOTE_CLOSED,
        ConnState.CLOSED,
        ConnState.FAILED,
    )


async def _wait_greeting(stream: FakeSwitchStream, quiet: float, cap: float) -> None:
    """Until the greeting has played out: it starts within ``GREETING_START_S`` or not at all."""
    start_by = time.monotonic() + GREETING_START_S
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline and not _server_closed(stream):
        last = stream.last_bot_audio_at()
        if last is None:
            if time.monotonic() >= start_by:
                return  # no greeting
        elif not stream.playing and time.monotonic() - last >= quiet:
            return
        await asyncio.sleep(_POLL_S)


async def _wait_answer(stream: FakeSwitchStream, after: float, quiet: float, cap: float) -> bool:
    """Until the bot has answered (audio after ``after``) and gone quiet; False on timeout
    or when the server closed the call first."""
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        if _server_closed(stream):
            return stream.first_bot_audio_received_after(after) is not None
        if stream.first_bot_audio_received_after(after) is not None:
            last = stream.last_bot_audio_at()
            if not stream.playing and last is not None and time.monotonic() - last >= quiet:
                return True
        await asyncio.sleep(_POLL_S)
    return False


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000, 1)


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


def _turns(stream: FakeSwitchStream, t0: float, gap: float) -> list[dict[str, Any]]:
    segs = stream.voiced_segments(min_gap_s=gap)
    out: list[dict[str, Any]] = []
    for i, (_, end) in enumerate(segs):
        nxt = segs[i + 1][0] if i + 1 < len(segs) else None
        bot = stream.first_bot_audio_received_after(end)
        heard = stream.first_bot_audio_played_after(end)
        if bot is not None and nxt is not None and bot > nxt:
            bot = None  # the bot answered only a later turn
        if heard is not None and nxt is not None and heard > nxt:
            heard = None
        out.append(
            {
                "caller_speech_end_s": _rel(end, t0),
                "bot_audio_start_s": _rel(bot, t0),
                "latency_ms": _ms(end, bot),
                "heard_latency_ms": _ms(end, heard),
            }
        )
    return out


def _answer_pcm(stream: FakeSwitchStream, dialect: str, rate: int) -> bytes:
    if dialect != "file":
        return stream.played_audio()[0]
    parts: list[bytes] = []
    for ev in stream.events:
        if ev.name != EVENT_PLAY or not isinstance(ev.body, dict):
            continue
        path = ev.body.get("file")
        if not isinstance(path, str) or not Path(path).exists():
            continue
        decoded = decode_audio_file(path)
        if decoded is None:
            logger.warning("cannot decode {} for the answer WAV", path)
            continue
        parts.append(resample(decoded[0], decoded[1], rate))
    return b"".join(parts)


async def run_call(args: argparse.Namespace) -> int:
    """Place the call; print a JSON summary on stdout.

    Exit 0: answered; 1: connected but no answer; 2: nothing connected, or the server refused
    the call (its close code and reason go to stderr as one line, as FreeSWITCH's
    ``mod_audio_stream::disconnect`` would carry them).
    """
    uid = args.uuid or str(uuid4())
    url = args.url.replace("{uuid}", uid)
    metadata = args.metadata.replace("{uuid}", uid) if args.metadata else None
    question, _ = load_wav(args.wav, args.rate)
    cfg = StreamConfig(
        url=url,
        uuid=uid,
        mix=args.mix,
        rate=args.rate,
        metadata=metadata,
        playback=DIALECT_PLAYBACK[args.dialect],
    )
    stream = FakeSwitchStream(cfg)
    summary: dict[str, Any] = {
        "uuid": uid,
        "url": url,
        "rate": args.rate,
        "mix": args.mix,
        "dialect": args.dialect,
        "playback": cfg.playback,
    }
    rc = 0
    answer = b""
    refused: str | None = None
    try:
        await stream.start()
        connected = await stream.wait_connected()
        summary["connected"] = connected
        if not connected:
            err = next((e for e in stream.events if e.name == EVENT_ERROR), None)
            summary["error"] = err.body if err is not None else "no connect event"
            body = summary["error"]
            detail = body.get("message", body) if isinstance(body, dict) else body
            if isinstance(detail, dict):
                detail = detail.get("error", detail)
            refused = f"no connection to {url}: {detail}"
            rc = 2
        else:
            await _wait_greeting(stream, args.quiet, args.answer_timeout)
            if not _server_closed(stream):
                await asyncio.sleep(args.lead_in)
                q_start = time.monotonic()
                secs = stream.queue_caller_audio(question)
                await stream.wait_caller_drained(timeout_s=secs + 5.0)
                if args.hold is not None:
                    await asyncio.sleep(args.hold)
                    answered = stream.first_bot_audio_received_after(q_start) is not None
                else:
                    answered = await _wait_answer(stream, q_start, args.quiet, args.answer_timeout)
                rc = 0 if answered else 1
            cr = stream.close_record
            if cr.server_close_code is not None and stream.last_bot_audio_at() is None:
                # Closed before a single bot sample: the server refused the call.
                refused = f"call refused: close {cr.server_close_code} {cr.server_close_reason!r}"
                rc = 2
            answer = _answer_pcm(stream, args.dialect, args.rate)
    finally:
        record = await stream.hangup()
        await stream.aclose()
    t0 = stream.started_at or 0.0
    # "connect" = the complete 101: bot audio sent right behind it is read with it.
    connect_t = stream.upgraded_at
    first_bot = stream.first_bot_audio_received_after(connect_t) if connect_t else None
    segs = stream.voiced_segments(min_gap_s=args.turn_gap)
    if first_bot is not None and segs and first_bot > segs[0][0]:
        first_bot = None  # no greeting before the caller spoke
    _, rx = stream.received_audio()
    summary.update(
        {
            "upgrade_ms": _ms(stream.started_at, stream.upgraded_at),
            "greeting_ms": _ms(connect_t, first_bot),
            "turns": _turns(stream, t0, args.turn_gap),
            "events": stream.event_counts(),
            "frames_sent": len(stream.sent_frames),
            "audio_bytes_sent": stream.audio_bytes_sent,
            "bytes_sent": stream.bytes_sent,
            "audio_bytes_received": sum(a.nbytes for a in rx),
            "bytes_received": stream.bytes_received,
            "duration_s": _rel(time.monotonic(), t0),
            "close": {
                "initiator": record.initiator,
                "server_code": record.server_close_code,
                "server_reason": record.server_close_reason,
            },
            "hangup": {
                "initiator": record.initiator,
                "server_closed_tcp": record.server_closed_tcp,
                "server_eof_ms": None
                if record.server_eof_after_close_s is None
                else round(record.server_eof_after_close_s * 1000, 1),
            },
            "out": str(args.out) if args.out else None,
        }
    )
    if args.out is not None:
        write_wav(args.out, answer, args.rate)
    print(json.dumps(summary, indent=2))
    if refused is not None:
        print(f"pipeswitch call: {refused}", file=sys.stderr)
    return rc


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m pipeswitch.bench.fakeswitch.cli``)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeswitch.bench.fakeswitch.cli",
        description="Place one emulated FreeSWITCH mod_audio_stream call.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_call_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run_call(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
