"""Give memory that glibc keeps free back to the system when the server goes idle.

Calls allocate their audio buffers from several threads (the default executor, the
VAD's ONNX runtime, provider SDKs), so glibc grows one 64 MB-reserved arena per thread
and, fragmented by the calls' buffers, keeps what was freed: in ``pipeswitch bench soak
--concurrency 5`` the idle RSS climbed ~1.6 MB per call, of which ``malloc_trim(0)``
returned most (359 -> 226 MB after 97 calls). The Python objects stayed flat, so this is
retained free memory, not live data; trimming when the last call ends (no call's audio
can be delayed) keeps the idle RSS near its real size.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import sys
import time
from collections.abc import Callable

from loguru import logger

_trim: Callable[[int], int] | None = None
_loaded = False


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim, _loaded
    if not _loaded:
        _loaded = True
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        try:
            _trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
        except OSError:  # not glibc (musl has no malloc_trim): nothing to do
            _trim = None
    return _trim


async def trim_free_memory() -> None:
    """``malloc_trim(0)`` in a thread (it walks every arena; the loop keeps running)."""
    trim = _malloc_trim()
    if trim is None:
        return
    t0 = time.monotonic()
    await asyncio.to_thread(trim, 0)
    logger.debug("malloc_trim at idle: {:.0f} ms", (time.monotonic() - t0) * 1000.0)
