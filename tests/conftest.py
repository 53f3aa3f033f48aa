"""Shared fixtures: one Pipeswitch server (Piper for real, providers emulated) per session.

Starting Piper and the emulators once keeps the end-to-end suite short; each test
places its own calls through the FreeSWITCH emulator, the way FreeSWITCH would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from _pytest.nodeid import coerce_node_id
from loguru import logger

from pipeswitch.bench.emulators.runner import EmulatorConfig, RunningEmulators, run_emulators
from pipeswitch.config.loaders import StaticTenantLoader
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import ProviderSettings, Tenant
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.emulated import endpoints_for
from pipeswitch.pipelines.piper_client import wav_pcm

# Benches run by tests check plumbing, not figures: no waiting for a quiet machine
# (CI's other xdist worker is rarely quiet; the wait ran into the 90 s test timeout).
os.environ.setdefault("PIPESWITCH_BENCH_QUIET_WAIT_S", "0")

QUESTION = "What are your opening hours on Saturday?"
KEYWORD_ROUTER = "python:pipeswitch.pipelines.examples.keyword_router:build"
BARGE_IN = "Sorry, can you hold on a second?"


@dataclass
class Served:
    """The running server and what tests need to drive and inspect it."""

    app: Pipeswitch
    emu: RunningEmulators
    http: aiohttp.ClientSession

    def url(
        self, domain: str | None = "default", rate: int = 8000, uuid: str = "call", **q: str
    ) -> str:
        query = {"rate": str(rate), "mix": "mono", **q}
        if domain is not None:
            query["domain"] = domain
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return f"ws://127.0.0.1:{self.app.port}/fs/{uuid}?{qs}"

    async def speech(self, text: str, rate: int) -> bytes:
        """Caller speech synthesized by the running Piper server (cached)."""
        key = (text, rate)
        if key not in _speech_cache:
            url = self.app.endpoints.piper_for_rate(rate)
            async with self.http.post(url, json={"text": text, "voice": "joe"}) as r:
                r.raise_for_status()
                wav = await r.read()
            _speech_cache[key] = trim_silence(wav_pcm(wav)[0])
        return _speech_cache[key]


_speech_cache: dict[tuple[str, int], bytes] = {}


def trim_silence(pcm: bytes, peak: int = 300) -> bytes:
    """Drop leading/trailing near-silence so 'end of speech' is the last voiced sample."""
    a = np.frombuffer(pcm, dtype="<i2")
    idx = np.flatnonzero(np.abs(a) > peak)
    if not len(idx):
        return pcm
    return a[idx[0] : idx[-1] + 1].tobytes()


def make_tenants() -> StaticTenantLoader:
    """The default tenant plus one tenant per playback dialect."""
    tenants = [Tenant(name="default")]
    for dialect in ("json-stream", "binary", "file"):
        tenants.append(Tenant(name=f"{dialect}.test", playback=dialect))
    tenants.append(Tenant(name="router.test", pipeline=KEYWORD_ROUTER))
    # Groq first, OpenAI when Groq is down (tests/faults/test_llm_failover.py).
    tenants.append(
        Tenant(name="llm-fallback.test", providers=ProviderSettings(llm_fallback="openai"))
    )
    tenants.append(
        Tenant(name="raises.test", pipeline="python:tests.pipelines.builders:build_raising")
    )
    return StaticTenantLoader(tenants, default="default")


# pytest-xdist (``-n 3 --dist loadgroup`` in pyproject): tests that share a costly fixture run
# on one worker, so it starts once, not once per worker. The whole local model stack (Whisper
# and the LLM: memory and both cores), the console's Chromium, the speech-to-speech server.
_SHARED_FIXTURE_GROUPS = {"local_servers": "local-models", "console": "console", "s2s": "s2s"}


def _xdist_group(item: pytest.Item) -> str | None:
    """The worker group of ``item``: its costly shared fixture, or its module when the module
    has a module-scoped fixture (one set-up per module, not one per worker it lands on)."""
    names = getattr(item, "fixturenames", ())
    for fixture, group in _SHARED_FIXTURE_GROUPS.items():
        if fixture in names:
            return group
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        for defs in info.name2fixturedefs.values():
            if defs and defs[-1].scope == "module":
                return item.nodeid.split("::")[0]
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put each test in its xdist group (an explicit ``xdist_group`` mark wins).

    xdist 3.8 puts a test in its group by rewriting ``item._nodeid`` to ``nodeid@group``, and
    pytest 9.2 no longer reads ``_nodeid`` (a node id is ``str(item._id)``): every group was
    silently spread over the workers (a module's shared state, a costly fixture per worker).
    The suffix is written here where pytest 9.2 reads it, for marked tests too.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        marks = [
            m.args[0] if m.args else m.kwargs.get("name", "default")
            for m in item.iter_markers("xdist_group")
        ]
        group = "_".join(sorted({str(g) for g in marks})) or _xdist_group(item)
        if group and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{group}")


@pytest.fixture(scope="session")
def log_lines() -> Iterator[list[str]]:
    """Every log line of the session, to check that bad input is logged with a reason."""
    lines: list[str] = []
    sink = logger.add(
        lambda m: lines.append(str(m)), level="INFO", format="{level} {extra} {message}"
    )
    yield lines
    # A test that runs a CLI entry point in-process reconfigures logging (all sinks go).
    with contextlib.suppress(ValueError):
        logger.remove(sink)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def served(log_lines: list[str]) -> AsyncIterator[Served]:
    cfg = EmulatorConfig(llm_script="office", stt_script="office", seed=1)
    async with run_emulators(cfg) as emu:
        loader = make_tenants()
        settings = Settings(host="127.0.0.1", port=0, providers="emulated", idle_timeout_secs=30)
        app = Pipeswitch(
            settings, loader=loader, default_tenant="default", endpoints=endpoints_for(emu)
        )
        await app.start()
        async with aiohttp.ClientSession() as http:
            try:
                yield Served(app, emu, http)
            finally:
                await app.stop(drain_secs=2.0)
                await asyncio.sleep(0)
