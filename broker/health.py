"""Per-tenant health: what the last token acquisitions and syncs said about each customer tenant.

Every acquisition that reaches Entra ID, every sync run, the doctor and the consent callback report here;
a token served from memory does not (it says nothing new, and the hot path must stay free of I/O). The
record per tenant: last success, last failure (code and time), consecutive failures, and what is known of
consent::

    unknown ──success──▶ granted ──consent_required──▶ revoked
       │                    ▲  └────role_missing─────▶ role_missing
       └─consent_required─▶ missing                    (any success ▶ granted)
    the consent callback: an administrator's refusal ▶ refused

Records live in memory and are written to the ``tenanthealth`` table (one row per tenant GUID) by one
background thread, never on the caller's thread: at once when the state changes (healthy ↔ failing, a new
failure code, a new consent state), otherwise at most once per tenant per ``write_interval`` (so a
steadily failing tenant's counter still moves in storage). A tenant whose consent was revoked therefore
shows it after one failed attempt. Each instance writes what it saw last; readers overlay this instance's
newer records on the table, so the view is never older than the last write by any instance.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import AzureError
from azure.data.tables import TableClient, UpdateMode

log = logging.getLogger(__name__)

PARTITION = "health"
DEFAULT_WRITE_INTERVAL = 60.0
_AFTER_CONSENT_REQUIRED = {"granted": "revoked", "role_missing": "revoked", "revoked": "revoked", "refused": "refused"}
CONSENT_STATES = ("unknown", "granted", "missing", "revoked", "role_missing", "refused")


@dataclass(frozen=True)
class TenantHealth:
    """One tenant's health record (times are epoch seconds; 0 means never)."""

    tenant_id: str
    consent: str = "unknown"
    last_success_at: float = 0.0
    last_failure_at: float = 0.0
    last_failure_code: str = ""
    last_failure_source: str = ""
    consecutive_failures: int = 0
    updated_at: float = 0.0

    @property
    def healthy(self) -> bool | None:
        """True after a success, False while failing, None when nothing is known yet."""
        if self.consecutive_failures:
            return False
        return True if self.last_success_at else None

    def _state(self) -> tuple[object, ...]:
        return (self.healthy, self.last_failure_code if self.consecutive_failures else "", self.consent)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        for name in ("last_success_at", "last_failure_at", "updated_at"):
            body[name] = _iso(body[name])
        body["healthy"] = self.healthy
        return body


def _iso(epoch: float) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds") if epoch else None


class HealthBook:
    """In-memory tenant health, written behind to a table on change or once per interval."""

    def __init__(
        self,
        table: Callable[[], TableClient],
        *,
        write_interval: float = DEFAULT_WRITE_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._table = table
        self.write_interval = write_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, TenantHealth] = {}
        self._written: dict[str, tuple[float, tuple[object, ...]]] = {}
        self._pending: dict[str, TenantHealth] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tenant-health")
        self.writes = 0  # rows written by this instance (what the "no write per request" test counts)

    # -- reports -------------------------------------------------------------------------------------

    def success(self, tenant_id: str, source: str) -> None:
        """An acquisition, sync or doctor run for this tenant worked: a checked token proves consent."""

        self._update(
            tenant_id,
            lambda old, now: replace(
                old, consent="granted", last_success_at=now, consecutive_failures=0, updated_at=now
            ),
        )

    def failure(self, tenant_id: str, code: str, source: str) -> None:
        """An acquisition or sync for this tenant failed with problem ``code``."""

        def change(old: TenantHealth, now: float) -> TenantHealth:
            consent = old.consent
            if code == "consent_required":
                consent = _AFTER_CONSENT_REQUIRED.get(old.consent, "missing")
            elif code == "role_missing":
                consent = "role_missing"
            return replace(
                old,
                consent=consent,
                last_failure_at=now,
                last_failure_code=code,
                last_failure_source=source,
                consecutive_failures=old.consecutive_failures + 1,
                updated_at=now,
            )

        self._update(tenant_id, change)

    def consent_refused(self, tenant_id: str, error: str) -> None:
        """The tenant's administrator refused (or could not give) consent through the link."""
        self._update(tenant_id, lambda old, now: replace(old, consent="refused", updated_at=now))
        log.info("tenant.health tenant=%s consent=refused error=%s", tenant_id, error)

    def forget(self, tenant_id: str) -> None:
        with self._lock:
            self._records.pop(tenant_id, None)

    # -- reads ---------------------------------------------------------------------------------------

    def local(self, tenant_id: str) -> TenantHealth | None:
        """This instance's record (no I/O)."""
        return self._records.get(tenant_id)

    def view(self) -> dict[str, TenantHealth]:
        """Every tenant's record: the table, overlaid by this instance's newer records."""
        try:
            rows = self._table().query_entities("PartitionKey eq @pk", parameters={"pk": PARTITION})
            stored = {r.tenant_id: r for r in (_from_entity(e) for e in rows) if r is not None}
        except AzureError as exc:
            log.warning("tenant.health.read outcome=failed error=%s", exc.__class__.__name__)
            stored = {}
        with self._lock:
            for tenant_id, record in self._records.items():
                if tenant_id not in stored or record.updated_at >= stored[tenant_id].updated_at:
                    stored[tenant_id] = record
        return stored

    # -- writing -------------------------------------------------------------------------------------

    def _update(self, tenant_id: str, change: Callable[[TenantHealth, float], TenantHealth]) -> None:
        now = self._clock()
        with self._lock:
            old = self._records.get(tenant_id) or TenantHealth(tenant_id)
            new = change(old, now)
            self._records[tenant_id] = new
            written_at, written_state = self._written.get(tenant_id, (float("-inf"), None))
            due = new._state() != written_state or now - written_at >= self.write_interval
            if not due:
                return
            self._written[tenant_id] = (now, new._state())
            queued = tenant_id in self._pending
            self._pending[tenant_id] = new
        if old._state() != new._state():
            log.info(
                "tenant.health tenant=%s healthy=%s consent=%s code=%s failures=%d",
                tenant_id,
                new.healthy,
                new.consent,
                new.last_failure_code or "-",
                new.consecutive_failures,
            )
        if not queued:
            with contextlib.suppress(RuntimeError):  # closed: the process is going away
                self._writer.submit(self._write, tenant_id)

    def _write(self, tenant_id: str) -> None:
        with self._lock:
            record = self._pending.pop(tenant_id, None)
        if record is None:
            return
        try:
            self._table().upsert_entity(_to_entity(record), mode=UpdateMode.REPLACE)
            self.writes += 1
        except AzureError as exc:
            log.warning("tenant.health.write tenant=%s outcome=failed error=%s", tenant_id, exc.__class__.__name__)
            with self._lock:
                self._written.pop(tenant_id, None)  # try again on the next report

    def flush(self, timeout: float = 10.0) -> None:
        """Wait for the writes queued so far (tests, and before the process exits)."""
        done = self._writer.submit(lambda: None)
        done.result(timeout=timeout)

    def close(self) -> None:
        self._writer.shutdown(wait=True)


def _to_entity(record: TenantHealth) -> dict[str, object]:
    return {
        "PartitionKey": PARTITION,
        "RowKey": record.tenant_id,
        "Consent": record.consent,
        "LastSuccessAt": record.last_success_at,
        "LastFailureAt": record.last_failure_at,
        "LastFailureCode": record.last_failure_code,
        "LastFailureSource": record.last_failure_source,
        "ConsecutiveFailures": record.consecutive_failures,
        "UpdatedAt": record.updated_at,
    }


def _from_entity(entity: Mapping[str, Any]) -> TenantHealth | None:
    try:
        consent = str(entity.get("Consent") or "unknown")
        return TenantHealth(
            tenant_id=str(entity["RowKey"]),
            consent=consent if consent in CONSENT_STATES else "unknown",
            last_success_at=float(entity.get("LastSuccessAt") or 0),
            last_failure_at=float(entity.get("LastFailureAt") or 0),
            last_failure_code=str(entity.get("LastFailureCode") or ""),
            last_failure_source=str(entity.get("LastFailureSource") or ""),
            consecutive_failures=int(entity.get("ConsecutiveFailures") or 0),
            updated_at=float(entity.get("UpdatedAt") or 0),
        )
    except (KeyError, TypeError, ValueError):
        return None
