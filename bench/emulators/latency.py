"""Latency models for the provider emulators.

The emulators must reproduce *published* provider latencies, not whatever the
loopback happens to do, so each delay is drawn from a lognormal fitted to a
median and a p95. Lognormal because service latencies are right-skewed and
strictly positive, and two quantiles pin its two parameters exactly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist

# z-score of the 95th percentile of the standard normal distribution.
_Z95 = NormalDist().inv_cdf(0.95)


@dataclass(frozen=True)
class LatencySpec:
    """A latency distribution given by its median and p95, in milliseconds.

    Specs are plain values so they can be shared and serialised; each emulator
    builds its own :class:`LatencyModel` (with its own RNG) from one.
    """

    median_ms: float
    p95_ms: float

    def model(self, seed: int | None = None) -> LatencyModel:
        """Build a sampler for this distribution."""
        return LatencyModel(self.median_ms, self.p95_ms, seed)


# Deepgram Nova-3 streaming STT, TTFS measured from the TRUE end of speech to the
# final transcript (pipecat-ai/stt-benchmark, 1,000 samples, VAD stop_secs 0.2; the
# 200 ms VAD wait before Pipecat sends Finalize is therefore *inside* this figure).
DEEPGRAM_TTFS = LatencySpec(median_ms=247.0, p95_ms=298.0)
# Groq gpt-oss-120b time to first answer token (kwindla/aiewf-eval, medium context).
GROQ_TTFT = LatencySpec(median_ms=98.0, p95_ms=217.0)
# ElevenLabs Flash v2 TTS time to first audio byte (voice-ai-primer TTS table).
ELEVENLABS_TTFB = LatencySpec(median_ms=170.0, p95_ms=190.0)


class LatencyModel:
    """Samples delays from a lognormal with the given median and p95.

    ``p95_ms <= median_ms`` means "no spread": every sample is the median, which
    is what tests want for deterministic timing. A seed makes a run repeatable.
    """

    def __init__(
        self,
        median_ms: float,
        p95_ms: float,
        seed: int | None = None,
        *,
        max_ms: float | None = None,
    ) -> None:
        """Fit the distribution; ``max_ms`` optionally clips the far tail."""
        if median_ms < 0:
            raise ValueError("median_ms must be >= 0")
        self.median_ms = float(median_ms)
        self.p95_ms = float(p95_ms)
        self.max_ms = max_ms
        self._rng = random.Random(seed)
        if median_ms > 0 and p95_ms > median_ms:
            self._mu: float | None = math.log(median_ms)
            self._sigma = math.log(p95_ms / median_ms) / _Z95
        else:
            self._mu = None
            self._sigma = 0.0

    @classmethod
    def constant(cls, ms: float) -> LatencyModel:
        """A model that always returns ``ms``."""
        return cls(ms, ms)

    @classmethod
    def from_spec(cls, spec: LatencySpec, seed: int | None = None) -> LatencyModel:
        """Build a model from a :class:`LatencySpec`."""
        return cls(spec.median_ms, spec.p95_ms, seed)

    @property
    def is_constant(self) -> bool:
        """Whether every sample equals the median."""
        return self._mu is None

    def sample_ms(self) -> float:
        """Draw one delay in milliseconds."""
        if self._mu is None:
            value = self.median_ms
        else:
            value = self._rng.lognormvariate(self._mu, self._sigma)
        if self.max_ms is not None:
            value = min(value, self.max_ms)
        return value

    def sample_s(self) -> float:
        """Draw one delay in seconds."""
        return self.sample_ms() / 1000.0

    def quantile_ms(self, q: float) -> float:
        """The model's q-quantile (0<q<1) in ms, for reports and test tolerances."""
        if self._mu is None:
            return self.median_ms
        return math.exp(self._mu + self._sigma * NormalDist().inv_cdf(q))

    def __repr__(self) -> str:
        """Show the fitted quantiles."""
        return f"LatencyModel(median_ms={self.median_ms:g}, p95_ms={self.p95_ms:g})"
