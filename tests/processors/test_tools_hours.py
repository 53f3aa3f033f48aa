"""Business hours: time zones, holidays, ranges past midnight, DST changes; config errors."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from pipeswitch.config.tenants import Tenant, ToolSettings
from pipeswitch.processors.tools_hours import hours_status

PRAGUE = ZoneInfo("Europe/Prague")
WEEK = {d: ["09:00-12:00", "13:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")}


def settings(**kw: object) -> ToolSettings:
    base: dict[str, object] = {"timezone": "Europe/Prague", "business_hours": WEEK}
    base.update(kw)
    return ToolSettings.model_validate(base)


def test_open_in_the_tenant_zone_not_utc() -> None:
    # 08:30 UTC on a Wednesday in January is 09:30 in Prague: open until noon.
    st = hours_status(settings(), datetime(2026, 1, 14, 8, 30, tzinfo=UTC))
    assert st.is_open and st.closes_at == datetime(2026, 1, 14, 12, 0, tzinfo=PRAGUE)
    assert "until 12 PM" in st.spoken()
    # The same instant for a New York tenant is 03:30: closed, opens 09:00 local.
    ny = settings(timezone="America/New_York")
    st = hours_status(ny, datetime(2026, 1, 14, 8, 30, tzinfo=UTC))
    assert not st.is_open
    assert st.next_open == datetime(2026, 1, 14, 9, 0, tzinfo=ZoneInfo("America/New_York"))
    assert "today at 9 AM" in st.spoken()


def test_lunch_break_and_weekend() -> None:
    lunch = hours_status(settings(), datetime(2026, 1, 14, 12, 30, tzinfo=PRAGUE))
    assert not lunch.is_open and lunch.next_open is not None and lunch.next_open.hour == 13
    friday_evening = hours_status(settings(), datetime(2026, 1, 16, 18, 0, tzinfo=PRAGUE))
    assert friday_evening.next_open == datetime(2026, 1, 19, 9, 0, tzinfo=PRAGUE)
    assert "Monday at 9 AM" in friday_evening.spoken()


def test_holiday_is_closed_all_day() -> None:
    s = settings(holidays=[date(2026, 1, 14)])
    st = hours_status(s, datetime(2026, 1, 14, 10, 0, tzinfo=PRAGUE))
    assert not st.is_open and st.holiday
    assert st.next_open == datetime(2026, 1, 15, 9, 0, tzinfo=PRAGUE)
    assert "holiday" in st.spoken() and "tomorrow" in st.spoken()


def test_range_past_midnight_joins_the_next_day() -> None:
    s = settings(business_hours={"fri": ["20:00-24:00"], "sat": ["00:00-02:00"]})
    st = hours_status(s, datetime(2026, 1, 17, 1, 0, tzinfo=PRAGUE))
    assert st.is_open and st.closes_at == datetime(2026, 1, 17, 2, 0, tzinfo=PRAGUE)
    st = hours_status(s, datetime(2026, 1, 16, 23, 0, tzinfo=PRAGUE))
    assert st.is_open and st.closes_at == datetime(2026, 1, 17, 2, 0, tzinfo=PRAGUE)


def test_next_opening_across_spring_forward() -> None:
    # Europe/Prague moves to CEST (UTC+2) on Sunday 29 March 2026.
    friday = datetime(2026, 3, 27, 18, 0, tzinfo=PRAGUE)  # CET, UTC+1
    st = hours_status(settings(), friday)
    assert st.next_open is not None
    assert st.next_open.astimezone(UTC) == datetime(2026, 3, 30, 7, 0, tzinfo=UTC)  # 09:00 CEST
    # One minute after opening on Monday, measured as a UTC instant, it is open.
    st = hours_status(settings(), datetime(2026, 3, 30, 7, 1, tzinfo=UTC))
    assert st.is_open


def test_fall_back_day_hours_are_wall_clock() -> None:
    # Sunday 25 October 2026: 03:00 CEST -> 02:00 CET. A Sunday 08:00-10:00 range is
    # two real hours long, opening at 07:00 UTC (CET).
    s = settings(business_hours={"sun": ["08:00-10:00"]})
    st = hours_status(s, datetime(2026, 10, 25, 6, 59, tzinfo=UTC))
    assert not st.is_open
    assert st.next_open is not None and st.next_open.astimezone(UTC).hour == 7
    assert hours_status(s, datetime(2026, 10, 25, 8, 59, tzinfo=UTC)).is_open
    assert not hours_status(s, datetime(2026, 10, 25, 9, 0, tzinfo=UTC)).is_open


def test_never_open_has_no_next_opening() -> None:
    st = hours_status(settings(business_hours={}), datetime(2026, 1, 14, 10, 0, tzinfo=UTC))
    assert not st.is_open and st.next_open is None
    assert st.spoken() == "We are closed right now."
    assert st.as_dict()["open"] is False


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        hours_status(settings(), datetime(2026, 1, 14, 10, 0))


@pytest.mark.parametrize(
    ("tools", "field", "words"),
    [
        ({"timezone": "Mars/Olympus"}, "tools.timezone", "unknown time zone"),
        ({"business_hours": {"mon": ["9-17"]}}, "tools.business_hours", "not a range"),
        ({"business_hours": {"mon": ["17:00-09:00"]}}, "tools.business_hours", "start before"),
        ({"business_hours": {"funday": ["09:00-10:00"]}}, "tools.business_hours.funday.[key]", ""),
        ({"holidays": ["2026-13-01"]}, "tools.holidays.0", ""),
        ({"enabled": ["transfer_call"]}, "tools", "transfer_targets is empty"),
        ({"enabled": ["teleport"]}, "tools.enabled.0", ""),
    ],
)
def test_bad_tool_config_names_the_field(tools: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        Tenant.model_validate({"name": "pbx.example.com", "tools": tools})
    err = info.value.errors()[0]
    assert ".".join(str(p) for p in err["loc"]) == field
    assert words in str(info.value)
