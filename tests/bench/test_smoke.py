"""The latency bench end to end: 1 call x 1 turn (+ its barge-in) against a real server process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pipeswitch.bench.cli import add_bench_arguments, run_bench
from pipeswitch.bench.report import RESULTS_ENV


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_latency_bench_one_call_one_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))  # keep bench/results/latest.json untouched
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    out = tmp_path / "run"
    args = parser.parse_args(
        [
            "latency",
            "--calls",
            "1",
            "--turns",
            "1",
            "--no-warmup",
            "--no-progress",
            "--gate-overhead-p95-ms",
            "10000",
            # The voxcom dialplan's STREAM_BUFFER_SIZE: caller audio in 40 ms messages.
            "--stream-buffer-ms",
            "40",
            "--out",
            str(out),
        ]
    )
    rc = await run_bench(args)
    assert rc == 0

    doc = json.loads((out / "results.json").read_text())
    assert json.loads((tmp_path / "latest.json").read_text())["results_dir"] == str(out)
    ours = doc["servers"]["pipeswitch"]
    s = ours["summary"]
    assert s["turns"] == 1 and s["lost"] == 0
    assert s["matched"] == {"stt": 1, "llm": 1, "breakdown": 1}
    wire = s["wire_ms"]["p50"]
    assert 250.0 < wire < 3000.0  # at least the STT TTFS, at most "something is stuck"
    assert s["overhead_ms"]["n"] == 1
    assert s["barge_in"]["n"] == 1
    assert 0.0 < s["barge_in"]["stop_ms"]["p50"] < 2000.0
    turn = next(t for t in ours["turns"] if t["kind"] == "turn")
    assert sum(turn["stages_ms"].values()) == pytest.approx(turn["wire_ms"], abs=1.0)
    assert doc["params"]["stream_buffer_ms"] == 40
    assert 0.0 < ours["machine_speed_s"] < 30.0  # the machine-speed reference was timed
    assert "Caller audio in 40 ms messages" in (out / "report.md").read_text()
    assert (out / "latency_cdf.png").exists() and (out / "latency_stages.png").exists()


def test_the_load_sets_the_channels_stream_buffer_size() -> None:
    from pipeswitch.bench.loadgen import LoadSpec, _stream_config

    load = LoadSpec("ws://127.0.0.1:1", 8000, "json-stream", [], stream_buffer_ms=40)
    assert _stream_config(load, "u1").buffer_ms == 40
    assert LoadSpec.from_json(load.to_json()).stream_buffer_ms == 40
    assert _stream_config(LoadSpec("ws://x", 8000, "binary", []), "u2").buffer_ms == 20
