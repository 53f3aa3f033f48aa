"""Coverage-guided fuzzing of the sans-I/O serializer with atheris (optional, not in CI).

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/atheris_serializer.py -runs=200000 -max_len=70000

Each input is split into a stream format and a sequence of messages (binary or text);
any exception other than the serializer's documented ``ValueError`` for bad stream
formats is a crash. ``test_atheris_short_run`` in ``test_serializer_fuzz.py`` runs a
short session when atheris is installed and ``PIPESWITCH_ATHERIS=1``.
"""

from __future__ import annotations

import asyncio
import sys

import atheris

with atheris.instrument_imports():
    from pipecat.processors.frame_processor import FrameProcessorSetup

    from pipeswitch.transports.dialects import make_dialect
    from pipeswitch.transports.serializer import ModAudioStreamSerializer, pipeline_rate_for

from loguru import logger

logger.remove()  # junk is logged by design; a fuzzer run would drown in it
_LOOP = asyncio.new_event_loop()
RATES = (8000, 16000, 24000, 48000)
DIALECTS = ("json-stream", "binary", "file")


async def _one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    rate = RATES[fdp.ConsumeIntInRange(0, 3)]
    channels = fdp.ConsumeIntInRange(1, 2)
    ser = ModAudioStreamSerializer(
        stream_rate=rate,
        channels=channels,
        dialect=make_dialect(DIALECTS[fdp.ConsumeIntInRange(0, 2)]),  # type: ignore[arg-type]
    )
    prate = pipeline_rate_for(rate)
    await ser.setup(
        FrameProcessorSetup(
            clock=None,  # type: ignore[arg-type]
            task_manager=None,  # type: ignore[arg-type]
            pipeline_worker=None,  # type: ignore[arg-type]
            audio_in_sample_rate=prate,
            audio_out_sample_rate=prate,
        )
    )
    while fdp.remaining_bytes():
        n = fdp.ConsumeIntInRange(0, 4096)
        if fdp.ConsumeBool():
            await ser.deserialize(fdp.ConsumeBytes(n))
        else:
            await ser.deserialize(fdp.ConsumeUnicodeNoSurrogates(n))


def test_one_input(data: bytes) -> None:
    _LOOP.run_until_complete(_one(data))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
