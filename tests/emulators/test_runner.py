"""Latency model, config round-trip, and the emulators in a child process."""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import pytest
from pipecat.frames.frames import (
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMTextFrame,
    TranscriptionFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.groq.llm import GroqLLMService

from pipeswitch.bench.emulators import (
    DEEPGRAM_TTFS,
    GROQ_TTFT,
    ChatFaults,
    DeepgramFaults,
    EmulatorConfig,
    LatencyModel,
    start_emulator_process,
)
from pipeswitch.bench.emulators.openai_chat import tokenize
from pipeswitch.bench.emulators.runner import run_emulators
from tests.emulators.helpers import running_pipeline, silence, voiced


@pytest.mark.parametrize("spec", [DEEPGRAM_TTFS, GROQ_TTFT])
def test_lognormal_fit_reproduces_median_and_p95(spec: object) -> None:
    model = LatencyModel.from_spec(spec, seed=7)  # type: ignore[arg-type]
    samples = sorted(model.sample_ms() for _ in range(20000))
    median = statistics.median(samples)
    p95 = samples[int(0.95 * len(samples))]
    assert median == pytest.approx(model.median_ms, rel=0.03)
    assert p95 == pytest.approx(model.p95_ms, rel=0.05)
    assert model.quantile_ms(0.95) == pytest.approx(model.p95_ms)


def test_latency_model_constant_and_seeded() -> None:
    assert LatencyModel(200, 150).sample_s() == 0.2
    assert LatencyModel.constant(80).is_constant
    a, b = LatencyModel(100, 200, seed=3), LatencyModel(100, 200, seed=3)
    assert [a.sample_ms() for _ in range(5)] == [b.sample_ms() for _ in range(5)]
    assert LatencyModel(100, 1000, seed=1, max_ms=150).sample_ms() <= 150


def test_tokenize_round_trips() -> None:
    for text in ["Sure. You asked.", "  lead and trail  ", "", "one"]:
        assert "".join(tokenize(text)) == text
    assert tokenize("Hi there, you.") == ["Hi", " there,", " you."]


def test_config_json_round_trip_and_callables_refused() -> None:
    cfg = EmulatorConfig(
        seed=5,
        stt_script=["a", "b"],
        llm_script={"hours": "Nine to five."},
        deepgram_faults=DeepgramFaults(drop_after_s=3.0),
        llm_faults=ChatFaults(status=429, retry_after_s=1.0, count=2),
    )
    back = EmulatorConfig.from_json(cfg.to_json())
    assert back == cfg
    with pytest.raises(TypeError):
        EmulatorConfig(llm_script=lambda messages: "x").to_json()


async def test_child_process_serves_real_services_and_exposes_logs() -> None:
    cfg = EmulatorConfig(
        deepgram_ttfs_median_ms=200.0,
        deepgram_ttfs_p95_ms=0.0,
        llm_ttft_median_ms=50.0,
        llm_ttft_p95_ms=0.0,
        stt_script="office",
    )
    proc = await asyncio.to_thread(start_emulator_process, cfg)
    try:
        assert proc.groq_base_url.endswith("/openai/v1")
        assert proc.deepgram_url.startswith("ws://127.0.0.1:")

        llm = GroqLLMService(
            api_key="emulated",
            base_url=proc.groq_base_url,
            settings=GroqLLMService.Settings(model="openai/gpt-oss-120b"),
        )
        async with running_pipeline(llm) as h:
            context = LLMContext(messages=[{"role": "user", "content": "Where are you?"}])
            await h.worker.queue_frame(LLMContextFrame(context))
            await h.down.wait_for(LLMFullResponseEndFrame, 5.0)
        text = "".join(f.text for _, f in h.down.of_type(LLMTextFrame))

        stt = DeepgramSTTService(api_key="emulated", base_url=proc.deepgram_url, sample_rate=8000)
        async with running_pipeline(stt, 8000) as h:
            await h.stream_audio(voiced(0.5, 8000))
            silence_task = asyncio.create_task(h.stream_audio(silence(0.5, 8000)))
            [(_, frame)] = await h.down.wait_for(TranscriptionFrame, 3.0)
            await silence_task
        assert frame.text == "Hi, what are your opening hours?"

        [req] = await asyncio.to_thread(proc.llm_requests)
        assert req["body"]["messages"][-1]["content"] == "Where are you?"
        assert req["sent_text"] == text and len(tokenize(text)) == req["tokens_sent"]
        [stream] = await asyncio.to_thread(proc.stt_streams)
        assert stream["utterances"][0]["text"] == frame.text
        await asyncio.to_thread(proc.reset)
        assert await asyncio.to_thread(proc.llm_requests) == []
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0


async def test_the_throwaway_ca_goes_with_the_emulators(tmp_path: Path) -> None:
    """The Gemini emulator's test CA (keys included) is removed when the emulators stop,
    unless the caller gave the folder; 72 such folders once piled up in /tmp."""
    async with run_emulators() as emu:
        made = Path(emu.gemini_ca_file).parent
        assert (made / "server.key").is_file()
    assert not made.exists()
    given = tmp_path / "tls"
    async with run_emulators(EmulatorConfig(tls_dir=str(given))) as emu:
        assert Path(emu.gemini_ca_file).parent == given
    assert (given / "ca.pem").is_file(), "a folder the caller gave is the caller's"
