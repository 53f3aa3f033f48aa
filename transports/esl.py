"""FreeSWITCH Event Socket (ESL): a sans-I/O codec and one shared asyncio inbound client.

Why our own and not ``genesis``: genesis pulls in a web stack and mixes parsing
with I/O; the plain-text ESL protocol is small (header blocks, optional
``Content-Length`` bodies, URL-encoded event headers), and a sans-I/O core
(bytes in, messages out, as aiortc and h11 do) is testable with byte fixtures,
including truncated and garbled input, without a socket or a switch.

Wire format (``mod_event_socket``): every message is a block of ``Name: value``
lines ended by an empty line; ``Content-Length`` announces a body of exactly
that many bytes. ``Content-Type`` says what it is: ``auth/request``,
``command/reply`` (``Reply-Text: +OK ...``/``-ERR ...``), ``api/response`` (the
body is the reply), ``text/event-plain`` (the body is itself a header block
with URL-encoded values, optionally followed by its own ``Content-Length`` body)
and ``text/disconnect-notice``. Replies come strictly in command order.

:class:`EslClient` is one connection per server process, shared by all calls
(not a socket per call): it authenticates, subscribes with ``event plain`` to
DTMF, hangup, bridge and ``CUSTOM mod_audio_stream::*``, filters the stream to
its own calls (``filter Unique-ID <uuid>``: a busy switch fires events for every
channel), routes events to per-call subscribers, reconnects with backoff, and fails commands fast with
:class:`CallControlUnavailable` while down, so a call degrades but its audio
never waits. The password is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from loguru import logger

from pipeswitch.transports.call_control import (
    EVENT_BACKGROUND_JOB,
    EVENT_CHANNEL_BRIDGE,
    EVENT_CHANNEL_HANGUP,
    EVENT_CHANNEL_HANGUP_COMPLETE,
    EVENT_CHANNEL_UNBRIDGE,
    EVENT_CUSTOM,
    EVENT_DTMF,
    MAS_SUBCLASSES,
    CallControlError,
    CallControlUnavailable,
    CallEvent,
    CallEventCallback,
    CommandFailed,
    Unsubscribe,
)

__all__ = [
    "DEFAULT_EVENTS",
    "EslClient",
    "EslEvent",
    "EslMessage",
    "EslParser",
    "EslProtocolError",
    "encode_command",
    "encode_event_plain",
    "encode_message",
    "parse_event_plain",
]

# Limits: a header block or body beyond these is not FreeSWITCH talking.
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024

CT_AUTH_REQUEST = "auth/request"
CT_COMMAND_REPLY = "command/reply"
CT_API_RESPONSE = "api/response"
CT_EVENT_PLAIN = "text/event-plain"
CT_DISCONNECT = "text/disconnect-notice"
CT_RUDE_REJECTION = "text/rude-rejection"

DEFAULT_EVENTS = (
    EVENT_DTMF,
    EVENT_CHANNEL_HANGUP,
    EVENT_CHANNEL_HANGUP_COMPLETE,
    EVENT_CHANNEL_BRIDGE,
    EVENT_CHANNEL_UNBRIDGE,
    EVENT_BACKGROUND_JOB,
    EVENT_CUSTOM,
    *MAS_SUBCLASSES,
)


class EslProtocolError(ValueError):
    """The byte stream is not ESL (garbage, a bad length, an oversized block)."""


# ---------------------------------------------------------------------------------- codec


@dataclass(frozen=True, slots=True)
class EslMessage:
    """One message from the switch: its header block and its body (bytes)."""

    headers: Mapping[str, str]
    body: bytes = b""
    command: str = ""  # the command line (client-to-switch messages only)

    @property
    def content_type(self) -> str:
        """``Content-Type`` (empty when absent)."""
        return self.headers.get("Content-Type", "")

    @property
    def reply_text(self) -> str:
        """``Reply-Text`` of a command/reply."""
        return self.headers.get("Reply-Text", "")

    @property
    def ok(self) -> bool:
        """A command/reply (or api/response body) that does not start with ``-ERR``."""
        if self.content_type == CT_API_RESPONSE:
            return not self.body.startswith(b"-ERR")
        return not self.reply_text.startswith("-ERR")


@dataclass(frozen=True, slots=True)
class EslEvent:
    """A ``text/event-plain`` event: URL-decoded headers and the event's own body."""

    headers: Mapping[str, str]
    body: str = ""

    @property
    def name(self) -> str:
        """``Event-Name``."""
        return self.headers.get("Event-Name", "")

    @property
    def subclass(self) -> str | None:
        """``Event-Subclass`` of CUSTOM events."""
        return self.headers.get("Event-Subclass")

    @property
    def unique_id(self) -> str | None:
        """``Unique-ID``: the channel the event is about."""
        return self.headers.get("Unique-ID")


def _parse_header_block(block: bytes, *, decode_values: bool) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw in block.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or not name.strip() or b" " in name.strip():
            raise EslProtocolError(f"not an ESL header line: {line[:60]!r}")
        try:
            key = name.strip().decode("ascii")
            text = value.lstrip(b" ").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EslProtocolError(f"header is not text: {line[:60]!r}") from exc
        # Repeated names keep the first value, as FreeSWITCH's own parser does.
        headers.setdefault(key, unquote(text) if decode_values else text)
    return headers


def _content_length(headers: Mapping[str, str]) -> int:
    raw = headers.get("Content-Length")
    if raw is None:
        return 0
    raw = raw.strip()
    if not raw.isdigit():
        raise EslProtocolError(f"bad Content-Length {raw[:20]!r}")
    n = int(raw)
    if n > MAX_BODY_BYTES:
        raise EslProtocolError(f"Content-Length {n} exceeds {MAX_BODY_BYTES}")
    return n


class EslParser:
    """Incremental parser: ``feed(bytes)`` returns the complete messages so far.

    A truncated message waits for more bytes; :meth:`eof` raises when the stream
    ended inside one. Garbage raises :class:`EslProtocolError` (the connection is
    then unusable: replies are matched by order, so one lost message desyncs it).
    """

    def __init__(self, *, commands: bool = False) -> None:
        # commands=True parses the client's side: each block starts with a command line.
        self._commands = commands
        self._buf = bytearray()
        self._headers: dict[str, str] | None = None
        self._command = ""
        self._need = 0

    def feed(self, data: bytes) -> list[EslMessage]:
        """Add bytes; return every message they complete."""
        self._buf += data
        out: list[EslMessage] = []
        while True:
            if self._headers is None:
                # Stray blank lines between messages are tolerated.
                while self._buf[:1] == b"\n" or self._buf[:2] == b"\r\n":
                    del self._buf[: 1 if self._buf[:1] == b"\n" else 2]
                end = self._buf.find(b"\n\n")
                if end < 0:
                    if len(self._buf) > MAX_HEADER_BYTES:
                        raise EslProtocolError("header block too long")
                    nl = self._buf.find(b"\n")
                    if nl > 0 and not self._commands:  # fail early on a garbage first line
                        _parse_header_block(bytes(self._buf[:nl]), decode_values=False)
                    return out
                block = bytes(self._buf[:end])
                del self._buf[: end + 2]
                if self._commands:
                    line, _, block = block.partition(b"\n")
                    try:
                        self._command = line.rstrip(b"\r").decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise EslProtocolError(f"command is not text: {line[:60]!r}") from exc
                    headers = _parse_header_block(block, decode_values=False)
                elif not (headers := _parse_header_block(block, decode_values=False)):
                    continue
                self._headers, self._need = headers, _content_length(headers)
            if len(self._buf) < self._need:
                return out
            body = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            out.append(EslMessage(self._headers, body, self._command))
            self._headers, self._need, self._command = None, 0, ""

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete message."""
        return len(self._buf)

    def eof(self) -> None:
        """The stream ended: raise if it ended inside a message."""
        if self._headers is not None or self._buf.strip():
            raise EslProtocolError(
                f"stream ended inside a message ({len(self._buf)} bytes, need {self._need})"
            )


def parse_event_plain(body: bytes | str) -> EslEvent:
    """The body of a ``text/event-plain`` message: URL-decoded headers, then its own body."""
    data = body.encode("utf-8") if isinstance(body, str) else body
    end = data.find(b"\n\n")
    block, rest = (data, b"") if end < 0 else (data[:end], data[end + 2 :])
    headers = _parse_header_block(block, decode_values=True)
    if not headers.get("Event-Name"):
        raise EslProtocolError("event without Event-Name")
    n = _content_length(headers)
    if n > len(rest):
        raise EslProtocolError(f"event body truncated ({len(rest)} of {n} bytes)")
    return EslEvent(headers, rest[:n].decode("utf-8", "replace"))


def _check_line(text: str, what: str) -> str:
    if "\n" in text or "\r" in text:
        raise ValueError(f"{what} must be one line (ESL is line-framed): {text[:40]!r}")
    return text


def encode_command(
    command: str, headers: Mapping[str, str] | None = None, body: str | bytes | None = None
) -> bytes:
    """One client command: ``command\\n[Name: value\\n]...\\n`` (+ body with its length).

    Newlines inside the command or a header would let text from a call (a
    transfer target, a digit string) inject commands, so they are refused.
    """
    lines = [_check_line(command, "command")]
    for k, v in (headers or {}).items():
        lines.append(f"{_check_line(k, 'header name')}: {_check_line(str(v), 'header value')}")
    payload = b"" if body is None else body.encode("utf-8") if isinstance(body, str) else body
    if payload:
        lines.append(f"Content-Length: {len(payload)}")
    return ("\n".join(lines) + "\n\n").encode("utf-8") + payload


def encode_message(headers: Mapping[str, str], body: bytes | str = b"") -> bytes:
    """One switch-side message (the emulator's half): header block + optional body."""
    payload = body.encode("utf-8") if isinstance(body, str) else body
    lines = [f"{k}: {v}" for k, v in headers.items() if k != "Content-Length"]
    if payload:
        lines.insert(0, f"Content-Length: {len(payload)}")
    return ("\n".join(lines) + "\n\n").encode("utf-8") + payload


def encode_event_plain(headers: Mapping[str, str], body: str = "") -> bytes:
    """A ``text/event-plain`` message as FreeSWITCH sends it (values URL-encoded)."""
    payload = body.encode("utf-8")
    lines = [f"{k}: {quote(str(v), safe='')}" for k, v in headers.items() if k != "Content-Length"]
    if payload:
        lines.append(f"Content-Length: {len(payload)}")
    inner = ("\n".join(lines) + "\n\n").encode("utf-8") + payload
    return encode_message({"Content-Type": CT_EVENT_PLAIN}, inner)


# ---------------------------------------------------------------------------------- client


@dataclass(slots=True)
class EslStats:
    """What the connection did (for metrics, tests and the bench)."""

    connects: int = 0
    disconnects: int = 0
    auth_failures: int = 0
    commands: int = 0
    failed_fast: int = 0
    events: int = 0
    protocol_errors: int = 0
    connected_at: float | None = None


@dataclass(slots=True)
class _Sub:
    callback: CallEventCallback
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)


class EslClient:
    """One inbound ESL connection shared by every call of this process.

    ``start()`` connects in the background (and keeps reconnecting);
    ``wait_connected()`` waits for the first successful login. Implements
    :class:`~pipeswitch.transports.call_control.CallControl`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8021,
        password: str = "ClueCon",
        *,
        events: tuple[str, ...] = DEFAULT_EVENTS,
        command_timeout: float = 5.0,
        bgapi_timeout: float = 30.0,
        connect_timeout: float = 3.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        filter_calls: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self._password = password
        self.events = events
        self.command_timeout = command_timeout
        self.bgapi_timeout = bgapi_timeout
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.filter_calls = filter_calls
        self.stats = EslStats()
        self.log = logger.bind(esl=f"{host}:{port}")
        self._writer: asyncio.StreamWriter | None = None
        self._ready = False
        self._replies: deque[asyncio.Future[EslMessage]] = deque()
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._subs: dict[str, list[_Sub]] = {}
        # Calls this switch has reported events for (only those can be "ended while away").
        self._seen: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._on_connect: list[Callable[[], Awaitable[None] | None]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        # Calls handed to someone else with uuid_transfer: when their pipeline ends, the
        # channel must not be hung up (CallEventBridge.finish reads this).
        self.handed_over: set[str] = set()

    def __repr__(self) -> str:  # never shows the password
        return f"EslClient({self.host}:{self.port}, connected={self.connected})"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Logged in and subscribed: commands can be sent."""
        return self._ready and self._writer is not None and not self._writer.is_closing()

    async def start(self) -> None:
        """Start connecting (and reconnecting) in the background; returns at once."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name=f"esl-{self.host}:{self.port}")

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a logged-in connection."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop reconnecting and close the connection; pending commands fail."""
        self._closing = True
        task, self._task = self._task, None
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.write(encode_command("exit"))
            self._writer.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._lost("client closed")

    def on_connect(self, hook: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``hook`` after every successful (re)connect."""
        self._on_connect.append(hook)

    async def _run(self) -> None:
        delay = self.backoff_initial
        failures = 0
        while not self._closing:
            try:
                conn = await self._connect()
            except (OSError, TimeoutError, CallControlError, EslProtocolError) as exc:
                failures += 1
                # The first failure of an outage is a warning; the retries are not news.
                level = "WARNING" if failures == 1 else "DEBUG"
                self.log.log(
                    level, "ESL connect failed: {}; retrying (backoff {:.1f}s)", exc, delay
                )
                await self._close_writer()
                await asyncio.sleep(delay)
                delay = min(self.backoff_max, delay * 2)
                continue
            delay, failures = self.backoff_initial, 0
            await self._after_connect()
            reason = await self._read_loop(*conn)
            self._lost(reason)
            await self._close_writer()
            if not self._closing:
                self.log.warning("ESL connection lost ({}); reconnecting", reason)
                await asyncio.sleep(delay)

    async def _connect(self) -> tuple[asyncio.StreamReader, EslParser, list[EslMessage]]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.connect_timeout
        )
        self._writer = writer
        parser = EslParser()
        inbox: deque[EslMessage] = deque()
        deadline = time.monotonic() + self.connect_timeout

        async def next_message() -> EslMessage:
            while not inbox:
                left = deadline - time.monotonic()
                data = await asyncio.wait_for(reader.read(65536), max(0.01, left))
                if not data:
                    raise CallControlUnavailable("switch closed the connection during login")
                inbox.extend(parser.feed(data))
            return inbox.popleft()

        first = await next_message()
        if first.content_type == CT_RUDE_REJECTION:
            raise CallControlUnavailable("switch refused the connection (ACL)")
        if first.content_type != CT_AUTH_REQUEST:
            raise EslProtocolError(f"expected auth/request, got {first.content_type!r}")
        writer.write(encode_command(f"auth {self._password}"))
        reply = await next_message()
        if reply.content_type != CT_COMMAND_REPLY or not reply.ok:
            self.stats.auth_failures += 1
            raise CallControlUnavailable(
                "ESL authentication failed (check PIPESWITCH_ESL_PASSWORD)"
            )
        writer.write(encode_command("event plain " + " ".join(self.events)))
        reply = await next_message()
        if reply.content_type != CT_COMMAND_REPLY or not reply.ok:
            raise CallControlUnavailable(f"event subscription refused: {reply.reply_text}")
        early: list[EslMessage] = []
        if self.filter_calls:
            # Only our calls' events (and our jobs' results) cross the wire: a busy
            # switch fires DTMF and hangups for every channel it has.
            wanted = [("Event-Name", EVENT_BACKGROUND_JOB)]
            wanted += [("Unique-ID", u) for u in self._subs]
            for name, value in wanted:
                writer.write(encode_command(f"filter {name} {value}"))
            for _ in wanted:
                reply = await next_message()
                while reply.content_type == CT_EVENT_PLAIN:  # events flow meanwhile
                    early.append(reply)
                    reply = await next_message()
                if not reply.ok:
                    raise CallControlUnavailable(f"event filter refused: {reply.reply_text}")
        self._ready = True
        self._connected.set()
        self.stats.connects += 1
        self.stats.connected_at = time.monotonic()
        self.log.info("ESL connected to {}:{}", self.host, self.port)
        # Events may already have arrived behind the subscription's reply.
        return reader, parser, early + list(inbox)

    async def _after_connect(self) -> None:
        for hook in self._on_connect:
            try:
                res = hook()
                if inspect.isawaitable(res):
                    self._spawn(res)
            except Exception as exc:
                self.log.warning("ESL on-connect hook failed: {}", exc)
        # Calls that ended while we were away never get their hangup event: ask.
        for call_uuid in list(self._subs):
            self._spawn(self._check_alive(call_uuid))

    async def _learn(self, call_uuid: str) -> None:
        with contextlib.suppress(CallControlError):
            if (await self.api(f"uuid_exists {call_uuid}")).strip() == "true":
                self._seen.add(call_uuid)

    async def _check_alive(self, call_uuid: str) -> None:
        try:
            alive = await self.api(f"uuid_exists {call_uuid}")
        except CallControlError:
            return
        if alive.strip() == "true":
            self._seen.add(call_uuid)
        elif alive.strip() == "false":
            if call_uuid not in self._seen:
                # This switch never reported the call: it is on another FreeSWITCH (a
                # fleet), or its events have not come yet. Its socket close ends it.
                self.log.debug("call {} is not on this switch; not ending it", call_uuid)
                return
            self.log.info("call {} ended while ESL was down", call_uuid)
            self._dispatch(
                CallEvent(
                    name=EVENT_CHANNEL_HANGUP_COMPLETE,
                    call_uuid=call_uuid,
                    headers={"Hangup-Cause": "UNKNOWN", "X-Pipeswitch-Synthesized": "true"},
                )
            )

    async def _read_loop(
        self, reader: asyncio.StreamReader, parser: EslParser, early: list[EslMessage]
    ) -> str:
        reason = self._handle(early)
        while reason is None:
            try:
                data = await reader.read(65536)
            except OSError as exc:
                return f"read failed: {exc}"
            if not data:
                try:
                    parser.eof()
                except EslProtocolError as exc:
                    return f"EOF inside a message: {exc}"
                return "switch closed the connection"
            try:
                msgs = parser.feed(data)
            except EslProtocolError as exc:
                self.stats.protocol_errors += 1
                self.log.error("ESL protocol error, dropping the connection: {}", exc)
                return f"protocol error: {exc}"
            reason = self._handle(msgs)
        return reason

    def _handle(self, msgs: list[EslMessage]) -> str | None:
        """Route messages; returns why the connection is over, or None."""
        for msg in msgs:
            ct = msg.content_type
            if ct in (CT_COMMAND_REPLY, CT_API_RESPONSE):
                self._on_reply(msg)
            elif ct == CT_EVENT_PLAIN:
                self._on_event(msg)
            elif ct in (CT_DISCONNECT, CT_RUDE_REJECTION):
                return "disconnect notice"
            # log/data and anything else: not subscribed, ignored
        return None

    def _on_reply(self, msg: EslMessage) -> None:
        if not self._replies:
            self.log.warning("ESL reply with no command waiting: {}", msg.reply_text[:80])
            return
        fut = self._replies.popleft()
        if not fut.done():  # a timed-out command still owns its slot in the order
            fut.set_result(msg)

    def _on_event(self, msg: EslMessage) -> None:
        try:
            ev = parse_event_plain(msg.body)
        except EslProtocolError as exc:
            self.stats.protocol_errors += 1
            self.log.warning("ESL event unreadable, skipped: {}", exc)
            return
        self.stats.events += 1
        if ev.name == EVENT_BACKGROUND_JOB:
            job = self._jobs.pop(ev.headers.get("Job-UUID", ""), None)
            if job is not None and not job.done():
                job.set_result(ev.body)
            return
        call_uuid = ev.unique_id
        if not call_uuid or call_uuid not in self._subs:
            return
        self._dispatch(
            CallEvent(
                name=ev.name,
                call_uuid=call_uuid,
                headers=ev.headers,
                body=ev.body,
                subclass=ev.subclass,
            )
        )

    def _dispatch(self, ev: CallEvent) -> None:
        subs = self._subs.get(ev.call_uuid)
        if subs and ev.headers.get("X-Pipeswitch-Synthesized") != "true":
            self._seen.add(ev.call_uuid)
        for sub in list(subs or ()):
            try:
                res = sub.callback(ev)
            except Exception as exc:
                self.log.bind(call=ev.call_uuid).warning("event handler failed: {}", exc)
                continue
            if inspect.isawaitable(res):
                self._spawn(res, sub.tasks)

    def _spawn(self, aw: Awaitable[Any], keep: set[asyncio.Task[Any]] | None = None) -> None:
        async def guarded() -> None:
            try:
                await aw
            except Exception as exc:
                self.log.warning("ESL background work failed: {}", exc)

        task = asyncio.ensure_future(guarded())
        bag = keep if keep is not None else self._bg
        bag.add(task)
        task.add_done_callback(bag.discard)

    def _lost(self, reason: str) -> None:
        if self._ready:
            self.stats.disconnects += 1
        self._ready = False
        self._connected.clear()
        err = CallControlUnavailable(f"ESL connection lost: {reason}")
        while self._replies:
            fut = self._replies.popleft()
            if not fut.done():
                fut.set_exception(err)
        jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            if not job.done():
                job.set_exception(err)

    async def _close_writer(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 0.5)

    # -- commands --------------------------------------------------------------------------

    def _send(
        self, command: str, headers: Mapping[str, str] | None = None, body: str | None = None
    ) -> asyncio.Future[EslMessage]:
        """Write one command now (order preserved) and return the future of its reply."""
        data = encode_command(command, headers, body)
        if not self.connected:
            self.stats.failed_fast += 1
            raise CallControlUnavailable(
                f"FreeSWITCH event socket {self.host}:{self.port} is not connected"
            )
        assert self._writer is not None
        fut: asyncio.Future[EslMessage] = asyncio.get_running_loop().create_future()
        self._replies.append(fut)
        self._writer.write(data)
        self.stats.commands += 1
        return fut

    async def _command(
        self, command: str, headers: Mapping[str, str] | None = None, body: str | None = None
    ) -> EslMessage:
        fut = self._send(command, headers, body)
        try:
            msg = await asyncio.wait_for(asyncio.shield(fut), self.command_timeout)
        except TimeoutError:
            fut.cancel()
            raise CallControlError(
                f"{command.split(' ', 1)[0]} timed out after {self.command_timeout}s"
            ) from None
        if not msg.ok:
            reply = msg.reply_text or msg.body.decode("utf-8", "replace").strip()
            raise CommandFailed(command, reply)
        return msg

    async def api(self, cmd: str) -> str:
        """``api <cmd>``: the reply body (``-ERR`` raises :class:`CommandFailed`)."""
        msg = await self._command(f"api {cmd}")
        return msg.body.decode("utf-8", "replace")

    async def bgapi(self, cmd: str) -> str:
        """``bgapi <cmd>`` with our own Job-UUID; returns the BACKGROUND_JOB body."""
        job_uuid = str(uuidlib.uuid4())
        job: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._jobs[job_uuid] = job  # before sending: the job event may beat the reply
        try:
            await self._command(f"bgapi {cmd}", {"Job-UUID": job_uuid})
            result = await asyncio.wait_for(job, self.bgapi_timeout)
        except BaseException:
            self._jobs.pop(job_uuid, None)
            raise
        if result.startswith("-ERR"):
            raise CommandFailed(cmd, result.strip())
        return result

    async def sendmsg(
        self, call_uuid: str, headers: Mapping[str, str], body: str | None = None
    ) -> None:
        """``sendmsg <uuid>`` with the given headers (and body)."""
        await self._command(f"sendmsg {_word(call_uuid, 'call uuid')}", headers, body)

    async def break_playback(self, call_uuid: str) -> None:
        """``uuid_break <uuid> all`` as an ``api`` (it returns at once; ~25 ms to silence)."""
        await self.api(f"uuid_break {call_uuid} all")

    async def play_file(self, call_uuid: str, path: str) -> None:
        """Queue ``playback <path>`` on the channel (gapless, in order)."""
        await self.sendmsg(
            call_uuid,
            {
                "call-command": "execute",
                "execute-app-name": "playback",
                "execute-app-arg": path,
                "event-lock": "true",
            },
        )

    async def hangup(self, call_uuid: str, cause: str = "NORMAL_CLEARING") -> None:
        """``bgapi uuid_kill <uuid> <cause>``."""
        await self.bgapi(f"uuid_kill {call_uuid} {_word(cause, 'cause')}")

    async def transfer(
        self,
        call_uuid: str,
        destination: str,
        dialplan: str = "XML",
        context: str = "default",
        *,
        hand_over: bool = True,
    ) -> None:
        """``bgapi uuid_transfer <uuid> <dest> <dialplan> <context>``.

        ``hand_over=False`` is a take-back (the caller returns to the agent): the call is
        ours again, so a later bot-ended hang-up still kills the channel.
        """
        args = " ".join(
            _word(x, n)
            for x, n in ((destination, "destination"), (dialplan, "dialplan"), (context, "context"))
        )
        if hand_over:
            self.handed_over.add(call_uuid)
        else:
            self.handed_over.discard(call_uuid)
        try:
            await self.bgapi(f"uuid_transfer {call_uuid} {args}")
        except BaseException:
            self.handed_over.discard(call_uuid)
            raise

    async def send_dtmf(self, call_uuid: str, digits: str) -> None:
        """``bgapi uuid_send_dtmf <uuid> <digits>`` (digits 0-9 * # A-D, w/W pauses)."""
        if not digits or any(c not in "0123456789*#ABCDabcdwW" for c in digits):
            raise ValueError(f"not DTMF digits: {digits[:20]!r}")
        await self.bgapi(f"uuid_send_dtmf {call_uuid} {digits}")

    # -- events ----------------------------------------------------------------------------

    def subscribe(self, call_uuid: str, callback: CallEventCallback) -> Unsubscribe:
        """Deliver this call's events to ``callback`` (awaitables run as tasks)."""
        sub = _Sub(callback)
        if call_uuid not in self._subs:
            self._filter(f"filter Unique-ID {_word(call_uuid, 'call uuid')}")
            if self.connected:  # learn whether the call is on this switch at all
                self._spawn(self._learn(call_uuid))
        self._subs.setdefault(call_uuid, []).append(sub)

        def unsubscribe() -> None:
            subs = self._subs.get(call_uuid)
            if subs and sub in subs:
                subs.remove(sub)
                if not subs:
                    del self._subs[call_uuid]
                    self._seen.discard(call_uuid)
                    self.handed_over.discard(call_uuid)
                    self._filter(f"filter delete Unique-ID {call_uuid}")

        return unsubscribe

    def _filter(self, command: str) -> None:
        """Add or drop an event filter now, without waiting (re-sent on reconnect)."""
        if not self.filter_calls or not self.connected:
            return
        fut = self._send(command)
        fut.add_done_callback(_ignore_result)


def _ignore_result(fut: asyncio.Future[EslMessage]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a lost connection is handled by the reconnect


def _word(value: str, what: str) -> str:
    """One API argument: no spaces, no line breaks (FreeSWITCH splits on spaces)."""
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} must be one word: {value[:40]!r}")
    return value
