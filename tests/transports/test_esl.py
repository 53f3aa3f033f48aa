"""The sans-I/O ESL codec against byte fixtures shaped like FreeSWITCH's, broken ones included."""

from __future__ import annotations

import pytest

from pipeswitch.transports.esl import (
    EslParser,
    EslProtocolError,
    encode_command,
    encode_event_plain,
    parse_event_plain,
)

AUTH = b"Content-Type: auth/request\n\n"
OK = b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n"
API = b"Content-Type: api/response\nContent-Length: 16\n\n+OK 3 channels\n\n"
# A real CUSTOM mod_audio_stream::play event (values URL-encoded, body after its own length).
PLAY_BODY = b'{"audioDataType":"raw","sampleRate":8000,"seq":3,"file":"/tmp/ab_3.tmp.r8"}'
PLAY_EVENT = (
    b"Event-Name: CUSTOM\n"
    b"Core-UUID: 6b0f\n"
    b"Event-Subclass: mod_audio_stream%3A%3Aplay\n"
    b"Unique-ID: 5fba-1\n"
    b"Caller-Caller-ID-Number: %2B4930123\n"
    b"Content-Length: " + str(len(PLAY_BODY)).encode() + b"\n\n" + PLAY_BODY
)
PLAY = (
    b"Content-Length: "
    + str(len(PLAY_EVENT)).encode()
    + b"\nContent-Type: text/event-plain\n\n"
    + PLAY_EVENT
)
DISCONNECT = (
    b"Content-Type: text/disconnect-notice\nContent-Length: 67\n\n"
    b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
)


def test_a_login_and_an_event_in_one_read() -> None:
    msgs = EslParser().feed(AUTH + OK + API + PLAY + DISCONNECT)
    assert [m.content_type for m in msgs] == [
        "auth/request",
        "command/reply",
        "api/response",
        "text/event-plain",
        "text/disconnect-notice",
    ]
    assert msgs[1].ok and msgs[1].reply_text == "+OK accepted"
    assert msgs[2].body == b"+OK 3 channels\n\n"  # a body may itself contain blank lines
    ev = parse_event_plain(msgs[3].body)
    assert ev.name == "CUSTOM"
    assert ev.subclass == "mod_audio_stream::play"
    assert ev.unique_id == "5fba-1"
    assert ev.headers["Caller-Caller-ID-Number"] == "+4930123"
    assert ev.body == PLAY_BODY.decode()


def test_byte_by_byte_feeding_gives_the_same_messages() -> None:
    stream = AUTH + OK + API + PLAY
    p = EslParser()
    got = []
    for i in range(len(stream)):
        got.extend(p.feed(stream[i : i + 1]))
    assert [m.content_type for m in got] == [
        "auth/request",
        "command/reply",
        "api/response",
        "text/event-plain",
    ]
    assert parse_event_plain(got[3].body).body == PLAY_BODY.decode()
    p.eof()  # ended on a boundary: fine


def test_truncated_body_waits_then_eof_is_an_error() -> None:
    p = EslParser()
    assert p.feed(API[:-5]) == []
    assert p.pending == 11
    with pytest.raises(EslProtocolError, match="ended inside"):
        p.eof()


def test_truncated_header_block_waits_then_eof_is_an_error() -> None:
    p = EslParser()
    assert p.feed(b"Content-Type: command/re") == []
    with pytest.raises(EslProtocolError):
        p.eof()


def test_missing_content_length_reads_the_body_as_headers_and_fails() -> None:
    # An api/response without its length: the body is taken as the next header block.
    broken = b"Content-Type: api/response\n\n-ERR no such channel\n\n"
    p = EslParser()
    with pytest.raises(EslProtocolError, match="not an ESL header"):
        p.feed(broken)


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n",
        b"\x00\xff\xfe garbage\n\n",
        b"Content-Length: -3\n\n",
        b"Content-Length: 12abc\n\n",
        b"Content-Length: 99999999999\n\n",
    ],
)
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(EslProtocolError):
        EslParser().feed(garbage)


def test_an_endless_header_block_is_refused() -> None:
    with pytest.raises(EslProtocolError, match="too long"):
        EslParser().feed(b"X-Junk: " + b"a" * 70000)


def test_event_without_name_or_with_short_body_is_refused() -> None:
    with pytest.raises(EslProtocolError, match="Event-Name"):
        parse_event_plain(b"Unique-ID: x\n\n")
    with pytest.raises(EslProtocolError, match="truncated"):
        parse_event_plain(b"Event-Name: CUSTOM\nContent-Length: 50\n\n{}")


def test_error_replies_are_not_ok() -> None:
    msgs = EslParser().feed(
        b"Content-Type: command/reply\nReply-Text: -ERR invalid\n\n"
        b"Content-Type: api/response\nContent-Length: 23\n\n-ERR No such channel!\n\n"
    )
    assert [m.ok for m in msgs] == [False, False]


def test_encode_command_and_sendmsg() -> None:
    assert encode_command("api status") == b"api status\n\n"
    sendmsg = encode_command(
        "sendmsg abc",
        {
            "call-command": "execute",
            "execute-app-name": "playback",
            "execute-app-arg": "/tmp/abc_0.tmp.r8",
            "event-lock": "true",
        },
    )
    assert sendmsg == (
        b"sendmsg abc\ncall-command: execute\nexecute-app-name: playback\n"
        b"execute-app-arg: /tmp/abc_0.tmp.r8\nevent-lock: true\n\n"
    )
    # The switch side reads it back with the command line first.
    (m,) = EslParser(commands=True).feed(sendmsg + b"")
    assert m.command == "sendmsg abc"
    assert m.headers["execute-app-arg"] == "/tmp/abc_0.tmp.r8"
    with_body = encode_command("sendmsg abc", {"call-command": "execute"}, "hello")
    (m,) = EslParser(commands=True).feed(with_body)
    assert m.body == b"hello"


@pytest.mark.parametrize("bad", ["uuid_kill x\n\napi shutdown", "a\rb"])
def test_command_injection_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="one line"):
        encode_command(f"api {bad}")
    with pytest.raises(ValueError):
        encode_command("sendmsg x", {"execute-app-arg": bad})


def test_event_round_trip_url_encodes_values() -> None:
    data = encode_event_plain(
        {"Event-Name": "DTMF", "Unique-ID": "u1", "DTMF-Digit": "#", "X": "a b:c%"}, ""
    )
    (m,) = EslParser().feed(data)
    assert b"DTMF-Digit: %23" in m.body
    ev = parse_event_plain(m.body)
    assert ev.headers["DTMF-Digit"] == "#"
    assert ev.headers["X"] == "a b:c%"
