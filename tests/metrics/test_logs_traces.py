"""Logs carry the call, tenant and pipeline on every line (Pipecat's own too); JSON lines in
production; OpenTelemetry gives one trace per call with a span per turn."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from loguru import logger
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeswitch.config.settings import Settings
from pipeswitch.pipelines.app import Pipeswitch
from pipeswitch.pipelines.emulated import endpoints_for
from tests.conftest import QUESTION, Served, make_tenants
from tests.e2e.helpers import ask, open_call, wait_bot_quiet

_LOGS = textwrap.dedent(
    """
    import asyncio, sys
    from loguru import logger
    from pipeswitch.config.logging import configure_logging
    configure_logging("INFO", json=sys.argv[1] == "json")

    async def pipecat_like() -> None:  # a task started inside the call, logging unbound
        logger.info("inside a task")

    async def main() -> None:
        with logger.contextualize(call="uuid-1", tenant="acme", pipeline="cascade"):
            await asyncio.ensure_future(pipecat_like())
            api_key = "sk-not-in-any-log"
            try:
                raise ValueError("refused")
            except ValueError:
                logger.exception("provider refused ({} chars of key)", len(api_key))
        logger.info("outside any call")

    asyncio.run(main())
    """
)


def _run_logs(mode: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _LOGS, mode], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [line for line in out.stderr.splitlines() if line.strip()]


def test_json_lines_bound_to_the_call() -> None:
    lines = _run_logs("json")
    records = [json.loads(line) for line in lines]  # every line is one flat JSON object
    inside = next(r for r in records if r["message"] == "inside a task")
    assert (inside["call"], inside["tenant"], inside["pipeline"]) == ("uuid-1", "acme", "cascade")
    assert inside["level"] == "INFO" and ":pipecat_like:" in inside["where"]
    outside = next(r for r in records if r["message"] == "outside any call")
    assert (outside["call"], outside["tenant"], outside["pipeline"]) == ("-", "-", "-")
    # The traceback rides in its line, without variable values (the key stays out).
    failed = next(r for r in records if r["message"].startswith("provider refused"))
    assert failed["call"] == "uuid-1" and "ValueError: refused" in failed["exception"]
    assert not any("sk-not-in-any-log" in line for line in lines)


def test_terminal_lines_are_readable() -> None:
    lines = _run_logs("text")
    inside = next(line for line in lines if "inside a task" in line)
    assert "uuid-1 acme cascade inside a task" in inside
    assert not inside.lstrip().startswith("{")


async def test_pipecat_lines_of_a_call_carry_its_uuid(served: Served) -> None:
    seen: list[dict[str, Any]] = []
    sink = logger.add(
        lambda m: seen.append(dict(m.record["extra"])),
        level="DEBUG",
        filter=lambda r: r["name"] is not None and r["name"].startswith("pipecat"),
    )
    stream = await open_call(served.url(uuid="log-bound-1"), 8000, "json-stream")
    try:
        await wait_bot_quiet(stream, timeout_s=5.0)
    finally:
        await stream.hangup()
        logger.remove(sink)
    assert seen, "Pipecat logged nothing during a call"
    bound = [e for e in seen if e.get("call") == "log-bound-1"]
    assert bound and all(e.get("tenant") == "default" for e in bound)
    assert all(e.get("pipeline") == "cascade" for e in bound)


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):  # another test installed one: add to it
        current.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    return exporter


async def test_one_trace_per_call_with_a_span_per_turn(
    served: Served, spans: InMemorySpanExporter
) -> None:
    settings = Settings(host="127.0.0.1", port=0, providers="emulated", tracing=True)
    app = Pipeswitch(
        settings,
        loader=make_tenants(),
        default_tenant="default",
        endpoints=endpoints_for(served.emu),
    )
    await app.start()
    try:
        speech = await served.speech(QUESTION, 8000)
        url = f"ws://127.0.0.1:{app.port}/fs/traced-1?domain=default&rate=8000&mix=mono"
        stream = await open_call(url, 8000, "json-stream")
        try:
            await wait_bot_quiet(stream)
            for _ in range(2):
                _, answer = await ask(stream, speech, 8000)
                assert answer is not None
                await wait_bot_quiet(stream)
        finally:
            await stream.hangup()
    finally:
        await app.stop(drain_secs=2.0)
    finished = spans.get_finished_spans()
    convs = [
        s
        for s in finished
        if s.name == "conversation" and (s.attributes or {}).get("conversation.id") == "traced-1"
    ]
    assert len(convs) == 1, [s.name for s in finished]
    conv = convs[0]
    turns = [
        s
        for s in finished
        if s.name == "turn" and s.parent is not None and s.parent.span_id == conv.context.span_id
    ]
    assert len(turns) >= 2
    assert all(t.context.trace_id == conv.context.trace_id for t in turns)
    # The call's trace names its tenant and pipeline kind.
    assert (conv.attributes or {}).get("tenant") == "default"
    assert (conv.attributes or {}).get("pipeline") == "cascade"
