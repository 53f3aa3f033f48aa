"""Binary fixtures for the client-side RFC 6455 codec (good and broken frames)."""

from __future__ import annotations

import zlib

import pytest

from pipeswitch.bench.fakeswitch.wsframe import (
    Frame,
    FrameParser,
    MaskKeys,
    Opcode,
    PerMessageDeflate,
    close_payload,
    encode_frame,
    mask_payload,
)

MASK = bytes.fromhex("01020304")


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


# ---------------------------------------------------------------- encoding


def test_encode_320_byte_audio_frame() -> None:
    payload = bytes(range(256)) + bytes(64)
    data = encode_frame(Opcode.BINARY, payload, MASK)
    assert data[:8] == h("82 FE 01 40 01 02 03 04")
    assert len(data) == 8 + 320
    assert mask_payload(data[8:], MASK) == payload


@pytest.mark.parametrize(
    ("opcode", "size", "head"),
    [
        (Opcode.BINARY, 640, "82 FE 02 80"),
        (Opcode.TEXT, 30, "81 9E"),
        (Opcode.BINARY, 125, "82 FD"),
        (Opcode.BINARY, 126, "82 FE 00 7E"),
        (Opcode.BINARY, 65535, "82 FE FF FF"),
        (Opcode.BINARY, 70000, "82 FF 00 00 00 00 00 01 11 70"),
    ],
)
def test_encode_length_forms(opcode: Opcode, size: int, head: str) -> None:
    data = encode_frame(opcode, bytes(size), MASK)
    hb = h(head)
    assert data[: len(hb)] == hb
    assert data[len(hb) : len(hb) + 4] == MASK
    assert len(data) == len(hb) + 4 + size


def test_encode_heartbeat_ping() -> None:
    assert encode_frame(Opcode.PING, b"ping", bytes(4)) == h("89 84 00000000") + b"ping"


def test_encode_close_normal_closure() -> None:
    payload = close_payload(1000, "Normal closure")
    assert payload == h("03 E8") + b"Normal closure"
    data = encode_frame(Opcode.CLOSE, payload, MASK)
    assert data[:2] == h("88 90")
    assert mask_payload(data[6:], MASK) == payload


def test_close_reason_cut_to_123_bytes_and_control_limit() -> None:
    assert len(close_payload(1000, "x" * 200)) == 125
    with pytest.raises(ValueError):
        encode_frame(Opcode.PING, bytes(126), MASK)


def test_encode_rsv1_for_deflated_payload() -> None:
    assert encode_frame(Opcode.BINARY, b"ab", MASK, rsv1=True)[0] == 0xC2


def test_mask_keys_are_deterministic_per_seed_and_change_per_frame() -> None:
    a, b = MaskKeys(seed=42), MaskKeys(seed=42)
    seq_a = [a() for _ in range(5)]
    assert seq_a == [b() for _ in range(5)]
    assert len(set(seq_a)) == 5
    assert all(len(k) == 4 for k in seq_a)


# ---------------------------------------------------------------- parsing: good frames


def parse_all(data: bytes, parser: FrameParser | None = None) -> tuple[list[Frame], FrameParser]:
    p = parser or FrameParser()
    return p.feed(data), p


def test_parse_text_and_binary_with_16_and_64_bit_lengths() -> None:
    data = h("81 05") + b"Hello" + h("82 7E 01 00") + bytes(256) + h("82 7F 0000000000010000")
    data += bytes(65536)
    frames, p = parse_all(data)
    assert p.error is None
    assert [f.opcode for f in frames] == [Opcode.TEXT, Opcode.BINARY, Opcode.BINARY]
    assert frames[0].text == "Hello"
    assert [len(f.payload) for f in frames] == [5, 256, 65536]


def test_fragments_reassembled_with_interleaved_ping() -> None:
    data = h("01 03") + b"Hel" + h("89 05") + b"Hello" + h("80 02") + b"lo"
    frames, p = parse_all(data)
    assert p.error is None
    assert [(f.opcode, f.payload) for f in frames] == [
        (Opcode.PING, b"Hello"),
        (Opcode.TEXT, b"Hello"),
    ]
    assert frames[1].text == "Hello"


def test_byte_by_byte_feeding_gives_the_same_frames() -> None:
    data = h("01 02 E2 82") + h("8A 00") + h("80 01 AC") + h("82 03 010203")
    p = FrameParser()
    frames: list[Frame] = []
    for b in data:
        frames += p.feed(bytes([b]))
    assert p.error is None
    assert [f.opcode for f in frames] == [Opcode.PONG, Opcode.TEXT, Opcode.BINARY]
    assert frames[1].text == "€"  # a code point split across fragments is fine


def test_fragmented_binary() -> None:
    frames, p = parse_all(h("02 02 0102") + h("00 01 03") + h("80 01 04"))
    assert p.error is None
    assert frames == [Frame(Opcode.BINARY, h("01020304"))]


# ---------------------------------------------------------------- parsing: broken frames


@pytest.mark.parametrize(
    ("data", "code", "reason"),
    [
        (h("81 85 37fa213d 7f9f4d5158"), 1002, "Masked frame from server"),
        (h("C1 05") + b"Hello", 1002, "Unexpected RSV bits"),  # RSV1 without deflate
        (h("A1 00"), 1002, "Unexpected RSV bits"),
        (h("91 00"), 1002, "Unexpected RSV bits"),
        (h("83 00"), 1002, "Unsupported opcode"),
        (h("8B 00"), 1002, "Unsupported opcode"),
        (h("09 00"), 1002, "Control frame fragmented"),
        (h("80 02") + b"lo", 1002, "continuation frame without initial frame"),
        (
            h("01 03") + b"Hel" + h("81 02") + b"lo",
            1002,
            "Received new data frame when expecting continuation frame",
        ),
        (h("81 02 C3 28"), 1007, "Invalid UTF-8 in text message"),
        (h("81 03 ED A0 80"), 1007, "Invalid UTF-8 in text message"),  # surrogate
        (h("01 01 E2") + h("80 00"), 1007, "Invalid UTF-8 in text message"),  # truncated
    ],
)
def test_protocol_errors(data: bytes, code: int, reason: str) -> None:
    frames, p = parse_all(data)
    assert frames == []
    assert p.error is not None
    assert (p.error.code, p.error.reason) == (code, reason)


def test_control_frame_too_large_is_rejected_from_the_header_alone() -> None:
    p = FrameParser()
    assert p.feed(h("89 7E 00 7E")) == []
    assert p.error is not None and p.error.reason == "Control frame payload too large"


def test_masked_frame_is_rejected_from_the_first_two_bytes() -> None:
    p = FrameParser()
    p.feed(h("82 FE"))
    assert p.error is not None and p.error.reason == "Masked frame from server"


def test_invalid_utf8_in_a_first_fragment_fails_before_the_message_ends() -> None:
    p = FrameParser()
    p.feed(h("01 01 FF"))
    assert p.error is not None and p.error.code == 1007
    p2 = FrameParser()
    p2.feed(h("01 02 ED A0"))  # CPython would wait here; libwsc rejects the prefix
    assert p2.error is not None and p2.error.code == 1007


def test_error_messages_match_libwsc_event_text() -> None:
    p = FrameParser()
    p.feed(h("81 02 C3 28"))
    assert p.error is not None
    assert p.error.event_message == "WebSocket invalid UTF-8 (1007): Invalid UTF-8 in text message"
    p = FrameParser()
    p.feed(h("83 00"))
    assert p.error is not None
    assert p.error.event_message == "WebSocket protocol error (1002): Unsupported opcode"


def test_frames_before_an_error_are_returned_and_parsing_stops() -> None:
    frames, p = parse_all(h("81 01 41") + h("83 00") + h("81 01 42"))
    assert [f.text for f in frames] == ["A"]
    assert p.error is not None
    assert p.feed(h("81 01 43")) == []


# ---------------------------------------------------------------- CLOSE semantics


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        ("", 1000, ""),
        ("03 E8", 1000, ""),
        ("03 E8" + b"server done".hex(), 1000, "server done"),
        ("0B B8", 3000, ""),
        ("03", 1002, ""),  # 1-byte payload
        ("03 ED", 1002, ""),  # 1005 may not be sent
        ("03 EE", 1002, ""),  # 1006 neither
        ("03 F4", 1002, ""),  # 1012: libwsc only knows 1000-1011
        ("13 88", 1002, ""),  # 5000
        ("03 E8 C3 28", 1002, ""),  # reason not UTF-8
    ],
)
def test_close_code_and_reason_as_libwsc_reports_them(payload: str, code: int, reason: str) -> None:
    body = h(payload)
    frames, p = parse_all(bytes([0x88, len(body)]) + body + h("81 01 41"))
    assert p.error is None
    assert len(frames) == 1  # nothing is parsed after a CLOSE
    assert (frames[0].close_code, frames[0].close_reason) == (code, reason)
    assert p.closed


# ---------------------------------------------------------------- permessage-deflate


def _deflate(data: bytes) -> bytes:
    co = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = co.compress(data) + co.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def test_compressed_server_messages_when_negotiated() -> None:
    body = _deflate("héllo".encode())
    p = FrameParser(deflate=PerMessageDeflate(server_no_context_takeover=True))
    half = len(body) // 2
    frames = p.feed(
        bytes([0xC1, len(body)])
        + body
        + bytes([0x41, half])
        + body[:half]
        + bytes([0x80, len(body) - half])
        + body[half:]
    )
    assert p.error is None
    assert [f.text for f in frames] == ["héllo", "héllo"]


def test_corrupt_deflate_is_1007() -> None:
    p = FrameParser(deflate=PerMessageDeflate())
    p.feed(h("C2 03 FF FF FF"))
    assert p.error is not None
    assert (p.error.code, p.error.reason) == (1007, "Decompression failed")


def test_outgoing_deflate_round_trip() -> None:
    pmd = PerMessageDeflate(client_max_window_bits=9)
    packed = pmd.compress(bytes(640))
    assert packed is not None and len(packed) < 640
    assert zlib.decompressobj(-15).decompress(packed + b"\x00\x00\xff\xff") == bytes(640)
