"""DTMF keys the LLM can read.

Key presses enter the pipeline once, as ``InputDTMFFrame`` from the call's
input transport (relayed over the socket or heard over ESL, deduplicated there:
:mod:`pipeswitch.transports.call_events`), so a tenant rule such as "0 =
operator" can watch for them. :func:`dtmf_aggregator` also turns them into text
the LLM sees as the caller's turn (Pipecat's ``DTMFAggregator``: a short pause or
``#`` ends the entry; the first key interrupts the bot).
"""

from __future__ import annotations

from pipecat.processors.aggregators.dtmf_aggregator import DTMFAggregator

__all__ = ["DTMF_PREFIX", "dtmf_aggregator"]

# What the LLM reads in the user's turn, e.g. "The caller pressed the keys: 0".
DTMF_PREFIX = "The caller pressed the keys: "


def dtmf_aggregator(timeout_secs: float = 1.5) -> DTMFAggregator:
    """Keys to a TranscriptionFrame the user aggregator takes as the caller's turn.

    Place it after the STT and before the user aggregator. It runs in Pipecat's direct
    mode: every frame after the STT crosses it (transcripts, metrics, the speaking
    ticks going up), and all it does with them is pass them on, so they cross in the
    pusher's task instead of through a queue and a task of its own. Its digit timer
    is a task of its own either way.
    """
    return DTMFAggregator(timeout=timeout_secs, prefix=DTMF_PREFIX, enable_direct_mode=True)
