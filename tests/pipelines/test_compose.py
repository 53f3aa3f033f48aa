"""The composition API: builders resolved and checked at load; a broken call ends alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pipeswitch.config.loaders import ConfigError
from pipeswitch.config.settings import Settings
from pipeswitch.config.tenants import Tenant
from pipeswitch.pipelines.app import load_tenants
from pipeswitch.pipelines.cascade import build_cascade
from pipeswitch.pipelines.compose import BuilderError, builtin_kinds, resolve_builder
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet, wait_for_bot_audio


def test_builtin_cascade_is_registered() -> None:
    assert "cascade" in builtin_kinds()
    assert resolve_builder("cascade") is build_cascade


def test_python_builder_resolves() -> None:
    fn = resolve_builder("python:tests.pipelines.builders:build_raising")
    assert fn.__name__ == "build_raising"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("python:no_such_module_here:build", "cannot import no_such_module_here"),
        ("python:tests.pipelines.builders:missing", "has no 'missing'"),
        ("python:tests.pipelines.builders:not_async", "must be an async function"),
        ("python:tests.pipelines.builders:two_args", "must take one argument"),
        ("python:tests.pipelines.builders:NOT_CALLABLE", "is not callable"),
        ("entrypoint:nobody-registered-this", "no entry point"),
        ("openai-realtime-v9", "is not available in this build"),
    ],
)
def test_broken_builders_are_one_line_errors(spec: str, problem: str) -> None:
    with pytest.raises(BuilderError) as err:
        resolve_builder(spec)
    message = str(err.value)
    assert problem in message and "\n" not in message


def test_tenant_pipeline_value_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown pipeline"):
        Tenant(name="x.example", pipeline="python:not a module")


def test_file_with_a_broken_builder_is_refused_at_load(tmp_path: Path) -> None:
    f = tmp_path / "tenants.toml"
    f.write_text(
        '[[tenants]]\nname = "dev.example"\npipeline = "python:tests.pipelines.builders:two_args"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_tenants(Settings(config_file=f))
    assert "dev.example" in str(err.value) and "one argument" in str(err.value)


@pytest.mark.asyncio(loop_scope="session")
async def test_exception_in_a_developer_processor_ends_that_call_only(
    served: Served, log_lines: list[str]
) -> None:
    speech = await served.speech(QUESTION, 8000)
    broken = await open_call(served.url(domain="raises.test", uuid="dev-bug"), 8000, "json-stream")
    healthy = await open_call(served.url(domain="default", uuid="dev-ok"), 8000, "json-stream")
    try:
        for s in (broken, healthy):
            assert await wait_for_bot_audio(s, 0.0, timeout_s=3.0) is not None
        await asyncio.gather(wait_bot_quiet(broken), wait_bot_quiet(healthy))
        # The broken call's first turn reaches the faulty processor: that call ends ...
        broken.queue_caller_audio(speech)
        closed = await broken.wait_event(
            lambda e: e.name == "mod_audio_stream::disconnect", timeout_s=10.0
        )
        assert closed is not None, "the broken call was not ended"
        assert broken.close_record.server_close_code is not None
        # ... and the other call goes on answering.
        _, answer = await ask(healthy, speech, 8000)
        assert answer is not None
    finally:
        await broken.hangup()
        await healthy.hangup()
    lines = [ln for ln in log_lines if "dev-bug" in ln and "Explodes" in ln]
    assert lines and "bug in a developer's processor" in lines[0]


@pytest.mark.parametrize(
    ("mode", "stt", "timeout"),
    [("local", "deepgram", 20.0), ("real", "whisper-local", 20.0), ("real", "deepgram", 5.0)],
)
def test_a_local_whisper_turn_is_not_given_up_after_five_seconds(
    mode: str, stt: str, timeout: float
) -> None:
    """Pipecat answers a turn it timed out as an empty one: with one Whisper shared by all
    calls, a loaded machine's transcription (9.7 s measured) must not be pre-empted."""
    from typing import Any, cast

    from pipecat.processors.aggregators.llm_context import LLMContext

    from pipeswitch.pipelines.compose import CallContext
    from pipeswitch.pipelines.services import ProviderEndpoints

    tenant = Tenant.model_validate({"name": "t.example", "providers": {"stt": stt}})
    ctx = CallContext(
        tenant=tenant,
        call=cast(Any, None),
        transport=cast(Any, None),
        sample_rate=8000,
        services=cast(Any, None),
        endpoints=ProviderEndpoints(mode=mode, piper_url=""),  # type: ignore[arg-type]
        http=cast(Any, None),
    )
    user = ctx.context_aggregators(LLMContext()).user()
    assert user._params.user_turn_stop_timeout == timeout


@pytest.mark.parametrize(("guard", "needed"), [(False, 0.2), (True, 0.15)])
def test_behind_the_cascade_echo_guard_silero_start_is_the_barge_in(
    guard: bool, needed: float
) -> None:
    """The guard already held the onset until it cleared the echo for 150 ms and releases
    it at once: asking Silero for more speech on top only delays the stop."""
    from typing import Any, cast

    from pipeswitch.pipelines.compose import CallContext
    from pipeswitch.pipelines.services import ProviderEndpoints
    from pipeswitch.processors.barge_in import BargeInStartStrategy

    tenant = Tenant.model_validate(
        {"name": "t.example", "turns": {"echo_guard_cascade": guard, "barge_in_min_secs": 0.2}}
    )
    ctx = CallContext(
        tenant=tenant,
        call=cast(Any, None),
        transport=cast(Any, None),
        sample_rate=8000,
        services=cast(Any, None),
        endpoints=ProviderEndpoints(mode="emulated", piper_url=""),
        http=cast(Any, None),
    )
    (barge_in,) = [
        s for s in ctx.turn_strategies().start or [] if isinstance(s, BargeInStartStrategy)
    ]
    assert barge_in._min_secs == pytest.approx(needed)
