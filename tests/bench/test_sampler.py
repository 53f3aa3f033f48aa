"""The bench's process sampler: CPU and the time an event loop waited for a CPU."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import psutil
import pytest

from pipeswitch.bench.servers import ProcessGroup, ProcessSampler

pytestmark = pytest.mark.asyncio

SPIN = "import time\nt = time.monotonic() + 5\nwhile time.monotonic() < t: pass\n"


async def test_a_crowded_machine_shows_as_run_queue_wait_an_idle_process_does_not() -> None:
    # One more busy process than there are cores: each waits for a CPU part of the time.
    n = (os.cpu_count() or 1) + 1
    busy = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        await asyncio.sleep(0.3)  # past interpreter start-up
        procs = {f"busy{i}": psutil.Process(p.pid) for i, p in enumerate(busy)}
        procs["idle"] = psutil.Process(idle.pid)
        procs["group"] = ProcessGroup([psutil.Process(p.pid) for p in busy[:2]])
        sampler = ProcessSampler(procs, interval_s=0.2)
        sampler.begin()
        await asyncio.sleep(1.0)
        out = await sampler.end()
    finally:
        for p in [*busy, idle]:
            p.kill()
            p.wait()
    waits = [out[f"busy{i}"].main_thread_wait_pct for i in range(n)]
    assert all(w is not None for w in waits)
    # n runnable on n-1 cores: about 1/n of the wall waiting, on average.
    assert sum(waits) / n > 5.0, waits  # type: ignore[arg-type]
    assert sum(out[f"busy{i}"].cpu_pct or 0.0 for i in range(n)) > 50.0
    assert out["idle"].main_thread_wait_pct is not None
    assert out["idle"].main_thread_wait_pct < 2.0
    group = out["group"].main_thread_wait_pct
    assert group is not None and group == pytest.approx(waits[0] + waits[1], abs=5.0)  # type: ignore[operator]
