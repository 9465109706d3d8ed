"""NCRONTAB, the six-field schedule the Functions timer trigger takes: ``second minute hour day month day-of-week``.

Each field is ``*``, a number, a range ``a-b``, a step ``*/n`` or ``a-b/n``, or a comma-separated list of
those; months and days of the week also take their three-letter English names, and day-of-week 0 and 7
are both Sunday. As in cron, when both day fields are restricted a day matching either one fires.
Times are UTC, as on the Functions host unless ``WEBSITE_TIME_ZONE`` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (name, lowest, highest, names counted from `lowest`)
_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS),
)
_HORIZON_DAYS = 5 * 366  # a schedule that cannot fire within five years (30 Feb) is refused


class ScheduleError(ValueError):
    """The expression is not a six-field NCRONTAB schedule; the message says which field and why."""


@dataclass(frozen=True)
class Schedule:
    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, expression: str) -> Schedule:
        parts = expression.split()
        if len(parts) != 6:
            raise ScheduleError(f"{expression!r}: six fields expected (second minute hour day month day-of-week)")
        values = [_field(part, *spec) for part, spec in zip(parts, _FIELDS, strict=True)]
        schedule = cls(
            expression=expression,
            seconds=values[0],
            minutes=values[1],
            hours=values[2],
            days=values[3],
            months=values[4],
            weekdays=frozenset(d % 7 for d in values[5]),
            any_day=parts[3] == "*",
            any_weekday=parts[5] == "*",
        )
        schedule.next_after(datetime(2000, 1, 1, tzinfo=UTC))  # refuse a schedule that never fires
        return schedule

    def _day_matches(self, day: datetime) -> bool:
        if day.month not in self.months:
            return False
        by_day = day.day in self.days
        by_weekday = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return by_day and by_weekday
        return by_day or by_weekday

    def next_after(self, moment: datetime) -> datetime:
        """The first time strictly after ``moment`` (aware) that the schedule fires."""
        start = moment.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
        day = start.replace(hour=0, minute=0, second=0)
        for _ in range(_HORIZON_DAYS):
            if self._day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        for second in sorted(self.seconds):
                            candidate = day.replace(hour=hour, minute=minute, second=second)
                            if candidate >= start:
                                return candidate
            day += timedelta(days=1)
        raise ScheduleError(f"{self.expression!r}: never fires")


def _field(text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        body, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ScheduleError(f"{name} field {text!r}: step {step_text!r} is not a positive number")
            step = int(step_text)
        if body == "*":
            first, last = low, (6 if name == "day-of-week" else high)
        elif "-" in body:
            a, _, b = body.partition("-")
            first, last = _value(a, name, low, high, names), _value(b, name, low, high, names)
            if first > last:
                raise ScheduleError(f"{name} field {text!r}: range {body!r} runs backwards")
        else:
            first = _value(body, name, low, high, names)
            last = high if step_text else first
        values.update(range(first, last + 1, step))
    return frozenset(values)


def _value(text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    lowered = text.strip().lower()
    if lowered in names:
        return names.index(lowered) + low
    if not lowered.isdigit():
        raise ScheduleError(f"{name} field: {text!r} is not a number" + (" or a name" if names else ""))
    value = int(lowered)
    if not low <= value <= high:
        raise ScheduleError(f"{name} field: {value} is outside {low}-{high}")
    return value
