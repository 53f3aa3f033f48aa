"""The real-switch bench reads what the caller said and heard from a stereo recording.

FreeSWITCH's stereo ``uuid_record`` puts the read leg (the caller) left and the write
leg (the bot) right; these tests build such a file and check the timeline read off it.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from pipeswitch.bench.realswitch import first_loud_sample, heard_timeline, voiced_segments

RATE = 8000


def _stereo(
    path: Path, secs: float, said: list[tuple[float, float]], heard: list[tuple[float, float]]
) -> None:
    n = int(secs * RATE)
    left = np.zeros(n, dtype="<i2")
    right = np.zeros(n, dtype="<i2")
    t = np.arange(n) / RATE
    tone = (3000 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    for s, e in said:
        left[int(s * RATE) : int(e * RATE)] = tone[int(s * RATE) : int(e * RATE)]
    for s, e in heard:
        right[int(s * RATE) : int(e * RATE)] = tone[int(s * RATE) : int(e * RATE)]
    inter = np.empty(2 * n, dtype="<i2")
    inter[0::2], inter[1::2] = left, right
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(inter.tobytes())


def test_greeting_reply_and_barge_in_read_off_both_legs(tmp_path: Path) -> None:
    rec = tmp_path / "call.wav"
    # greeting 0.04-0.60 cut by the question 0.5-2.0 + 2.5-4.0 (one question: pause < 1 s),
    # reply from 4.6, the caller barges in at 6.0 and the bot stops at 6.26.
    _stereo(rec, 9.0, said=[(0.5, 2.0), (2.5, 4.0), (6.0, 7.5)], heard=[(0.04, 0.6), (4.6, 6.26)])
    said = voiced_segments(rec, channel=0)
    heard = voiced_segments(rec, channel=1)
    got = heard_timeline(said, heard, offset_s=0.01, barge_at=5.9, length_s=9.0)
    assert got["greeting_heard_after_start_ms"] == 50
    assert got["question_end_s"] == 4.0
    assert got["reply_heard_after_question_ms"] == 600
    assert got["barge_onset_s"] == 6.0
    assert abs(got["barge_in_stop_ms"] - 260) <= 20
    assert got["bot_silent_after_stop_ms"] >= 2700
    assert got["bot_talking_at_end"] is False


def test_bot_still_talking_at_the_hangup(tmp_path: Path) -> None:
    rec = tmp_path / "call.wav"
    _stereo(rec, 6.0, said=[(0.5, 2.0)], heard=[(2.6, 6.0)])
    got = heard_timeline(
        voiced_segments(rec, channel=0), voiced_segments(rec, channel=1), offset_s=0.0, length_s=6.0
    )
    assert got["reply_heard_after_question_ms"] == 600
    assert got["barge_in_stop_ms"] is None
    assert got["bot_talking_at_end"] is True


def test_barge_in_landing_in_a_pause_of_the_reply(tmp_path: Path) -> None:
    """Seen on the real switch: the caller's onset fell in a 0.3 s pause between words;
    the bot said one more word, then was quiet until its next reply."""
    rec = tmp_path / "call.wav"
    _stereo(
        rec,
        12.0,
        said=[(0.5, 4.3), (6.36, 10.0)],
        heard=[(4.8, 6.1), (6.42, 6.6), (10.8, 12.0)],
    )
    got = heard_timeline(
        voiced_segments(rec, channel=0),
        voiced_segments(rec, channel=1),
        offset_s=0.0,
        barge_at=6.2,
        length_s=12.0,
    )
    assert got["barge_onset_s"] == 6.36
    assert abs(got["barge_in_stop_ms"] - 240) <= 20
    assert abs(got["bot_silent_after_stop_ms"] - 4200) <= 20
    assert got["bot_talking_at_end"] is True


def test_greeting_onset_to_the_sample(tmp_path: Path) -> None:
    rec = tmp_path / "call.wav"
    _stereo(rec, 1.0, said=[], heard=[(0.0335, 0.5)])
    got = first_loud_sample(rec)
    assert got is not None and abs(got - 0.0335) < 0.001  # 20 ms RMS steps would say 0.02-0.04
