"""Stream access checks (pure): signatures good, wrong, expired, another tenant's; tokens;
the unsigned policy."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import SecretStr

from pipeswitch.config.tenants import StreamAccess
from pipeswitch.transports.auth import check_access, is_loopback, sign_call

NOW = 1_800_000_000.0
CALL = "6f1c3a52-8d0e-4f8e-9a55-2d0c0c5f2b11"
SECRET_A = "secret-of-tenant-a"
SECRET_B = "secret-of-tenant-b"
ACCESS_A = StreamAccess(
    signing_secret=SecretStr(SECRET_A),
    token_sha256=hashlib.sha256(b"token-a").hexdigest(),
)


def decide(
    query: dict[str, str],
    headers: dict[str, str] | None = None,
    peer: str | None = "10.0.0.5",
    access: StreamAccess = ACCESS_A,
    policy: str = "loopback",
    domain: str = "a.example.com",
) -> tuple[bool, str, str]:
    d = check_access(
        call_uuid=CALL,
        domain=domain,
        query=query,
        headers=headers or {},
        peer=peer,
        access=access,
        policy=policy,  # type: ignore[arg-type]
        now=NOW,
    )
    return d.allowed, d.method, d.reason


def signed(
    secret: str, exp: float, call: str = CALL, domain: str = "a.example.com"
) -> dict[str, str]:
    return {"exp": str(int(exp)), "sig": sign_call(secret, call, domain, int(exp))}


def test_good_signature() -> None:
    assert decide(signed(SECRET_A, NOW + 60)) == (True, "signature", "")


def test_domain_case_does_not_matter_but_domain_does() -> None:
    assert decide(signed(SECRET_A, NOW + 60, domain="A.Example.COM"))[0]
    assert decide(signed(SECRET_A, NOW + 60), domain="b.example.com")[2] == "bad signature"


def test_wrong_signature_refused_even_from_loopback_with_always() -> None:
    q = signed(SECRET_A, NOW + 60)
    q["sig"] = q["sig"][:-1] + ("0" if q["sig"][-1] != "0" else "1")
    assert decide(q, peer="127.0.0.1", policy="always") == (False, "signature", "bad signature")


def test_expired_signature() -> None:
    assert decide(signed(SECRET_A, NOW - 1)) == (False, "signature", "signature expired")


def test_other_tenants_secret() -> None:
    assert decide(signed(SECRET_B, NOW + 60))[2] == "bad signature"


def test_signature_for_another_call_uuid() -> None:
    assert decide(signed(SECRET_A, NOW + 60, call="other-call"))[2] == "bad signature"


def test_expiry_too_far_ahead_and_missing_exp() -> None:
    assert decide(signed(SECRET_A, NOW + 10 * 86400))[2] == "signature expiry too far ahead"
    q = signed(SECRET_A, NOW + 60)
    del q["exp"]
    assert decide(q)[2] == "signed URL without a valid exp="


def test_signature_for_tenant_without_secret() -> None:
    assert not decide(signed(SECRET_A, NOW + 60), access=StreamAccess())[0]


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ({"token": "token-a"}, {}),
        ({}, {"X-Pipeswitch-Token": "token-a"}),
        ({}, {"Authorization": "Bearer token-a"}),
    ],
)
def test_static_token(query: dict[str, str], headers: dict[str, str]) -> None:
    assert decide(query, headers) == (True, "token", "")


def test_wrong_token_and_token_for_tenant_without_one() -> None:
    assert decide({"token": "token-b"}) == (False, "token", "bad token")
    assert decide({"token": "token-a"}, access=StreamAccess())[0] is False


@pytest.mark.parametrize(
    ("policy", "peer", "allowed"),
    [
        ("loopback", "127.0.0.1", True),
        ("loopback", "::1", True),
        ("loopback", "10.0.0.5", False),
        ("loopback", None, False),
        ("never", "127.0.0.1", False),
        ("always", "203.0.113.9", True),
    ],
)
def test_unsigned_policy(policy: str, peer: str | None, allowed: bool) -> None:
    ok, method, reason = decide({}, peer=peer, policy=policy)
    assert ok is allowed
    assert method == ("unsigned" if allowed else "none")
    assert allowed or reason == "signature or token required"


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.2") and is_loopback("::1")
    assert not is_loopback("192.168.1.1") and not is_loopback("not-an-ip") and not is_loopback("")


def test_the_readmes_openssl_line_computes_the_same_signature() -> None:
    """The Lua dialplan helper in the README shells out to openssl: it must agree with us."""
    import shutil
    import subprocess

    assert shutil.which("openssl"), "openssl is part of every FreeSWITCH host image"
    payload = f"{CALL}|pbx.example.com|1800000000"
    out = subprocess.run(
        f"printf '%s' '{payload}' | openssl dgst -sha256 -hmac '{SECRET_A}' -r",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split()[0] == sign_call(SECRET_A, CALL, "PBX.example.com", 1800000000)
