"""Bench-only entry: Pipeswitch in its own process, pointed at running emulators.

``python -m pipeswitch.bench.serve --emulators '{"deepgram_url": …, "groq_base_url": …}'``

Starts exactly what ``pipeswitch serve --providers emulated`` starts (the same
:class:`pipelines.app.Pipeswitch`, its Piper child, the default tenant) but
uses emulators the bench already runs, so one emulator process (and its
request log) serves the whole bench run. Adds a :class:`bench.probe.BenchProbe`
on a second loopback port. Prints one JSON line on stdout once listening;
exits on SIGTERM or when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from pipeswitch.bench.probe import BenchProbe, breakdown_dict, user_texts, wait_for_stop_signal


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeswitch.bench.serve", description=__doc__)
    p.add_argument("--emulators", required=True, help="JSON with deepgram_url, groq_base_url")
    p.add_argument("--dialect", default="json-stream", choices=["json-stream", "binary", "file"])
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--max-calls", type=int, default=1000)
    p.add_argument("--uvloop", action="store_true")
    p.add_argument(
        "--experiment", action="append", default=[], help="bench.experiments patch (A/B)"
    )
    return p.parse_args(argv)


# ``turns.speculate=false,providers.stt=deepgram-flux``: tenant settings for an A/B run
# (inherited from the ``pipeswitch bench …`` command's environment).
TENANT_SET_ENV = "PIPESWITCH_BENCH_TENANT_SET"


def tenant_overrides(text: str) -> dict[str, dict[str, Any]]:
    """``section.key=value`` pairs (comma-separated) as nested tenant fields.

    Values are JSON where they parse (``false``, ``0.1``), strings otherwise.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise SystemExit(f"{TENANT_SET_ENV}: expected section.key=value, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def speculation_counts() -> dict[str, float]:
    """This process's speculative-turn counters (started, confirmed, wasted)."""
    from pipeswitch.transports.metrics import TURN_SPECULATIONS

    counts: dict[str, float] = {"started": 0.0, "confirmed": 0.0, "wasted": 0.0}
    for metric in TURN_SPECULATIONS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                outcome = sample.labels.get("outcome", "")
                counts[outcome] = counts.get(outcome, 0.0) + sample.value
    return counts


def _record_dict(rec: Any) -> dict[str, Any]:
    return {
        "call_uuid": rec.call.call_uuid,
        "tenant": rec.tenant,
        "started_at": rec.started_at,
        "ended_at": rec.ended_at,
        "turn_latencies": list(rec.turn_latencies),
        "breakdowns": [breakdown_dict(b) for b in list(rec.breakdowns)],
        "user_texts": user_texts(rec.messages),
        "end_reason": rec.end_reason,
    }


async def _amain(args: argparse.Namespace) -> None:
    from pipeswitch.bench.experiments import apply
    from pipeswitch.config.loaders import StaticTenantLoader
    from pipeswitch.config.logging import configure_logging
    from pipeswitch.config.settings import Settings
    from pipeswitch.config.tenants import DEFAULT_TENANT_NAME, Tenant
    from pipeswitch.pipelines.app import Pipeswitch
    from pipeswitch.pipelines.emulated import endpoints_for
    from pipeswitch.pipelines.session import CallRecord

    configure_logging(args.log_level)
    experiments = apply(args.experiment)
    urls = json.loads(args.emulators)
    settings = Settings(
        host="127.0.0.1",
        port=0,
        providers="emulated",
        log_level=args.log_level,
        max_calls=args.max_calls,
    )
    overrides = tenant_overrides(os.environ.get(TENANT_SET_ENV, ""))
    tenant = Tenant.model_validate(
        {"name": DEFAULT_TENANT_NAME, "playback": args.dialect, **overrides}
    )
    loader = StaticTenantLoader([tenant], default=DEFAULT_TENANT_NAME)
    ep = endpoints_for(argparse.Namespace(**urls))
    app = Pipeswitch(settings, loader=loader, default_tenant=DEFAULT_TENANT_NAME, endpoints=ep)
    await app.start()
    assert app.sessions is not None and app.server is not None
    sessions, server = app.sessions, app.server
    finished: list[CallRecord] = []

    async def _keep(rec: CallRecord, _cp: Any) -> None:
        finished.append(rec)

    sessions.finished_hooks.append(_keep)

    def calls() -> list[dict[str, Any]]:
        recs = [*finished, *list(sessions.active.values())]
        return [_record_dict(r) for r in recs]

    spec_base = speculation_counts()

    def health() -> dict[str, Any]:
        st = server.stats
        now = speculation_counts()
        return {
            "calls_active": st.calls_active,
            "calls_total": st.calls_total,
            "refused": dict(st.refused),
            "upgrade_ms": list(st.upgrade_ms),
            # Since the last reset: the measured window only, not the warm-up call.
            "speculation": {k: int(v - spec_base.get(k, 0.0)) for k, v in now.items()},
        }

    def reset() -> None:
        nonlocal spec_base
        finished.clear()
        server.stats.upgrade_ms.clear()
        spec_base = speculation_counts()

    probe = BenchProbe(calls, health, reset)
    stats_port = await probe.start()
    ready = {
        "ready": True,
        "kind": "pipeswitch",
        "port": app.port,
        "stats_port": stats_port,
        "pid": os.getpid(),
        "piper_url": app.endpoints.piper_url,
        "vad_stop_secs": tenant.turns.vad_stop_secs,
        "policy_wait_secs": tenant.turns.complete_wait_secs,
        "experiments": experiments,
        "tenant_overrides": overrides,
    }
    print(json.dumps(ready), flush=True)
    try:
        await wait_for_stop_signal()
    finally:
        await probe.stop()
        await app.stop(drain_secs=0.0)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = _parse(argv)
    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(_amain(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
