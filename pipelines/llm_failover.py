"""A tenant's second LLM, taken over mid-turn when the first is down.

Pipecat's ``LLMSwitcher`` with its failover strategy moves to the next LLM only when the
active one reports an error that leaves it unusable (a permanent category: bad key,
unknown model). A provider outage is none of those: a refused connection is
``CONNECTIVITY``, a 5xx ``SERVER``, a 429 ``RATE_LIMIT``, and Pipecat counts them as
transient, so the call would keep asking the provider that is down, turn after turn.
:class:`OutageFailover` treats them as reasons to fail over too, and the call stays on
the fallback for the rest of its life (no flapping back mid-conversation; the next call
tries the primary again).

A provider that stalls reports nothing: the turn watchdog's retry (2.5 s) asks
:meth:`OutageFailover.fail_over` first, so the retried turn goes to the fallback.

The turn that failed is asked again at once on the new LLM (the switcher absorbs the
error, so nothing else would): ``on_failed_over`` tells the call's watchdog.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import openai
from pipecat.frames.frames import ErrorFrame
from pipecat.pipeline.llm_switcher import LLMSwitcher
from pipecat.pipeline.service_switcher import ServiceSwitcherStrategyFailover
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.llm_service import LLMService
from pipecat.utils.errors import ErrorCategory

# Errors that say the provider is down now, not that this request was wrong.
OUTAGE = frozenset(
    {
        ErrorCategory.CONNECTIVITY,
        ErrorCategory.SERVER,
        ErrorCategory.RATE_LIMIT,
        ErrorCategory.QUOTA,
    }
)

FailedOver = Callable[[str], Awaitable[None]]


def is_outage(error: ErrorFrame) -> bool:
    """Whether ``error`` says the provider is down or broken (Pipecat's category, or the
    OpenAI SDK's connection and malformed-stream errors, which Pipecat files as UNKNOWN)."""
    if error.category in OUTAGE:
        return True
    exc = error.exception
    # A reply that is not the API's JSON (a broken proxy, a provider bug) is the
    # provider failing too: another provider will not send the same garbage.
    return isinstance(
        exc,
        (
            openai.APIConnectionError,
            openai.APIResponseValidationError,
            httpx.TransportError,
            ConnectionError,
            json.JSONDecodeError,
        ),
    )


class OutageFailover(ServiceSwitcherStrategyFailover):
    """Failover on an outage as well as on a permanent error; never back mid-call."""

    def __init__(self, services: list[FrameProcessor]) -> None:
        super().__init__(services)
        self.on_failed_over: FailedOver | None = None

    async def handle_error(self, error: ErrorFrame) -> FrameProcessor | None:
        failed = error.processor or self.active_service
        if failed is self.active_service and failed.is_usable and is_outage(error):
            await failed.set_usable(False)
        switched = await super().handle_error(error)
        if switched is not None:
            await self._switched(str(error.error))
        return switched

    async def fail_over(self, why: str) -> bool:
        """Leave the active LLM for the next usable one (it stalled); False: none left."""
        before = self.active_service
        others = [s for s in self.services if s is not before and s.is_usable]
        if not others:
            return False
        await before.set_usable(False)
        switched = await self._set_active_if_available(others[0])
        if switched is None:
            return False
        await self._switched(why)
        return True

    async def _switched(self, why: str) -> None:
        if self.on_failed_over is not None:
            await self.on_failed_over(why)


def llm_with_fallback(primary: LLMService[Any], backup: LLMService[Any]) -> LLMSwitcher[Any]:
    """The call's LLM slot: ``primary``, and ``backup`` once the primary is down."""
    return LLMSwitcher([primary, backup], strategy_type=OutageFailover)


def failover_of(llm: FrameProcessor) -> OutageFailover | None:
    """The failover strategy of an LLM slot built by :func:`llm_with_fallback`."""
    strategy = getattr(llm, "strategy", None) if isinstance(llm, LLMSwitcher) else None
    return strategy if isinstance(strategy, OutageFailover) else None
