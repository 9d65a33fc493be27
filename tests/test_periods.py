"""Periods: calendar and rolling windows across month ends, DST changes and leap days."""

from __future__ import annotations

import re
import typing as t
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from zoneinfo import ZoneInfo

import pytest

from flask_ai_metering.config import ConfigVars
from flask_ai_metering.errors import ConfigurationError
from flask_ai_metering.errors import InvalidUsage
from flask_ai_metering.quota.periods import Period
from flask_ai_metering.quota.periods import period_for
from flask_ai_metering.quota.periods import validate_period_settings

KEYS = (ConfigVars.PERIOD_TYPE, ConfigVars.PERIOD_ALIGNMENT, ConfigVars.TIMEZONE)

try:
    import hypothesis
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    hypothesis = None  # type: ignore[assignment]

UTC = timezone.utc
HOUR = timedelta(hours=1)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def calendar(at: datetime, period_type: str, tz: str = "UTC") -> Period:
    return period_for(at, period_type=period_type, alignment="calendar", timezone=tz)


def rolling(at: datetime, period_type: str, anchor: datetime, tz: str = "UTC") -> Period:
    return period_for(at, period_type=period_type, alignment="rolling", timezone=tz, anchor=anchor)


def bounds(period: Period) -> tuple[datetime, datetime]:
    return period.start, period.end


# -- calendar -------------------------------------------------------------------------------


def test_last_second_of_a_month() -> None:
    january = calendar(utc(2026, 1, 31, 23, 59, 59, 999_999), "monthly")
    assert bounds(january) == (utc(2026, 1, 1), utc(2026, 2, 1))
    assert bounds(calendar(utc(2026, 2, 1), "monthly")) == (utc(2026, 2, 1), utc(2026, 3, 1))
    # In Berlin (UTC+1 in winter) January ends at 23:00 UTC.
    berlin = calendar(utc(2026, 1, 31, 22, 59, 59), "monthly", "Europe/Berlin")
    assert bounds(berlin) == (utc(2025, 12, 31, 23), utc(2026, 1, 31, 23))
    assert calendar(utc(2026, 1, 31, 23), "monthly", "Europe/Berlin").start == utc(2026, 1, 31, 23)


@pytest.mark.parametrize(
    ("tz", "at", "start", "hours"),
    [
        # Spring forward: the local day has 23 hours.
        ("Europe/Berlin", utc(2026, 3, 29, 12), utc(2026, 3, 28, 23), 23),
        ("America/New_York", utc(2026, 3, 8, 12), utc(2026, 3, 8, 5), 23),
        # Fall back: 25 hours.
        ("Europe/Berlin", utc(2026, 10, 25, 12), utc(2026, 10, 24, 22), 25),
        ("America/New_York", utc(2026, 11, 1, 12), utc(2026, 11, 1, 4), 25),
        # São Paulo moved its clocks at midnight: that day began at 01:00 local.
        ("America/Sao_Paulo", utc(2018, 11, 4, 12), utc(2018, 11, 4, 3), 23),
    ],
)
def test_calendar_days_across_dst(tz: str, at: datetime, start: datetime, hours: int) -> None:
    day = calendar(at, "daily", tz)
    assert bounds(day) == (start, start + hours * HOUR)
    assert day.next().start == day.end
    assert day.previous().end == day.start


def test_calendar_month_across_dst() -> None:
    march = calendar(utc(2026, 3, 15), "monthly", "Europe/Berlin")
    # Starts at CET midnight, ends at CEST midnight.
    assert bounds(march) == (utc(2026, 2, 28, 23), utc(2026, 3, 31, 22))


def test_weeks_start_on_monday() -> None:
    sunday = utc(2026, 11, 22, 20)
    assert bounds(calendar(sunday, "weekly")) == (utc(2026, 11, 16), utc(2026, 11, 23))
    assert calendar(utc(2026, 11, 23), "weekly").start == utc(2026, 11, 23)
    # 23:30 UTC on Sunday is already Monday in Berlin.
    berlin = calendar(utc(2026, 11, 22, 23, 30), "weekly", "Europe/Berlin")
    assert bounds(berlin) == (utc(2026, 11, 22, 23), utc(2026, 11, 29, 23))
    assert berlin.start.astimezone(ZoneInfo("Europe/Berlin")).weekday() == 0


def test_calendar_year() -> None:
    year = calendar(utc(2026, 6, 1), "yearly", "America/New_York")
    assert bounds(year) == (utc(2026, 1, 1, 5), utc(2027, 1, 1, 5))


def test_bounds_are_utc() -> None:
    period = calendar(utc(2026, 6, 1), "monthly", "Asia/Tokyo")
    assert period.start.tzinfo is UTC
    assert period.end.tzinfo is UTC


# -- rolling --------------------------------------------------------------------------------


def test_subscription_started_on_the_31st() -> None:
    anchor = utc(2026, 1, 31, 9, 30)
    period = rolling(anchor, "monthly", anchor)
    starts = []
    for _ in range(5):
        starts.append(period.start)
        period = period.next()
    # Clamped to the month's end, but always computed from the anchor: back to the 31st in March.
    assert starts == [
        utc(2026, 1, 31, 9, 30),
        utc(2026, 2, 28, 9, 30),
        utc(2026, 3, 31, 9, 30),
        utc(2026, 4, 30, 9, 30),
        utc(2026, 5, 31, 9, 30),
    ]
    leap = rolling(utc(2028, 3, 1), "monthly", anchor)
    assert bounds(leap) == (utc(2028, 2, 29, 9, 30), utc(2028, 3, 31, 9, 30))
    # period_type "rolling" is monthly, rolling alignment, whatever the alignment says.
    same = period_for(utc(2028, 3, 1), period_type="rolling", alignment="calendar", timezone="UTC", anchor=anchor)
    assert same == leap


def test_rolling_yearly_anchored_on_a_leap_day() -> None:
    anchor = utc(2024, 2, 29, 12)
    assert bounds(rolling(utc(2025, 2, 28, 11, 59, 59), "yearly", anchor)) == (anchor, utc(2025, 2, 28, 12))
    assert bounds(rolling(utc(2025, 3, 1), "yearly", anchor)) == (utc(2025, 2, 28, 12), utc(2026, 2, 28, 12))
    assert bounds(rolling(utc(2028, 3, 1), "yearly", anchor)) == (utc(2028, 2, 29, 12), utc(2029, 2, 28, 12))


def test_rolling_days_keep_the_anchors_local_time_across_dst() -> None:
    anchor = utc(2026, 1, 10, 9, 30)  # 10:30 in Berlin
    # 10:30 CET on the 28th to 10:30 CEST on the 29th: a 23-hour day.
    day = rolling(utc(2026, 3, 29, 7), "daily", anchor, "Europe/Berlin")
    assert bounds(day) == (utc(2026, 3, 28, 9, 30), utc(2026, 3, 29, 8, 30))
    assert bounds(day.next()) == (utc(2026, 3, 29, 8, 30), utc(2026, 3, 30, 8, 30))
    week = rolling(utc(2026, 3, 29, 12), "weekly", anchor, "Europe/Berlin")
    # 2026-01-10 was a Saturday: weeks run Saturday 10:30 to Saturday 10:30, local time.
    assert bounds(week) == (utc(2026, 3, 28, 9, 30), utc(2026, 4, 4, 8, 30))


def test_rolling_anchor_in_a_skipped_or_repeated_hour() -> None:
    # 02:30 local does not exist on 2026-03-29 in Berlin: that boundary falls just after the gap.
    skipped = utc(2026, 3, 1, 1, 30)  # 02:30 CET
    day = rolling(utc(2026, 3, 29, 1, 29), "daily", skipped, "Europe/Berlin")
    assert bounds(day) == (utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 30))
    assert day.next().end == utc(2026, 3, 30, 0, 30)
    # A subscription started in the second 02:30 of 2025-10-26 renews exactly then.
    repeated = utc(2025, 10, 26, 1, 30)  # 02:30 CET, after the 02:30 CEST an hour earlier
    assert rolling(repeated, "daily", repeated, "Europe/Berlin").start == repeated
    assert rolling(repeated, "yearly", repeated, "Europe/Berlin").start == repeated


def test_before_the_anchor_periods_extend_backwards() -> None:
    anchor = utc(2026, 1, 31)
    assert bounds(rolling(utc(2025, 12, 15), "monthly", anchor)) == (utc(2025, 11, 30), utc(2025, 12, 31))


def test_rolling_without_anchor_falls_back_to_calendar() -> None:
    at = utc(2026, 5, 17, 8)
    no_anchor = period_for(at, period_type="monthly", alignment="rolling", timezone="UTC")
    assert bounds(no_anchor) == (utc(2026, 5, 1), utc(2026, 6, 1))


# -- Period ---------------------------------------------------------------------------------


def test_contains_is_half_open() -> None:
    period = calendar(utc(2026, 5, 17), "monthly")
    assert period.contains(period.start)
    assert period.contains(period.end - timedelta(microseconds=1))
    assert not period.contains(period.end)
    assert not period.contains(period.start - timedelta(microseconds=1))


def test_resets_in() -> None:
    period = calendar(utc(2026, 5, 17), "daily")
    assert period.resets_in(utc(2026, 5, 17, 18)) == timedelta(hours=6)
    assert period.resets_in(utc(2026, 5, 19)) == timedelta(0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: calendar(datetime(2026, 5, 17), "monthly"),
        lambda: calendar(utc(2026, 5, 17), "monthly").contains(datetime(2026, 5, 17)),
        lambda: calendar(utc(2026, 5, 17), "monthly").resets_in(datetime(2026, 5, 17)),
        lambda: rolling(utc(2026, 5, 17), "monthly", datetime(2026, 1, 1)),
    ],
)
def test_naive_datetimes_are_refused(call: t.Callable[[], object]) -> None:
    with pytest.raises(InvalidUsage, match=r"(at|now|anchor) must be timezone-aware"):
        call()


def test_naive_refusal_names_the_field() -> None:
    with pytest.raises(InvalidUsage, match="^at must be timezone-aware"):
        calendar(datetime(2026, 5, 17), "monthly")
    with pytest.raises(InvalidUsage, match="^anchor must be timezone-aware"):
        rolling(utc(2026, 5, 17), "monthly", datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"period_type": "weakly"}, "period_type must be one of 'daily', 'weekly', 'monthly', 'yearly', 'rolling'"),
        ({"alignment": "lunar"}, "alignment must be one of 'calendar', 'rolling', got 'lunar'"),
        ({"timezone": "Mars/Olympus"}, "timezone must be an IANA timezone name"),
        ({"timezone": ""}, "timezone must be an IANA timezone name"),
    ],
)
def test_unknown_settings(settings: dict[str, str], message: str) -> None:
    arguments = {"period_type": "monthly", "alignment": "calendar", "timezone": "UTC", **settings}
    with pytest.raises(ValueError, match=re.escape(message)):
        period_for(
            utc(2026, 1, 1),
            period_type=arguments["period_type"],
            alignment=arguments["alignment"],
            timezone=arguments["timezone"],
        )


def test_validate_period_settings_names_the_config_key() -> None:
    validate_period_settings("weekly", "rolling", "America/New_York", KEYS)
    with pytest.raises(ConfigurationError, match="^AI_METERING_PERIOD_TYPE must be one of .*got 'weakly'"):
        validate_period_settings("weakly", "calendar", "UTC", KEYS)
    with pytest.raises(ConfigurationError, match="^AI_METERING_PERIOD_ALIGNMENT must be one of"):
        validate_period_settings("monthly", None, "UTC", KEYS)
    with pytest.raises(ConfigurationError, match="^AI_METERING_TIMEZONE must be an IANA timezone name"):
        validate_period_settings("monthly", "calendar", "Europe/Nowhere", KEYS)


def test_next_and_previous_round_trip() -> None:
    if hypothesis is None:  # pragma: no cover
        pytest.skip("hypothesis is not installed")
    from hypothesis import given
    from hypothesis import settings
    from hypothesis import strategies as st

    instants = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC))
    zones = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"])
    types = st.sampled_from(["daily", "weekly", "monthly", "yearly", "rolling"])

    @settings(max_examples=500, deadline=None, database=None)
    @given(instants, types, st.sampled_from(["calendar", "rolling"]), zones, st.one_of(st.none(), instants))
    def check(at: datetime, period_type: str, alignment: str, tz: str, anchor: datetime | None) -> None:
        period = period_for(at, period_type=period_type, alignment=alignment, timezone=tz, anchor=anchor)
        assert period.contains(at)
        assert period.start < period.end
        assert period.next().start == period.end
        assert period.previous().end == period.start
        assert period.next().previous() == period
        assert period.previous().next() == period
        if anchor is not None and (alignment == "rolling" or period_type == "rolling"):
            assert (
                period_for(anchor, period_type=period_type, alignment=alignment, timezone=tz, anchor=anchor).start
                == anchor
            )

    check()
