"""Capacity ceilings: which concurrent-call steps stayed within the budget.

Pure functions of a step's JSON summary, shared by the capacity driver (which
decides when to stop the sweep) and the report (which prints the ceilings).
"""

from __future__ import annotations

from typing import Any


def evaluate(step: dict[str, Any], budget_ms: float) -> list[str]:
    """Why a step does not hold (empty: it holds)."""
    s, c = step["summary"], step["connections"]
    why: list[str] = []
    p95 = s["overhead_ms"].get("p95")
    if p95 is None:
        why.append("no turn measured")
    elif p95 > budget_ms:
        why.append(f"overhead p95 {p95:.0f} ms")
    if s["underruns"]:
        why.append(f"{s['underruns']} underruns")
    if s["lost"]:
        why.append(f"{s['lost']} lost turns")
    if s.get("premature"):
        why.append(f"{s['premature']} premature replies")
    if c["failed"]:
        why.append(f"{c['failed']} failed calls")
    return why


NEAR_CLEAN_PER_1000 = 2.0


def server_underruns_per_1000(step: dict[str, Any]) -> float | None:
    """Underruns during which the server's own loop stalled, per 1000 bot messages."""
    s = step["summary"]
    msgs = s.get("bot_messages") or 0
    causes = s.get("underrun_causes") or {}
    if not msgs:
        return None
    return 1000.0 * (causes.get("server", 0) + causes.get("both", 0)) / msgs


def evaluate_near_clean(step: dict[str, Any], budget_ms: float) -> bool:
    """Like :func:`evaluate`, but tolerating <= 2 server-caused underruns per 1000 messages.

    On this shared 2-core VM (load generator, emulators, Piper and other work on
    the same cores, plus hypervisor steal) single 41-60 ms gaps appear even at one
    call while the server's loop was not stalled; the strict criterion is kept,
    this one shows where the server's own curve bends.
    """
    s, c = step["summary"], step["connections"]
    p95 = s["overhead_ms"].get("p95")
    rate = server_underruns_per_1000(step)
    return (
        p95 is not None
        and p95 <= budget_ms
        and not s["lost"]
        and not s.get("premature")
        and not c["failed"]
        and (rate or 0.0) <= NEAR_CLEAN_PER_1000
    )


# The relative rule: a step still counts while its wire p95 stays within +50 ms of N=1.
RELATIVE_MS = 50.0


def relative_ceiling(steps: list[dict[str, Any]]) -> int | None:
    """The baseline's rule: overhead p95 within +50 ms of the smallest step's, and
    <= 2 server-caused underruns per 1000 messages, no lost turns, no failed calls.

    Fair to a server whose single-call overhead is already above the absolute
    budget (the reference pays its fixed Silero tail on every turn).
    """
    steps = sorted(steps, key=lambda s: s["n"])
    if not steps or steps[0]["summary"]["overhead_ms"].get("p95") is None:
        return None
    base = float(steps[0]["summary"]["overhead_ms"]["p95"])
    best: int | None = None
    for st in steps:
        s, c = st["summary"], st["connections"]
        p95 = s["overhead_ms"].get("p95")
        rate = server_underruns_per_1000(st) or 0.0
        ok = (
            p95 is not None
            and p95 <= base + RELATIVE_MS
            and rate <= NEAR_CLEAN_PER_1000
            and not s["lost"]
            and not c["failed"]
        )
        if not ok:
            break
        best = st["n"]
    return best
