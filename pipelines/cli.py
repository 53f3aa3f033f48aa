"""pipeswitch command line: serve, call, demo, bench.

Only ``serve`` is the product. ``call``, ``demo`` and ``bench`` drive the FreeSWITCH and
provider emulators (``pipeswitch.bench``), so their modules are imported inside the command,
never on the way to ``serve`` or ``--help``: a plain ``pip install '.[local]'`` serves and
runs the demo without the ``[bench]`` extra, and ``--help`` does not import Pipecat.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from pipeswitch.config.logging import configure_logging
from pipeswitch.config.settings import EventLoopKind, Settings
from pipeswitch.pipelines.db_cli import DB_COMMANDS  # names only; DB modules load lazily

DESCRIPTION = (
    "AI voice agents for FreeSWITCH/FusionPBX: answer mod_audio_stream calls with a "
    "per-tenant Pipecat pipeline."
)
# pipelines/workers.py sets it for the processes of ``serve --workers N`` (not imported here:
# workers.py loads Pipecat).
WORKER_ENDPOINTS_ENV = "PIPESWITCH_WORKER_ENDPOINTS"
USAGE_ERROR = 2  # argparse's own code for a usage error; configuration errors share it


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or action.required or "default" in text:
            return text
        return super()._get_help_string(action)


def _import_pipecat_quietly() -> None:
    """Import Pipecat with its import-time version banner muted (it is noise in a CLI)."""
    from loguru import logger

    logger.disable("pipecat")
    try:
        import pipecat  # noqa: F401
    finally:
        logger.enable("pipecat")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host", default=None, help="listen address (default 0.0.0.0, or $PIPESWITCH_HOST)"
    )
    p.add_argument(
        "--port", type=int, default=None, help="listen port (default 8080, or $PIPESWITCH_PORT)"
    )
    p.add_argument("--config", type=Path, default=None, help="tenant file (TOML or YAML)")
    p.add_argument(
        "--providers",
        choices=["real", "emulated", "local"],
        default=None,
        help="real: cloud providers; emulated: loopback emulators (no keys); "
        "local: the embedded offline models (default)",
    )
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING... (default INFO)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (one event loop per core)",
    )
    p.add_argument(
        "--loop",
        choices=get_args(EventLoopKind),
        default=None,
        help="event loop (default auto: uvloop where installed, or $PIPESWITCH_EVENT_LOOP)",
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
            "event_loop": args.loop,
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


def _preflight(settings: Settings) -> None:
    """What can be checked without Pipecat, before its imports (seconds on a busy machine):
    the tenants file, the keys its tenants need, the port. Workers skip it (their parent ran
    it, and their siblings hold the port on purpose)."""
    from pipeswitch.config.loaders import builtin_loader, load_tenant_file
    from pipeswitch.pipelines.startup import check_port_free, check_provider_keys

    if os.environ.get(WORKER_ENDPOINTS_ENV):
        return
    if settings.config_file is not None:
        tenants = load_tenant_file(settings.config_file).all()
    else:
        tenants = builtin_loader().all()
    check_provider_keys(settings, tenants)
    check_port_free(settings.host, settings.port)


async def _serve(settings: Settings, args: argparse.Namespace, argv: list[str]) -> int:
    from pipeswitch.pipelines.app import Pipeswitch, serve_forever, settings_endpoints
    from pipeswitch.pipelines.workers import serve_workers, worker_endpoints

    handed = worker_endpoints()
    if handed is not None:  # a worker process started by `serve --workers N`
        await serve_forever(Pipeswitch(settings, endpoints=handed, port_shared=True))
        return 0
    if args.workers > 1:
        child_argv = _without_option(argv, "--workers")
        if settings.providers == "emulated":
            from pipeswitch.pipelines.emulated import emulated_endpoints

            async with emulated_endpoints(settings) as ep:
                return await serve_workers(settings, args.workers, ep, child_argv)
        base = settings_endpoints(settings)
        return await serve_workers(settings, args.workers, base, child_argv)
    app = Pipeswitch(settings)  # loads and checks the tenants before anything starts
    if settings.providers == "emulated":
        from pipeswitch.pipelines.emulated import emulated_endpoints

        app.check_startup()  # port and config first: the emulators take seconds to start
        async with emulated_endpoints(settings) as ep:
            app.use_endpoints(ep)
            await serve_forever(app)
    else:
        await serve_forever(app)
    return 0


def _one_line(exc: BaseException) -> str:
    """A configuration problem as one line (pydantic errors name the setting)."""
    if isinstance(exc, ValidationError):
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err.get("loc", ()))
        env = f"PIPESWITCH_{field.upper()}" if field else "settings"
        return f"{env}: {err.get('msg', 'invalid value')}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _lazy_command(
    name: str,
) -> tuple[
    Callable[[argparse.ArgumentParser], None],
    Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
]:
    """The argument builder and runner of an emulator-driven command, imported now."""
    if name == "call":
        from pipeswitch.bench.fakeswitch.cli import add_call_arguments, run_call

        return add_call_arguments, run_call
    if name in DB_COMMANDS:  # tenant database (issue 9)
        from pipeswitch.pipelines.db_cli import arguments_for, run_db_command

        return arguments_for(name), run_db_command
    if name == "demo":
        from pipeswitch.pipelines.demo import add_demo_arguments, run_demo

        return add_demo_arguments, run_demo
    from pipeswitch.bench.cli import add_bench_arguments, run_bench

    return add_bench_arguments, run_bench


LAZY_COMMANDS = {
    "call": "place one emulated FreeSWITCH call",
    "demo": "offline demo: server + one spoken call",
    "bench": "latency and capacity benchmarks (needs the [bench] extra)",
    **DB_COMMANDS,
}


# Modules only the [bench] extra installs (pyproject.toml): missing, they are a usage error.
BENCH_EXTRA_MODULES = {"psutil", "matplotlib", "tqdm"}


def _run_lazy(name: str, argv: list[str]) -> int:
    if name != "call":  # the FreeSWITCH emulator alone needs no Pipecat
        _import_pipecat_quietly()
    try:
        add_arguments, run = _lazy_command(name)
        parser = argparse.ArgumentParser(
            prog=f"pipeswitch {name}", description=LAZY_COMMANDS[name], formatter_class=Formatter
        )
        add_arguments(parser)
        args = parser.parse_args(argv)
        configure_logging(getattr(args, "log_level", None) or Settings().log_level)
        # The demo is the product in-process: on the loop `serve` would use; a bench's load
        # generator runs on the loop it was asked for (--bench-loop); the rest on asyncio's.
        kind: EventLoopKind = (
            Settings().event_loop if name == "demo" else getattr(args, "bench_loop", "asyncio")
        )
        from pipeswitch.pipelines import event_loop

        return event_loop.run(run(args), kind)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in BENCH_EXTRA_MODULES:
            raise
        print(
            f"pipeswitch {name}: needs {exc.name!r}, which is not installed "
            "(pip install 'pipeswitch[bench]')",
            file=sys.stderr,
        )
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"pipeswitch {name}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; emulator commands are listed here, parsed in their own module."""
    parser = argparse.ArgumentParser(
        prog="pipeswitch", description=DESCRIPTION, formatter_class=Formatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_args(sub.add_parser("serve", help="run the media server", formatter_class=Formatter))
    for name, help_text in LAZY_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pipeswitch`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LAZY_COMMANDS:
        return _run_lazy(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        configure_logging(settings.log_level, json=settings.log_json)
        _preflight(settings)
        _import_pipecat_quietly()
        from pipeswitch.pipelines import event_loop

        return event_loop.run(_serve(settings, args, argv), settings.event_loop)
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 130
    except Exception as exc:
        if not _is_config_problem(exc):
            raise
        print(f"pipeswitch serve: {_one_line(exc)}", file=sys.stderr)
        return USAGE_ERROR


def _is_config_problem(exc: Exception) -> bool:
    """Errors the operator fixes in the configuration: one line and exit 2, no traceback."""
    from pipeswitch.config.loaders import ConfigError

    if isinstance(exc, ValidationError | ConfigError):
        return True
    from pipeswitch.pipelines.startup import StartupError

    return isinstance(exc, StartupError)


if __name__ == "__main__":
    sys.exit(main())
