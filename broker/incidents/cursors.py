"""The cursors ``GET /api/incidents`` hands out: a store row key, bound to the tenant it was issued for,
in URL-safe base64. A cursor is caller input on the way back: it is checked before it reaches a query."""

from __future__ import annotations

import base64
import json
import re

from broker.incidents.records import is_time_key


def encode_cursor(tenant_id: str, key: str) -> str:
    raw = json.dumps({"t": tenant_id, "k": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(tenant_id: str, cursor: str) -> str:
    """The row key a cursor carries; ``ValueError`` if it is not one of ours for this tenant."""
    if not 0 < len(cursor) <= 400 or not re.fullmatch(r"[A-Za-z0-9_-]+", cursor):
        raise ValueError("malformed cursor")
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("malformed cursor") from exc
    if not isinstance(data, dict) or data.get("t") != tenant_id or not isinstance(data.get("k"), str):
        raise ValueError("the cursor belongs to another query")
    key = str(data["k"])
    if not is_time_key(key):
        raise ValueError("malformed cursor")
    return key
