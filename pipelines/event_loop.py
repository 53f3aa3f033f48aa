"""Which asyncio event loop the server runs on.

A call is ~100 socket messages a second (caller audio in, bot audio out) and a
few timers; at 40-60 calls per process most of the main thread is the event
loop itself: selector wake-ups, transport reads and writes, handle scheduling.
uvloop (libuv) does that work in C. Measured back to back with the capacity
bench (README, performance): where one process's loop is saturated (80 calls)
uvloop halves its lag and the audio underruns 30-40 % less; below that the gain
is a few points of a core.

``auto`` (the default) takes uvloop where it is installed, as uvicorn does;
``asyncio`` keeps the standard loop (for an A/B, or a platform without uvloop);
``uvloop`` insists on it (start-up fails, naming the setting, if it is missing).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

from pipeswitch.config.settings import EventLoopKind
from pipeswitch.pipelines.startup import StartupError

EVENT_LOOP_KINDS: tuple[EventLoopKind, ...] = get_args(EventLoopKind)

T = TypeVar("T")


class EventLoopUnavailable(StartupError):
    """``event_loop = "uvloop"`` where uvloop cannot be imported."""


def uvloop_available() -> bool:
    """Whether uvloop is importable here (it is not on Windows or PyPy)."""
    return importlib.util.find_spec("uvloop") is not None


def resolve(kind: EventLoopKind) -> Literal["uvloop", "asyncio"]:
    """The loop ``kind`` means on this machine."""
    if kind == "asyncio":
        return "asyncio"
    if uvloop_available():
        return "uvloop"
    if kind == "uvloop":
        raise EventLoopUnavailable(
            "PIPESWITCH_EVENT_LOOP: uvloop is not installed (pip install uvloop, "
            "or set PIPESWITCH_EVENT_LOOP=asyncio)"
        )
    return "asyncio"


def loop_factory(kind: EventLoopKind) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for :class:`asyncio.Runner` (``None``: the standard loop)."""
    if resolve(kind) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run(main: Coroutine[Any, Any, T], kind: EventLoopKind = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``kind`` selects (no global policy is changed)."""
    try:
        factory = loop_factory(kind)
    except BaseException:
        main.close()  # never awaited: say so quietly, not as a RuntimeWarning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def describe(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """``uvloop 0.21.0`` or ``asyncio``: for the start-up log line and bench results."""
    loop = loop or asyncio.get_running_loop()
    if type(loop).__module__.split(".")[0] == "uvloop":
        import uvloop

        return f"uvloop {uvloop.__version__}"
    return "asyncio"
