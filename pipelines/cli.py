"""``pipeswitch`` command line: serve, call, demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from pipeswitch.config.logging import configure_logging
from pipeswitch.config.settings import Settings


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="listen port (default 8080)")
    p.add_argument("--config", type=Path, default=None, help="tenant file (TOML or YAML)")
    p.add_argument(
        "--providers",
        choices=["real", "emulated", "local"],
        default=None,
        help="real: cloud providers; emulated: loopback emulators (no keys); "
        "local: the embedded offline models (default)",
    )
    p.add_argument("--log-level", default=None)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (one event loop per core); default 1",
    )


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "config_file": args.config,
            "providers": args.providers,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    return Settings(**overrides)


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` minus ``name VALUE`` / ``name=VALUE`` (the workers must not fork again)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


async def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    from pipeswitch.pipelines.app import Pipeswitch, serve_forever, settings_endpoints
    from pipeswitch.pipelines.emulated import emulated_endpoints
    from pipeswitch.pipelines.workers import serve_workers, worker_endpoints

    settings = _settings(args)
    handed = worker_endpoints()
    if handed is not None:  # a worker process started by `serve --workers N`
        await serve_forever(Pipeswitch(settings, endpoints=handed))
        return 0
    if args.workers > 1:
        child_argv = _without_option(argv, "--workers")
        if settings.providers == "emulated":
            async with emulated_endpoints(settings) as ep:
                return await serve_workers(settings, args.workers, ep, child_argv)
        base = settings_endpoints(settings)
        return await serve_workers(settings, args.workers, base, child_argv)
    if settings.providers == "emulated":
        async with emulated_endpoints(settings) as ep:
            await serve_forever(Pipeswitch(settings, endpoints=ep))
    else:
        await serve_forever(Pipeswitch(settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pipeswitch`` console script."""
    parser = argparse.ArgumentParser(prog="pipeswitch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_args(sub.add_parser("serve", help="run the media server"))

    from pipeswitch.bench.fakeswitch.cli import add_call_arguments, run_call

    add_call_arguments(sub.add_parser("call", help="place one emulated FreeSWITCH call"))

    from pipeswitch.pipelines.demo import add_demo_arguments, run_demo

    add_demo_arguments(sub.add_parser("demo", help="offline demo: server + one spoken call"))

    from pipeswitch.bench.cli import add_bench_arguments, run_bench

    add_bench_arguments(sub.add_parser("bench", help="latency and capacity benchmarks"))

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", None) or Settings().log_level)
    if args.command == "serve":
        return asyncio.run(_serve(args, argv))
    if args.command == "call":
        return asyncio.run(run_call(args))
    if args.command == "demo":
        return asyncio.run(run_demo(args))
    if args.command == "bench":
        return asyncio.run(run_bench(args))
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
