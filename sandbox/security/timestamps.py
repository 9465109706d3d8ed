"""Times as integer 100-ns ticks since the Unix epoch, rendered like Microsoft's ``2020-09-06T14:46:57.0733333Z``.

That is the resolution Microsoft's timestamps show, so ``$filter`` comparisons on them are exact.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

TICKS_PER_SECOND = 10_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ticks_from_datetime(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * TICKS_PER_SECOND + delta.microseconds * 10


_TS_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2})?)(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})?$")


def parse_timestamp(text: str) -> int:
    """ISO-8601 (any fraction length, ``Z`` or an offset; no zone means UTC) → ticks. ValueError if not one."""
    match = _TS_RE.match(text.strip())
    if not match:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}")
    base, fraction, zone = match.groups()
    whole = datetime.fromisoformat(base + ("" if zone in (None, "Z") else zone))
    if whole.tzinfo is None:
        whole = whole.replace(tzinfo=UTC)
    ticks = ticks_from_datetime(whole)
    if fraction:
        ticks += int((fraction + "0000000")[:7])
    return ticks


def format_ticks(ticks: int) -> str:
    seconds, rest = divmod(ticks, TICKS_PER_SECOND)
    stamp = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{rest:07d}Z"


def to_ticks(value: Any) -> int:
    if isinstance(value, datetime):
        return ticks_from_datetime(value)
    if isinstance(value, str):
        return parse_timestamp(value)
    if isinstance(value, int):
        return value
    raise ValueError(f"not a timestamp: {value!r}")
