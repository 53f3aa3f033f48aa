"""Whisper on the local server while the VAD still counts its silence.

Pipecat's segmented STT (``OpenAISTTService``) sends the whole utterance when the VAD
stops (``stop_secs`` after the speech ended, plus Silero's own lag), so every offline
turn then waits for Whisper on all of it. Here, once the caller has been quiet for
``pause_secs`` (energy of the 20 ms frames, no model; shorter pauses inside a
sentence would each cost the single Whisper worker a wasted run), the turn's audio so far is sent
to Whisper at once, in the background. If the VAD stop follows with no speech after
that point, the result of that early request *is* the turn's transcript: it is pushed
as soon as it is there (usually at the stop), so only Whisper's tail remains. If the
caller goes on, the early result is dropped and a later pause (or the stop) sends the
whole turn again: Whisper always hears the turn in one piece, so nothing is cut
mid-phrase (transcribing segments separately dropped short phrases' first words).
An early request costs what the stop's would have (the Whisper server pads each turn to
10 s; ~0.05-0.1 s of CPU for tiny.en); a dropped one is the price of a caller pausing
mid-turn.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from pipecat.audio.utils import pcm_to_wav
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.openai.stt import OpenAISTTService

# Pipecat ends a user turn that no stop strategy ended within ``user_turn_stop_timeout``
# (5 s) of the last VAD or transcript event as an *empty* turn, and answers it when the
# caller had interrupted the bot. One Whisper worker serves every call, and under load a
# transcription took 9.7 s (load average 16 on 2 cores): the caller then got a reply to
# nothing, then one more per transcript as it came. The turn-taking strategy still ends
# the turn the moment the transcript is there; this only stops Pipecat from giving up first.
TURN_STOP_TIMEOUT_SECS = 20.0


class IncrementalWhisperSTTService(OpenAISTTService):
    """``OpenAISTTService`` that starts transcribing at the caller's pause, not the VAD stop."""

    def __init__(self, *, pause_secs: float = 0.16, level_dbfs: float = -45.0, **kwargs: Any):
        super().__init__(**kwargs)
        self._pause_secs = pause_secs
        # Mean square of an int16 frame at ``level_dbfs``: above it, the frame is voiced.
        self._voiced_ms = (32768.0 * 10 ** (level_dbfs / 20.0)) ** 2
        self._voiced = False  # voiced audio since the last early request (or turn start)
        self._quiet_s = 0.0
        self._early: asyncio.Task[list[Frame]] | None = None
        # Early requests sent, and those whose result became the turn's transcript.
        self.early_requests = 0
        self.early_used = 0

    async def _handle_user_started_speaking(self, frame: VADUserStartedSpeakingFrame) -> None:
        await self._drop_early()
        self._voiced, self._quiet_s = False, 0.0
        await super()._handle_user_started_speaking(frame)

    async def process_audio_frame(
        self, frame: InputAudioRawFrame, direction: FrameDirection
    ) -> None:
        await super().process_audio_frame(frame, direction)
        if not self._user_speaking:
            return
        samples = np.frombuffer(frame.audio, dtype="<i2").astype(np.float32)
        if samples.size == 0:
            return
        if float(np.dot(samples, samples)) / samples.size > self._voiced_ms:
            self._voiced, self._quiet_s = True, 0.0
            return
        self._quiet_s += samples.size / (frame.sample_rate * frame.num_channels)
        if self._voiced and self._quiet_s >= self._pause_secs:
            self._voiced = False
            await self._drop_early()
            audio = self._segment_audio(bytes(self._audio_buffer))
            self.early_requests += 1
            self._early = self.create_task(self._transcribe_early(audio), f"{self}::early")

    async def _handle_user_stopped_speaking(self, frame: VADUserStoppedSpeakingFrame) -> None:
        early, self._early = self._early, None
        if early is None or self._voiced or not self.is_usable:
            # No pause was seen, or the caller spoke after it: the whole turn, as Pipecat does.
            if early is not None:
                await self.cancel_task(early)
            self._voiced, self._quiet_s = False, 0.0
            await super()._handle_user_stopped_speaking(frame)
            return
        self._user_speaking = False
        self._audio_buffer.clear()
        self.early_used += 1
        self.create_task(self._push_when_done(early), f"{self}::early_push")

    def _segment_audio(self, pcm: bytes) -> bytes:
        """What the base class would send for ``pcm`` (padded, WAV when wanted)."""
        pcm += self._trailing_silence()
        self._record_stt_audio_usage(pcm)
        return pcm_to_wav(pcm, self.sample_rate) if self.wants_wav_segments else pcm

    async def _transcribe_early(self, audio: bytes) -> list[Frame]:
        return [f async for f in self.run_stt(audio) if f is not None]

    async def _push_when_done(self, early: asyncio.Task[list[Frame]]) -> None:
        try:
            frames = await early
        except Exception as e:
            await self.push_error(f"{self}: transcription failed: {e}", exception=e)
            return
        await self.emit_stt_usage_metrics()
        for f in frames:
            if isinstance(f, ErrorFrame):
                await self.push_error_frame(f)
            else:
                await self.push_frame(f)

    async def _drop_early(self) -> None:
        early, self._early = self._early, None
        if early is not None:
            await self.cancel_task(early)
