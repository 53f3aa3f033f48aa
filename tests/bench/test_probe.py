"""The bench probe's GC timing: pauses while calls are up, apart from idle ones."""

from __future__ import annotations

import gc

from pipeswitch.bench.probe import GcMonitor


def test_collections_with_no_call_up_are_counted_apart() -> None:
    calls = [0]
    mon = GcMonitor(active=lambda: calls[0])
    mon.install()
    try:
        gc.collect()  # idle: the server's collection after the last call ended
        calls[0] = 3
        gc.collect()
        gc.collect()
    finally:
        mon.uninstall()
    gen2 = mon.summary_ms()["gen2"]
    assert (gen2["count"], gen2["idle_count"]) == (2, 1)
    assert gen2["max_ms"] is not None and gen2["max_ms"] >= 0.0


def test_without_a_call_count_every_collection_counts() -> None:
    mon = GcMonitor()
    mon.install()
    try:
        gc.collect()
    finally:
        mon.uninstall()
    gc.collect()  # uninstalled: not seen
    gen2 = mon.summary_ms()["gen2"]
    assert (gen2["count"], gen2["idle_count"]) == (1, 0)
    mon.reset()
    assert mon.summary_ms()["gen2"]["count"] == 0
