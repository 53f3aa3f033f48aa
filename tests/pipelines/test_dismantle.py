"""A finished call is freed by reference counting, with no full collection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from pipecat.processors.frame_processor import FrameProcessor

import pipeswitch.pipelines.collector as collector_module
import pipeswitch.pipelines.session as session_module
from pipeswitch.pipelines.compose import CallPipeline
from pipeswitch.pipelines.dismantle import dismantle
from pipeswitch.pipelines.session import CallRecord
from tests.conftest import Served
from tests.e2e.helpers import open_call


@contextlib.contextmanager
def no_automatic_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Shared:
    """Stands for what calls share (a client, the tenant): never emptied."""

    def __init__(self) -> None:
        self.calls: dict[str, Any] = {}


class Proc(FrameProcessor):
    def __init__(self) -> None:
        super().__init__()
        self._register_event_handler("on_peer")

    async def on_peer(self, *_: Any) -> None:
        return None


def _linked_call(shared: Shared) -> tuple[Proc, Proc]:
    a, b = Proc(), Proc()
    a.link(b)  # a._next = b, b._prev = a: a cycle
    a.add_event_handler("on_peer", b.on_peer)
    b.add_event_handler("on_peer", a.on_peer)
    a.shared = shared  # type: ignore[attr-defined]
    shared.calls["a"] = "kept by the shared object"
    return a, b


def test_a_linked_pair_of_processors_is_a_cycle_without_it() -> None:
    with no_automatic_gc():
        a, b = _linked_call(Shared())
        ra, rb = weakref.ref(a), weakref.ref(b)
        del a, b
        assert ra() is not None and rb() is not None, "no cycle: the test proves nothing"
        gc.collect()
        assert ra() is None and rb() is None


def test_dismantled_processors_are_freed_at_once_and_shared_objects_left_whole() -> None:
    shared = Shared()
    with no_automatic_gc():
        a, b = _linked_call(shared)
        keep = Proc()
        keep.peer = a  # type: ignore[attr-defined]
        emptied = dismantle([CallPipeline(pipeline=None, parts={"a": a})], keep=[keep])  # type: ignore[arg-type]
        assert emptied >= 2  # a, b and what they own (their metrics)
        ra, rb = weakref.ref(a), weakref.ref(b)
        del a, b, keep
        assert ra() is None and rb() is None
    assert shared.calls == {"a": "kept by the shared object"}


def test_kept_objects_are_looked_through_but_not_emptied() -> None:
    a, b = _linked_call(Shared())
    keep = Proc()
    keep.peer = a  # type: ignore[attr-defined]
    dismantle([keep], keep=[keep])
    assert keep.peer is a and keep.name  # type: ignore[attr-defined]
    assert not vars(a) and not vars(b)


def test_named_parts_keep_their_data_and_lose_their_links() -> None:
    """A call-finished hook may keep a part to read its stats after the call."""
    with no_automatic_gc():
        a, b = _linked_call(Shared())
        b.stats = {"barge_ins": 2}  # type: ignore[attr-defined]
        dismantle([a], inspect=[b])
        assert b.stats == {"barge_ins": 2}  # type: ignore[attr-defined]
        assert "_prev" not in vars(b) and "_event_handlers" not in vars(b)
        assert not vars(a)
        rb = weakref.ref(b)
        del a, b
        assert rb() is None


async def test_a_finished_call_is_freed_without_a_full_collection(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another call stays up (the server never goes idle, so never collects) and full
    collections are off: the ended call's processors must go by reference counting."""
    assert served.app.sessions is not None
    sessions = served.app.sessions
    monkeypatch.setattr(collector_module, "COLLECT_INTERVAL_SECS", 1e9)
    monkeypatch.setattr(collector_module, "GROWTH_LIMIT", 10**12)
    monkeypatch.setattr(collector_module, "COLLECT_EVERY_CALLS", 10**6)
    refs: list[weakref.ref[Any]] = []

    async def grab(_record: CallRecord, cp: CallPipeline) -> None:
        if not refs:
            refs.extend(weakref.ref(p) for p in cp.pipeline.processors)

    sessions.finished_hooks.append(grab)
    keep = await open_call(served.url(uuid="dismantle-keep"), 8000, "json-stream")
    try:
        with no_automatic_gc():
            for dismantled in (False, True):
                monkeypatch.setattr(session_module, "DISMANTLE_CALLS", dismantled)
                refs.clear()
                uuid = f"dismantle-{dismantled}"
                short = await open_call(served.url(uuid=uuid), 8000, "json-stream")
                await asyncio.sleep(0.5)
                await short.hangup()
                for _ in range(100):
                    if refs and uuid not in sessions.active:
                        break
                    await asyncio.sleep(0.05)
                # The server's handler returns once the socket is closed.
                for _ in range(60):
                    if all(r() is None for r in refs):
                        break
                    await asyncio.sleep(0.05)
                assert "dismantle-keep" in sessions.active, "the server went idle"
                alive = [r() for r in refs if r() is not None]
                if dismantled:
                    assert refs and not alive, f"still alive: {alive[:5]}"
                else:
                    assert alive, "a whole call was freed without help: the test proves nothing"
                    gc.collect()
    finally:
        sessions.finished_hooks.remove(grab)
        await keep.hangup()
