"""Sans-I/O mod_audio_stream serializer: WebSocket messages <-> Pipecat frames.

Inbound (FreeSWITCH -> us): BINARY = raw s16le PCM at the stream rate, mono or
stereo-interleaved (left = the leg the stream is on, i.e. the caller); TEXT =
the ``start`` metadata or a ``send_text`` payload such as a relayed DTMF digit
``{"event":"dtmf","digit":"5"}``. Outbound audio and "stop playback" go through
the tenant's playback dialect (:mod:`pipeswitch.transports.dialects`).

The serializer owns the wire completely, "stop playback" included (as Pipecat's
telephony serializers do): the output transport serializes an
``InterruptionFrame`` and sends what comes back, and asks the serializer - never
the dialect - how the far end plays (its playout lead, whether a clear drops
what is buffered there, whether playback needs out-of-band control).

Nothing here touches a socket, so every quirk is unit-testable with bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import (
    AudioRawFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InputTransportMessageFrame,
    InterruptionFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
)
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.serializers.base_serializer import FrameSerializer

from pipeswitch.transports.dialects import Dialect, FileDialect
from pipeswitch.transports.frames import CallMetadataFrame
from pipeswitch.transports.resample import StreamResampler

_DTMF_DIGITS = {e.value: e for e in KeypadEntry}


def pipeline_rate_for(stream_rate: int) -> int:
    """Pipeline rate for a stream rate: Silero only runs at 8 or 16 kHz."""
    return stream_rate if stream_rate in (8000, 16000) else 16000


@dataclass(slots=True)
class SerializerStats:
    """What crossed (and what was odd on) the wire: the call's closing log line."""

    audio_messages: int = 0
    audio_bytes: int = 0
    misaligned_messages: int = 0
    text_messages: int = 0
    bad_text: int = 0
    oversized_text: int = 0
    dtmf: int = 0


class ModAudioStreamSerializer(FrameSerializer):
    """Pipecat serializer for one mod_audio_stream connection."""

    def __init__(
        self,
        *,
        stream_rate: int,
        channels: int,
        dialect: Dialect,
        max_text_bytes: int = 8192,
        log_context: dict[str, str] | None = None,
    ) -> None:
        super().__init__(FrameSerializer.InputParams(resampler_clear_after_secs=None))
        if stream_rate <= 0 or stream_rate % 8000:
            raise ValueError(f"stream rate {stream_rate} is not a multiple of 8000")
        if channels not in (1, 2):
            raise ValueError("channels must be 1 or 2")
        self.stream_rate = stream_rate
        self.channels = channels
        self._dialect = dialect
        self.max_text_bytes = max_text_bytes
        self.stats = SerializerStats()
        self._frame_bytes = 2 * channels
        self._remainder = b""
        self._seen_text = False
        self._seen_audio = False
        self._in_rate = pipeline_rate_for(stream_rate)
        self._out_rate = self._in_rate
        self._in_resampler: StreamResampler | None = None
        self._out_resampler: StreamResampler | None = None
        self._log = logger.bind(**(log_context or {}))

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        """Take the pipeline rates; resamplers exist only when rates differ."""
        await super().setup(setup)
        self._in_rate = setup.audio_in_sample_rate
        self._out_rate = setup.audio_out_sample_rate
        if self._in_rate != self.stream_rate and self._in_resampler is None:
            self._in_resampler = StreamResampler(self.stream_rate, self._in_rate)

    # -- inbound ---------------------------------------------------------------------------

    async def deserialize(self, data: str | bytes) -> Frame | None:
        """One WebSocket message to a frame (or None when there is nothing to pass on)."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            return await self._audio(bytes(data))
        return self._text(data)

    async def _audio(self, data: bytes) -> Frame | None:
        if not self._seen_audio:
            self._uplink(len(data))
        if self._remainder:
            data = self._remainder + data
            self._remainder = b""
        usable = len(data) - len(data) % self._frame_bytes
        if usable != len(data):
            # A truncated sample (or half a stereo pair): keep it for the next message.
            if self.stats.misaligned_messages == 0:
                self._log.warning(
                    "audio message of {} bytes is not a multiple of {}; carrying the tail",
                    len(data),
                    self._frame_bytes,
                )
            self.stats.misaligned_messages += 1
            self._remainder = data[usable:]
            data = data[:usable]
        if not data:
            return None
        self.stats.audio_messages += 1
        self.stats.audio_bytes += len(data)
        if self.channels == 2:
            data = np.frombuffer(data, dtype="<i2")[0::2].tobytes()
        if self._in_resampler is not None:
            data = self._in_resampler.process(data)
            if not data:
                return None
        return InputAudioRawFrame(audio=data, sample_rate=self._in_rate, num_channels=1)

    def _uplink(self, nbytes: int) -> None:
        """The first audio message: its length is the module's STREAM_BUFFER_SIZE,
        which is also the voxcom fork's playback buffer (the dialect's lead follows)."""
        self._seen_audio = True
        secs = nbytes / (2 * self.channels * self.stream_rate)
        lead = self._dialect.lead_secs
        self._dialect.uplink_message(secs)
        if self._dialect.lead_secs != lead:
            self._log.info(
                "caller audio in {} ms messages: playout lead {} ms",
                round(secs * 1000),
                round(self._dialect.lead_secs * 1000),
            )

    def _text(self, text: str) -> Frame | None:
        self.stats.text_messages += 1
        first = not self._seen_text
        self._seen_text = True
        if (
            len(text) > self.max_text_bytes
            or len(text.encode("utf-8", "replace")) > self.max_text_bytes
        ):
            self.stats.oversized_text += 1
            self._log.warning(
                "text message of {} chars exceeds {} bytes; ignored", len(text), self.max_text_bytes
            )
            return None
        try:
            obj = json.loads(text)
        except ValueError as exc:
            if first:
                # Metadata may be any text (the dialplan decides); keep it raw.
                return CallMetadataFrame(text=text, data=None)
            self.stats.bad_text += 1
            self._log.warning("text message is not JSON ({}); ignored: {!r}", exc, text[:80])
            return None
        if not isinstance(obj, dict):
            if first:
                return CallMetadataFrame(text=text, data=None)
            self.stats.bad_text += 1
            self._log.warning("text message is JSON but not an object; ignored: {!r}", text[:80])
            return None
        kind = obj.get("event") or obj.get("type")
        if kind == "dtmf":
            digit = str(obj.get("digit", obj.get("dtmf", "")))
            entry = _DTMF_DIGITS.get(digit)
            if entry is None:
                self.stats.bad_text += 1
                self._log.warning("dtmf event with invalid digit {!r}; ignored", digit[:8])
                return None
            self.stats.dtmf += 1
            return InputDTMFFrame(button=entry)
        if first or kind in (None, "metadata", "start"):
            return CallMetadataFrame(text=text, data=obj)
        return InputTransportMessageFrame(message=obj)

    # -- outbound --------------------------------------------------------------------------

    async def serialize(self, frame: Frame) -> str | bytes | None:
        """A frame to one wire message, in the tenant's dialect."""
        if isinstance(frame, AudioRawFrame):
            return self.encode_audio(frame.audio, frame.sample_rate)
        if isinstance(frame, InterruptionFrame):
            self._dialect.discard()
            return self._dialect.encode_clear()
        if isinstance(frame, (OutputTransportMessageFrame, OutputTransportMessageUrgentFrame)):
            if self.should_ignore_frame(frame):
                return None
            return json.dumps(frame.message, separators=(",", ":"), ensure_ascii=True)
        return None

    def encode_audio(self, pcm: bytes, sample_rate: int) -> str | bytes | None:
        """Bot audio (mono s16le at ``sample_rate``) to one wire message, or None if held.

        The output transport cuts its chunks into 20 ms wire frames and encodes each
        here, without a Pipecat frame per piece.
        """
        if sample_rate != self.stream_rate:
            r = self._out_resampler
            if r is None or r.in_rate != sample_rate:
                r = self._out_resampler = StreamResampler(sample_rate, self.stream_rate)
            pcm = r.process(pcm)
        if not pcm:
            return None
        return self._dialect.encode_audio(pcm, self.stream_rate)

    def flush(self) -> list[str]:
        """Messages for audio a coalescing dialect still holds."""
        return self._dialect.flush(self.stream_rate)

    # -- what the far end does with our audio ---------------------------------------------

    @property
    def dialect_name(self) -> str:
        """The playback dialect's name (logs)."""
        return self._dialect.name

    @property
    def playout_lead_secs(self) -> float:
        """How far ahead of real time audio may be sent (the far end's buffer)."""
        return self._dialect.lead_secs

    @property
    def streaming(self) -> bool:
        """True: audio goes out frame by frame; False: coalesced into files."""
        return self._dialect.streaming

    @property
    def clear_drops_buffered(self) -> bool:
        """Whether stopping playback drops audio the far end has buffered but not played.

        json-stream builds have no clear: everything sent within the lead still plays.
        """
        return self._dialect.encode_clear() is not None

    @property
    def next_play_seq(self) -> int:
        """``seq`` of the next coalesced ``streamAudio`` message (-1: messages carry none).

        ESL playback drops ``::play`` events below the value read at a barge-in.
        """
        return self._dialect.next_seq if isinstance(self._dialect, FileDialect) else -1

    @property
    def needs_playback_control(self) -> bool:
        """Whether the far end plays files that only ESL can stop (``uuid_break``)."""
        return not self._dialect.streaming
