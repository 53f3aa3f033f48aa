"""A provider failing inside a turn: the caller hears an apology, not dead air, and the
next turn is answered once the provider is back."""

from __future__ import annotations

from pipeswitch.bench.emulators.openai_chat import ChatFaults
from pipeswitch.pipelines.recovery import LLM_APOLOGY
from tests.conftest import QUESTION, Served
from tests.e2e.helpers import ask, open_call, wait_bot_quiet


async def test_llm_error_is_apologised_for_then_the_call_goes_on(
    served: Served, log_lines: list[str]
) -> None:
    speech = await served.speech(QUESTION, 8000)
    stream = await open_call(served.url(uuid="fault-llm-500"), 8000, "json-stream")
    try:
        await wait_bot_quiet(stream, quiet_s=1.0)
        served.emu.openai.set_faults(ChatFaults(status=500, should_retry=False))
        # Without the apology the caller hears nothing at all until they speak again.
        _, heard = await ask(stream, speech, 8000, timeout_s=8.0)
        assert heard is not None, "dead air: nothing after the LLM failed"
        served.emu.openai.set_faults(ChatFaults())
        await wait_bot_quiet(stream, quiet_s=1.0)
        _, answer = await ask(stream, speech, 8000, timeout_s=8.0)
        assert answer is not None, "the call did not recover after the LLM came back"
        assert stream.close_record.server_close_at is None, "the call was dropped"
    finally:
        served.emu.openai.set_faults(ChatFaults())
        await stream.hangup()
    said = [line for line in log_lines if "fault-llm-500" in line and "apologising" in line]
    assert said, "no log line says why the bot apologised"
    assert LLM_APOLOGY  # the text is a constant tenants will want to translate
