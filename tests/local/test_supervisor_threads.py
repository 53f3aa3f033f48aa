"""How many threads the local LLM server is started with (nothing is spawned here)."""

from __future__ import annotations

import pytest

from pipeswitch.pipelines.local.supervisor import LLM_THREADS_ENV, LocalModelServers


def _llm_threads(servers: LocalModelServers) -> tuple[str, int]:
    child = servers.children["llm"]
    return child.args[child.args.index("--threads") + 1], child.threads


def test_the_llm_gets_one_thread_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LLM_THREADS_ENV, raising=False)
    assert _llm_threads(LocalModelServers(piper=False, whisper=False)) == ("1", 1)
    monkeypatch.setenv(LLM_THREADS_ENV, "2")  # a machine whose 2 cores the LLM has alone
    assert _llm_threads(LocalModelServers(piper=False, whisper=False)) == ("2", 2)
    # An explicit argument wins over the environment.
    assert _llm_threads(LocalModelServers(piper=False, whisper=False, llm_threads=3)) == ("3", 3)
