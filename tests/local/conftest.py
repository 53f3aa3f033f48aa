"""Fixtures for the local inference servers.

* ``piper_servers`` (module scope): Piper only (``LocalModelServers.piper_only()``); Piper is
  a base dependency, so these tests need no ``[local]`` extra.
* ``local_servers`` (session scope): Piper + Whisper + LLM, started once per test session;
  tests using it are marked ``local_models`` and skipped when the ``[local]`` extra is
  missing.

Async tests that use these fixtures run on the session event loop
(``pytest.mark.asyncio(loop_scope="session")``) so the supervisor keeps draining the
children's stderr pipes while tests run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from pipeswitch.pipelines.local import models
from pipeswitch.pipelines.local.supervisor import LocalModelServers


def _local_extra_problems() -> list[str]:
    return models.check_local_extra()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def piper_servers() -> AsyncIterator[LocalModelServers]:
    async with LocalModelServers.piper_only(start_timeout=60) as servers:
        yield servers


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def local_servers() -> AsyncIterator[LocalModelServers]:
    problems = _local_extra_problems()
    if problems:
        pytest.skip("[local] extra incomplete: " + "; ".join(problems))
    async with LocalModelServers(start_timeout=180) as servers:
        yield servers
