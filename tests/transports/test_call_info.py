"""Call identity parsing from the dialplan's URL."""

from __future__ import annotations

import pytest

from pipeswitch.transports.call_info import BadCallRequest, parse_call_request


def test_canonical_url() -> None:
    c = parse_call_request(
        "/fs/3f0b6c1e-aaaa-bbbb-cccc-444455556666",
        "domain=pbx.example.com&rate=16000&mix=stereo&caller=%2B1555&destination=9000",
    )
    assert c.call_uuid == "3f0b6c1e-aaaa-bbbb-cccc-444455556666"
    assert (c.domain, c.rate, c.mix, c.channels) == ("pbx.example.com", 16000, "stereo", 2)
    assert (c.caller, c.destination) == ("+1555", "9000")


def test_bare_path_gets_a_uuid_and_defaults() -> None:
    c = parse_call_request("/", "")
    assert len(c.call_uuid) == 36 and c.domain is None and c.rate is None and c.mix is None


def test_rate_literals_and_uuid_in_query() -> None:
    c = parse_call_request("/anything/here", "uuid=abc-1&rate=8k")
    assert (c.call_uuid, c.rate) == ("abc-1", 8000)


@pytest.mark.parametrize("q", ["rate=44100", "rate=24k", "rate=0", "rate=128000", "mix=quad"])
def test_bad_rate_or_mix_is_refused(q: str) -> None:
    with pytest.raises(BadCallRequest):
        parse_call_request("/fs/x", q)


def test_unsafe_uuid_is_refused() -> None:
    with pytest.raises(BadCallRequest):
        parse_call_request("/fs/x", "uuid=../../etc/passwd")
