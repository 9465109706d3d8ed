"""Audit records, their keyed MACs, and the table rows that hold them.

A record's MAC is HMAC-SHA256 over its canonical JSON (every field, ``day``, ``seq``, ``prev``, ``link`` and
``key``) with a key the storage account does not hold: a Key Vault secret, read through the broker's
Key Vault client. ``key`` names the secret version (``<name>/<version>``), so a rotated key verifies old
records with the version they were made with.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.keyvault.secrets import SecretClient

from broker.errors import AuditUnavailable

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 32
ZERO_MAC = "0" * 64  # ``prev`` of the first record of the first day
FIELDS = (
    "id",
    "time",
    "action",
    "outcome",
    "code",
    "reason",
    "caller",
    "caller_app",
    "tenant",
    "tenant_name",
    "scope",
    "request_id",
    "expires_on",
    "fingerprint",
    "client",
    "count",
)
CHAINED = ("seq", "prev", "link", "key", "mac")
_CHUNK = 30_000  # characters per string property (the service allows 64 KiB, i.e. 32 Ki UTF-16 units)
_POS_SPACE = 10**12


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AuditRecord:
    """One decision. ``fingerprint`` names an issued token without revealing it; ``count`` > 1 is an
    aggregate (refusals before authentication from one ``client`` address in one interval)."""

    action: str
    outcome: str  # issued | denied | failed | allowed
    code: str  # the problem code the caller saw ("ok" when allowed)
    reason: str = "-"  # why, as a stable reason code (e.g. token_expired, tenant_not_granted)
    caller: str = "-"
    caller_app: str = "-"
    tenant: str = "-"
    tenant_name: str = "-"
    scope: str = "-"
    request_id: str = "-"
    expires_on: int = 0
    fingerprint: str = "-"
    client: str = "-"
    count: int = 1
    time: str = field(default_factory=now_iso)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> AuditRecord:
        return cls(**{name: data[name] for name in FIELDS if name in data})


@dataclass(frozen=True)
class Written:
    """Where a record went: its day and sequence number (never reused) and its MAC."""

    day: str
    seq: int
    mac: str

    @property
    def ref(self) -> str:
        return f"{self.day}/{self.seq}"


# -- keys ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    id: str  # "<secret name>/<version>"
    secret: bytes = field(repr=False)

    def mac(self, payload: dict[str, Any]) -> str:
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self.secret, body, hashlib.sha256).hexdigest()


class KeySource(Protocol):
    def current(self) -> Key: ...


class PushedKey:
    """The writer process's key: whatever the broker sent last over the pipe."""

    def __init__(self) -> None:
        self._key: Key | None = None

    def set(self, key: Key) -> None:
        self._key = key

    def current(self) -> Key:
        if self._key is None:
            raise AuditUnavailable(diagnostic="the audit writer has no key yet")
        return self._key


class KeyRing:
    """The audit MAC key from Key Vault: the current version for writing (re-read every
    ``refresh_seconds``, so a rotation needs no restart), any recorded version for verifying."""

    def __init__(
        self,
        client: SecretClient,
        name: str,
        *,
        refresh_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.refresh_seconds = refresh_seconds
        self._client = client
        self._refresh = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._current: Key | None = None
        self._read_at = float("-inf")
        self._retry_at = float("-inf")
        self._versions: dict[str, Key | None] = {}

    def current(self) -> Key:
        with self._lock:
            if self._current is not None and self._clock() - self._read_at < self._refresh:
                return self._current
            if self._current is None and self._clock() < self._retry_at:
                raise AuditUnavailable(diagnostic=f"audit key {self.name}: unavailable, retried every 15 s")
            try:
                secret = self._client.get_secret(self.name)
            except AzureError as exc:
                if self._current is not None:
                    log.warning("audit.key outcome=stale name=%s error=%s", self.name, exc.__class__.__name__)
                    self._read_at = self._clock() - self._refresh + 15
                    return self._current
                log.error("audit.key outcome=unavailable name=%s error=%s", self.name, exc.__class__.__name__)
                self._retry_at = self._clock() + 15  # not a vault round trip per record while it is down
                raise AuditUnavailable(diagnostic=f"audit key {self.name}: {exc.__class__.__name__}") from exc
            key = self._key(secret.properties.version or "", secret.value or "")
            self._current, self._read_at = key, self._clock()
            self._versions[key.id] = key
            return key

    def version(self, key_id: str) -> Key | None:
        """The key a record names, or None when it is not a version of this ring's secret."""
        with self._lock:
            if key_id in self._versions:
                return self._versions[key_id]
        name, _, version = key_id.partition("/")
        found: Key | None = None
        if name == self.name and version and version.isalnum():
            try:
                secret = self._client.get_secret(name, version)
                found = self._key(secret.properties.version or version, secret.value or "")
            except ResourceNotFoundError:
                found = None
            except AuditUnavailable:
                found = None
        with self._lock:
            self._versions[key_id] = found
        return found

    def _key(self, version: str, value: str) -> Key:
        if len(value) < MIN_KEY_CHARS:
            raise AuditUnavailable(
                diagnostic=f"audit key {self.name} must be at least {MIN_KEY_CHARS} characters of random data"
            )
        return Key(f"{self.name}/{version}", value.encode())


# -- chaining --------------------------------------------------------------------------------------------


def canonical(row: dict[str, Any], day: str) -> dict[str, Any]:
    """What a record's MAC covers."""
    return {name: row[name] for name in (*FIELDS, "seq", "prev", "link", "key")} | {"day": day}


def chain(record: AuditRecord, day: str, seq: int, prev: str, link: str, key: Key) -> dict[str, Any]:
    """The stored form of a record: its fields, ``seq``, ``prev``, ``link``, ``key`` and ``mac``."""
    row = record.fields()
    row.update(seq=seq, prev=prev, link=link, key=key.id)
    row["mac"] = key.mac(canonical(row, day))
    return row


def size(record: AuditRecord) -> int:
    """About the length of the record's JSON once chained."""
    return sum(len(str(value)) + len(name) + 6 for name, value in record.fields().items()) + 260


# -- rows ------------------------------------------------------------------------------------------------


def inv(number: int) -> str:
    return f"{_POS_SPACE - 1 - number:012d}"


def chain_key(pos: int) -> str:
    """The row key of the chain block starting at position ``pos`` of its day (newest sorts first)."""
    return "c" + inv(pos)


def _safe_key(value: str) -> str:
    """A value usable inside a RowKey (no ``/ \\ # ?`` or control characters)."""
    return "".join(ch if ch.isprintable() and ch not in "/\\#?|" else "_" for ch in value)[:100]


def index_prefix(kind: str, value: str) -> str:
    return f"{kind}|{_safe_key(value)}|"


def block_entity(day: str, row_key: str, rows: list[dict[str, Any]], pos: int) -> dict[str, Any]:
    payload = json.dumps(rows, separators=(",", ":"), sort_keys=True)
    chunks = [payload[i : i + _CHUNK] for i in range(0, len(payload), _CHUNK)]
    times = [str(row["time"]) for row in rows]
    entity: dict[str, Any] = {
        "PartitionKey": day,
        "RowKey": row_key,
        "Pos": pos,
        "First": rows[0]["seq"],
        "Seq": rows[-1]["seq"],
        "Mac": rows[-1]["mac"],
        "Count": len(rows),
        "MinTime": min(times),
        "MaxTime": max(times),
        "Chunks": len(chunks),
    }
    entity.update({f"R{i}": chunk for i, chunk in enumerate(chunks)})
    return entity


def block_rows(entity: dict[str, Any]) -> list[dict[str, Any]]:
    """The records a chain or index row holds, oldest first; ``ValueError`` if it cannot be read."""
    try:
        payload = "".join(str(entity[f"R{i}"]) for i in range(int(entity["Chunks"])))
        rows = json.loads(payload)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"row {entity.get('RowKey')} cannot be read") from exc
    wanted = (*FIELDS, *CHAINED)
    if not (
        isinstance(rows, list)
        and rows
        and all(isinstance(r, dict) and all(k in r for k in wanted) and isinstance(r["seq"], int) for r in rows)
    ):
        raise ValueError(f"row {entity.get('RowKey')} does not hold records")
    return rows


def index_entities(day: str, rows: list[dict[str, Any]], pos: int) -> dict[str, dict[str, Any]]:
    """The index rows for one chain block: one per tenant and one per caller it mentions."""
    first = inv(pos)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        for kind, value in (("t", row["tenant"]), ("k", row["caller"])):
            if value not in ("", "-"):
                groups.setdefault(index_prefix(kind, str(value)) + first, []).append(row)
    return {key: block_entity(day, key, group, pos) for key, group in groups.items()}
