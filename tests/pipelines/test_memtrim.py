"""Trimming at idle gives back what glibc kept free in a thread's arena (pipelines/memtrim.py)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from pipeswitch.pipelines.memtrim import _malloc_trim, trim_free_memory


def rss_mb() -> float:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _malloc_trim() is None, reason="glibc only"
)
async def test_free_memory_of_a_thread_arena_is_returned() -> None:
    keep: list[bytearray] = []

    def churn() -> None:
        # ~120 MB of call-sized buffers from a worker thread (its own arena); every 64th
        # survives, so the arena is fragmented and free() alone cannot shrink it.
        chunks = [bytearray(640) for _ in range(200_000)]
        keep.extend(chunks[::64])
        del chunks

    t = threading.Thread(target=churn)
    t.start()
    t.join()
    before = rss_mb()
    await trim_free_memory()
    after = rss_mb()
    assert len(keep) == 3125
    assert before - after > 40, (before, after)
