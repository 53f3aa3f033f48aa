"""The bench's own processes (load generator, provider emulators) run on the loop asked for."""

from __future__ import annotations

import asyncio

import pytest

from pipeswitch.bench import loadgen
from pipeswitch.bench.emulators.runner import start_emulator_process
from pipeswitch.pipelines.event_loop import uvloop_available


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_emulators_run_on_the_loop_asked_for(use_uvloop: bool) -> None:
    if use_uvloop and not uvloop_available():
        pytest.skip("uvloop is not installed")
    emu = start_emulator_process(use_uvloop=use_uvloop)
    try:
        assert emu.info["event_loop"] == ("uvloop" if use_uvloop else "asyncio")
        assert emu.deepgram_port > 0
    finally:
        emu.stop()


def test_load_worker_rejects_an_unknown_loop() -> None:
    # (It checks its arguments before it configures logging: the suite's sinks survive.)
    with pytest.raises(SystemExit, match="unknown event loop 'tokio'"):
        loadgen.main(["spec.json", "out.json", "tokio"])
    with pytest.raises(SystemExit, match="usage"):
        loadgen.main(["spec.json"])


def test_bench_cli_runs_the_load_generator_on_the_bench_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`pipeswitch bench ... --bench-loop X` runs the bench (the load generator) on X."""
    from pipeswitch.bench import cli as bench_cli
    from pipeswitch.pipelines import cli as pipeswitch_cli

    seen: list[str] = []

    async def fake_run_bench(args: object) -> int:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])
        return 0

    monkeypatch.setattr(bench_cli, "run_bench", fake_run_bench)
    # The CLIs replace loguru's sinks; the suite's own (log assertions) must survive this test.
    monkeypatch.setattr("pipeswitch.config.logging.configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(pipeswitch_cli, "configure_logging", lambda *a, **k: None)
    kinds = ["asyncio"] + (["uvloop"] if uvloop_available() else [])
    for kind in kinds:
        assert bench_cli.main(["capacity", "--steps", "1", "--bench-loop", kind]) == 0
        assert pipeswitch_cli.main(["bench", "latency", "--bench-loop", kind]) == 0
    assert seen == [k for k in kinds for _ in range(2)]
