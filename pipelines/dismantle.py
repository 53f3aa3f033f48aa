"""Take a finished call apart so reference counting frees it, not a full collection.

A Pipecat call is one big reference cycle: processors are linked both ways
(``_prev``/``_next``), register each other's bound methods as event handlers,
and the transport, its input/output halves, the worker, its runner and bus all
point at one another. Left alone, a finished call (~1,700 objects, its buffers
and sockets) waits for a full (generation 2) collection, and a full collection
stops the event loop - every call's audio - for as long as it takes to traverse
every *live* call's objects: ~0.8 ms per call here, 30-60 ms at 20-40 calls,
longer than json-stream's 20 ms playout lead. Emptying the instance dicts of
the call's Pipecat objects once nothing of the call runs any more (and cutting
only the links of the parts that hooks may still read) breaks those cycles, so
the call is freed the moment :meth:`CallSessions.run_call` returns, and the
server can run full collections rarely (pipelines/collector.py: hourly while
calls are up).

Only objects reached from the call's own roots through Pipecat objects are
touched, and only through Pipecat objects, bound methods, event handlers and
plain containers: shared things (tenant config, the batched VAD, the Piper
client, the HTTP session, the call manager) are not Pipecat base objects,
are never looked into and never emptied.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from types import FunctionType, MethodType
from typing import Any

from pipecat.utils.base_object import BaseObject, EventHandler

# How deep to look inside plain containers held by a Pipecat object (lists of
# processors, dicts of event handlers, tuples of strategies).
_CONTAINER_DEPTH = 3


def dismantle(roots: Iterable[Any], keep: Iterable[Any] = (), inspect: Iterable[Any] = ()) -> int:
    """Take apart every Pipecat object reachable from ``roots``.

    Call only when the call is over: its worker has finished, its tasks are
    reaped and nothing runs on these objects any more. Objects in ``keep`` are
    looked through but left whole (the transport, which the server still closes
    afterwards). Objects in ``inspect`` (a pipeline's named parts, which
    call-finished hooks may keep to read their stats) and our own per-call
    helpers (``call_owned``) lose only their links to other call objects; every
    other one is emptied (an attribute read afterwards raises ``AttributeError``).
    Returns how many objects were taken apart.
    """
    kept = {id(k) for k in keep}
    readable = {id(o) for o in inspect}
    done = 0
    for obj in _call_objects(roots):
        if id(obj) in kept:
            continue
        if id(obj) in readable or not isinstance(obj, BaseObject):
            _unwire(obj)
        else:
            vars(obj).clear()
        done += 1
    return done


def _unwire(obj: Any) -> None:
    """Drop the attributes that tie ``obj`` to other call objects, keep its data.

    Links, event handlers, bound methods, closures and other Pipecat objects (or
    containers of them) go; counters, stats, contexts and buffers stay, so a
    call-finished hook that kept a processor can still read what it measured.
    """
    attrs = vars(obj)
    for name in [k for k, v in attrs.items() if _is_wiring(v)]:
        del attrs[name]


def _is_wiring(value: Any) -> bool:
    if isinstance(value, _WIRING):
        return True
    if isinstance(value, dict):
        return any(isinstance(v, _WIRING) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset, deque)):
        return any(isinstance(v, _WIRING) for v in value)
    return False


# What call objects point at each other through.
_WIRING = (BaseObject, EventHandler, MethodType, FunctionType)


def _call_objects(roots: Iterable[Any]) -> list[Any]:
    """The call's Pipecat objects and ``call_owned`` helpers reachable from ``roots``."""
    seen: set[int] = set()
    found: list[Any] = []
    todo: deque[tuple[Any, int]] = deque()
    for root in roots:
        if isinstance(root, BaseObject):
            todo.append((root, 0))
        elif hasattr(root, "__dict__"):
            # A per-call helper (e.g. CallPipeline): looked through, left as it is.
            todo.extend((v, 1) for v in vars(root).values())
    while todo:
        obj, depth = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, BaseObject) or (
            getattr(type(obj), "call_owned", False) and hasattr(obj, "__dict__")
        ):
            found.append(obj)
            todo.extend((v, 0) for v in vars(obj).values())
        elif isinstance(obj, MethodType):
            if isinstance(obj.__self__, BaseObject):
                todo.append((obj.__self__, depth))
        elif isinstance(obj, EventHandler):
            todo.extend((h, depth) for h in obj.handlers)
        elif depth < _CONTAINER_DEPTH:
            if isinstance(obj, dict):
                todo.extend((v, depth + 1) for v in obj.values())
            elif isinstance(obj, (list, tuple, set, frozenset, deque)):
                todo.extend((v, depth + 1) for v in obj)
        # Anything else (a shared client, the tenant, the call manager behind a bound
        # method) is not looked into: only the call's own Pipecat objects are emptied.
    return found
