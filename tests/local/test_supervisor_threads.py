"""How many threads the local LLM server is started with (nothing is spawned here)."""

from __future__ import annotations

import pytest

from pipeswitch.pipelines.local.supervisor import (
    LLM_GEN_THREADS_ENV,
    LLM_THREADS_ENV,
    LocalModelServers,
)


def _llm_threads(servers: LocalModelServers) -> tuple[str, str, int]:
    """(generation threads, prompt threads) as passed to the server, and the child's pin."""
    child = servers.children["llm"]
    args = child.args
    return args[args.index("--threads") + 1], args[args.index("--batch-threads") + 1], child.threads


def test_the_llm_gets_one_thread_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LLM_THREADS_ENV, raising=False)
    monkeypatch.delenv(LLM_GEN_THREADS_ENV, raising=False)
    # Two threads stall each other whenever other work takes a core (supervisor.py).
    assert _llm_threads(LocalModelServers(piper=False, whisper=False)) == ("1", "1", 1)
    monkeypatch.setenv(LLM_THREADS_ENV, "2")  # a box with a core to spare: the prompt on 2
    assert _llm_threads(LocalModelServers(piper=False, whisper=False)) == ("1", "2", 2)
    monkeypatch.setenv(LLM_GEN_THREADS_ENV, "2")
    assert _llm_threads(LocalModelServers(piper=False, whisper=False)) == ("2", "2", 2)
    monkeypatch.setenv(LLM_THREADS_ENV, "1")  # generation never gets more than the prompt
    assert _llm_threads(LocalModelServers(piper=False, whisper=False)) == ("1", "1", 1)
    # Explicit arguments win over the environment.
    servers = LocalModelServers(piper=False, whisper=False, llm_threads=3, llm_gen_threads=2)
    assert _llm_threads(servers) == ("2", "3", 3)
