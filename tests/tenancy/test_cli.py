"""``pipeswitch migrate``, ``purge`` and ``admin`` against the test database."""

from __future__ import annotations

import asyncio
import io
import json
from contextlib import redirect_stdout

import pytest

from pipeswitch.pipelines.cli import main
from tests.tenancy.conftest import Db

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def run(argv: list[str], monkeypatch: pytest.MonkeyPatch, db: Db) -> tuple[int, str]:
    monkeypatch.setenv("PIPESWITCH_SECRETS_KEY", db.key)
    buf = io.StringIO()

    def call() -> int:
        with redirect_stdout(buf):
            return main(argv)

    rc = await asyncio.to_thread(call)
    return rc, buf.getvalue()


async def test_migrate_admin_purge(db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = ["--database-url", db.dsn]
    rc, out = await run(["migrate", *dsn, "--dry-run"], monkeypatch, db)
    assert rc == 0 and "nothing (up to date)" in out
    duid = await db.add_domain("cli.example.com")
    rc, out = await run(
        ["admin", *dsn, "agents", "create", "cli.example.com", "--name", "Desk", "--default",
         "--json", '{"playback": "file"}'],
        monkeypatch, db,
    )  # fmt: skip
    assert rc == 0
    agent = json.loads(out)
    assert agent["playback"] == "file" and agent["domain_uuid"] == str(duid)
    rc, out = await run(
        ["admin", *dsn, "routes", "set", "cli.example.com", "200", agent["voice_agent_uuid"]],
        monkeypatch,
        db,
    )
    assert rc == 0 and json.loads(out)["destination"] == "200"
    rc, _ = await run(
        ["admin", *dsn, "agents", "create", "cli.example.com", "--json", '{"playback": "mp3"}'],
        monkeypatch,
        db,
    )
    assert rc == 2
    rc, _ = await run(["admin", *dsn, "agents", "list", "nobody.example.com"], monkeypatch, db)
    assert rc == 2
    rc, out = await run(
        ["admin", *dsn, "domain", "cli.example.com", "settings", "--retention-days", "7"],
        monkeypatch,
        db,
    )
    assert rc == 0 and json.loads(out)["retention_days"] == 7
    rc, out = await run(["purge", *dsn, "--domain", "cli.example.com"], monkeypatch, db)
    assert rc == 0 and json.loads(out)[0]["retention_days"] == 7
    rc, out = await run(
        ["admin", *dsn, "gdpr-delete", "cli.example.com", "+15550000"], monkeypatch, db
    )
    assert rc == 0 and json.loads(out)["calls"] == 0
    rc, out = await run(["admin", *dsn, "domain", "cli.example.com", "audit"], monkeypatch, db)
    actions = [a["action"] for a in json.loads(out)]
    assert {"agent_create", "route_set", "domain_settings", "purge", "gdpr_delete"} <= set(actions)
    assert all(a["actor"] == "cli" for a in json.loads(out))
