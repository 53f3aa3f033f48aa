"""``bench hops`` runs every combination through a real worker and reports each."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pipeswitch.bench.hops import add_hops_arguments, run_hops

pytestmark = pytest.mark.asyncio


async def test_every_combination_is_measured_and_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = argparse.ArgumentParser()
    add_hops_arguments(p)
    args = p.parse_args(
        [
            "--frames",
            "300",
            "--hops",
            "2",
            "--observers",
            "1",
            "--repeat",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert await run_hops(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["hops"]
    combos = {(r["worker"], r["direct"], r["frame"]) for r in rows}
    assert combos == {
        (w, d, f)
        for w in ("PipelineWorker", "CallWorker")
        for d in (False, True)
        for f in ("text", "audio")
    }
    # Every run ended (all frames reached the counter) and cost some CPU.
    assert all(len(r["us_per_hop"]) == 1 and r["us_per_hop"][0] > 0 for r in rows)
    table = capsys.readouterr().out
    assert "| CallWorker | direct |" in table and "| PipelineWorker | queued |" in table
