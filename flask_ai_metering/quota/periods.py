"""Quota periods: daily, weekly, monthly or yearly windows, calendar or rolling.

Every period is computed the same way: boundaries repeat on the local wall clock
of a timezone from an *anchor*. Calendar alignment anchors on 2001-01-01 00:00
local time (a Monday, the 1st, January 1st), so days start at local midnight,
weeks on Monday, months on the 1st and years on January 1st. Rolling alignment
anchors on the subscription start, at its local time of day. Boundaries are
converted to UTC, so across a DST change a local day lasts 23 or 25 hours.

Each boundary is computed from the anchor, never from the previous boundary: a
subscription started on January 31st renews on February 28th (or 29th), then on
March 31st, and one started on February 29th renews on February 28th in other
years. Periods also extend backwards from the anchor by the same rule, so a
usage dated before the subscription start falls in the rolling period containing
it, as a calendar one would.

A local wall time the DST change skips is taken just after the gap, and one it
repeats at its first occurrence (``fold=0``), unless the anchor itself was the
second occurrence.
"""

from __future__ import annotations

import calendar
import dataclasses
import functools
import typing as t
from datetime import datetime
from datetime import timedelta
from datetime import timezone as dt_timezone
from zoneinfo import ZoneInfo
from zoneinfo import ZoneInfoNotFoundError

from ..errors import ConfigurationError
from ..errors import InvalidUsage

#: Accepted ``AI_METERING_PERIOD_TYPE`` values; ``rolling`` means monthly, rolling alignment.
PERIOD_TYPES = ("daily", "weekly", "monthly", "yearly", "rolling")
#: Accepted ``AI_METERING_PERIOD_ALIGNMENT`` values.
ALIGNMENTS = ("calendar", "rolling")

_UTC = dt_timezone.utc
#: Calendar alignment's anchor: a Monday, the 1st of a month and of a year, at midnight.
_CALENDAR_ANCHOR = datetime(2001, 1, 1)
_DAY = timedelta(days=1)
_WEEK = timedelta(weeks=1)
#: Budgets' short periods (``minute``, ``hour``), not offered to plans: fixed steps like days.
_STEPS = {"minutely": timedelta(minutes=1), "hourly": timedelta(hours=1), "daily": _DAY, "weekly": _WEEK}
_TICK = timedelta(microseconds=1)


class PeriodRule:
    """How periods repeat: a step of ``unit`` from ``anchor`` on ``zone``'s wall clock.

    It remembers the last period it computed: most calls fall in the current
    period, and a hit costs a comparison instead of three timezone conversions.
    """

    __slots__ = ("unit", "zone", "anchor", "_last")

    def __init__(self, unit: str, zone: ZoneInfo, anchor: datetime) -> None:
        #: ``daily``, ``weekly``, ``monthly`` or ``yearly``.
        self.unit = unit
        self.zone = zone
        #: The anchor's local wall time (naive, keeping its ``fold``).
        self.anchor = anchor
        self._last: Period | None = None

    def __repr__(self) -> str:
        return f"PeriodRule({self.unit!r}, {self.zone.key!r}, anchor={self.anchor.isoformat()!r})"

    def period_for(self, at: datetime) -> Period:
        """The period containing ``at`` (timezone-aware)."""
        _check_aware(at, "at")
        last = self._last
        if last is not None and last.start <= at < last.end:
            return last
        local = at.astimezone(self.zone).replace(tzinfo=None)
        anchor = self.anchor
        # A wall-clock estimate, exact but where a DST change moves a boundary
        # across ``at``, which the two loops below correct.
        step = _STEPS.get(self.unit)
        if step is not None:
            index = (local - anchor) // step
        elif self.unit == "monthly":
            index = (local.year - anchor.year) * 12 + local.month - anchor.month
        else:
            index = local.year - anchor.year
        if local < self._wall(index):
            index -= 1
        start = self._boundary(index)
        while at < start:
            index -= 1
            start = self._boundary(index)
        end = self._boundary(index + 1)
        while end <= at:
            index += 1
            start, end = end, self._boundary(index + 1)
        # Shared between threads: replacing the reference is atomic, and either value is valid.
        self._last = period = Period(start, end, self)
        return period

    def _wall(self, index: int) -> datetime:
        """The local wall time of the ``index``-th boundary after (or before) the anchor."""
        anchor = self.anchor
        step = _STEPS.get(self.unit)
        if step is not None:
            return anchor + index * step
        if self.unit == "monthly":
            year, month = divmod(anchor.month - 1 + index, 12)
            year, month = anchor.year + year, month + 1
        else:
            year, month = anchor.year + index, anchor.month
        day = min(anchor.day, calendar.monthrange(year, month)[1])
        return anchor.replace(year=year, month=month, day=day)

    def _boundary(self, index: int) -> datetime:
        """The UTC instant of the ``index``-th boundary."""
        return self._wall(index).replace(tzinfo=self.zone, fold=self.anchor.fold).astimezone(_UTC)


@dataclasses.dataclass(frozen=True)
class Period:
    """A half-open window ``start <= at < end`` in UTC, and the rule that made it."""

    start: datetime
    end: datetime
    rule: PeriodRule = dataclasses.field(compare=False, repr=False)

    def contains(self, at: datetime) -> bool:
        _check_aware(at, "at")
        return self.start <= at < self.end

    def next(self) -> Period:
        return self.rule.period_for(self.end)

    def previous(self) -> Period:
        # Periods are contiguous and much longer than a microsecond.
        return self.rule.period_for(self.start - _TICK)

    def resets_in(self, now: datetime) -> timedelta:
        """Time left until ``end``; zero once the period is over."""
        _check_aware(now, "now")
        return max(self.end - now, timedelta(0))


def period_for(
    at: datetime,
    *,
    period_type: str,
    alignment: str,
    timezone: str,
    anchor: datetime | None = None,
) -> Period:
    """The period containing ``at``.

    :param period_type: one of :data:`PERIOD_TYPES`.
    :param alignment: ``calendar``, or ``rolling`` to anchor on ``anchor``
        (calendar is used when ``anchor`` is None).
    :param timezone: an IANA name, e.g. ``"Europe/Berlin"``; calendar boundaries
        and a rolling anchor's time of day are in this zone.
    :param anchor: the subscription start, for rolling alignment.
    :raises InvalidUsage: if ``at`` or ``anchor`` is a naive datetime.
    :raises ValueError: for an unknown period type, alignment or timezone.
    """
    if anchor is not None:
        _check_aware(anchor, "anchor")
    return _rule(period_type, alignment, timezone, anchor).period_for(at)


def validate_period_settings(
    period_type: t.Any,
    alignment: t.Any,
    timezone: t.Any,
    keys: tuple[str, str, str],
) -> None:
    """Check the three period settings, naming the config key of a bad one.

    :param keys: the config keys of the three settings, named in the error
        (:class:`~flask_ai_metering.config.Settings` passes its ``ConfigVars``).
    :raises ConfigurationError: naming the key of the bad setting.
    """
    try:
        _choice(period_type, PERIOD_TYPES, keys[0])
        _choice(alignment, ALIGNMENTS, keys[1])
        _zone(timezone, keys[2])
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


@functools.lru_cache(maxsize=1024)
def _rule(period_type: str, alignment: str, timezone: str, anchor: datetime | None) -> PeriodRule:
    """Build (once per settings and anchor: this is on every metered call's path) a rule."""
    _choice(period_type, PERIOD_TYPES + ("minutely", "hourly"), "period_type")
    _choice(alignment, ALIGNMENTS, "alignment")
    zone = _zone(timezone, "timezone")
    unit = "monthly" if period_type == "rolling" else period_type
    if anchor is None or (alignment == "calendar" and period_type != "rolling"):
        return PeriodRule(unit, zone, _CALENDAR_ANCHOR)
    return PeriodRule(unit, zone, anchor.astimezone(zone).replace(tzinfo=None))


def _choice(value: t.Any, choices: tuple[str, ...], field: str) -> None:
    if value not in choices:
        allowed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}")


def _zone(name: t.Any, field: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValueError(
            f"{field} must be an IANA timezone name such as 'UTC' or 'Europe/Berlin', got {name!r}"
        ) from None


def _check_aware(value: datetime, field: str) -> None:
    if value.utcoffset() is None:
        raise InvalidUsage(f"{field} must be timezone-aware, e.g. datetime.now(timezone.utc)")
