"""An incident as the sync receives it, and the one rule for incident ids.

An incident id names a row key, a blob path and (for a merge target) the path of a request to the
incident API, so one rule decides what is an id everywhere: an integer, or 1-64 letters, digits, ``_``
and ``-`` starting with a letter or digit. Defender's ids are integers and Graph's are digit strings
today; the rule accepts more than digits so that an unexpected id shape is stored, not fatal, and every
character it accepts is safe in a URL path segment and a table key.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from broker.incidents.dialects import Dialect
from broker.incidents.ticks import parse_ticks

_ID = r"[0-9A-Za-z][0-9A-Za-z_-]{0,63}"
_INCIDENT_ID = re.compile(_ID)
_TIME_KEY = re.compile(rf"t_[0-9]{{19}}_{_ID}")


def parse_incident_id(value: object) -> str | None:
    """The incident id ``value`` carries (an integer or a string of the id alphabet), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    text = str(value)
    return text if _INCIDENT_ID.fullmatch(text) else None


def time_key(ticks: int, incident_id: str) -> str:
    """The store's row key for an incident as of one update: ``t_{ticks:019}_{id}``."""
    return f"t_{ticks:019d}_{incident_id}"


def is_time_key(key: str) -> bool:
    return _TIME_KEY.fullmatch(key) is not None


@dataclass(frozen=True)
class IncidentRecord:
    """An incident as received, with the keys the index needs."""

    incident_id: str
    last_update: int
    status: str
    severity: str
    merged_into: str | None
    body: bytes = field(repr=False)
    packed: bytes = field(repr=False, default=b"")  # zlib of body: what a table row holds

    @classmethod
    def from_api(cls, doc: dict[str, Any], dialect: Dialect) -> IncidentRecord:
        """Check and key one incident; ``ValueError`` if it lacks a usable id or update time."""
        incident_id = parse_incident_id(doc.get(dialect.id_field))
        if incident_id is None:
            raise ValueError("incident without a usable id")
        stamp = doc.get(dialect.time_field)
        if not isinstance(stamp, str):
            raise ValueError(f"incident {incident_id} without {dialect.time_field}")
        redirect = doc.get("redirectIncidentId")
        return cls(
            incident_id=incident_id,
            last_update=parse_ticks(stamp),
            status=str(doc.get("status") or "").lower(),
            severity=str(doc.get("severity") or "").lower(),
            merged_into=None if redirect in (None, "") else str(redirect),
            body=(body := json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()),
            packed=zlib.compress(body, 6),
        )

    @property
    def time_key(self) -> str:
        return time_key(self.last_update, self.incident_id)
