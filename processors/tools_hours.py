"""Business hours: open or closed at an instant, and when the tenant opens next.

Pure functions over :class:`config.tenants.ToolSettings` so they are tested
without a clock. Ranges are wall-clock times in the tenant's time zone; every
comparison happens in UTC, because Python compares two datetimes that share a
``tzinfo`` by their wall time, which is wrong across a DST change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from pipeswitch.config.tenants import ToolSettings, Weekday

WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# How far ahead "next opening" looks (covers long holiday closures).
LOOKAHEAD_DAYS = 31


@dataclass(frozen=True)
class HoursStatus:
    """The answer to "are you open?" at one instant (local times in the tenant's zone)."""

    is_open: bool
    now: datetime
    holiday: bool
    closes_at: datetime | None
    next_open: datetime | None

    def spoken(self) -> str:
        """A short sentence the LLM can pass on (it rephrases it anyway)."""
        if self.is_open:
            until = f" until {_clock(self.closes_at)}" if self.closes_at else ""
            return f"We are open now{until}."
        why = " today for a holiday" if self.holiday else " right now"
        if self.next_open is None:
            return f"We are closed{why}."
        return f"We are closed{why}. We open again {_when(self.next_open, self.now)}."

    def as_dict(self) -> dict[str, object]:
        """The tool result sent to the LLM (ISO times plus the sentence)."""
        return {
            "open": self.is_open,
            "holiday": self.holiday,
            "now": self.now.isoformat(timespec="minutes"),
            "closes_at": self.closes_at.isoformat(timespec="minutes") if self.closes_at else None,
            "next_open": self.next_open.isoformat(timespec="minutes") if self.next_open else None,
            "summary": self.spoken(),
        }


def _clock(t: datetime | None) -> str:
    if t is None:
        return ""
    h = t.hour % 12 or 12
    ampm = "AM" if t.hour < 12 else "PM"
    return f"{h}:{t.minute:02d} {ampm}" if t.minute else f"{h} {ampm}"


def _when(t: datetime, now: datetime) -> str:
    days = (t.date() - now.date()).days
    if days == 0:
        day = "today"
    elif days == 1:
        day = "tomorrow"
    elif days < 7:
        day = t.strftime("%A")
    else:
        day = t.strftime("%A, %B ") + str(t.day)
    return f"{day} at {_clock(t)}"


def _parse_range(r: str) -> tuple[int, int]:
    start, _, end = r.replace(" ", "").partition("-")
    sh, sm = start.split(":")
    eh, em = end.split(":")
    return int(sh) * 60 + int(sm), int(eh) * 60 + int(em)


def _at(day: date, minutes: int, tz: ZoneInfo) -> datetime:
    """Wall-clock ``minutes`` after local midnight of ``day``, as a UTC instant.

    ``24:00`` is the next midnight. A wall time that does not exist (inside a
    spring-forward gap) takes the offset in force before the change (PEP 495
    ``fold=0``), so "02:30" on that day is 03:30 summer time; an ambiguous one
    (autumn) is its first occurrence.
    """
    extra, minutes = divmod(minutes, 24 * 60)
    wall = datetime.combine(day + timedelta(days=extra), time(minutes // 60, minutes % 60))
    return wall.replace(tzinfo=tz).astimezone(UTC)


def open_intervals(
    settings: ToolSettings, first: date, days: int
) -> list[tuple[datetime, datetime]]:
    """Open intervals (UTC, merged where they touch) for ``days`` local days from ``first``."""
    tz = ZoneInfo(settings.timezone)
    holidays = set(settings.holidays)
    spans: list[tuple[datetime, datetime]] = []
    for k in range(days):
        day = first + timedelta(days=k)
        if day in holidays:
            continue
        for r in settings.business_hours.get(WEEKDAYS[day.weekday()], []):
            start, end = _parse_range(r)
            spans.append((_at(day, start, tz), _at(day, end, tz)))
    spans.sort()
    merged: list[tuple[datetime, datetime]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def hours_status(settings: ToolSettings, now: datetime) -> HoursStatus:
    """Open/closed at ``now`` (an aware datetime), when it closes, and the next opening."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    tz = ZoneInfo(settings.timezone)
    now_utc = now.astimezone(UTC)
    local_now = now.astimezone(tz)
    # Start a day early: yesterday's range may run past midnight into today.
    intervals = open_intervals(settings, local_now.date() - timedelta(days=1), LOOKAHEAD_DAYS + 1)
    holiday = local_now.date() in set(settings.holidays)
    for a, b in intervals:
        if a <= now_utc < b:
            return HoursStatus(True, local_now, holiday, b.astimezone(tz), None)
    upcoming = [a for a, _ in intervals if a > now_utc]
    nxt = upcoming[0].astimezone(tz) if upcoming else None
    return HoursStatus(False, local_now, holiday, None, nxt)
