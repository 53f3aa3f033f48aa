"""CallerAudioSink: caller audio stops here, everything else flows on."""

from __future__ import annotations

from pipecat.frames.frames import InputAudioRawFrame, TextFrame, UserStartedSpeakingFrame
from pipecat.tests.utils import run_test

from pipeswitch.processors.caller_audio import CallerAudioSink


async def test_caller_audio_is_consumed_and_other_frames_pass() -> None:
    frames = [
        InputAudioRawFrame(audio=bytes(320), sample_rate=8000, num_channels=1),
        UserStartedSpeakingFrame(),
        TextFrame(text="hello"),
        InputAudioRawFrame(audio=bytes(320), sample_rate=8000, num_channels=1),
    ]
    down, _ = await run_test(
        CallerAudioSink(),
        frames_to_send=frames,
        expected_down_frames=[UserStartedSpeakingFrame, TextFrame],
    )
    assert [type(f) for f in down] == [UserStartedSpeakingFrame, TextFrame]
