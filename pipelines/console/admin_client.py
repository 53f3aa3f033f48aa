"""The console is a client of the admin API (``/admin``), with the logged-in admin's token.

Scoping, validation, auditing and the SQL all stay in one place (:mod:`pipelines.admin_api`):
a domain token asking for another domain gets the API's own 403, whatever the console asked.
The API is reached over loopback on the socket the console's request came in on, so it is
the same server process and the same code path an ``curl`` to ``/admin`` would take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web


class AdminError(Exception):
    """A non-2xx answer of the admin API: status, message and pydantic details if any."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.details = details or []


@dataclass
class AdminClient:
    """Calls ``/admin/domains/{domain}/...`` as the logged-in admin."""

    http: aiohttp.ClientSession
    base: str  # http://host:port of this very server
    token: str
    domain: str  # domain name or uuid, as the API resolves it

    def _url(self, path: str) -> str:
        return f"{self.base}/admin/domains/{quote(self.domain, safe='')}{path}"

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(
            method,
            self._url(path),
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=aiohttp.ClientTimeout(total=15),
        ) as r:
            try:
                data = await r.json(content_type=None)
            except ValueError:
                data = {"error": (await r.text())[:200]}
            if r.status >= 400:
                doc = data if isinstance(data, dict) else {}
                raise AdminError(r.status, str(doc.get("error", r.reason)), doc.get("details"))
            return data

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    @staticmethod
    def seg(value: str) -> str:
        """A path segment (agent uuid, destination, call uuid) quoted for the URL."""
        return quote(value, safe="")


def loopback_base(request: web.Request) -> str:
    """``http://addr:port`` of the socket this request arrived on: this server itself."""
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if not sock:
        raise web.HTTPServiceUnavailable(text="console: no local socket")
    host, port = sock[0], sock[1]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
