"""Whisper while the caller speaks: each pause's audio is transcribed before the VAD stop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import jiwer
import pytest
import pytest_asyncio
from pipecat.frames.frames import (
    InputAudioRawFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.services.openai.stt import OpenAISTTService
from pipecat.tests.utils import SleepFrame, run_test

from pipeswitch.pipelines.local import models
from pipeswitch.pipelines.local.incremental_stt import IncrementalWhisperSTTService
from pipeswitch.pipelines.local.supervisor import LocalModelServers
from tests.local.audio_utils import SENTENCES, normalize_words, piper_pcm, silence, telephone_band

pytestmark = [pytest.mark.local_models, pytest.mark.asyncio(loop_scope="session")]

RATE = 8000
FRAME_BYTES = RATE // 50 * 2


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def whisper() -> AsyncIterator[LocalModelServers]:
    problems = models.check_local_extra()
    if problems:
        pytest.skip("[local] extra incomplete: " + "; ".join(problems))
    async with LocalModelServers(llm=False, start_timeout=180) as servers:
        yield servers


def frames(pcm: bytes) -> list[InputAudioRawFrame]:
    return [
        InputAudioRawFrame(audio=pcm[i : i + FRAME_BYTES], sample_rate=RATE, num_channels=1)
        for i in range(0, len(pcm), FRAME_BYTES)
    ]


async def _run(stt: OpenAISTTService, frames_to_send: list) -> list[str]:
    down, _ = await run_test(
        stt,
        frames_to_send=frames_to_send,
        pipeline_params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE),
        start_timeout=5.0,
    )
    return [f.text for f in down if isinstance(f, TranscriptionFrame)]


async def test_the_transcript_is_requested_at_the_pause_before_the_vad_stop(
    whisper: LocalModelServers,
) -> None:
    async with aiohttp.ClientSession() as http:
        a, b = [
            telephone_band(await piper_pcm(http, whisper.piper_url(RATE), s)) for s in SENTENCES[:2]
        ]
    stt = IncrementalWhisperSTTService(
        api_key=whisper.api_key,
        base_url=whisper.whisper_base_url,
        settings=OpenAISTTService.Settings(model="whisper-1"),
    )
    # Turn 1: one sentence, then the VAD's 200 ms of silence; the early request is the answer.
    turn = [VADUserStartedSpeakingFrame(), *frames(silence(0.2) + a + silence(0.25))]
    turn += [VADUserStoppedSpeakingFrame(), SleepFrame(sleep=1.0)]
    # Turn 2: two sentences with a pause between them: the early request on the first is
    # dropped when the caller goes on, and the turn is transcribed whole.
    turn += [VADUserStartedSpeakingFrame(), *frames(silence(0.2) + a + silence(0.4) + b)]
    turn += [*frames(silence(0.25)), VADUserStoppedSpeakingFrame(), SleepFrame(sleep=1.5)]
    heard_before = await _audio_seconds(whisper)
    texts = await _run(stt, turn)
    assert stt.early_used == 2  # turn 2's last pause too: nothing voiced after it
    assert stt.early_requests >= 3
    assert len(texts) == 2, texts
    # What Whisper was sent: turn 1 at its pause, and turn 2 whole at its last pause (not
    # only its first sentence; a first-pause request dropped in time is never transcribed).
    sent = await _audio_seconds(whisper) - heard_before
    turn2 = (len(a) + len(b)) / (2 * RATE) + 0.2 + 0.4
    assert sent >= len(a) / (2 * RATE) + 0.2 + turn2, (sent, turn2)
    one, both = normalize_words(SENTENCES[0]), normalize_words(f"{SENTENCES[0]} {SENTENCES[1]}")
    assert jiwer.wer(one, normalize_words(texts[0])) <= 0.15, texts
    # The words: the whole turn, or its first sentence: Piper's voice varies run to run, and
    # on some of it the tiny model ends its transcript at the pause (seen in 1 run in ~7
    # under load, with the whole turn's audio sent: the check above); never anything else.
    t2 = normalize_words(texts[1])
    assert min(jiwer.wer(both, t2), jiwer.wer(one, t2)) <= 0.15, texts


async def _audio_seconds(servers: LocalModelServers) -> float:
    """Seconds of audio the Whisper server has transcribed so far (its /metrics)."""
    base = servers.whisper_base_url.removesuffix("/v1")
    auth = {"Authorization": f"Bearer {servers.api_key}"}
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics", headers=auth) as r:
        assert r.status == 200
        return float((await r.json())["audio_seconds"])
