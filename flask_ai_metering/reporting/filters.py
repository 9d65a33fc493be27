"""The query-string filters every dashboard page shares, parsed once and validated.

A bad value is the user's typo, not our crash: it becomes a 400 that says which
parameter is wrong. Days are local to ``AI_METERING_TIMEZONE``; ``end`` is
inclusive, so ``start=2026-11-01&end=2026-11-30`` is all of November.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t
from zoneinfo import ZoneInfo

from werkzeug.exceptions import BadRequest

from .rollups import day_bounds

#: Days shown when no range is given: the last 30, today included.
DEFAULT_DAYS = 30
#: The longest range a page aggregates (ten years).
MAX_DAYS = 3660
MAX_PAGE = 100_000
#: Column widths of the ledger: a longer filter value cannot match anything.
_LENGTHS = {"provider": 50, "model": 150, "feature": 100, "tenant": 100}
#: Every parameter :meth:`Filters.query` writes back into links.
PARAMS = ("start", "end", "provider", "model", "feature", "billable", "tenant")


class FilterError(BadRequest):
    """A filter value the dashboard cannot use (answered with 400 and the message)."""


@dataclasses.dataclass(frozen=True)
class Filters:
    """The validated filters of one request."""

    start: dt.date
    end: dt.date
    zone: ZoneInfo
    provider: str | None = None
    model: str | None = None
    feature: str | None = None
    billable: tuple[str, str] | None = None
    tenant: str | None = None
    page: int = 1
    #: True when the range came from the URL (links keep it), False for the default.
    explicit_range: bool = False

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    @property
    def since(self) -> dt.datetime:
        """The first instant of ``start`` in UTC."""
        return day_bounds(self.start, self.zone)[0]

    @property
    def until(self) -> dt.datetime:
        """The first instant after ``end`` in UTC (exclusive)."""
        return day_bounds(self.end, self.zone)[1]

    def previous(self) -> Filters:
        """The window of the same length just before this one, for "change vs previous"."""
        length = dt.timedelta(days=self.days)
        return dataclasses.replace(self, start=self.start - length, end=self.end - length)

    def query(self, **changes: t.Any) -> dict[str, str]:
        """Query parameters reproducing these filters, with ``changes`` applied (None drops one)."""
        out: dict[str, str] = {}
        if self.explicit_range:
            out["start"] = self.start.isoformat()
            out["end"] = self.end.isoformat()
        for name in ("provider", "model", "feature", "tenant"):
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.billable:
            out["billable"] = f"{self.billable[0]}:{self.billable[1]}"
        for name, value in changes.items():
            if value is None:
                out.pop(name, None)
            else:
                out[name] = str(value)
        return out


def _date(args: t.Mapping[str, str], name: str) -> dt.date | None:
    raw = args.get(name, "").strip()
    if not raw:
        return None
    try:
        return dt.date.fromisoformat(raw) if len(raw) == 10 else _bad(name, raw)
    except ValueError:
        return _bad(name, raw)


def _bad(name: str, raw: str) -> t.NoReturn:
    raise FilterError(f"'{name}' must be a date written YYYY-MM-DD, got {raw[:40]!r}.")


def _text(args: t.Mapping[str, str], name: str) -> str | None:
    raw = args.get(name, "").strip()
    if not raw:
        return None
    if len(raw) > _LENGTHS[name] or any(ord(c) < 32 for c in raw):
        raise FilterError(f"'{name}' must be at most {_LENGTHS[name]} printable characters.")
    return raw


def parse_billable(raw: str) -> tuple[str, str]:
    kind, sep, ident = raw.partition(":")
    if any(ord(c) < 32 for c in raw):
        raise FilterError("'billable' must not contain control characters.")
    if not sep or not kind or not ident or len(kind) > 100 or len(ident) > 100:
        raise FilterError(f"'billable' must be TYPE:ID (for example Team:42), got {raw[:60]!r}.")
    return kind, ident


def parse_filters(args: t.Mapping[str, str], timezone: str, today: dt.date | None = None) -> Filters:
    """Read the shared filters from ``args`` (``request.args``).

    :raises FilterError: naming the parameter that is wrong.
    """
    zone = ZoneInfo(timezone)
    today = today or dt.datetime.now(zone).date()
    start = _date(args, "start")
    end = _date(args, "end")
    explicit = start is not None or end is not None
    end = end or (today if start is None else max(today, start))
    start = start or end - dt.timedelta(days=DEFAULT_DAYS - 1)
    if start > end:
        raise FilterError("'start' must not be after 'end'.")
    if (end - start).days >= MAX_DAYS:
        raise FilterError(f"The date range may span at most {MAX_DAYS} days.")
    if start.year < 1971 or end.year > 9998:
        raise FilterError("The date range is out of bounds.")
    raw_page = args.get("page", "").strip() or "1"
    if not raw_page.isdigit() or not 1 <= int(raw_page) <= MAX_PAGE:
        raise FilterError(f"'page' must be a whole number from 1 to {MAX_PAGE}, got {raw_page[:20]!r}.")
    raw_billable = args.get("billable", "").strip()
    return Filters(
        start=start,
        end=end,
        zone=zone,
        provider=_text(args, "provider"),
        model=_text(args, "model"),
        feature=_text(args, "feature"),
        billable=parse_billable(raw_billable) if raw_billable else None,
        tenant=_text(args, "tenant"),
        page=int(raw_page),
        explicit_range=explicit,
    )


def presets(f: Filters) -> list[tuple[str, dt.date, dt.date]]:
    """Quick ranges for the filter bar, relative to today in the dashboard's timezone."""
    today = dt.datetime.now(f.zone).date()
    month_start = today.replace(day=1)
    last_month_end = month_start - dt.timedelta(days=1)
    return [
        ("Today", today, today),
        ("7 days", today - dt.timedelta(days=6), today),
        ("30 days", today - dt.timedelta(days=29), today),
        ("This month", month_start, today),
        ("Last month", last_month_end.replace(day=1), last_month_end),
        ("90 days", today - dt.timedelta(days=89), today),
    ]
