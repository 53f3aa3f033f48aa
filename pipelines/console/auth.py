"""Console sessions: who is logged in, for which domain, and the CSRF token of the session.

The session lives in one cookie, encrypted and authenticated with Fernet (so it is signed and
its content - the admin token the console uses on the admin API - is not readable), HttpOnly,
SameSite=Strict, ``Secure`` behind TLS, and expires after :data:`SESSION_SECS`. Keeping it
in the cookie (not in process memory) lets ``serve --workers N`` answer any page from any
worker. Every admin action still goes through the admin API with the user's own token, so a
revoked token stops working at once, whatever the cookie says.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken
from loguru import logger

COOKIE = "ps_console"
PRE_COOKIE = "ps_console_login"  # double-submit CSRF token of the login form
SESSION_SECS = 8 * 3600


@dataclass(frozen=True)
class ConsoleSession:
    """One logged-in admin: their token, whether it is the super-admin's, their domain."""

    token: str
    super_admin: bool
    domain_uuid: str | None  # None for the super-admin (every domain)
    csrf: str
    actor: str

    def may_open(self, domain_uuid: str) -> bool:
        """Every page and call is scoped: a domain token reaches its own domain only."""
        return self.super_admin or self.domain_uuid == domain_uuid


def session_key(secrets_key: str | None) -> bytes:
    """The cookie key: derived from ``PIPESWITCH_SECRETS_KEY`` when set (every worker and
    instance reads the same cookies), else random for this process (sessions end on restart)."""
    if secrets_key:
        raw = hmac.new(secrets_key.encode(), b"pipeswitch-console-session", hashlib.sha256)
        return base64.urlsafe_b64encode(raw.digest())
    logger.warning(
        "console: PIPESWITCH_SECRETS_KEY is not set; console sessions are valid in this "
        "process only and end when it restarts"
    )
    return Fernet.generate_key()


class SessionCodec:
    """Seals a :class:`ConsoleSession` into a cookie value and opens it again."""

    def __init__(self, key: bytes, max_age_secs: int = SESSION_SECS) -> None:
        self._fernet = Fernet(key)
        self.max_age = max_age_secs

    def seal(self, s: ConsoleSession) -> str:
        doc = {"t": s.token, "s": s.super_admin, "d": s.domain_uuid, "c": s.csrf, "a": s.actor}
        return self._fernet.encrypt(json.dumps(doc).encode()).decode("ascii")

    def open(self, value: str | None) -> ConsoleSession | None:
        """The session in a cookie; None when absent, forged, tampered with or expired."""
        if not value:
            return None
        try:
            doc = json.loads(self._fernet.decrypt(value.encode("ascii"), ttl=self.max_age))
            return ConsoleSession(
                token=str(doc["t"]),
                super_admin=bool(doc["s"]),
                domain_uuid=None if doc["d"] is None else str(doc["d"]),
                csrf=str(doc["c"]),
                actor=str(doc["a"]),
            )
        except (InvalidToken, ValueError, KeyError, TypeError, UnicodeError):
            return None


def new_csrf() -> str:
    return secrets.token_urlsafe(24)


def same_token(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two CSRF tokens (False when either is missing)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
