"""``pipeswitch migrate``, ``pipeswitch purge`` and ``pipeswitch admin ...``: the database side
of multi-tenancy from the command line, the same operations as the admin HTTP API.

Whoever can run these holds the database DSN, so the CLI acts as super-admin; every change is
audited with actor ``cli``. Database modules are imported inside the commands, so ``pipeswitch
--help`` and ``serve`` without a database never load them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DB_COMMANDS = {
    "migrate": "apply the PostgreSQL migrations (idempotent; safe from two instances at once)",
    "purge": "delete call records past each domain's retention (audited)",
    "admin": "agents, routes, tools, credentials, calls, GDPR delete (tenant database)",
}


def _dsn_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--database-url", default=None, help="PostgreSQL DSN (default: PIPESWITCH_DATABASE_URL)"
    )


def add_migrate_arguments(m: argparse.ArgumentParser) -> None:
    """``pipeswitch migrate``."""
    m.set_defaults(command="migrate")
    _dsn_arg(m)
    m.add_argument("--dry-run", action="store_true", help="print pending migrations only")


def add_purge_arguments(p: argparse.ArgumentParser) -> None:
    """``pipeswitch purge``."""
    p.set_defaults(command="purge")
    _dsn_arg(p)
    p.add_argument("--domain", default=None, help="only this domain (name or uuid)")
    p.add_argument("--days", type=int, default=None, help="override the retention (days)")


def arguments_for(name: str) -> Any:
    """The argument builder of one database command (for ``pipelines/cli.py``)."""
    return {
        "migrate": add_migrate_arguments,
        "purge": add_purge_arguments,
        "admin": add_admin_arguments,
    }[name]


def add_admin_arguments(a: argparse.ArgumentParser) -> None:
    """``pipeswitch admin ...``."""
    a.set_defaults(command="admin")
    _dsn_arg(a)
    asub = a.add_subparsers(dest="admin_cmd", required=True)
    asub.add_parser("gen-key", help="print a new PIPESWITCH_SECRETS_KEY")

    ag = asub.add_parser("agents", help="list | create | update | disable").add_subparsers(
        dest="action", required=True
    )
    ag.add_parser("list").add_argument("domain")
    for name in ("create", "update"):
        c = ag.add_parser(name)
        c.add_argument("domain")
        if name == "update":
            c.add_argument("agent", help="agent uuid")
        c.add_argument("--name", dest="agent_name")
        c.add_argument("--prompt", dest="system_prompt")
        c.add_argument("--first-message")
        c.add_argument("--default", dest="agent_default", action="store_true", default=None)
        c.add_argument("--json", dest="fields_json", help="other fields as a JSON object")
    d = ag.add_parser("disable")
    d.add_argument("domain")
    d.add_argument("agent")

    rt = asub.add_parser("routes", help="list | set | delete").add_subparsers(
        dest="action", required=True
    )
    rt.add_parser("list").add_argument("domain")
    rs = rt.add_parser("set")
    rs.add_argument("domain")
    rs.add_argument("destination")
    rs.add_argument("agent")
    rd = rt.add_parser("delete")
    rd.add_argument("domain")
    rd.add_argument("destination")

    tl = asub.add_parser("tools", help="list | set").add_subparsers(dest="action", required=True)
    tli = tl.add_parser("list")
    tli.add_argument("domain")
    tli.add_argument("agent")
    ts = tl.add_parser("set")
    ts.add_argument("domain")
    ts.add_argument("agent")
    ts.add_argument("tool")
    ts.add_argument("--settings", default="{}", help="JSON object")
    ts.add_argument("--disabled", action="store_true")

    cl = asub.add_parser("calls", help="list | show").add_subparsers(dest="action", required=True)
    cll = cl.add_parser("list")
    cll.add_argument("domain")
    cll.add_argument("--caller")
    cll.add_argument("--limit", type=int, default=50)
    cls_ = cl.add_parser("show")
    cls_.add_argument("domain")
    cls_.add_argument("call")

    g = asub.add_parser("gdpr-delete", help="delete one caller's calls and messages")
    g.add_argument("domain")
    g.add_argument("caller")

    cr = asub.add_parser("credentials", help="set a provider key for a domain")
    cr.add_argument("domain")
    cr.add_argument("provider")
    src = cr.add_mutually_exclusive_group(required=True)
    src.add_argument("--api-key-stdin", action="store_true", help="read the key from stdin")
    src.add_argument("--key-ref", help="name of a PIPESWITCH_KEY_* environment variable")

    dm = asub.add_parser("domain", help="set limits; rotate stream secret/token; admin token")
    dm.add_argument("domain")
    dm.add_argument(
        "what", choices=["settings", "stream-secret", "stream-token", "admin-token", "audit"]
    )
    dm.add_argument("--max-calls", type=int, default=None)
    dm.add_argument("--retention-days", type=int, default=None)
    dm.add_argument("--disabled", action="store_true", default=None)


def _out(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


async def run_db_command(args: argparse.Namespace) -> int:
    """Run one database command; 0 ok, 2 usage or configuration error."""
    from pipeswitch.config.db import SecretBox, SecretsUnavailable, connect, generate_key, migrate
    from pipeswitch.config.settings import Settings

    if args.command == "admin" and args.admin_cmd == "gen-key":
        print(generate_key())
        return 0
    settings = Settings()
    dsn = args.database_url or (
        settings.database_url.get_secret_value() if settings.database_url else ""
    )
    if not dsn:
        print("pipeswitch: set PIPESWITCH_DATABASE_URL or --database-url", file=sys.stderr)
        return 2
    try:
        box = SecretBox(settings.secrets_key.get_secret_value() if settings.secrets_key else None)
        conn = await connect(dsn)
    except (SecretsUnavailable, OSError) as exc:
        print(f"pipeswitch: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "migrate":
            names = await migrate(conn, dry_run=args.dry_run)
            verb = "would apply" if args.dry_run else "applied"
            print(f"{verb}: {', '.join(names) if names else 'nothing (up to date)'}")
            return 0
        return await _with_store(args, conn, box)
    except (ValueError, LookupError, SecretsUnavailable) as exc:
        print(f"pipeswitch: {exc}", file=sys.stderr)
        return 2
    finally:
        await conn.close()


async def _domain(store: Any, key: str) -> Any:
    row = await store.find_domain(key)
    if row is None:
        raise LookupError(f"no domain {key!r} in v_domains")
    return row["domain_uuid"]


async def _with_store(args: argparse.Namespace, conn: Any, box: Any) -> int:
    from pipeswitch.config.db import new_token, row_dict
    from pipeswitch.config.tenant_store import AgentFields, TenantStore

    store = TenantStore(conn, box)
    actor = "cli"
    if args.command == "purge":
        if args.domain:
            duid = await _domain(store, args.domain)
            row = await store.domain_settings(duid)
            days = args.days or (row["retention_days"] if row else None)
            if not days:
                raise ValueError("this domain has no retention_days; give --days")
            _out([{"domain_uuid": str(duid), **await store.purge(duid, days, actor)}])
            return 0
        results = []
        for pol in await store.retention_policies():
            days = args.days or pol["retention_days"]
            results.append(
                {
                    "domain_uuid": str(pol["domain_uuid"]),
                    **await store.purge(pol["domain_uuid"], days, actor),
                }
            )
        _out(results)
        return 0

    cmd = args.admin_cmd
    duid = await _domain(store, args.domain)
    if cmd == "agents":
        if args.action == "list":
            _out([row_dict(r) for r in await store.list_agents(duid)])
        elif args.action == "disable":
            row = await store.update_agent(duid, args.agent, AgentFields(agent_enabled=False))
            await store.audit(duid, actor, "agent_disable", {"agent": args.agent})
            _out(row_dict(row))
        else:
            fields: dict[str, Any] = json.loads(args.fields_json) if args.fields_json else {}
            for k in ("agent_name", "system_prompt", "first_message", "agent_default"):
                if getattr(args, k) is not None:
                    fields[k] = getattr(args, k)
            af = AgentFields.model_validate(fields)
            if args.action == "create":
                row = await store.create_agent(duid, af)
            else:
                row = await store.update_agent(duid, args.agent, af)
            await store.audit(
                duid, actor, f"agent_{args.action}", {"agent": str(row["voice_agent_uuid"])}
            )
            _out(row_dict(row))
    elif cmd == "routes":
        if args.action == "list":
            _out([row_dict(r) for r in await store.list_routes(duid)])
        elif args.action == "set":
            row = await store.set_route(duid, args.destination, args.agent)
            await store.audit(duid, actor, "route_set", row_dict(row))
            _out(row_dict(row))
        else:
            await store.delete_route(duid, args.destination)
            await store.audit(duid, actor, "route_delete", {"destination": args.destination})
            _out({"deleted": args.destination})
    elif cmd == "tools":
        if args.action == "list":
            _out([row_dict(r) for r in await store.list_tools(duid, args.agent)])
        else:
            row = await store.set_tool(
                duid, args.agent, args.tool, json.loads(args.settings), not args.disabled
            )
            await store.audit(duid, actor, "tool_set", {"agent": args.agent, "tool": args.tool})
            _out(row_dict(row))
    elif cmd == "calls":
        if args.action == "list":
            _out(
                [
                    row_dict(r)
                    for r in await store.list_calls(duid, caller=args.caller, limit=args.limit)
                ]
            )
        else:
            call = row_dict(await store.get_call(duid, args.call))
            call["turns"] = [row_dict(r) for r in await store.list_turns(duid, args.call)]
            _out(call)
    elif cmd == "gdpr-delete":
        _out(await store.delete_caller_data(duid, args.caller, actor))
    elif cmd == "credentials":
        if args.api_key_stdin:
            key = sys.stdin.readline().strip()
            await store.set_credential(duid, args.provider, api_key=key)
        else:
            await store.set_credential(duid, args.provider, key_ref=args.key_ref)
        await store.audit(duid, actor, "credential_set", {"provider": args.provider})
        _out({"provider": args.provider, "stored": True})
    elif cmd == "domain":
        if args.what == "settings":
            changes: dict[str, Any] = {}
            if args.max_calls is not None:
                changes["max_concurrent_calls"] = args.max_calls
            if args.retention_days is not None:
                changes["retention_days"] = args.retention_days
            if args.disabled is not None:
                changes["voice_domain_enabled"] = not args.disabled
            out = await store.set_domain_settings(duid, changes)
            await store.audit(duid, actor, "domain_settings", changes)
            _out(out)
        elif args.what == "stream-secret":
            value = new_token()
            await store.set_signing_secret(duid, value)
            await store.audit(duid, actor, "stream_secret_rotate", {})
            _out({"signing_secret": value})
        elif args.what == "stream-token":
            value = new_token()
            await store.set_stream_token(duid, value)
            await store.audit(duid, actor, "stream_token_rotate", {})
            _out({"stream_token": value})
        elif args.what == "admin-token":
            token = await store.create_admin_token(duid, os.environ.get("USER", "cli"))
            await store.audit(duid, actor, "admin_token_create", {})
            _out({"token": token})
        else:
            _out([row_dict(r) for r in await store.list_audit(duid)])
    return 0
