"""The bot's own voice echoed back by the phone line, end to end.

The FreeSWITCH emulator puts the audio it played back on the caller's leg (40-120 ms
late, attenuated by the echo return loss, plus line noise), as a hybrid does. Per
pipeline, with the echo guard off the echo cuts the bot's long reply (so the echo path
is real and the test can fail); with it on the reply plays out, and the caller talking
over the bot still stops it. The stop *time* against the 250 ms budget is the echo
bench's job (``python -m pipeswitch.bench.echo``), not a timed test's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from pipeswitch.bench.echo import Bench, TrialResult, run_trial, running_bench

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.xdist_group("echo")]

ECHO_DB = -20.0


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def bench() -> AsyncIterator[Bench]:
    async with running_bench() as b:
        yield b


async def _trial(b: Bench, pipeline: str, guard: bool, replies: int, barge_ins: int) -> TrialResult:
    return await run_trial(
        b,
        ECHO_DB,
        guard,
        rate=8000,
        replies=replies,
        barge_ins=barge_ins,
        noise_dbfs=-55.0,
        seed=7,
        pipeline=pipeline,
    )


@pytest.mark.parametrize(
    "pipeline", ["cascade", "elevenlabs-agent", "openai-realtime", "gemini-live"]
)
async def test_echo_cuts_the_bot_without_the_guard_and_not_with_it(
    bench: Bench, pipeline: str
) -> None:
    off = await _trial(bench, pipeline, guard=False, replies=1, barge_ins=0)
    assert off.replies == 1 and off.replies_cut == 1, "the echo path did not echo"
    on = await _trial(bench, pipeline, guard=True, replies=1, barge_ins=2)
    assert on.replies == 1 and on.bot_speech_s > 5.0
    assert on.replies_cut == 0, f"the bot's own echo interrupted it ({pipeline})"
    # Real barge-ins over the echo: each stopped the bot (within 1 s, or it counts as
    # missed), none talked through.
    assert on.barge_ins_missed == 0
    assert len(on.barge_in_stop_ms) + on.barge_ins_void == 2 and on.barge_in_stop_ms
