"""Report periods: `7d`, `24h`, `2w` or `2026-05-01..2026-05-08`, aligned so a rerun covers the same window."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

__all__ = ["Period", "PeriodError", "parse_period"]

_LENGTH = re.compile(r"^(?P<n>\d+)\s*(?P<unit>[hdw])$")
_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
MAX_LENGTH = timedelta(days=3660)


class PeriodError(ValueError):
    """A period string that is not understood; the message shows the accepted forms."""


@dataclass(frozen=True)
class Period:
    """The window [start, end) a report covers; `spec` is what was asked for (e.g. '7d')."""

    spec: str
    start: datetime
    end: datetime

    @property
    def length(self) -> timedelta:
        return self.end - self.start

    def as_of(self, now: datetime | None = None) -> datetime:
        """The moment "stale" is judged at: the end of the window, or now when the window reaches past now."""
        now = now or datetime.now(UTC)
        return min(self.end, now)

    @property
    def label(self) -> str:
        """Human form: `7d: 2026-05-02 .. 2026-05-09 (UTC)`."""
        fmt = "%Y-%m-%d" if _midnight(self.start) and _midnight(self.end) else "%Y-%m-%d %H:%M"
        return f"{self.spec}: {self.start:{fmt}} .. {self.end:{fmt}} (UTC)"

    @property
    def slug(self) -> str:
        """A file-name-safe key, unique per window: `20260502T0000-20260509T0000`."""
        return f"{self.start:%Y%m%dT%H%M}-{self.end:%Y%m%dT%H%M}"


def _midnight(t: datetime) -> bool:
    return t.hour == 0 and t.minute == 0 and t.second == 0 and t.microsecond == 0


def _ceil(t: datetime, unit: timedelta) -> datetime:
    """`t` rounded up to the next whole hour (unit < 1 day) or UTC midnight; unchanged when already whole."""
    if unit < timedelta(days=1):
        floor = t.replace(minute=0, second=0, microsecond=0)
    else:
        floor = t.replace(hour=0, minute=0, second=0, microsecond=0)
        unit = timedelta(days=1)
    return floor if floor == t else floor + unit


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def parse_period(spec: str, end: datetime | None = None) -> Period:
    """The window for `spec`, ending at `end` (default now) rounded up to a whole hour (`h`) or UTC day.

    Rounding up makes the window cover `end` itself and makes a rerun later the same day (or hour)
    hit the same window, so it replaces the earlier report instead of adding one. A scheduled daily
    run passes its data interval's end (a UTC midnight), which is kept as is. An explicit
    `YYYY-MM-DD..YYYY-MM-DD` covers those days, the end day exclusive.
    """
    text = (spec or "").strip().lower()
    if ".." in text:
        first, _, last = text.partition("..")
        try:
            start_day, end_day = date.fromisoformat(first.strip()), date.fromisoformat(last.strip())
        except ValueError:
            raise PeriodError(_usage(spec)) from None
        if end_day <= start_day:
            raise PeriodError(f"period {spec!r}: the end day must be after the start day (the end is exclusive)")
        start = datetime(start_day.year, start_day.month, start_day.day, tzinfo=UTC)
        stop = datetime(end_day.year, end_day.month, end_day.day, tzinfo=UTC)
        return Period(spec=f"{start_day}..{end_day}", start=start, end=stop)
    match = _LENGTH.match(text)
    if match is None:
        raise PeriodError(_usage(spec))
    unit = _UNITS[match["unit"]]
    length = int(match["n"]) * unit
    if length <= timedelta(0) or length > MAX_LENGTH:
        raise PeriodError(f"period {spec!r}: give a length between 1h and {MAX_LENGTH.days}d")
    stop = _ceil(_utc(end or datetime.now(UTC)), unit)
    return Period(spec=f"{match['n']}{match['unit']}", start=stop - length, end=stop)


def _usage(spec: str) -> str:
    return (
        f"period {spec!r} is not understood: use a length ending now, such as 24h, 7d or 2w, "
        "or days such as 2026-05-01..2026-05-08 (end day exclusive)"
    )
