"""``pipeswitch bench playout`` end to end, small: every call's audio reaches its far
end as 20 ms wire frames, on the process's playout clock."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pipeswitch.bench.cli import add_bench_arguments, run_bench


@pytest.mark.timeout(60)
async def test_playout_bench_plays_every_calls_audio_on_one_clock(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(
        ["playout", "--calls", "4", "--secs", "2", "--repeat", "1", "--out", str(tmp_path)]
    )
    assert await run_bench(args) == 0
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["wire_messages_per_call"] == 100  # 2 s in 20 ms frames, per call
    assert run["cpu_s"] > 0 and run["cpu_pct_per_call"] > 0
    # The clock ran (one process-wide task), and not once per call per frame.
    assert 0 < run["pacer_rounds_per_s"] < 4 * 50
