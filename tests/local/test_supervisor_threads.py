"""How many threads the local LLM server is started with (nothing is spawned here)."""

from __future__ import annotations

import pytest

from pipeswitch.pipelines.local.supervisor import (
    DEFAULT_LLM_THREADS,
    LLM_THREADS_ENV,
    LocalModelServers,
)


def _llm_threads(servers: LocalModelServers) -> tuple[str, int]:
    child = servers.children["llm"]
    return child.args[child.args.index("--threads") + 1], child.threads


def test_the_llm_gets_one_thread_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LLM_THREADS_ENV, raising=False)
    default = str(DEFAULT_LLM_THREADS)
    assert _llm_threads(LocalModelServers(piper=False, whisper=False)) == (default, int(default))
    monkeypatch.setenv(LLM_THREADS_ENV, "1")  # a box the LLM shares with heavy work
    assert _llm_threads(LocalModelServers(piper=False, whisper=False)) == ("1", 1)
    # An explicit argument wins over the environment.
    assert _llm_threads(LocalModelServers(piper=False, whisper=False, llm_threads=3)) == ("3", 3)
