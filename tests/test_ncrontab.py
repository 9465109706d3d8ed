"""The local Functions host reads NCRONTAB schedules as the Functions host does: six fields, UTC."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from devrun.ncrontab import Schedule, ScheduleError

T0 = datetime(2026, 12, 2, 9, 0, 7, tzinfo=UTC)  # a Wednesday


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("*/20 * * * * *", datetime(2026, 12, 2, 9, 0, 20, tzinfo=UTC)),
        ("0 */5 * * * *", datetime(2026, 12, 2, 9, 5, 0, tzinfo=UTC)),  # the broker's default schedule
        ("0 30 9 * * *", datetime(2026, 12, 2, 9, 30, 0, tzinfo=UTC)),
        ("0 0 9 * * *", datetime(2026, 12, 3, 9, 0, 0, tzinfo=UTC)),  # today's 09:00:00 has passed
        ("0 0 0 * * Sun", datetime(2026, 12, 6, 0, 0, 0, tzinfo=UTC)),
        ("0 0 0 * * 7", datetime(2026, 12, 6, 0, 0, 0, tzinfo=UTC)),  # 7 is Sunday too
        ("0 0 0 1 jan *", datetime(2027, 1, 1, 0, 0, 0, tzinfo=UTC)),
        ("5,10 0 9 * * 1-5", datetime(2026, 12, 2, 9, 0, 10, tzinfo=UTC)),
        ("0 0 12 29 2 *", datetime(2028, 2, 29, 12, 0, 0, tzinfo=UTC)),
        ("0 0 0 1 * mon", datetime(2026, 12, 7, 0, 0, 0, tzinfo=UTC)),  # both day fields: either matches
    ],
)
def test_next_occurrence_is_the_first_match_strictly_after(expression: str, expected: datetime) -> None:
    """Each field form (step, list, range, names, 0/7 Sunday, leap day) finds the next firing time."""
    assert Schedule.parse(expression).next_after(T0) == expected


def test_a_firing_time_is_not_repeated() -> None:
    """Asked at the moment it fires, the schedule names the following time, so a tick never runs twice."""
    schedule = Schedule.parse("*/20 * * * * *")
    first = schedule.next_after(T0)
    assert schedule.next_after(first) == datetime(2026, 12, 2, 9, 0, 40, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("*/5 * * * *", "six fields"),  # a five-field Unix cron line
        ("61 * * * * *", "outside 0-59"),
        ("*/0 * * * * *", "step"),
        ("0 0 0 31 2 *", "never fires"),
        ("0 0 0 * * funday", "not a number"),
        ("0 10-5 * * * *", "backwards"),
    ],
)
def test_malformed_schedules_are_refused_with_the_reason(expression: str, why: str) -> None:
    """A schedule the host would refuse is refused here with the field and the reason."""
    with pytest.raises(ScheduleError, match=why):
        Schedule.parse(expression)
