"""Whisper server through Pipecat's unmodified ``OpenAISTTService`` (segmented, VAD-driven)."""

from __future__ import annotations

import aiohttp
import jiwer
import pytest
from openai import AsyncOpenAI, AuthenticationError
from pipecat.frames.frames import (
    InputAudioRawFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.services.openai.stt import OpenAISTTService
from pipecat.tests.utils import SleepFrame, run_test

from pipeswitch.pipelines.local.supervisor import LocalModelServers
from tests.local.audio_utils import (
    SENTENCES,
    normalize_words,
    piper_pcm,
    silence,
    telephone_band,
    to_wav,
)

pytestmark = [pytest.mark.local_models, pytest.mark.asyncio(loop_scope="session")]

RATE = 8000
FRAME_BYTES = RATE // 50 * 2  # 20 ms


def audio_frames(pcm: bytes) -> list[InputAudioRawFrame]:
    return [
        InputAudioRawFrame(audio=pcm[i : i + FRAME_BYTES], sample_rate=RATE, num_channels=1)
        for i in range(0, len(pcm), FRAME_BYTES)
    ]


async def telephone_clips(servers: LocalModelServers) -> list[bytes]:
    async with aiohttp.ClientSession() as session:
        return [
            telephone_band(await piper_pcm(session, servers.piper_url(RATE), s)) for s in SENTENCES
        ]


@pytest.mark.parametrize("include_prob_metrics", [False, True], ids=["json", "verbose_json"])
async def test_openai_stt_service_wer_8k_telephone(
    local_servers: LocalModelServers, include_prob_metrics: bool
) -> None:
    clips = await telephone_clips(local_servers)
    frames: list = []
    for pcm in clips:
        frames.append(VADUserStartedSpeakingFrame())
        frames.extend(audio_frames(silence(0.3) + pcm))
        frames.append(VADUserStoppedSpeakingFrame())
        frames.append(SleepFrame(sleep=0.05))
    stt = OpenAISTTService(
        api_key=local_servers.api_key,
        base_url=local_servers.whisper_base_url,
        # "whisper-*" makes the service ask for verbose_json when prob metrics are on.
        settings=OpenAISTTService.Settings(model="whisper-1"),
        include_prob_metrics=include_prob_metrics,
    )
    down, _ = await run_test(
        stt,
        frames_to_send=frames,
        pipeline_params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE),
        start_timeout=5.0,
    )
    transcripts = [f.text for f in down if isinstance(f, TranscriptionFrame)]
    assert len(transcripts) == len(SENTENCES), transcripts
    refs = [normalize_words(s) for s in SENTENCES]
    hyps = [normalize_words(t) for t in transcripts]
    wer = jiwer.wer(refs, hyps)
    assert wer <= 0.10, f"WER {wer:.3f}: {list(zip(refs, hyps, strict=True))}"


async def test_response_formats_and_auth(local_servers: LocalModelServers) -> None:
    clip = (await telephone_clips(local_servers))[0]
    wav = to_wav(silence(0.2) + clip + silence(0.3), RATE)
    client = AsyncOpenAI(api_key=local_servers.api_key, base_url=local_servers.whisper_base_url)
    text = await client.audio.transcriptions.create(
        file=("a.wav", wav, "audio/wav"), model="whisper-1", response_format="text"
    )
    assert "appointment" in str(text).lower()
    verbose = await client.audio.transcriptions.create(
        file=("a.wav", wav, "audio/wav"), model="whisper-1", response_format="verbose_json"
    )
    assert verbose.segments and verbose.duration > 1.0
    assert "appointment" in verbose.text.lower()

    bad = AsyncOpenAI(api_key="wrong-key", base_url=local_servers.whisper_base_url)
    with pytest.raises(AuthenticationError):
        await bad.audio.transcriptions.create(file=("a.wav", wav, "audio/wav"), model="x")

    base = local_servers.whisper_base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/health") as resp:
            assert resp.status == 200
        async with session.get(f"{base}/metrics") as resp:
            assert resp.status == 401
        async with session.get(
            f"{base}/metrics", headers={"Authorization": f"Bearer {local_servers.api_key}"}
        ) as resp:
            metrics = await resp.json()
    assert metrics["requests"] >= 2 and metrics["errors"] == 0
    assert metrics["transcribe"]["count"] >= 2


async def test_rejects_non_english_and_garbage(local_servers: LocalModelServers) -> None:
    client = AsyncOpenAI(api_key=local_servers.api_key, base_url=local_servers.whisper_base_url)
    wav = to_wav(silence(0.5), RATE)
    from openai import BadRequestError

    with pytest.raises(BadRequestError):
        await client.audio.transcriptions.create(
            file=("a.wav", wav, "audio/wav"), model="whisper-1", language="de"
        )
    with pytest.raises(BadRequestError):
        await client.audio.transcriptions.create(
            file=("a.wav", b"RIFF....WAVEgarbage", "audio/wav"), model="whisper-1"
        )
    empty = await client.audio.transcriptions.create(
        file=("a.wav", to_wav(b"", RATE), "audio/wav"), model="whisper-1"
    )
    assert empty.text == ""


async def test_window_frames_pads_short_turns_to_the_minimum_window() -> None:
    from pipeswitch.pipelines.local.whisper_server import window_frames

    sr = 16000
    assert window_frames(int(2.5 * sr), 10.0) == 1000  # a turn: the 10 s minimum
    assert window_frames(int(9.5 * sr), 10.0) == 1100  # audio + 1 s tail, whole seconds
    assert window_frames(int(14.2 * sr), 10.0) == 1600
    assert window_frames(40 * sr, 10.0) == 3000  # never past Whisper's 30 s window
    assert window_frames(sr, 30.0) == 3000  # --min-window 30: the old behaviour


async def test_short_window_keeps_short_and_long_turns_whole(
    local_servers: LocalModelServers,
) -> None:
    """A window shorter than ~8 s made tiny.en repeat short turns ("no no no ...") to
    its token limit; the 10 s minimum must not, and audio longer than it is heard whole."""
    client = AsyncOpenAI(api_key=local_servers.api_key, base_url=local_servers.whisper_base_url)
    async with aiohttp.ClientSession() as session:
        short = [
            telephone_band(await piper_pcm(session, local_servers.piper_url(RATE), text))
            for text in ("No.", "Yes, thank you.")
        ]
    for pcm, ref in zip(short, ("no", "yes thank you"), strict=True):
        wav = to_wav(silence(0.2) + pcm + silence(0.3), RATE)
        text = await client.audio.transcriptions.create(
            file=("a.wav", wav, "audio/wav"), model="whisper-1", response_format="text"
        )
        assert normalize_words(str(text)) == ref, text
    # Four sentences with pauses: about 13 s, longer than the minimum window.
    clips = (await telephone_clips(local_servers))[:4]
    long_pcm = silence(0.2) + b"".join(c + silence(0.5) for c in clips)
    assert len(long_pcm) / (2 * RATE) > 11.0
    text = await client.audio.transcriptions.create(
        file=("a.wav", to_wav(long_pcm, RATE), "audio/wav"),
        model="whisper-1",
        response_format="text",
    )
    refs = " ".join(normalize_words(s) for s in SENTENCES[:4])
    wer = jiwer.wer(refs, normalize_words(str(text)))
    assert wer <= 0.10, (wer, text)
    base = local_servers.whisper_base_url.removesuffix("/v1")
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{base}/metrics", headers={"Authorization": f"Bearer {local_servers.api_key}"}
        ) as resp,
    ):
        assert (await resp.json())["min_window_secs"] == 10.0
