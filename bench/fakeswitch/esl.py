"""FreeSWITCH's Event Socket (mod_event_socket, inbound) as an asyncio server.

Why: the community mod_audio_stream build plays nothing itself; what the caller
hears, barge-in, DTMF, hangup and transfer all go over ESL (protocol doc §8-9,
§14-15). This server speaks the real plain-text protocol (``auth``, ``event
plain``, ``api``/``bgapi`` with ``BACKGROUND_JOB``, ``sendmsg``, URL-encoded
events with ``Content-Length`` bodies, ``text/disconnect-notice``) and is tied
to the mod_audio_stream emulator (:class:`FakeSwitchStream`) of the same
channel: ``sendmsg … playback`` plays the ``::play`` file into that channel's
write leg (~60 ms to first audio, gapless when queued), ``uuid_break <uuid>
all`` silences it (~25 ms), ``uuid_kill`` hangs the channel up.

Each module build's rules from §15 are applied per channel (see
:class:`Channel`): what it plays, what it needs (``send_silence_when_idle=-1``
for cloudfieldcz), and the voxcom hangup deadlock as a detectable condition
(``Channel.stuck``), cured by ``STREAM_BUFFER_SIZE=40``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from pipeswitch.bench.fakeswitch.playout import Playback
from pipeswitch.bench.fakeswitch.records import StreamEvent
from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig
from pipeswitch.transports.esl import (
    EslParser,
    EslProtocolError,
    encode_event_plain,
    encode_message,
)

__all__ = [
    "BREAK_DELAY_S",
    "EVENT_DELAY_S",
    "PLAYBACK_START_S",
    "Channel",
    "EslCommand",
    "FakeSwitchEsl",
    "recommended_variables",
]

# Measured on FreeSWITCH 1.10.12 (doc §14): ::play reaches ESL ~12 ms after the server
# sent the message; playback writes its first frame ~45 ms after sendmsg (59 ms end to end,
# with the 20 ms media tick); uuid_break silences the channel ~24 ms after the command.
EVENT_DELAY_S = 0.012
PLAYBACK_START_S = 0.035
BREAK_DELAY_S = 0.015

DISCONNECT_NOTICE = "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
PLAYBACK_CAPABLE = ("voxcom", "cloudfieldcz")

SendmsgHandler = Callable[["Channel", Mapping[str, str]], Awaitable[str] | str]


def recommended_variables(build: Playback) -> dict[str, str]:
    """Channel variables each build's dialplan must set (doc §15; freeswitch-conf)."""
    v = {"STREAM_MESSAGE_DEFLATE": "true", "STREAM_HEART_BEAT": "0"}
    if build == "voxcom":
        v["STREAM_BUFFER_SIZE"] = "40"  # the write buffer then holds the 20 ms lead
    elif build == "cloudfieldcz":
        v["send_silence_when_idle"] = "-1"  # WRITE_REPLACE only runs when FS writes
    return v


@dataclass(slots=True)
class EslCommand:
    """One command a client sent (for tests and the bench)."""

    t: float
    conn: int
    command: str
    headers: dict[str, str]


@dataclass
class Channel:
    """One emulated channel: its variables, its mod_audio_stream, what ESL did to it.

    ``hazards`` lists §15 rule violations seen on this channel (human-readable);
    ``stuck`` is the voxcom deadlock: the hangup never completes, the WebSocket
    never closes and no CHANNEL_HANGUP_COMPLETE is fired.
    """

    uuid: str
    build: Playback = "community"
    rate: int = 8000
    variables: dict[str, str] = field(default_factory=dict)
    stream: FakeSwitchStream | None = None
    state: str = "CS_EXECUTE"
    hangup_cause: str | None = None
    stuck: bool = False
    hazards: list[str] = field(default_factory=list)
    played_files: list[tuple[float, str]] = field(default_factory=list)
    breaks: list[float] = field(default_factory=list)
    transfers: list[tuple[str, str, str]] = field(default_factory=list)
    dtmf_sent: list[str] = field(default_factory=list)
    _queue: asyncio.Queue[tuple[int, str]] = field(default_factory=asyncio.Queue)
    _generation: int = 0
    _player: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        """Not hung up (a stuck channel is still up)."""
        return self.state != "CS_DESTROY"

    @property
    def locatable(self) -> bool:
        """What ``uuid_*`` commands can still reach: on a real switch a channel whose
        hangup has begun cannot be locked any more, so ``uuid_exists`` says false and
        ``uuid_kill`` says "No such channel" - a stuck voxcom channel included, though
        ``show channels`` still lists it (seen on FreeSWITCH 1.10.12)."""
        return self.up and self.hangup_cause is None

    def hazard(self, text: str) -> None:
        """Record a §15 rule violation once."""
        if text not in self.hazards:
            self.hazards.append(text)
            logger.warning("fakeswitch {}: {}", self.uuid, text)


class _Conn:
    """One ESL client connection."""

    def __init__(self, cid: int, writer: asyncio.StreamWriter) -> None:
        self.id = cid
        self.writer = writer
        self.authed = False
        self.events: set[str] = set()
        self.subclasses: set[str] = set()
        self.all_events = False
        self.filters: list[tuple[str, str]] = []

    def wants(self, name: str, subclass: str | None, headers: Mapping[str, str]) -> bool:
        if not self.authed:
            return False
        if self.filters and not any(headers.get(k) == v for k, v in self.filters):
            return False  # with filters set, an event must match one of them
        if self.all_events:
            return True
        if name == "CUSTOM":
            return "CUSTOM" in self.events and (subclass in self.subclasses)
        return name in self.events

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)


class FakeSwitchEsl:
    """The emulated switch's event socket plus its channels.

    ``await start()`` listens (port 0 = any); ``start_call(config)`` places a
    channel with a mod_audio_stream on it; ``inject_dtmf``/``caller_hangup``
    act as the caller; ``drop_clients()``/``outage()`` emulate a lost ESL.
    """

    def __init__(
        self,
        *,
        password: str = "ClueCon",
        host: str = "127.0.0.1",
        port: int = 0,
        event_delay_s: float = EVENT_DELAY_S,
        playback_start_s: float = PLAYBACK_START_S,
        break_delay_s: float = BREAK_DELAY_S,
    ) -> None:
        self.password = password
        self.host = host
        self.port = port
        self.event_delay_s = event_delay_s
        self.playback_start_s = playback_start_s
        self.break_delay_s = break_delay_s
        self.channels: dict[str, Channel] = {}
        self.commands: list[EslCommand] = []
        self.sendmsg_handlers: dict[str, SendmsgHandler] = {}
        self.auth_failures = 0
        self._server: asyncio.Server | None = None
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ server

    async def start(self) -> None:
        """Listen for ESL clients."""
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Hang up every channel, drop clients, stop listening."""
        for ch in list(self.channels.values()):
            if ch.stream is not None:
                await ch.stream.aclose()
            if ch._player is not None:
                ch._player.cancel()
        self.drop_clients()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for t in list(self._tasks):
            t.cancel()

    async def __aenter__(self) -> FakeSwitchEsl:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def clients(self) -> int:
        """Authenticated ESL connections."""
        return sum(1 for c in self._conns.values() if c.authed)

    def drop_clients(self) -> None:
        """Close every ESL connection abruptly (the switch restarted, a network blip)."""
        for c in list(self._conns.values()):
            c.writer.close()
        self._conns.clear()

    async def outage(self, secs: float) -> None:
        """ESL unreachable for ``secs``: connections dropped and refused, then back."""
        assert self._server is not None
        self._server.close()
        self.drop_clients()
        await self._server.wait_closed()
        await asyncio.sleep(secs)
        self._server = await asyncio.start_server(self._client, self.host, self.port)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(next(self._ids), writer)
        self._conns[conn.id] = conn
        conn.send(encode_message({"Content-Type": "auth/request"}))
        parser = EslParser(commands=True)
        try:
            while not writer.is_closing():
                data = await reader.read(65536)
                if not data:
                    break
                try:
                    msgs = parser.feed(data)
                except EslProtocolError as exc:
                    logger.warning("fakeswitch ESL: client sent garbage ({}); closing", exc)
                    break
                for m in msgs:
                    await self._command(conn, m.command, m.headers, m.body)
        except (ConnectionError, OSError):
            pass
        finally:
            self._conns.pop(conn.id, None)
            writer.close()

    # ------------------------------------------------------------------ commands

    def _reply(self, conn: _Conn, text: str, **extra: str) -> None:
        conn.send(encode_message({"Content-Type": "command/reply", "Reply-Text": text, **extra}))

    async def _command(
        self, conn: _Conn, cmd_line: str, headers: Mapping[str, str], body: bytes
    ) -> None:
        rest = dict(headers)
        logged = "auth ********" if cmd_line.startswith("auth ") else cmd_line
        self.commands.append(EslCommand(time.monotonic(), conn.id, logged, rest))
        verb, _, args = cmd_line.partition(" ")
        if verb == "auth":
            if args == self.password:
                conn.authed = True
                self._reply(conn, "+OK accepted")
            else:
                self.auth_failures += 1
                self._reply(conn, "-ERR invalid")
                conn.send(
                    encode_message({"Content-Type": "text/disconnect-notice"}, DISCONNECT_NOTICE)
                )
                conn.writer.close()
            return
        if not conn.authed:
            self._reply(conn, "-ERR command not found")
            return
        if verb == "event":
            fmt, _, names = args.partition(" ")
            if fmt != "plain":
                self._reply(conn, f"-ERR format {fmt} not emulated")
                return
            custom = False
            for tok in names.split():
                if tok == "ALL":
                    conn.all_events = True
                elif tok == "CUSTOM":
                    custom = True
                    conn.events.add(tok)
                elif custom and "::" in tok:
                    conn.subclasses.add(tok)
                else:
                    conn.events.add(tok)
            self._reply(conn, "+OK event listener enabled plain")
        elif verb == "filter":
            parts = args.split(" ", 2)
            if parts[0] == "delete" and len(parts) == 3:
                if (parts[1], parts[2]) in conn.filters:
                    conn.filters.remove((parts[1], parts[2]))
                self._reply(conn, f"+OK filter deleted. [{parts[1]}]=[{parts[2]}]")
            elif len(parts) >= 2 and parts[0] != "delete":
                value = args.split(" ", 1)[1]
                conn.filters.append((parts[0], value))
                self._reply(conn, f"+OK filter added. [{parts[0]}]=[{value}]")
            else:
                self._reply(conn, "-ERR invalid syntax")
        elif verb in ("noevents", "nixevent", "linger", "nolinger", "log", "nolog"):
            self._reply(conn, "+OK")
        elif verb == "exit":
            self._reply(conn, "+OK bye")
            conn.send(encode_message({"Content-Type": "text/disconnect-notice"}, DISCONNECT_NOTICE))
            conn.writer.close()
        elif verb == "api":
            result = await self.execute_api(args)
            conn.send(encode_message({"Content-Type": "api/response"}, result))
        elif verb == "bgapi":
            job = rest.get("Job-UUID") or str(uuidlib.uuid4())
            self._reply(conn, f"+OK Job-UUID: {job}", **{"Job-UUID": job})
            self._spawn(self._bgapi(args, job))
        elif verb == "sendmsg":
            reply = await self._sendmsg(args.strip(), rest)
            self._reply(conn, reply)
        else:
            self._reply(conn, "-ERR command not found")

    async def _bgapi(self, args: str, job: str) -> None:
        result = await self.execute_api(args)
        cmd, _, arg = args.partition(" ")
        self.fire(
            "BACKGROUND_JOB",
            {"Job-UUID": job, "Job-Command": cmd, "Job-Command-Arg": arg},
            body=result,
        )

    async def _sendmsg(self, call_uuid: str, h: Mapping[str, str]) -> str:
        ch = self.channels.get(call_uuid)
        if ch is None or not ch.locatable:
            return f"-ERR invalid session id [{call_uuid}]"
        command = h.get("call-command", "")
        if command == "execute":
            app = h.get("execute-app-name", "")
            arg = h.get("execute-app-arg", "")
            if app == "playback":
                ch._queue.put_nowait((ch._generation, arg))
                if ch._player is None:
                    ch._player = asyncio.create_task(self._player(ch))
                return "+OK"
            if app == "hangup":
                self._spawn(self.hangup(ch.uuid, arg or "NORMAL_CLEARING"))
                return "+OK"
            if app == "set" and "=" in arg:
                k, _, v = arg.partition("=")
                ch.variables[k] = v
                return "+OK"
            return "+OK"  # other applications are accepted and ignored
        if command == "hangup":
            self._spawn(self.hangup(ch.uuid, h.get("hangup-cause", "NORMAL_CLEARING")))
            return "+OK"
        handler = self.sendmsg_handlers.get(command)
        if handler is not None:
            res = handler(ch, h)
            return await res if not isinstance(res, str) else res
        return f"-ERR call-command {command!r} not emulated"

    async def execute_api(self, line: str) -> str:
        """Run one API command as ``fs_cli``/``api`` would; returns the reply text."""
        cmd, _, args = line.strip().partition(" ")
        argv = args.split()
        if cmd == "status":
            return "UP 0 years, 0 days\nFreeSWITCH (Version 1.10.12 fakeswitch) is ready\n"
        if cmd == "uuid_exists":
            ch = self.channels.get(argv[0]) if argv else None
            return "true" if ch is not None and ch.locatable else "false"
        if cmd not in _CHANNEL_APIS:
            return f"-ERR {cmd} Command not found!\n"
        if not argv:
            return f"-USAGE: {cmd} <uuid> ...\n"
        ch = self.channels.get(argv[0])
        if ch is None or not ch.locatable:
            return "-ERR No such channel!\n"
        if cmd == "uuid_break":
            self.break_playback(ch, all_=len(argv) > 1 and argv[1] == "all")
            return "+OK\n"
        if cmd == "uuid_kill":
            self._spawn(self.hangup(ch.uuid, argv[1] if len(argv) > 1 else "NORMAL_CLEARING"))
            return "+OK\n"
        if cmd == "uuid_transfer":
            rest = [a for a in argv[1:] if a not in ("-bleg", "-both")]
            if not rest:
                return "-USAGE: <uuid> [-bleg|-both] <dest-exten> [<dialplan>] [<context>]\n"
            dest = rest[0]
            dialplan = rest[1] if len(rest) > 1 else "XML"
            context = rest[2] if len(rest) > 2 else "default"
            ch.transfers.append((dest, dialplan, context))
            return "+OK\n"
        if cmd == "uuid_send_dtmf":
            if len(argv) < 2:
                return "-USAGE: <uuid> <dtmf_data>\n"
            ch.dtmf_sent.append(argv[1])
            return "+OK Success\n"
        if cmd == "uuid_audio_stream":
            return await self._audio_stream(ch, args)
        return f"-ERR {cmd} Command not found!\n"  # pragma: no cover

    async def _audio_stream(self, ch: Channel, args: str) -> str:
        argv = args.split(" ", 5)
        sub = argv[1] if len(argv) > 1 else ""
        st = ch.stream
        if sub == "start":
            if st is not None and st.state.value not in ("closed", "failed"):
                return "-ERR bug already attached\n"
            if len(argv) < 5:
                return "-ERR Invalid arguments\n"
            rate_arg = argv[4].lower().rstrip("k")
            if not rate_arg.isdigit():
                return "-ERR invalid sample rate\n"
            rate = int(rate_arg) * (1000 if argv[4].lower().endswith("k") else 1)
            metadata = argv[5] if len(argv) > 5 else None
            cfg = self._config(ch, argv[2], mix=argv[3], rate=rate, metadata=metadata)
            await self._attach(ch, cfg)
            return "+OK Success\n"
        if st is None:
            return "-ERR no bug\n"
        if sub == "stop":
            text = args.split(" ", 2)[2] if len(args.split(" ", 2)) > 2 else None
            await st.stop(text)
            return "+OK Success\n"
        if sub == "send_text":
            text = args.split(" ", 2)[2] if len(args.split(" ", 2)) > 2 else ""
            return "+OK Success\n" if st.send_text(text) else "-ERR no bug\n"
        if sub == "pause":
            return "+OK Success\n" if st.pause() else "-ERR no bug\n"
        if sub == "resume":
            return "+OK Success\n" if st.resume() else "-ERR no bug\n"
        return "-ERR Invalid arguments\n"

    # ------------------------------------------------------------------ channels

    def new_channel(
        self,
        call_uuid: str | None = None,
        *,
        build: Playback = "community",
        rate: int = 8000,
        variables: Mapping[str, str] | None = None,
    ) -> Channel:
        """A parked channel with no stream yet (the dialplan's ``answer`` + ``park``)."""
        ch = Channel(
            uuid=call_uuid or str(uuidlib.uuid4()),
            build=build,
            rate=rate,
            variables=dict(variables or {}),
        )
        self.channels[ch.uuid] = ch
        return ch

    def _config(
        self, ch: Channel, url: str, *, mix: str = "mono", rate: int, metadata: str | None = None
    ) -> StreamConfig:
        v = ch.variables
        buf = v.get("STREAM_BUFFER_SIZE", "20")
        return StreamConfig(
            url=url,
            uuid=ch.uuid,
            mix=mix,  # type: ignore[arg-type]
            rate=rate,
            metadata=metadata,
            buffer_ms=int(buf) if buf.isdigit() else 20,
            offer_deflate=v.get("STREAM_MESSAGE_DEFLATE", "true") != "true",
            playback=ch.build,
        )

    async def start_call(
        self,
        url: str,
        *,
        call_uuid: str | None = None,
        build: Playback = "community",
        rate: int = 8000,
        variables: Mapping[str, str] | None = None,
        **config: Any,
    ) -> Channel:
        """A channel plus ``uuid_audio_stream <uuid> start <url> mono <rate>`` on it."""
        ch = self.new_channel(call_uuid, build=build, rate=rate, variables=variables)
        cfg = self._config(ch, url, rate=rate)
        for k, val in config.items():
            setattr(cfg, k, val)
        await self._attach(ch, cfg)
        return ch

    async def _attach(self, ch: Channel, cfg: StreamConfig) -> None:
        stream = FakeSwitchStream(cfg, on_event=lambda ev: self._on_stream_event(ch, ev))
        ch.stream = stream
        self._apply_build_rules(ch)
        await stream.start()

    def _apply_build_rules(self, ch: Channel) -> None:
        """§15: what each build needs from the channel."""
        st = ch.stream
        assert st is not None
        silence = ch.variables.get("send_silence_when_idle")
        if ch.build == "cloudfieldcz" and silence != "-1":
            # WRITE_REPLACE only runs when FreeSWITCH writes a frame to the channel.
            st.playout.gated = True
            ch.hazard("cloudfieldcz without send_silence_when_idle=-1: the stream plays nothing")
        if ch.build == "voxcom" and silence:
            ch.hazard("voxcom with send_silence_when_idle: silence interleaves with the reply")

    def _on_stream_event(self, ch: Channel, ev: StreamEvent) -> None:
        """mod_audio_stream fired a CUSTOM event: ESL clients get it ~12 ms later."""
        headers = self._channel_headers(ch)
        headers.update({"Event-Name": "CUSTOM", "Event-Subclass": ev.name})
        loop = asyncio.get_running_loop()
        loop.call_later(self.event_delay_s, lambda: self.fire("CUSTOM", headers, body=ev.raw))

    def _channel_headers(self, ch: Channel) -> dict[str, str]:
        return {
            "Unique-ID": ch.uuid,
            "Channel-State": ch.state,
            "Channel-Read-Codec-Name": "PCMU",
            "Channel-Read-Codec-Rate": str(ch.rate),
            "Caller-Caller-ID-Number": "1000",
        }

    def fire(self, name: str, headers: Mapping[str, str], body: str = "") -> None:
        """Send an event to every client subscribed to it."""
        h = {"Event-Name": name, **headers}
        h.setdefault("Core-UUID", "fakeswitch")
        h.setdefault("Event-Date-Timestamp", str(int(time.time() * 1e6)))
        data = encode_event_plain(h, body)
        sub = h.get("Event-Subclass")
        for c in list(self._conns.values()):
            if c.wants(name, sub, h):
                c.send(data)

    # ------------------------------------------------------------------ playback

    async def _player(self, ch: Channel) -> None:
        """The channel's queue of ``playback`` applications, executed in order."""
        while True:
            gen, path = await ch._queue.get()
            st = ch.stream
            if gen != ch._generation or st is None or not ch.up:
                continue  # dropped by uuid_break all
            if ch.build == "cloudfieldcz" and st.playout.write_active:
                ch.hazard(
                    "cloudfieldcz: audio played over ESL while streaming is replaced by silence"
                )
                continue
            if ch.build == "voxcom" and st.state.value == "open":
                ch.hazard("voxcom: ESL playback interleaves with the stream's own writer")
            if not st.playing:
                # A playback start on an idle channel: file open, first frame write.
                await asyncio.sleep(self.playback_start_s)
                if gen != ch._generation:
                    continue
            try:
                st.play_file(path)
            except (OSError, ValueError) as exc:
                logger.error("fakeswitch {}: playback({}) failed: {}", ch.uuid, path, exc)
                continue
            ch.played_files.append((time.monotonic(), path))

    def break_playback(self, ch: Channel, *, all_: bool = True) -> None:
        """``uuid_break``: queued files dropped at once, the channel silent ~25 ms later."""
        ch.breaks.append(time.monotonic())
        ch._generation += 1
        while not ch._queue.empty():
            ch._queue.get_nowait()
        st = ch.stream
        if st is not None:
            asyncio.get_running_loop().call_later(self.break_delay_s, st.break_playback)

    # ------------------------------------------------------------------ caller actions

    def inject_dtmf(self, call_uuid: str, digit: str, duration_ms: int = 100) -> None:
        """The caller pressed a key (RFC 2833): a DTMF event, as FreeSWITCH fires it."""
        ch = self.channels[call_uuid]
        h = self._channel_headers(ch)
        h.update({"DTMF-Digit": digit, "DTMF-Duration": str(duration_ms * 8), "DTMF-Source": "RTP"})
        self.fire("DTMF", h)

    async def caller_hangup(
        self, call_uuid: str, cause: str = "NORMAL_CLEARING", *, close_stream: bool = True
    ) -> Channel:
        """The caller hung up. ``close_stream=False``: the WebSocket lingers (a stuck
        module or a lost FIN) and only the ESL event tells the server."""
        return await self.hangup(call_uuid, cause, close_stream=close_stream)

    async def kill_switch_channel(self, call_uuid: str) -> Channel:
        """The remedy for a stuck channel on a real switch (kill -9): its TCP connection
        goes away without a CLOSE or any event."""
        ch = self.channels[call_uuid]
        st = ch.stream
        if st is not None:
            st._abort()
            await st.aclose()
        ch.stuck = False
        ch.state = "CS_DESTROY"
        return ch

    async def hangup(
        self, call_uuid: str, cause: str = "NORMAL_CLEARING", *, close_stream: bool = True
    ) -> Channel:
        """Hang the channel up: media bug cleanup (WebSocket CLOSE), then HANGUP_COMPLETE.

        CHANNEL_HANGUP is fired first, as ``switch_channel_perform_hangup`` does before
        the state machine closes the media bugs. voxcom with bot audio blocking
        ``injectRawAudio`` at that moment deadlocks (§15): the channel is marked
        ``stuck`` and nothing else happens (on a real switch: CHANNEL_HANGUP 1-17 ms
        after ``uuid_kill``, then no CHANNEL_HANGUP_COMPLETE, ever).
        """
        ch = self.channels[call_uuid]
        if not ch.up or ch.stuck or ch.hangup_cause is not None:
            return ch
        st = ch.stream
        ch.state = "CS_HANGUP"
        ch.hangup_cause = cause
        ch._generation += 1
        h = self._channel_headers(ch)
        h.update({"Hangup-Cause": cause, "Channel-State": "CS_HANGUP"})
        self.fire("CHANNEL_HANGUP", h)
        if (
            st is not None
            and ch.build == "voxcom"
            and st.config.voxcom_blocking_inject
            and st.hangup_would_deadlock
        ):
            ch.stuck = True
            ch.state = "CS_EXECUTE"
            # The fork's write thread stopped at hangup: the blocked inject never gets
            # space, libwsc's thread never reads or sends again, no caller audio is read.
            st.playout.gated = True
            st.pause()
            ch.hazard(
                "voxcom hangup deadlock: injectRawAudio blocked libwsc's thread with bot audio "
                "queued; the channel never hangs up (set STREAM_BUFFER_SIZE=40, keep the lead small)"
            )
            return ch
        if st is not None and close_stream:
            await st.hangup()
        elif st is not None:
            st.pause()  # no more caller audio, but the socket stays open
        if ch._player is not None:
            ch._player.cancel()
            ch._player = None
        ch.state = "CS_DESTROY"
        h = self._channel_headers(ch)
        h.update({"Hangup-Cause": cause, "Channel-State": "CS_DESTROY"})
        self.fire("CHANNEL_HANGUP_COMPLETE", h)
        return ch


_CHANNEL_APIS = frozenset(
    {
        "uuid_break",
        "uuid_kill",
        "uuid_transfer",
        "uuid_send_dtmf",
        "uuid_audio_stream",
    }
)
