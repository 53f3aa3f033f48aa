"""Who may open a call for a tenant: signed URLs and static stream tokens (sans-I/O).

Checked by the server right after the tenant is resolved and before any pipeline or provider
connection exists, so an unauthenticated socket costs nothing but the upgrade.

* **Signed URL** (recommended): ``...&exp=<unix seconds>&sig=<hex>`` where ``sig`` is
  HMAC-SHA256, keyed with the tenant's signing secret, over ``"<call uuid>|<domain>|<exp>"``
  (domain exactly as in the URL's ``domain=``, lower-cased). A leaked URL is good for one call
  uuid and only until ``exp``. See README "Tenants in FusionPBX's database" for the dialplan.
* **Static token** (simple setups): ``token=<token>`` in the URL, or the header
  ``X-Pipeswitch-Token`` / ``Authorization: Bearer`` via ``STREAM_EXTRA_HEADERS``.
* **Neither presented**: the deployment policy ``accept_unsigned`` decides (``never``,
  ``loopback`` - FreeSWITCH on this host, the default - or ``always``).

Anything presented and wrong is refused whatever the policy: a bad signature is an attack or a
misconfiguration, never "unsigned".
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pipeswitch.config.tenants import StreamAccess

UnsignedPolicy = Literal["never", "loopback", "always"]
# A signed URL may not be valid for longer than this (a dialplan signs for seconds to minutes).
MAX_SIGNATURE_LIFETIME_SECS = 24 * 3600
TOKEN_HEADER = "X-Pipeswitch-Token"


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """Whether a call may proceed; ``reason`` goes into the 1008 close and the log."""

    allowed: bool
    method: Literal["signature", "token", "unsigned", "none"]
    reason: str = ""


def signature_payload(call_uuid: str, domain: str, exp: int) -> bytes:
    """The exact bytes signed: ``call uuid|domain|exp``."""
    return f"{call_uuid}|{domain.strip().lower()}|{exp}".encode()


def sign_call(secret: str, call_uuid: str, domain: str, exp: int) -> str:
    """The ``sig=`` value for a call (what the dialplan computes)."""
    return hmac.new(
        secret.encode("utf-8"), signature_payload(call_uuid, domain, exp), hashlib.sha256
    ).hexdigest()


def is_loopback(peer: str | None) -> bool:
    """Whether the socket's peer is this host (a missing peer is not)."""
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def presented_token(query: Mapping[str, str], headers: Mapping[str, str]) -> str | None:
    """A static token from the URL or the upgrade request's headers, if any."""
    token = query.get("token") or headers.get(TOKEN_HEADER)
    if not token:
        auth = headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
    return token or None


def check_access(
    *,
    call_uuid: str,
    domain: str | None,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    peer: str | None,
    access: StreamAccess,
    policy: UnsignedPolicy,
    now: float,
) -> AccessDecision:
    """Decide whether this call may open (pure: the clock and the peer are arguments)."""
    sig = query.get("sig")
    if sig is not None:
        if access.signing_secret is None:
            return AccessDecision(False, "signature", "signed URL, but the tenant has no secret")
        raw_exp = query.get("exp", "")
        if not raw_exp.isdigit():
            return AccessDecision(False, "signature", "signed URL without a valid exp=")
        exp = int(raw_exp)
        if exp < now:
            return AccessDecision(False, "signature", "signature expired")
        if exp > now + MAX_SIGNATURE_LIFETIME_SECS:
            return AccessDecision(False, "signature", "signature expiry too far ahead")
        want = sign_call(access.signing_secret.get_secret_value(), call_uuid, domain or "", exp)
        if not hmac.compare_digest(want, sig.strip().lower()):
            return AccessDecision(False, "signature", "bad signature")
        return AccessDecision(True, "signature")
    token = presented_token(query, headers)
    if token is not None:
        if access.token_sha256 is None:
            return AccessDecision(False, "token", "token given, but the tenant has none")
        got = hashlib.sha256(token.encode("utf-8")).hexdigest()
        if not hmac.compare_digest(got, access.token_sha256):
            return AccessDecision(False, "token", "bad token")
        return AccessDecision(True, "token")
    if policy == "always" or (policy == "loopback" and is_loopback(peer)):
        return AccessDecision(True, "unsigned")
    return AccessDecision(False, "none", "signature or token required")
