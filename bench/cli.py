"""``pipeswitch bench …`` / ``python -m pipeswitch.bench.cli …``: latency, capacity and profile benches.

* ``latency``  - N calls × M turns: wire latency, server overhead, barge-in stop,
  the pipeline's own breakdown; ``--gate-overhead-p95-ms`` for CI.
* ``capacity`` - sweep concurrent calls until the overhead budget breaks.
* ``profile``  - py-spy on the Pipeswitch server under N calls; hot spots.
* ``hops``     - CPU of one frame crossing one Pipecat processor (queued/direct, observers).

Each run writes ``bench/results/<timestamp>-<kind>/`` (results.json, report.md,
PNG plots) and ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import sys


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``latency`` / ``capacity`` / ``profile`` subcommands to ``parser``."""
    from pipeswitch.bench.capacity import add_capacity_arguments
    from pipeswitch.bench.latency import add_latency_arguments
    from pipeswitch.bench.profile import add_profile_arguments

    sub = parser.add_subparsers(dest="bench_command", required=True)
    add_latency_arguments(
        sub.add_parser("latency", help="per-turn latency and server overhead (CI gate)")
    )
    add_capacity_arguments(sub.add_parser("capacity", help="concurrent-call sweep"))
    add_profile_arguments(sub.add_parser("profile", help="py-spy the server under load"))
    from pipeswitch.bench.faults import add_fault_arguments
    from pipeswitch.bench.soak import add_soak_arguments

    add_fault_arguments(sub.add_parser("faults", help="provider fault matrix: what callers hear"))

    add_soak_arguments(sub.add_parser("soak", help="sequential calls: RSS, tasks, fds over time"))
    from pipeswitch.bench.playout import add_playout_arguments

    add_playout_arguments(sub.add_parser("playout", help="CPU of the bot-audio path alone"))
    from pipeswitch.bench.hops import add_hops_arguments

    add_hops_arguments(sub.add_parser("hops", help="CPU of one frame crossing one processor"))


async def run_bench(args: argparse.Namespace) -> int:
    """Run the bench subcommand in ``args``; returns the process exit status."""
    if args.bench_command == "latency":
        from pipeswitch.bench.latency import run_latency

        return await run_latency(args)
    if args.bench_command == "capacity":
        from pipeswitch.bench.capacity import run_capacity

        return await run_capacity(args)
    if args.bench_command == "profile":
        from pipeswitch.bench.profile import run_profile

        return await run_profile(args)
    if args.bench_command == "faults":
        from pipeswitch.bench.faults import run_faults

        return await run_faults(args)
    if args.bench_command == "soak":
        from pipeswitch.bench.soak import run_soak

        return await run_soak(args)
    if args.bench_command == "playout":
        from pipeswitch.bench.playout import run_playout

        return await run_playout(args)
    if args.bench_command == "hops":
        from pipeswitch.bench.hops import run_hops

        return await run_hops(args)
    raise SystemExit(f"unknown bench command {args.bench_command!r}")


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeswitch.bench.cli``."""
    from pipeswitch.config.logging import configure_logging

    parser = argparse.ArgumentParser(prog="python -m pipeswitch.bench.cli", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    from pipeswitch.pipelines import event_loop

    # The load generator on the loop it was asked for (--bench-loop; else asyncio's).
    return event_loop.run(run_bench(args), getattr(args, "bench_loop", "asyncio"))


if __name__ == "__main__":
    sys.exit(main())
