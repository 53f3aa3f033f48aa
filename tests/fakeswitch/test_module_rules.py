"""URL rules, the upgrade request, FS argument splitting and streamAudio handling."""

from __future__ import annotations

import base64
import json

import pytest

from pipeswitch.bench.fakeswitch.fsargs import api_text_argument, separate_string
from pipeswitch.bench.fakeswitch.handshake import (
    InvalidUrl,
    build_upgrade_request,
    negotiate_deflate,
    parse_extra_headers,
    parse_ws_url,
    upgrade_accepted,
)
from pipeswitch.bench.fakeswitch.streamaudio import (
    base64_decode,
    cjson_dumps,
    cjson_parse,
    process_message,
)

# ---------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "host", "port", "target", "secure"),
    [
        ("ws://10.0.0.5:8765/fs/abc?x=1", "10.0.0.5", 8765, "/fs/abc?x=1", False),
        ("ws://h:8080/?a=b", "h", 8080, "/?a=b", False),
        ("ws://my-host.example", "my-host.example", 80, "/", False),
        ("wss://h/x", "h", 443, "/x", True),
        ("ws://h:70000/", "h", 70000 - 65536, "/", False),  # unsigned short
    ],
)
def test_valid_urls(url: str, host: str, port: int, target: str, secure: bool) -> None:
    u = parse_ws_url(url)
    assert (u.host, u.port, u.target, u.secure) == (host, port, target, secure)


@pytest.mark.parametrize(
    "url",
    [
        "ws://h:8080?a=b",  # a query needs a path first
        "ws://h?a=b",
        "http://h/",
        "WS://h/",
        "ws://[::1]:80/",
        "ws://my_host/",
        "ws://:80/",
        "ws://h:/x",
        "ws://h:8a/",
        "ws://h/" + "x" * 5000,
    ],
)
def test_invalid_urls(url: str) -> None:
    with pytest.raises(InvalidUrl):
        parse_ws_url(url)


# ---------------------------------------------------------------- upgrade


def test_upgrade_request_exact_bytes_with_deflate_offer_and_sorted_headers() -> None:
    u = parse_ws_url("ws://10.0.0.5:8765/fs/abc?x=1")
    headers = parse_extra_headers('{"X-b":"2","Authorization":"Bearer xyz","a-lower":"1","n":3}')
    req = build_upgrade_request(
        u, "a2V5a2V5a2V5a2V5a2V5aw==", offer_deflate=True, extra_headers=headers
    )
    assert req == (
        b"GET /fs/abc?x=1 HTTP/1.1\r\n"
        b"Host:10.0.0.5:8765\r\n"
        b"Upgrade:websocket\r\n"
        b"Connection:upgrade\r\n"
        b"Sec-WebSocket-Key:a2V5a2V5a2V5a2V5a2V5aw==\r\n"
        b"Sec-WebSocket-Version:13\r\n"
        b"Sec-WebSocket-Extensions:permessage-deflate; client_no_context_takeover; "
        b"server_no_context_takeover; client_max_window_bits=9\r\n"
        b"Origin:http://10.0.0.5:8765\r\n"
        b"Authorization:Bearer xyz\r\n"
        b"X-b:2\r\n"
        b"a-lower:1\r\n"
        b"\r\n"
    )


def test_extra_headers_json_rules() -> None:
    assert parse_extra_headers('{"A":"1","A":"3"}') == {"A": "3"}
    assert parse_extra_headers("[1,2]") == {}
    assert parse_extra_headers("not json") == {}
    assert parse_extra_headers(None) == {}


@pytest.mark.parametrize(
    ("head", "new_ok", "old_ok"),
    [
        (b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n\r\n", True, True),
        (b"HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: x\r\n\r\n", True, False),
        (b"X: 1\r\nHTTP/1.1 101\r\nSec-WebSocket-Accept:\r\n\r\n", True, False),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", False, False),
        (b"HTTP/1.1 200 OK\r\nSec-WebSocket-Accept: x\r\n\r\n", False, False),
        (b"HTTP/1.0 101 OK\r\nSec-WebSocket-Accept: x\r\n\r\n", False, False),
    ],
)
def test_upgrade_acceptance(head: bytes, new_ok: bool, old_ok: bool) -> None:
    assert upgrade_accepted(head) is new_ok
    assert upgrade_accepted(head, old_libwsc=True) is old_ok


def test_deflate_negotiation_parse() -> None:
    head = (
        b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: x\r\nSec-WebSocket-Extensions: "
        b"permessage-deflate; server_no_context_takeover; client_max_window_bits=10\r\n\r\n"
    )
    pmd = negotiate_deflate(head)
    assert pmd is not None
    assert pmd.server_no_context_takeover and not pmd.client_no_context_takeover
    assert (pmd.client_max_window_bits, pmd.server_max_window_bits) == (10, 15)
    assert negotiate_deflate(b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: x\r\n\r\n") is None


# ---------------------------------------------------------------- FS argument splitting


@pytest.mark.parametrize(
    ("text", "sent"),
    [
        ('{"a": 1}', '{"a":'),  # cut at the first unquoted space
        ('{"event":"dtmf","digit":"5"}', '{"event":"dtmf","digit":"5"}'),
        ("'{\"a\": 1}'", '{"a": 1}'),  # single quotes group and are stripped
        ("hello\\sworld", "hello world"),
        ("it\\'s", "it's"),
        ("a\\nb", "a\nb"),
        ("  x  y", "x"),
        ("", None),
        ("   ", None),
    ],
)
def test_send_text_argument(text: str, sent: str | None) -> None:
    assert api_text_argument("uuid-1", text) == sent


def test_separate_string_last_slot_takes_the_rest() -> None:
    argv = separate_string("u start ws://h/x mono 8k {'a': 1}  z ", 6)
    assert argv == ["u", "start", "ws://h/x", "mono", "8k", "{a: 1}  z"]


# ---------------------------------------------------------------- streamAudio


def _msg(data: dict[str, object], **top: object) -> str:
    return json.dumps({"type": "streamAudio", "data": data, **top})


def test_stream_audio_raw_keeps_extra_fields_and_appends_file() -> None:
    audio = bytes(range(200))
    pr = process_message(
        _msg(
            {
                "audioDataType": "raw",
                "sampleRate": 16000,
                "audioData": base64.b64encode(audio).decode(),
                "seq": 7,
            }
        )
    )
    assert pr.ok and pr.extension == ".r16" and pr.audio == audio
    assert pr.play_body("/tmp/u_0.tmp.r16") == (
        '{"audioDataType":"raw","sampleRate":16000,"seq":7,"file":"/tmp/u_0.tmp.r16"}'
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            _msg({"audioDataType": "raw", "sampleRate": 44100, "audioData": "AAAA"}),
            "unsupported sample rate: 44100",
        ),
        (
            _msg({"audioDataType": "raw", "sampleRate": "16000", "audioData": "AAAA"}),
            "unsupported sample rate: 0",
        ),
        (_msg({"audioDataType": "flac", "audioData": "AAAA"}), "unsupported audio type: flac"),
        (
            _msg({"audioDataType": "raw", "sampleRate": 8000, "audioData": 5}),
            "'audioData' is not a string",
        ),
        (_msg({"audioDataType": "raw", "sampleRate": 8000}), "missing 'audioData' field"),
        (json.dumps({"type": "streamAudio"}), "no data in streamAudio"),
        (
            _msg({"audioDataType": "raw", "sampleRate": 8000, "audioData": "A!AA"}),
            "base64 decode error",
        ),
    ],
)
def test_stream_audio_failures(text: str, error: str) -> None:
    pr = process_message(text)
    assert not pr.ok
    assert len(pr.errors) == 1 and error in pr.errors[0]


def test_cjson_quirks_case_insensitive_keys_trailing_data_valueint() -> None:
    text = '{"TYPE":"streamAudio","Data":{"AUDIODATATYPE":"raw","samplerate":8000.9,"audiodata":"AAAA"}} junk'
    pr = process_message(text)
    assert pr.ok and pr.extension == ".r8" and pr.audio == bytes(3)
    assert pr.play_body("f") == '{"AUDIODATATYPE":"raw","samplerate":8000.9,"file":"f"}'
    assert not process_message('{"type":"hello"}').ok
    assert process_message('{"type":"clearAudio"}').json_type == "clearAudio"
    assert not process_message("plain text").ok and not process_message("plain text").errors


def test_voxcom_raw_is_not_a_file() -> None:
    pr = process_message(
        _msg({"audioDataType": "raw", "sampleRate": 8000, "audioData": "AAAA"}), raw_to_file=False
    )
    assert pr.ok and pr.extension == ""


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("QUJD", b"ABC"),
        ("QQ", b"A"),  # padding optional
        ("QQ=", b"A"),
        ("QUI.", b"AB"),  # '.' as padding
        ("-_-_", base64.b64decode("+/+/")),  # url-safe alphabet accepted
        ("QQ==QUJD", b"AABC"),  # padding mid-string is tolerated per chunk
        ("", b""),
    ],
)
def test_lenient_base64(encoded: str, decoded: bytes) -> None:
    assert base64_decode(encoded) == decoded


@pytest.mark.parametrize("bad", ["QUJD=", "QU JD", "QUJD\n", "=QUJ"])
def test_base64_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        base64_decode(bad)


def test_cjson_print() -> None:
    v = cjson_parse('{"a":16000.0,"b":0.5,"c":"é/\\u0001","d":[true,null],"a":1}')
    assert cjson_dumps(v) == '{"a":16000,"b":0.5,"c":"é/\\u0001","d":[true,null],"a":1}'
