"""Echo bench: does the bot's own voice, echoed by the phone line, interrupt it?

A call (ElevenLabs Agents against the ConvAI emulator, OpenAI Realtime or Gemini
Live against theirs, or the cascade; each provider emulator's energy VAD interrupts
the model on any caller energy, as the real servers do) is placed by the FreeSWITCH emulator with an echo path on the caller's leg: the
audio FreeSWITCH *played* to the caller comes back into the caller's audio
``delay`` (40-120 ms) later, attenuated by the echo return loss (-10 to -25 dB),
plus line noise. Per echo level, with the echo guard on and off:

* **false interruptions**: the caller says nothing while the agent gives long
  replies; every reply cut short (locally by the guard, or by the agent's own VAD)
  is a false interruption. Reported per reply and per minute of bot speech.
* **real barge-in stop time**: the caller talks over a reply (echo still on); the
  time from the caller's speech onset (first voiced frame sent) to the last bot
  audio received before playback stopped, on the wire.

Run::

    python -m pipeswitch.bench.echo --levels=-10,-15,-20,-25 --replies 2 --barge-ins 2
    python -m pipeswitch.bench.echo --pipeline openai-realtime   # or gemini-live, cascade

It starts Piper (caller and agent speech) and the emulators in this process and
writes ``bench/results/echo-<time>/echo.json`` and ``echo.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from pipeswitch.bench.emulators.elevenlabs_convai import (
    CONVAI_RESPONSE,
    ConvAISettings,
    ConversationRecord,
    ElevenLabsConvAIEmulator,
    serve_convai,
)
from pipeswitch.bench.emulators.latency import LatencyModel
from pipeswitch.bench.emulators.openai_realtime import SpeechSynth, piper_speech, split_sentences
from pipeswitch.bench.emulators.runner import EmulatorConfig, run_emulators
from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig

AGENT = "agent_echo_bench"
ASK_LONG = "Tell me everything about your office."
BARGE_IN = "Sorry, can you hold on a second?"
# ~14 s of speech per reply, so a false interruption has room to happen.
REPLY = (
    "Of course. Our main office is on Market Street, right next to the central library. "
    "We open at nine in the morning and close at five in the afternoon, Monday to Friday. "
    "On Saturdays a smaller team is in from ten until two. Parking is free for the first "
    "hour, and there is a bus stop just outside the front door."
)

# The cascade synthesizes its reply sentence by sentence (Piper over HTTP): short
# sentences, so a loaded machine still keeps up (the long ones timed out at 2 s).
CASCADE_REPLY = (
    "Of course. Our office is on Market Street. It is next to the library. "
    "We open at nine. We close at five. That is Monday to Friday. "
    "On Saturdays we open at ten. We close at two. Parking is free. "
    "The first hour costs nothing. A bus stops outside. The door is on the left."
)


# The calls' pipelines and their tenants' domain suffix (echo-on.<suffix>/echo-off.<suffix>).
PIPELINES = {
    "elevenlabs-agent": "test",
    "cascade": "cascade",
    "openai-realtime": "openai",
    "gemini-live": "gemini",
}
# A stop sooner than this after the caller's onset is the bot's own pause, not a
# barge-in (a provider VAD needs 60 ms of speech, the guard 150 ms, before either acts).
VOID_STOP_SECS = 0.02
S2S_RATE = 24000  # OpenAI Realtime's and Gemini Live's reply audio


def _s2s_transcript(turn: int) -> str:
    """What the OpenAI/Gemini emulators 'heard' in the caller's turn ``turn`` of a call."""
    return ASK_LONG if turn == 0 else BARGE_IN


def _s2s_reply(messages: list[dict[str, Any]]) -> str:
    """The long reply to the question, a short one to anything else (a barge-in, an echo)."""
    users = [m for m in messages if m.get("role") == "user"]
    last = str(users[-1].get("content", "")) if users else ""
    return REPLY if "office" in last else "Sure, take your time."


class CachedSpeech:
    """Piper speech for the emulators, synthesized once per sentence and rate.

    A reply's sentences are made ahead of the trials, so a loaded machine does not
    turn a slow synthesis into a gap in the reply (a gap looks like a cut).
    """

    def __init__(self, synth: SpeechSynth) -> None:
        """Wrap ``synth`` (``piper_speech``)."""
        self._synth = synth
        self._cache: dict[tuple[str, int], bytes] = {}

    async def __call__(self, text: str, rate: int) -> bytes:
        """The sentence's PCM at ``rate``."""
        key = (text, rate)
        if key not in self._cache:
            self._cache[key] = await self._synth(text, rate)
        return self._cache[key]

    async def reply_secs(self, text: str, rate: int = S2S_RATE) -> float:
        """Duration of ``text`` spoken sentence by sentence, as the emulators stream it."""
        pcm = [await self(t, rate) for t in split_sentences(text) or [text]]
        return sum(len(a) for a in pcm) / (2 * rate)


class EchoPath:
    """The line's echo of what the caller hears, plus noise, added to the caller's audio."""

    def __init__(
        self, rate: int, erl_db: float, delay_s: float, noise_dbfs: float, seed: int = 0
    ) -> None:
        """``erl_db``: echo level relative to the played audio (negative)."""
        self.gain = 10.0 ** (erl_db / 20.0)
        self._line = np.zeros(int(delay_s * rate), dtype=np.float32)
        self._rng = np.random.default_rng(seed)
        self._noise = 32768.0 * 10.0 ** (noise_dbfs / 20.0)

    def mix(self, caller: bytes, played: bytes) -> bytes:
        """One frame of the caller's leg: their voice + the delayed echo + noise."""
        p = np.frombuffer(played, dtype="<i2").astype(np.float32)
        line = np.concatenate((self._line, p))
        echo, self._line = line[: p.size], line[p.size :]
        c = np.frombuffer(caller, dtype="<i2").astype(np.float32)
        n = min(c.size, echo.size)
        out = c[:n] + self.gain * echo[:n] + self._rng.normal(0.0, self._noise, n)
        return np.clip(out, -32768, 32767).astype("<i2").tobytes()


class EchoingStream(FakeSwitchStream):
    """A mod_audio_stream stream whose caller leg carries the echo of its own playback."""

    def __init__(self, config: StreamConfig, echo: EchoPath) -> None:
        """Same as the emulator's stream; ``echo`` shapes the caller leg."""
        super().__init__(config)
        self.echo = echo

    def _tick(self, k: int, t_tick: float) -> None:
        played, write_active = self.playout.tick(t_tick)
        frame, voiced = self._caller.next()
        mixed = self.echo.mix(bytes(frame), played)
        if self._attached and not self._paused:
            self._bug.tick(k, t_tick, mixed, voiced, played, write_active)


@dataclass
class TrialResult:
    """One echo level, one guard setting."""

    erl_db: float
    guard: bool
    delay_ms: list[float] = field(default_factory=list)
    replies: int = 0
    replies_cut: int = 0
    bot_speech_s: float = 0.0
    guard_barge_ins: int = 0
    server_interruptions: int = 0
    barge_in_stop_ms: list[float] = field(default_factory=list)
    barge_ins_missed: int = 0
    barge_ins_void: int = 0  # the bot was already quiet at the caller's onset

    @property
    def false_per_min(self) -> float:
        """False interruptions per minute of bot speech."""
        return 60.0 * self.replies_cut / self.bot_speech_s if self.bot_speech_s else 0.0


def _tenants() -> Any:
    from pipeswitch.config.loaders import StaticTenantLoader
    from pipeswitch.config.tenants import ProviderSettings, Tenant, TurnSettings

    def t(name: str, guard: bool) -> Tenant:
        return Tenant(
            name=name,
            pipeline="elevenlabs-agent",
            first_message=None,
            playback="json-stream",
            providers=ProviderSettings(elevenlabs_agent_id=AGENT),
            turns=TurnSettings(echo_guard=guard),
        )

    def cascade(name: str, guard: bool) -> Tenant:
        return Tenant(
            name=name,
            first_message=None,
            playback="json-stream",
            turns=TurnSettings(echo_guard_cascade=guard),
        )

    def s2s(name: str, pipeline: str, guard: bool) -> Tenant:
        # The provider's server VAD at its default silence (500 ms ends a turn).
        return Tenant(
            name=name,
            pipeline=pipeline,
            first_message=None,
            playback="json-stream",
            turns=TurnSettings(echo_guard=guard),
        )

    s2s_tenants = [
        s2s(f"echo-{'on' if guard else 'off'}.{PIPELINES[p]}", p, guard)
        for p in ("openai-realtime", "gemini-live")
        for guard in (True, False)
    ]
    return StaticTenantLoader(
        [
            Tenant(name="default"),
            t("echo-on.test", True),
            t("echo-off.test", False),
            cascade("echo-on.cascade", True),
            cascade("echo-off.cascade", False),
            *s2s_tenants,
        ],
        default="default",
    )


@dataclass
class Bench:
    """The running server and emulator."""

    app: Any
    convai: ElevenLabsConvAIEmulator
    http: aiohttp.ClientSession
    emu: Any = None  # RunningEmulators: the OpenAI Realtime and Gemini Live emulators
    s2s_reply_secs: float = 0.0  # the long reply's length as those emulators speak it
    speech: dict[str, bytes] = field(default_factory=dict)
    guards: dict[str, Any] = field(default_factory=dict)
    # Playback cut by an interruption, per finished call (the call record's count).
    interruptions: dict[str, int] = field(default_factory=dict)

    async def say(self, text: str, rate: int) -> bytes:
        if text not in self.speech:
            async with self.http.post(
                self.app.endpoints.piper_for_rate(rate), json={"text": text, "voice": None}
            ) as r:
                r.raise_for_status()
                wav = await r.read()
            at = wav.find(b"data", 12)
            a = np.frombuffer(wav[at + 8 :][: (len(wav) - at - 8) // 2 * 2], dtype="<i2")
            idx = np.flatnonzero(np.abs(a) > 300)
            self.speech[text] = a[idx[0] : idx[-1] + 1].tobytes() if idx.size else a.tobytes()
        return self.speech[text]


@asynccontextmanager
async def running_bench(response: LatencyModel | None = None) -> AsyncIterator[Bench]:
    """Piper, the emulators and a Pipeswitch server with the two echo tenants."""
    from pipeswitch.config.settings import Settings
    from pipeswitch.pipelines import (  # noqa: F401  (registers the builders)
        elevenlabs_agent,
        gemini_live,
        openai_realtime,
    )
    from pipeswitch.pipelines.app import Pipeswitch
    from pipeswitch.pipelines.emulated import endpoints_for

    convai = ElevenLabsConvAIEmulator(
        settings=ConvAISettings(agent_ids=[AGENT], api_key="emulated", first_message=None),
        response_latency=response or LatencyModel.constant(300),
        user_lines=lambda turn: ASK_LONG,
        script=lambda text, turn: REPLY if "office" in text else "Sure, take your time.",
    )
    runner, port = await serve_convai(convai)
    try:
        async with run_emulators(EmulatorConfig(seed=1)) as emu:
            ep = dataclasses.replace(
                endpoints_for(emu),
                elevenlabs_url=f"ws://127.0.0.1:{port}",
                elevenlabs_api_key="emulated",
            )
            settings = Settings(
                host="127.0.0.1", port=0, providers="emulated", idle_timeout_secs=60
            )
            app = Pipeswitch(settings, loader=_tenants(), default_tenant="default", endpoints=ep)
            await app.start()
            convai.piper_url = app.endpoints.piper_url
            # Synthesize the agent's replies now, so a reply starts 300 ms after the turn.
            for text in (REPLY, "Sure, take your time."):
                await convai.speech(text, 16000)
            # The cascade's LLM gives the same long reply to whatever the caller says.
            emu.openai.script = lambda messages: CASCADE_REPLY
            async with aiohttp.ClientSession() as http:
                # OpenAI Realtime and Gemini Live: the long reply in Piper's voice, 300 ms
                # after the provider's VAD ended the caller's turn.
                speech = CachedSpeech(piper_speech(app.endpoints.piper_url, session=http))
                assert emu.realtime is not None and emu.gemini is not None
                for s2s_emu in (emu.realtime, emu.gemini):
                    s2s_emu.ttfa = LatencyModel.constant(300)
                    s2s_emu.script = _s2s_reply
                    s2s_emu.transcripts = _s2s_transcript
                    s2s_emu.speech = speech
                await speech.reply_secs("Sure, take your time.")
                bench = Bench(app, convai, http, emu, await speech.reply_secs(REPLY))

                async def _record_guard(record: Any, cp: Any) -> None:
                    bench.interruptions[record.call.call_uuid] = len(record.interruptions)
                    bench.guards[record.call.call_uuid] = cp.parts.get("echo_guard")

                assert app.sessions is not None
                app.sessions.finished_hooks.append(_record_guard)
                try:
                    yield bench
                finally:
                    await app.stop(drain_secs=1.0)
    finally:
        await runner.cleanup()


async def _wait_conversation(b: Bench, n: int) -> ConversationRecord:
    for _ in range(300):
        if len(b.convai.conversations) > n and b.convai.conversations[-1].init:
            return b.convai.conversations[-1]
        await asyncio.sleep(0.02)
    raise RuntimeError("no agent conversation opened")


async def _wait_reply_over(
    stream: FakeSwitchStream,
    started: float,
    timeout: float,
    conv: ConversationRecord | None,
    cut: Callable[[], bool] | None = None,
) -> None:
    """Until the reply played out (bot quiet for 1.2 s) or the provider was interrupted.

    ``cut``: the provider saw a caller turn nobody spoke (without it, an echo that
    keeps starting new replies keeps the bot talking until the timeout).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        if (conv is not None and any(t.interrupted_at is not None for t in conv.agent_turns)) or (
            cut is not None and cut()
        ):
            await asyncio.sleep(0.5)  # let the cut reach the wire
            return
        last = stream.last_bot_audio_at()
        if last is not None and last > started and time.monotonic() - last > 1.2:
            return


async def _ask(stream: FakeSwitchStream, pcm: bytes) -> float:
    stream.queue_caller_audio(pcm)
    stream.queue_caller_silence(0.3)
    await stream.wait_caller_drained(timeout_s=len(pcm) / 16000 + 3.0)
    return time.monotonic()


async def run_trial(
    b: Bench,
    erl_db: float,
    guard: bool,
    *,
    rate: int,
    replies: int,
    barge_ins: int,
    noise_dbfs: float,
    seed: int,
    pipeline: str = "elevenlabs-agent",
) -> TrialResult:
    """False interruptions over ``replies`` long replies, then ``barge_ins`` real ones."""
    rng = random.Random(seed)
    res = TrialResult(erl_db=erl_db, guard=guard)
    ask = await b.say(ASK_LONG, rate)
    barge = await b.say(BARGE_IN, rate)
    cascade = pipeline == "cascade"
    convai = pipeline == "elevenlabs-agent"
    domain = f"echo-{'on' if guard else 'off'}.{PIPELINES[pipeline]}"
    for i in range(replies + (barge_ins if guard else 0)):
        delay = rng.uniform(0.04, 0.12)
        res.delay_ms.append(round(delay * 1000, 1))
        path = EchoPath(rate, erl_db, delay, noise_dbfs, seed=seed + i)
        call_id = f"echo-{seed}-{i}"
        url = f"ws://127.0.0.1:{b.app.port}/fs/{call_id}?rate={rate}&mix=mono&domain={domain}"
        stream = EchoingStream(
            StreamConfig(url=url, uuid=call_id, rate=rate, playback="voxcom"), path
        )
        n = len(b.convai.conversations)
        n_s2s = _s2s_sessions(b, pipeline)
        await stream.start()
        if not await stream.wait_connected(3.0):
            raise RuntimeError("call did not connect")
        false_trial = i < replies
        short = False
        try:
            conv = await _wait_conversation(b, n) if convai else None
            asked = await _ask(stream, ask)
            if false_trial:
                await _wait_reply_over(
                    stream, asked, timeout=40.0, conv=conv, cut=_s2s_cut(b, pipeline, n_s2s)
                )
                res.replies += 1
                played = _bot_speech_secs(stream, asked, rate)
                res.bot_speech_s += played
                if conv is not None:
                    long_turns = [t for t in conv.agent_turns if t.text == REPLY]
                    res.server_interruptions += sum(
                        1 for u in conv.user_turns if u.interrupted_event_id
                    )
                    cut = any(t.interrupted_at is not None for t in long_turns)
                    # Cut = interrupted at the agent, or (locally) a reply that did not all play.
                    full = len(b.convai._speech_cache.get((REPLY, 16000), b"")) / 32000
                    if cut or played < full - 1.0:
                        res.replies_cut += 1
                elif not cascade:
                    # OpenAI/Gemini: a reply that did not all play was cut, whether or
                    # not the call record saw an interruption (checked after the hang-up).
                    short = played < b.s2s_reply_secs - 1.0
            else:
                first = None
                while first is None and time.monotonic() - asked < 8.0:
                    await asyncio.sleep(0.02)
                    first = stream.first_bot_audio_received_after(asked)
                if first is None:
                    res.barge_ins_missed += 1
                    continue
                await asyncio.sleep(rng.uniform(1.5, 3.0))
                # Talk over the bot, not into a pause between its sentences.
                while (
                    last := stream.last_bot_audio_at()
                ) is None or time.monotonic() - last > 0.03:
                    await asyncio.sleep(0.005)
                sent_before = len(stream.sent_frames)
                stream.queue_caller_audio(barge)
                stream.queue_caller_silence(1.0)
                onset = None
                while onset is None:
                    await asyncio.sleep(0.01)
                    onset = next((f.t for f in stream.sent_frames[sent_before:] if f.voiced), None)
                await asyncio.sleep(2.0)
                stop = _stop_after(stream, onset)
                if stop is None or stop - onset < VOID_STOP_SECS:
                    # The bot went quiet before anything could have heard the caller:
                    # its sentence ended as the caller began.
                    res.barge_ins_void += 1
                elif stop - onset > 1.0:
                    res.barge_ins_missed += 1  # the bot talked on through the caller
                else:
                    res.barge_in_stop_ms.append(round((stop - onset) * 1000, 1))
        finally:
            await stream.hangup()
        res.guard_barge_ins += await _guard_barge_ins(b, stream.uuid)
        if not convai and false_trial:
            res.server_interruptions += _s2s_interruptions(b, pipeline, n_s2s)
            if b.interruptions.pop(stream.uuid, 0) or short:
                # Playback was cut by a caller turn nobody spoke: false.
                res.replies_cut += 1
    return res


def _s2s_sessions(b: Bench, pipeline: str) -> int:
    """How many sessions the pipeline's provider emulator has logged (0: no emulator)."""
    emu = {"openai-realtime": "realtime", "gemini-live": "gemini"}.get(pipeline)
    return len(getattr(b.emu, emu).sessions) if emu and b.emu is not None else 0


def _s2s_cut(b: Bench, pipeline: str, since: int) -> Callable[[], bool] | None:
    """Whether the provider took the echo for a caller turn after the question (None: n/a)."""
    if pipeline == "openai-realtime":
        return lambda: any(len(s.speech_started) > 1 for s in b.emu.realtime.sessions[since:])
    if pipeline == "gemini-live":
        return lambda: any(
            s.interruptions or len(s.user_transcripts) > 1 for s in b.emu.gemini.sessions[since:]
        )
    return None


def _s2s_interruptions(b: Bench, pipeline: str, since: int) -> int:
    """The provider's own VAD interrupting the model, in sessions opened after ``since``.

    OpenAI: every ``speech_started`` after the caller's question (Pipecat stops the
    bot's playback on each); Gemini: each ``interrupted`` it sent.
    """
    if pipeline == "openai-realtime":
        return sum(max(0, len(s.speech_started) - 1) for s in b.emu.realtime.sessions[since:])
    if pipeline == "gemini-live":
        return sum(s.interruptions for s in b.emu.gemini.sessions[since:])
    return 0


async def _guard_barge_ins(b: Bench, uuid: str) -> int:
    """The echo guard's own count for a finished call (0 without a guard)."""
    for _ in range(250):
        if uuid in b.guards:
            guard = b.guards.pop(uuid)
            return 0 if guard is None else int(guard.core.stats.barge_ins)
        await asyncio.sleep(0.02)
    return 0


def _bot_speech_secs(stream: FakeSwitchStream, after: float, rate: int) -> float:
    _, rx = stream.received_audio()
    return sum(a.nbytes for a in rx if a.t > after) / (2 * rate)


def _stop_after(stream: FakeSwitchStream, onset: float, quiet_s: float = 0.7) -> float | None:
    """The last bot audio received before it went quiet (``quiet_s``) after ``onset``.

    Natural pauses between the bot's sentences are shorter than ``quiet_s``; the
    agent's answer to the barge-in comes well after the caller has finished.
    """
    _, rx = stream.received_audio()
    times = [a.t for a in rx if a.non_silent and a.t > onset - quiet_s]
    if not times:
        return None
    if times[-1] < onset:
        return None
    for t, nxt in zip(times, times[1:], strict=False):
        if t >= onset and nxt - t > quiet_s:
            return t
        if t < onset <= nxt and nxt - t > quiet_s:
            return None  # the bot was between sentences when the caller began: no trial
    return max(times[-1], onset)


@dataclass
class TurnTiming:
    """One caller turn: wire latency and what of it the (emulated) agent took."""

    wire_ms: float
    provider_ms: float

    @property
    def overhead_ms(self) -> float:
        """Pipeswitch's share: caller audio in plus agent audio out."""
        return self.wire_ms - self.provider_ms


async def measure_turns(b: Bench, turns: int, rate: int = 8000) -> list[TurnTiming]:
    """Wire turn latency of the ElevenLabs pipeline (guard on, no echo) and its overhead.

    Wire latency: caller's last voiced frame sent -> first audible agent audio
    received, at the FreeSWITCH emulator. Provider time: the agent's end of turn (its
    VAD saw the last voiced audio arrive) -> its first audible audio sent (the reply's
    leading silence is the provider's). The difference is what Pipeswitch adds on the
    way in and out.
    """
    out: list[TurnTiming] = []
    b.convai.script = lambda text, turn: "We are open from nine to five."
    await b.convai.speech("We are open from nine to five.", 16000)
    ask = await b.say(BARGE_IN, rate)
    path = EchoPath(rate, -90.0, 0.05, -70.0)
    url = f"ws://127.0.0.1:{b.app.port}/fs/turns?rate={rate}&mix=mono&domain=echo-on.test"
    stream = EchoingStream(StreamConfig(url=url, uuid="turns", rate=rate, playback="voxcom"), path)
    n = len(b.convai.conversations)
    await stream.start()
    await stream.wait_connected(3.0)
    try:
        conv = await _wait_conversation(b, n)
        for _ in range(turns):
            stream.queue_caller_audio(ask)
            stream.queue_caller_silence(0.3)
            await stream.wait_caller_drained(timeout_s=len(ask) / (2 * rate) + 3.0)
            end = stream.last_voiced_sent_at()
            first = None
            while first is None and end is not None and time.monotonic() - end < 5.0:
                await asyncio.sleep(0.01)
                first = stream.first_bot_audio_received_after(end)
            await _wait_reply_over(stream, end or 0.0, timeout=10.0, conv=conv)
            utt = conv.user_turns[-1] if conv.user_turns else None
            agent = conv.agent_turns[-1] if conv.agent_turns else None
            if (
                first is None
                or end is None
                or utt is None
                or utt.speech_end_at is None
                or agent is None
                or agent.first_voiced_at is None
            ):
                continue
            out.append(
                TurnTiming(
                    wire_ms=(first - end) * 1000,
                    provider_ms=(agent.first_voiced_at - utt.speech_end_at) * 1000,
                )
            )
    finally:
        await stream.hangup()
    return out


def report(results: Sequence[TrialResult], noise_dbfs: float) -> str:
    """Markdown table, one row per level and guard setting."""
    lines = [
        f"Echo delay 40-120 ms (uniform), line noise {noise_dbfs:g} dBFS, 8 kHz, json-stream.",
        "",
        "| echo | guard | replies cut / replies | false per min of bot speech | "
        "barge-in stop p50 / max (ms) | barge-ins missed | provider VAD cuts (silent caller) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stops = r.barge_in_stop_ms
        stop = f"{statistics.median(stops):.0f} / {max(stops):.0f}" if stops else "-"
        lines.append(
            f"| {r.erl_db:g} dB | {'on' if r.guard else 'off'} | {r.replies_cut} / {r.replies} | "
            f"{r.false_per_min:.2f} | {stop} | {r.barge_ins_missed if r.guard else '-'} | "
            f"{r.server_interruptions} |"
        )
    return "\n".join(lines)


async def run_echo_bench(
    levels: Sequence[float],
    *,
    replies: int = 2,
    barge_ins: int = 2,
    rate: int = 8000,
    noise_dbfs: float = -55.0,
    baseline: bool = True,
    pipeline: str = "elevenlabs-agent",
) -> list[TrialResult]:
    """Every level with the guard on (and off, for the baseline)."""
    results: list[TrialResult] = []
    async with running_bench() as b:
        for k, level in enumerate(levels):
            for guard in (True, False) if baseline else (True,):
                results.append(
                    await run_trial(
                        b,
                        level,
                        guard,
                        rate=rate,
                        replies=replies,
                        barge_ins=barge_ins,
                        noise_dbfs=noise_dbfs,
                        seed=100 * k + (0 if guard else 50),
                        pipeline=pipeline,
                    )
                )
    return results


async def _turns_only(turns: int) -> list[TurnTiming]:
    async with running_bench(CONVAI_RESPONSE.model(seed=3)) as b:
        return await measure_turns(b, turns)


async def elevenlabs_latency(turns: int, out_dir: Path) -> int:
    """``bench latency --pipeline elevenlabs-agent``: wire turn latency and server overhead."""
    timings = await _turns_only(turns)
    wire = sorted(t.wire_ms for t in timings)
    over = sorted(t.overhead_ms for t in timings)
    doc = {
        "pipeline": "elevenlabs-agent",
        "turns": len(timings),
        "wire_ms": {"p50": _q(wire, 0.5), "p95": _q(wire, 0.95)},
        "overhead_ms": {"p50": _q(over, 0.5), "p95": _q(over, 0.95)},
        "provider_ms": [round(t.provider_ms) for t in timings],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "s2s-elevenlabs-agent.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0 if timings else 2


def _q(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m pipeswitch.bench.echo``."""
    p = argparse.ArgumentParser(prog="python -m pipeswitch.bench.echo", description=__doc__)
    p.add_argument("--levels", default="-10,-15,-20,-25", help="echo return loss, dB")
    p.add_argument("--replies", type=int, default=2, help="long replies per level (false)")
    p.add_argument("--barge-ins", type=int, default=2, help="real barge-ins per level")
    p.add_argument("--noise-dbfs", type=float, default=-55.0)
    p.add_argument("--no-baseline", action="store_true", help="skip the guard-off runs")
    p.add_argument(
        "--pipeline",
        choices=tuple(PIPELINES),
        default="elevenlabs-agent",
        help="the calls' pipeline (the cascade: Deepgram/Groq emulators, Piper)",
    )
    p.add_argument("--out", default=None, help="results folder")
    p.add_argument(
        "--turns", type=int, default=0, help="only measure N turns' wire latency and overhead"
    )
    args = p.parse_args(argv)
    if args.turns:
        timings = asyncio.run(_turns_only(args.turns))
        wire = sorted(t.wire_ms for t in timings)
        over = sorted(t.overhead_ms for t in timings)
        print(f"turns: {len(timings)}")
        print(f"wire turn latency ms: p50 {_q(wire, 0.5):.0f} p95 {_q(wire, 0.95):.0f}")
        print(f"server overhead ms:   p50 {_q(over, 0.5):.0f} p95 {_q(over, 0.95):.0f}")
        print(
            "provider ms (emulated agent, end of turn -> first audio):",
            [round(t.provider_ms) for t in timings],
        )
        return
    levels = [float(x) for x in args.levels.split(",")]
    results = asyncio.run(
        run_echo_bench(
            levels,
            replies=args.replies,
            barge_ins=args.barge_ins,
            noise_dbfs=args.noise_dbfs,
            baseline=not args.no_baseline,
            pipeline=args.pipeline,
        )
    )
    table = f"Pipeline: {args.pipeline}.\n" + report(results, args.noise_dbfs)
    out = Path(args.out or f"bench/results/echo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "echo.json").write_text(
        json.dumps([dataclasses.asdict(r) | {"false_per_min": r.false_per_min} for r in results])
    )
    (out / "echo.md").write_text(table + "\n")
    print(table)
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
