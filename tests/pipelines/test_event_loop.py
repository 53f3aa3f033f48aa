"""The server's event loop: uvloop where installed, asyncio's own on request or without it."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys

import pytest

from pipeswitch.pipelines import event_loop
from pipeswitch.pipelines.startup import StartupError


async def _which() -> str:
    await asyncio.sleep(0)  # really running: a task switch on that loop
    return event_loop.describe()


def test_auto_runs_on_uvloop_where_installed() -> None:
    # uvloop is a core dependency on CPython/Linux: the default must pick it up.
    assert event_loop.uvloop_available()
    assert event_loop.resolve("auto") == "uvloop"
    assert event_loop.run(_which()).startswith("uvloop ")
    assert event_loop.run(_which(), "uvloop").startswith("uvloop ")


def test_asyncio_on_request() -> None:
    assert event_loop.resolve("asyncio") == "asyncio"
    assert event_loop.run(_which(), "asyncio") == "asyncio"


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_startup_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(event_loop, "uvloop_available", lambda: False)
    assert event_loop.resolve("auto") == "asyncio"
    assert event_loop.run(_which(), "auto") == "asyncio"
    coro = _which()
    assert inspect.iscoroutine(coro)
    with pytest.raises(StartupError, match="PIPESWITCH_EVENT_LOOP: uvloop is not installed"):
        event_loop.run(coro, "uvloop")
    assert coro.cr_frame is None  # closed, not left to warn "never awaited"


def test_no_global_policy_is_changed() -> None:
    """Tests and embedding apps keep their own loop: running on uvloop installs no policy."""
    before = type(asyncio.get_event_loop_policy())
    event_loop.run(_which(), "uvloop")
    assert type(asyncio.get_event_loop_policy()) is before


def test_serve_loop_uvloop_without_uvloop_is_one_line_exit_2() -> None:
    code = (
        "import sys\n"
        "sys.modules['uvloop'] = None  # as if not installed\n"
        "import pipeswitch.pipelines.event_loop as el\n"
        "el.uvloop_available = lambda: False\n"
        "from pipeswitch.pipelines.cli import main\n"
        "sys.exit(main(['serve', '--loop', 'uvloop', '--port', '0']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    err = out.stderr.strip().splitlines()
    assert err[-1].startswith("pipeswitch serve: PIPESWITCH_EVENT_LOOP: uvloop is not installed")
    assert "Traceback" not in out.stderr
