"""Microsoft's timestamps as integer 100-ns ticks since the epoch: the resolution they carry.

Defender writes ``lastUpdateTime`` with seven fraction digits; a float or a ``datetime`` (microseconds)
would merge distinct updates, and the sync's keys and de-duplication compare them exactly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

TICKS_PER_SECOND = 10_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TS = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2}))?(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})?$")


def parse_ticks(text: str) -> int:
    """``2020-09-06T14:46:57.0733333Z`` (any fraction, Z or offset) → ticks since the epoch."""
    match = _TS.match(text.strip())
    if not match:
        raise ValueError(f"not an ISO-8601 timestamp: {text[:40]!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0), tzinfo=UTC)
    if zone not in (None, "Z"):
        sign = 1 if zone[0] == "+" else -1
        moment -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    delta = moment - _EPOCH
    ticks = (delta.days * 86_400 + delta.seconds) * TICKS_PER_SECOND
    return ticks + (int((fraction + "0000000")[:7]) if fraction else 0)


def format_ticks(ticks: int) -> str:
    seconds, rest = divmod(ticks, TICKS_PER_SECOND)
    return f"{(_EPOCH + timedelta(seconds=seconds)).strftime('%Y-%m-%dT%H:%M:%S')}.{rest:07d}Z"


def now_ticks(clock: Callable[[], float] = time.time) -> int:
    return int(clock() * TICKS_PER_SECOND)
