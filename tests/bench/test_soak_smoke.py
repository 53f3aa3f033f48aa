"""``pipeswitch bench soak`` end to end: a few calls against a real server process, the
callers hanging up while the bot still talks, then nothing of any call left running."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pipeswitch.bench.cli import add_bench_arguments, run_bench

# What the soak server runs between calls: its own loops, the debug API's and the
# call server's keep-alive connections. Anything else at idle is a call left behind.
SERVER_TASKS = {
    "_serve_child",
    "wait_for_stop_signal.<locals>._watch",
    "RuntimeSampler._run",
    "HandshakeWatchdog._run",
    "CallTimeCollector._run",
    "RequestHandler.start",
    "LocalModelServers._watch",
    "LocalModelServers._drain",
    "LocalModelServers._pump_stderr",
}


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_soak_calls_hung_up_mid_answer_leave_no_task(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(
        [
            "soak",
            "--calls",
            "4",
            "--warmup",
            "1",
            "--hangup-after",
            "0.4",
            "--connect-timeout",
            "5",
            "--no-plot",
            "--out",
            str(tmp_path),
        ]
    )
    assert await run_bench(args) == 0
    soak = json.loads((tmp_path / "soak.json").read_text())
    assert len(soak["samples"]) == 4
    assert all(s["latencies_ms"] and not s["error"] for s in soak["samples"])
    tasks = json.loads((tmp_path / "tasks.json").read_text())["tasks"]
    left = [t for t in tasks if t["coro"] not in SERVER_TASKS]
    assert not left, f"tasks left after the calls: {left}"
