"""Call-event pieces without a switch: DTMF de-duplication, file chunking for ESL playback."""

from __future__ import annotations

import base64
import json

from pipeswitch.transports.call_events import DtmfDeduplicator, keypad_entry
from pipeswitch.transports.dialects import FileDialect


def test_a_press_reported_by_both_sources_counts_once() -> None:
    d = DtmfDeduplicator(window_secs=0.5)
    assert d.accept("5", "esl", now=10.0)
    assert not d.accept("5", "socket", now=10.1)  # the relayed copy of the same press
    assert d.accept("5", "esl", now=10.2)  # pressed again: "55"
    assert d.accept("5", "socket", now=11.0)  # outside the window: a new press
    assert d.accept("7", "esl", now=11.05)


def test_keypad_entries() -> None:
    assert keypad_entry("#") is not None and keypad_entry("0") is not None
    assert keypad_entry("A") is None and keypad_entry("") is None


def _secs(msg: str) -> float:
    data = json.loads(msg)["data"]
    return len(base64.b64decode(data["audioData"])) / (2 * data["sampleRate"])


def test_file_chunks_start_small_and_double_then_reset_per_burst() -> None:
    d = FileDialect(first_chunk_secs=0.5)
    frame = bytes(320)  # 20 ms at 8 kHz
    out: list[str] = []
    for _ in range(200):  # 4 s of audio
        m = d.encode_audio(frame, 8000)
        if isinstance(m, str):
            out.append(m)
    out += d.flush(8000)
    assert [round(_secs(m), 2) for m in out] == [0.5, 1.0, 2.0, 0.5]
    assert [json.loads(m)["data"]["seq"] for m in out] == [0, 1, 2, 3]
    assert d.next_seq == 4
    # A new burst starts small again.
    first = None
    for _ in range(25):
        first = first or d.encode_audio(frame, 8000)
    assert isinstance(first, str) and round(_secs(first), 2) == 0.5
