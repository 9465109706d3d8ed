"""Incident prefetch: copy each tenant's incidents from Defender XDR or Graph into storage, exactly.

Storage
-------
One table, partitioned by tenant GUID, so no read ever scans another tenant:

- ``t_{lastUpdate ticks:019}_{id}``: the incident as of that update - its JSON exactly as the API sent it
  (parsed and re-serialised; ``json.loads`` of it equals the API's object), zlib-compressed (alerts with
  ~30 null entity fields each compress about 8x, which is most of a page's storage cost) in 60 KB binary
  chunks (``Body0`` ...), with status, severity and the merge target beside it for filtering. "Updated
  since" is a range scan over these keys, paginated. A body still above 900 KB compressed (an entity holds
  1 MB) goes, uncompressed, to a blob,
  ``{tenant}/{id}/{ticks}.json``, and the row names it (``BlobName``): a 2 MB, 500-alert incident
  round-trips byte for byte.
- ``i_{id}``: which version is stored (``LastUpdate``), so an update can delete its old time row.

A page's incidents are written in entity-group transactions (at most 100 operations or 4 MB each); each
incident's new time row, id row and old-row delete sit in the same transaction, so a reader never sees an
incident twice or not at all. Upsert is idempotent and de-duplicated by (incident id, last update): the
page's time span is checked with one key-only range query, and only incidents not already stored at that
version are written (a first backfill skips the id lookups: nothing can be stored yet).

Paging over data that changes while we page
-------------------------------------------
Both APIs list most recently updated first; neither documents ``$orderby``, and their ``$skip`` (and
Graph's ``$skip``-based ``@odata.nextLink``) pages by *position*. An update moves an incident to the top
of the list; if it was on a page already read, every row behind it moves up one place and ``$skip``
silently jumps over one row we never saw. So the sync pages by *key* instead, inside a window:

1. A run's window is ``lastUpdate ge LOW``, LOW = watermark - ``SYNC_OVERLAP_SECONDS`` (first run:
   now - ``SYNC_LOOKBACK_DAYS``). The first page has no upper bound; its newest ``lastUpdate`` is HIGH.
2. Each next page asks ``ge LOW and le CURSOR``, CURSOR = the oldest ``lastUpdate`` on the page before.
   Rows only ever move *up* (updates raise ``lastUpdate``), never down past the cursor, so every row
   that is ``≤ CURSOR`` when the next page is read is still there to be read: nothing below the cursor
   can be skipped. The rows tied at CURSOR are read again (de-duplicated) because the order inside a
   tie is not documented. Only when a whole page shares one timestamp does the sync fall back to
   ``$skip`` (or the service's next link) inside that one timestamp.
3. A row updated during the run (after it was read, or before it was reached) gets a ``lastUpdate``
   above HIGH — HIGH came from the service, so no clock skew is involved — and the next run, starting
   at HIGH - overlap, reads it. The overlap also covers rows that become visible late.
4. The window is done when a page comes back short (or, where the service sends next links, without
   one). Only then does the watermark move, to HIGH.

Checkpoint: after each page is stored, the state entity records the window still owed
(``PendingLow``, ``PendingCursor``, ``PendingHigh``, ``PendingSkip``). The checkpoint therefore never
claims more than is stored: a run killed after page k resumes at page k's cursor, finishes that window,
then runs a fresh window from HIGH - overlap in the same run (so changes made meanwhile come too). A run
with nothing new costs one call per tenant: the overlap window, which fits on one page.

One run per tenant at a time: a run holds a 60-second blob lease on ``{tenant}`` (renewed every page)
and writes the state entity only with ``If-Match`` on the ETag it read, so a second run is refused at the
lease, and a run that lost its lease (stalled past 60 s) fails at its next checkpoint instead of
overwriting newer progress.

Merged incidents (``redirectIncidentId``) are stored with ``MergedInto``; a target not stored at least as
new as its merge is fetched by id at the end of the run. A Graph incident whose ``tenantId`` is not the
tenant being synced is refused: never stored, logged, counted in the status (``Refused``).

Budget: every call takes a slot from the tenant's persisted :class:`~broker.incidents.budget.CallBudget`. When the
budget (or a 429) needs a longer wait than the caller allows, the run stops at its last checkpoint with
outcome ``deferred``; the queue handler re-enqueues the tenant with that delay.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableClient, TableTransactionError, UpdateMode
from azure.storage.blob import BlobLeaseClient, ContainerClient, ContentSettings
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

from broker.errors import (
    BrokerError,
    SyncBudgetExhausted,
    SyncInProgress,
    UpstreamThrottled,
    UpstreamUnavailable,
)
from broker.incidents.upstream import (
    TICKS_PER_SECOND,
    CallCounter,
    Dialect,
    IncidentApiClient,
    format_ticks,
    now_ticks,
    parse_ticks,
)
from broker.storage import StorageAccount
from broker.tenants import Tenant, TenantRegistry

log = logging.getLogger(__name__)

MAX_DEQUEUE_COUNT = 5  # host.json extensions.queues.maxDequeueCount (a test keeps them equal)
LEASE_SECONDS = 60
STATE_PARTITION = "sync"
MAX_QUEUE_DELAY = 7 * 86_400
MAX_TARGET_HOPS = 3
_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_-]{0,63}$")
_KEY = re.compile(r"^t_[0-9]{19}_[0-9A-Za-z][0-9A-Za-z_-]{0,63}$")
OPS_PER_TRANSACTION = 99
POOL_WORKERS = 8  # the storage SDK's connection pool holds 10
CHUNK_BYTES = 60_000  # a binary property holds 64 KiB
MAX_INLINE_BYTES = 15 * CHUNK_BYTES  # an entity holds 1 MiB; bigger bodies go to a blob
MAX_TRANSACTION_BYTES = 3_500_000  # a transaction holds 4 MiB
TRANSACTION_ATTEMPTS = 3
_STATUS_FIELDS = (
    "LastOutcome",
    "LastError",
    "LastErrorAt",
    "Failures",
    "Poisoned",
    "DequeueCount",
    "ApiCalls",
    "Stored",
    "Refused",
    "Merged",
    "LastRunCalls",
    "LastRunAt",
)


# ---------------------------------------------------------------------------------------------------------
# Records


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
        raw_id = doc.get(dialect.id_field)
        incident_id = str(raw_id) if isinstance(raw_id, int | str) and not isinstance(raw_id, bool) else ""
        if not _ID.fullmatch(incident_id):
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


def time_key(ticks: int, incident_id: str) -> str:
    return f"t_{ticks:019d}_{incident_id}"


@dataclass(frozen=True)
class StoredIncident:
    """An index row and the incident's body."""

    incident_id: str
    last_update: str
    status: str
    severity: str
    merged_into: str | None
    api: str
    key: str
    document: Any


# ---------------------------------------------------------------------------------------------------------
# Store


class IncidentStore:
    """Incidents in one table partition per tenant; bodies too big for an entity in blobs."""

    def __init__(
        self,
        blobs: Callable[[], ContainerClient],
        table: Callable[[], TableClient],
        *,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self._blobs = blobs
        self._table = table
        self._pool = pool or ThreadPoolExecutor(max_workers=POOL_WORKERS, thread_name_prefix="incident-store")

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    @staticmethod
    def blob_name(tenant_id: str, record: IncidentRecord) -> str:
        return f"{tenant_id}/{record.incident_id}/{record.last_update:019d}.json"

    # -- writes ----------------------------------------------------------------------------------------

    def stored_versions(self, tenant_id: str, ids: Sequence[str]) -> dict[str, int]:
        """The stored ``lastUpdate`` ticks of each of ``ids`` that is stored (parallel point reads)."""
        table = self._table()

        def read(incident_id: str) -> tuple[str, int | None]:
            try:
                entity = table.get_entity(tenant_id, f"i_{incident_id}", select=["LastUpdate"])
            except ResourceNotFoundError:
                return incident_id, None
            return incident_id, int(str(entity["LastUpdate"]))

        return {i: t for i, t in self._pool.map(read, ids) if t is not None}

    def save(
        self, tenant_id: str, api: str, records: Sequence[IncidentRecord], *, maybe_stored: bool = True
    ) -> tuple[int, int]:
        """Upsert ``records``; returns (written, unchanged). ``maybe_stored=False`` (a tenant's very first
        window) skips looking for older versions, since there are none."""
        latest: dict[str, IncidentRecord] = {}
        for record in records:
            kept = latest.get(record.incident_id)
            if kept is None or record.last_update >= kept.last_update:
                latest[record.incident_id] = record
        if not latest:
            return 0, len(records)
        try:
            table = self._table()
            # 1. (id, lastUpdate) already stored? One key-only range query over the page's time span.
            low = min(r.last_update for r in latest.values())
            high = max(r.last_update for r in latest.values())
            present = {
                str(e["RowKey"])
                for e in table.query_entities(
                    "PartitionKey eq @pk and RowKey ge @lo and RowKey le @hi",
                    parameters={"pk": tenant_id, "lo": f"t_{low:019d}", "hi": f"t_{high:019d}_~"},
                    select=["RowKey"],
                )
            }
            fresh = [r for r in latest.values() if r.time_key not in present]
            # 2. For the rest, the version stored before (if any), whose time row must go.
            stored = self.stored_versions(tenant_id, [r.incident_id for r in fresh]) if maybe_stored else {}
            changed = [r for r in fresh if r.last_update > stored.get(r.incident_id, -1)]
            big = [r for r in changed if len(r.packed) > MAX_INLINE_BYTES]
            if big:
                container = self._blobs()
                settings = ContentSettings(content_type="application/json")

                def upload(record: IncidentRecord) -> None:
                    container.upload_blob(
                        self.blob_name(tenant_id, record), record.body, overwrite=True, content_settings=settings
                    )

                list(self._pool.map(upload, big))
            self._index(table, tenant_id, api, changed, stored)
        except AzureError as exc:
            raise UpstreamUnavailable("incident storage failed", diagnostic=repr(exc), retry_after=10) from exc
        return len(changed), len(records) - len(changed)

    def _index(
        self,
        table: TableClient,
        tenant_id: str,
        api: str,
        records: Sequence[IncidentRecord],
        stored: dict[str, int],
    ) -> None:
        """Per incident, in one transaction: the new time row (with the body), the id row, the old time row
        deleted. Transactions hold at most 100 operations and 4 MB."""
        batch: list[tuple[str, dict[str, Any]]] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if not batch:
                return
            try:
                for attempt in range(TRANSACTION_ATTEMPTS):
                    try:
                        table.submit_transaction(batch)
                        break
                    except (ServiceRequestError, ServiceResponseError):
                        # The connection dropped: the batch is idempotent (upserts; a replayed delete of
                        # a row already gone fails the batch and lands in the per-row path below).
                        if attempt + 1 == TRANSACTION_ATTEMPTS:
                            raise
                        time.sleep(0.2 * 2**attempt)
            except TableTransactionError:
                for kind, entity in batch:  # one at a time; a missing old row is not an error
                    if kind == "delete":
                        with contextlib.suppress(ResourceNotFoundError):
                            table.delete_entity(entity["PartitionKey"], entity["RowKey"])
                    else:
                        table.upsert_entity(entity, mode=UpdateMode.REPLACE)
            batch.clear()
            size = 0

        for record in records:
            row: dict[str, Any] = {
                "PartitionKey": tenant_id,
                "RowKey": record.time_key,
                "IncidentId": record.incident_id,
                "LastUpdate": format_ticks(record.last_update),
                "Status": record.status,
                "Severity": record.severity,
                "MergedInto": record.merged_into or "",
                "Api": api,
            }
            if len(record.packed) > MAX_INLINE_BYTES:
                row["BlobName"] = self.blob_name(tenant_id, record)
            else:
                row["Encoding"] = "zlib"
                for n, start in enumerate(range(0, len(record.packed), CHUNK_BYTES)):
                    row[f"Body{n}"] = record.packed[start : start + CHUNK_BYTES]
            ops = [
                ("upsert", row),
                (
                    "upsert",
                    {
                        "PartitionKey": tenant_id,
                        "RowKey": f"i_{record.incident_id}",
                        "LastUpdate": f"{record.last_update:019d}",
                    },
                ),
            ]
            old = stored.get(record.incident_id)
            if old is not None and old != record.last_update:
                ops.append(("delete", {"PartitionKey": tenant_id, "RowKey": time_key(old, record.incident_id)}))
            weight = min(len(record.packed), MAX_INLINE_BYTES) * 4 // 3 + 2048
            if len(batch) + len(ops) > OPS_PER_TRANSACTION or size + weight > MAX_TRANSACTION_BYTES:
                flush()
            batch.extend(ops)
            size += weight
        flush()

    # -- reads -----------------------------------------------------------------------------------------

    def page(
        self,
        tenant_id: str,
        *,
        since: int | None = None,
        after: str | None = None,
        status: str | None = None,
        severity: str | None = None,
        limit: int = 50,
    ) -> tuple[list[StoredIncident], str | None]:
        """Up to ``limit`` incidents updated at or after ``since``, oldest update first, after the row key
        ``after`` (a previous page's cursor); returns them and the next cursor (None at the end)."""
        clauses = ["PartitionKey eq @pk", "RowKey lt @end"]
        params: dict[str, Any] = {"pk": tenant_id, "end": "t_~"}
        if after is not None:
            clauses.append("RowKey gt @after")
            params["after"] = after
        else:
            clauses.append("RowKey ge @start")
            params["start"] = f"t_{max(0, since or 0):019d}"
        if status:
            clauses.append("Status eq @status")
            params["status"] = status
        if severity:
            clauses.append("Severity eq @severity")
            params["severity"] = severity
        rows: list[dict[str, Any]] = []
        more = False
        try:
            query = self._table().query_entities(
                " and ".join(clauses), parameters=params, results_per_page=min(1000, limit + 1)
            )
            for entity in query:
                if len(rows) == limit:
                    more = True
                    break
                rows.append(dict(entity))
            bodies = list(self._pool.map(self._body, rows))
        except AzureError as exc:
            raise UpstreamUnavailable("incident storage cannot be read", diagnostic=repr(exc), retry_after=5) from exc
        items = [
            StoredIncident(
                incident_id=str(row["IncidentId"]),
                last_update=str(row["LastUpdate"]),
                status=str(row.get("Status") or ""),
                severity=str(row.get("Severity") or ""),
                merged_into=str(row.get("MergedInto") or "") or None,
                api=str(row.get("Api") or ""),
                key=str(row["RowKey"]),
                document=json.loads(body),
            )
            for row, body in zip(rows, bodies, strict=True)
        ]
        return items, (items[-1].key if more and items else None)

    def _body(self, row: dict[str, Any]) -> bytes:
        name = row.get("BlobName")
        if name:
            return bytes(self._blobs().download_blob(str(name)).readall())
        parts = []
        n = 0
        while f"Body{n}" in row:
            parts.append(bytes(row[f"Body{n}"]))
            n += 1
        joined = b"".join(parts)
        return zlib.decompress(joined) if row.get("Encoding") == "zlib" else joined

    def documents(self, tenant_id: str) -> Iterator[Any]:
        """Every stored incident of a tenant, oldest update first (tests, export)."""
        items, after = self.page(tenant_id, limit=500)
        while True:
            for item in items:
                yield item.document
            if after is None:
                return
            items, after = self.page(tenant_id, after=after, limit=500)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint and status


@dataclass
class SyncState:
    """The state entity of one tenant: checkpoint, pending window and status counters."""

    tenant_id: str
    data: dict[str, Any]
    etag: str | None

    def get_int(self, name: str) -> int | None:
        raw = self.data.get(name)
        return None if raw in (None, "") else int(str(raw))

    @property
    def watermark(self) -> int | None:
        return self.get_int("Watermark")

    @property
    def pending(self) -> tuple[int, int | None, int | None, int] | None:
        low = self.get_int("PendingLow")
        if low is None:
            return None
        return low, self.get_int("PendingCursor"), self.get_int("PendingHigh"), self.get_int("PendingSkip") or 0


class SyncStateTable:
    """State entities (``PartitionKey "sync"``, ``RowKey`` tenant GUID); checkpoint writes are ETag-guarded."""

    def __init__(self, table: Callable[[], TableClient]) -> None:
        self._table = table

    def load(self, tenant_id: str) -> SyncState:
        try:
            entity = self._table().get_entity(STATE_PARTITION, tenant_id)
        except ResourceNotFoundError:
            return SyncState(tenant_id, {}, None)
        data = {k: v for k, v in entity.items() if k not in ("PartitionKey", "RowKey")}
        return SyncState(tenant_id, data, entity.metadata.get("etag"))

    def save(self, state: SyncState) -> None:
        """Write the whole entity if nobody else wrote it since we read it (``SyncInProgress`` otherwise)."""
        entity = {"PartitionKey": STATE_PARTITION, "RowKey": state.tenant_id, **_typed(state.data)}
        table = self._table()
        try:
            if state.etag is None:
                result = table.create_entity(entity)
            else:
                result = table.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=state.etag, match_condition=MatchConditions.IfNotModified
                )
        except (ResourceExistsError, ResourceModifiedError) as exc:
            raise SyncInProgress("another run changed this tenant's sync state", diagnostic=repr(exc)) from exc
        except HttpResponseError as exc:
            if exc.status_code in (409, 412):
                raise SyncInProgress("another run changed this tenant's sync state", diagnostic=repr(exc)) from exc
            raise
        state.etag = result.get("etag")

    def merge(self, tenant_id: str, fields: dict[str, Any]) -> None:
        """Set status fields without touching the checkpoint (used to record failures)."""
        entity = {"PartitionKey": STATE_PARTITION, "RowKey": tenant_id, **_typed(fields)}
        self._table().upsert_entity(entity, mode=UpdateMode.MERGE)

    def all(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for entity in self._table().query_entities("PartitionKey eq @pk", parameters={"pk": STATE_PARTITION}):
            found[str(entity["RowKey"])] = dict(entity)
        return found


def _typed(fields: dict[str, Any]) -> dict[str, Any]:
    """Table-safe values: big integers travel as strings (Edm.Int32 would overflow)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, bool) or value is None or isinstance(value, float | str):
            out[key] = "" if value is None else value
        elif isinstance(value, int):
            out[key] = str(value)
        else:
            out[key] = str(value)
    return out


class TenantLease:
    """A 60-second blob lease per tenant: one sync run per tenant at a time, across instances."""

    def __init__(self, container: Callable[[], ContainerClient]) -> None:
        self._container = container

    def acquire(self, tenant_id: str) -> BlobLeaseClient:
        blob = self._container().get_blob_client(f"leases/{tenant_id}")
        for _ in range(2):
            try:
                return blob.acquire_lease(lease_duration=LEASE_SECONDS)
            except ResourceNotFoundError:
                with contextlib.suppress(ResourceExistsError):
                    blob.upload_blob(b"", overwrite=False)
            except HttpResponseError as exc:
                if exc.status_code == 409:
                    raise SyncInProgress(f"a sync run for tenant {tenant_id} is in progress") from exc
                raise
        raise SyncInProgress(f"the sync lease of tenant {tenant_id} cannot be taken")


# ---------------------------------------------------------------------------------------------------------
# The sync


@dataclass
class RunReport:
    """What one run did; ``summary()`` is its log line."""

    tenant: str
    tenant_id: str
    api: str
    outcome: str = "complete"
    calls: int = 0
    throttled: int = 0
    pages: int = 0
    stored: int = 0
    unchanged: int = 0
    refused: int = 0
    malformed: int = 0
    merged: int = 0
    targets_fetched: int = 0
    resumed: bool = False
    watermark: int | None = None
    retry_after: int | None = None
    error: str = ""
    duration_s: float = 0.0

    def summary(self) -> str:
        fields = {
            "tenant": self.tenant_id,
            "name": self.tenant,
            "api": self.api,
            "outcome": self.outcome,
            "calls": self.calls,
            "throttled": self.throttled,
            "pages": self.pages,
            "stored": self.stored,
            "unchanged": self.unchanged,
            "refused": self.refused,
            "malformed": self.malformed,
            "merged": self.merged,
            "targets": self.targets_fetched,
            "resumed": str(self.resumed).lower(),
            "watermark": format_ticks(self.watermark) if self.watermark is not None else "-",
            "retry_after": self.retry_after if self.retry_after is not None else "-",
            "error": self.error or "-",
            "duration_s": f"{self.duration_s:.2f}",
        }
        return " ".join(f"{k}={v}" for k, v in fields.items())


class _Run:
    """The mutable context of one run."""

    def __init__(self, tenant: Tenant, state: SyncState, lease: BlobLeaseClient, report: RunReport) -> None:
        self.tenant = tenant
        self.state = state
        self.lease = lease
        self.report = report
        self.counter = CallCounter()
        self.targets: dict[str, int] = {}
        # Nothing stored yet for this tenant: a backfill need not look for older versions.
        self.empty = state.watermark is None and state.pending is None
        self.base = {k: _int(state.data.get(k)) for k in ("ApiCalls", "Stored", "Refused", "Merged")}


class IncidentSync:
    """Runs the per-tenant sync, fans runs out through the queue, and answers status."""

    def __init__(
        self,
        *,
        tenants: TenantRegistry,
        api: IncidentApiClient,
        store: IncidentStore,
        state: SyncStateTable,
        leases: TenantLease,
        queue: Callable[[], QueueClient],
        overlap_seconds: int,
        lookback_days: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tenants = tenants
        self.api = api
        self.store = store
        self.state = state
        self._leases = leases
        self._queue = queue
        self.overlap = overlap_seconds * TICKS_PER_SECOND
        self.lookback = lookback_days * 86_400 * TICKS_PER_SECOND
        self._clock = clock

    def close(self) -> None:
        self.api.close()
        self.store.close()

    # -- triggers ------------------------------------------------------------------------------------

    def fan_out(self) -> int:
        """The timer: one queue message per enabled tenant."""
        started = time.perf_counter()
        queue = self._queue()
        sent = 0
        for tenant in self.tenants.all():
            if tenant.enabled:
                queue.send_message(json.dumps({"tenant": tenant.tenant_id}))
                sent += 1
        log.info("sync.fan_out tenants=%d duration_ms=%.1f", sent, (time.perf_counter() - started) * 1000)
        return sent

    def handle_message(self, body: bytes | str, dequeue_count: int | None) -> RunReport | None:
        """The queue trigger: sync the tenant a message names. Raises on failure so the host retries it
        (and, at ``maxDequeueCount``, moves it to the poison queue, which the status then shows)."""
        try:
            text = body.decode() if isinstance(body, bytes) else body
            message = json.loads(text)
            tenant = self.tenants.resolve(message["tenant"])
        except (ValueError, KeyError, TypeError, BrokerError) as exc:
            # A message naming no registered tenant can never succeed: drop it, loudly.
            log.error("sync.message outcome=dropped reason=%s", exc.__class__.__name__)
            return None
        if not tenant.enabled:
            log.info("sync.message tenant=%s outcome=skipped reason=disabled", tenant.tenant_id)
            return None
        report = self.run(tenant, max_wait=self.api.retry.max_wait, dequeue_count=dequeue_count or 1)
        if report.outcome == "deferred" and report.retry_after is not None:
            delay = min(MAX_QUEUE_DELAY, max(1, report.retry_after))
            self._queue().send_message(json.dumps({"tenant": tenant.tenant_id}), visibility_timeout=delay)
        return report

    # -- one run -------------------------------------------------------------------------------------

    def run(self, tenant: Tenant, *, max_wait: float | None = None, dequeue_count: int | None = None) -> RunReport:
        """Sync one tenant until its window is done (or the budget defers it). Never raises for a busy
        tenant (outcome ``busy``) or a spent budget (``deferred``); raises other failures after recording
        them in the status."""
        started = time.perf_counter()
        report = RunReport(tenant.name, tenant.tenant_id, tenant.api)
        try:
            lease = self._leases.acquire(tenant.tenant_id)
        except SyncInProgress:
            report.outcome = "busy"
            report.duration_s = time.perf_counter() - started
            log.info("sync.run %s", report.summary())
            return report
        run = _Run(tenant, self.state.load(tenant.tenant_id), lease, report)
        try:
            self._run(run, max_wait)
        except (SyncBudgetExhausted, UpstreamThrottled) as exc:
            report.outcome = "deferred"
            report.retry_after = exc.retry_after
            self._finish(run, started, error=None)
        except SyncInProgress as exc:
            report.outcome = "busy"
            report.error = exc.code
            self._finish(run, started, error=None, save=False)
        except Exception as exc:
            report.outcome = "failed"
            code = exc.code if isinstance(exc, BrokerError) else exc.__class__.__name__
            report.error = code
            detail = exc.detail if isinstance(exc, BrokerError) else "unexpected error"
            diagnostic = exc.diagnostic if isinstance(exc, BrokerError) else repr(exc)
            self._finish(run, started, error=(code, detail, diagnostic, dequeue_count))
            raise
        else:
            self._finish(run, started, error=None)
        finally:
            try:
                lease.release()
            except AzureError:
                log.warning("sync.lease tenant=%s outcome=release_failed", tenant.tenant_id)
        return report

    def _run(self, run: _Run, max_wait: float | None) -> None:
        while True:
            pending = run.state.pending
            if pending is not None:
                run.report.resumed = True
                low, cursor, high, skip = pending
            else:
                watermark = run.state.watermark
                low = (
                    max(0, watermark - self.overlap)
                    if watermark is not None
                    else now_ticks(self._clock) - self.lookback
                )
                cursor, high, skip = None, None, 0
            self._window(run, low, cursor, high, skip, max_wait)
            if pending is None:
                break
        run.empty = False  # from here on, a fetched merge target may replace a version stored this run
        self._fetch_targets(run, max_wait)

    def _window(
        self, run: _Run, low: int, cursor: int | None, high: int | None, skip: int, max_wait: float | None
    ) -> None:
        tenant, report = run.tenant, run.report
        dialect = self.api.dialect(tenant)
        link: str | None = None
        links_seen = False
        if cursor is None and skip == 0:
            # Claim the window before the first page is stored, so a run killed before its first
            # checkpoint still resumes as "something may be stored" (and de-duplicates against it).
            run.state.data.update(PendingLow=low, PendingCursor=None, PendingHigh=None, PendingSkip=0)
            self._checkpoint(run)
        while True:
            run.lease.renew()
            page = self.api.list_page(
                tenant, run.counter, low=low, high=cursor, skip=skip, next_link=link, max_wait=max_wait
            )
            report.pages += 1
            links_seen = links_seen or page.next_link is not None
            times = self._store_page(run, dialect, page.incidents)
            if high is None and times:
                high = max(times)
            done = not page.incidents or len(page.incidents) < dialect.top or (links_seen and page.next_link is None)
            if done:
                break
            if not times or (cursor is not None and min(times) >= cursor):
                # A whole page inside one timestamp: step through that timestamp by position.
                link = page.next_link
                skip = 0 if link else skip + len(page.incidents)
            else:
                cursor, skip, link = min(times), 0, None
            run.state.data.update(
                PendingLow=low, PendingCursor=cursor, PendingHigh=high, PendingSkip=skip if link is None else 0
            )
            self._checkpoint(run)
        if high is not None:
            run.state.data["Watermark"] = max(high, run.state.watermark or 0)
        run.state.data.update(PendingLow=None, PendingCursor=None, PendingHigh=None, PendingSkip=None)
        self._checkpoint(run)

    def _store_page(self, run: _Run, dialect: Dialect, docs: list[dict[str, Any]]) -> list[int]:
        tenant, report = run.tenant, run.report
        records: list[IncidentRecord] = []
        times: list[int] = []
        refused: list[str] = []
        for doc in docs:
            try:
                record = IncidentRecord.from_api(doc, dialect)
            except ValueError as exc:
                report.malformed += 1
                log.error("sync.incident tenant=%s outcome=malformed reason=%s", tenant.tenant_id, exc)
                continue
            times.append(record.last_update)
            if dialect.name == "graph" and str(doc.get("tenantId", "")).lower() != tenant.tenant_id:
                refused.append(record.incident_id)
                continue
            records.append(record)
            if record.merged_into is not None:
                report.merged += 1
                run.targets[record.merged_into] = max(run.targets.get(record.merged_into, 0), record.last_update)
        if refused:
            report.refused += len(refused)
            log.warning(
                "sync.incident tenant=%s outcome=refused reason=tenant_mismatch count=%d ids=%s",
                tenant.tenant_id,
                len(refused),
                ",".join(refused[:10]),
            )
        stored, unchanged = self.store.save(tenant.tenant_id, tenant.api, records, maybe_stored=not run.empty)
        report.stored += stored
        report.unchanged += unchanged
        return times

    def _fetch_targets(self, run: _Run, max_wait: float | None) -> None:
        """Merge targets not stored at least as new as the merge: fetch them by id."""
        tenant = run.tenant
        dialect = self.api.dialect(tenant)
        todo = dict(run.targets)
        for _ in range(MAX_TARGET_HOPS):
            if not todo:
                return
            stored = self.store.stored_versions(tenant.tenant_id, list(todo))
            missing = [i for i, at in todo.items() if stored.get(i, -1) < at]
            todo = {}
            for incident_id in missing:
                run.lease.renew()
                doc = self.api.get_incident(tenant, incident_id, run.counter, max_wait=max_wait)
                if doc is None:
                    log.warning("sync.target tenant=%s id=%s outcome=not_found", tenant.tenant_id, incident_id)
                    continue
                before = run.report.merged
                self._store_page(run, dialect, [doc])
                run.report.targets_fetched += 1
                if run.report.merged > before:
                    todo.update({k: v for k, v in run.targets.items() if k not in stored and k != incident_id})

    def _checkpoint(self, run: _Run) -> None:
        self._counters(run)
        self.state.save(run.state)

    def _counters(self, run: _Run) -> None:
        """Fold the run's counts so far into the state (idempotent within a run: it stores run totals)."""
        data, report = run.state.data, run.report
        report.calls = run.counter.calls
        report.throttled = run.counter.throttled
        b = run.base
        data["ApiCalls"] = b["ApiCalls"] + report.calls
        data["Stored"] = b["Stored"] + report.stored
        data["Refused"] = b["Refused"] + report.refused
        data["Merged"] = b["Merged"] + report.merged
        data["LastRunCalls"] = report.calls
        data["LastRunAt"] = _iso(self._clock())

    def _finish(
        self,
        run: _Run,
        started: float,
        *,
        error: tuple[str, str, str, int | None] | None,
        save: bool = True,
    ) -> None:
        report = run.report
        report.duration_s = time.perf_counter() - started
        report.calls = run.counter.calls
        report.throttled = run.counter.throttled
        report.watermark = run.state.watermark
        data = run.state.data
        if save:
            self._counters(run)
            data["LastOutcome"] = report.outcome
            if error is None:
                if report.outcome == "complete":
                    data.update(LastSuccessAt=_iso(self._clock()), Failures=0, Poisoned=False)
                data["RetryAfter"] = report.retry_after or ""
            else:
                code, detail, diagnostic, dequeue_count = error
                data.update(
                    LastError=f"{code}: {detail}"[:500],
                    LastErrorAt=_iso(self._clock()),
                    Failures=int(str(data.get("Failures") or 0)) + 1,
                    Poisoned=dequeue_count is not None and dequeue_count >= MAX_DEQUEUE_COUNT,
                    DequeueCount=dequeue_count or "",
                )
                log.error("sync.run tenant=%s outcome=failed diagnostic=%s", run.tenant.tenant_id, diagnostic[:500])
            try:
                if error is None:
                    self.state.save(run.state)
                else:  # the checkpoint stays as the last page left it; only the status fields change
                    self.state.merge(run.tenant.tenant_id, {k: data[k] for k in _STATUS_FIELDS if k in data})
            except (AzureError, BrokerError) as exc:
                log.error("sync.state tenant=%s outcome=write_failed error=%s", run.tenant.tenant_id, exc)
        report.watermark = run.state.watermark
        log.info("sync.run %s", report.summary())

    # -- status --------------------------------------------------------------------------------------

    def status(self, tenants: Sequence[Tenant]) -> list[dict[str, Any]]:
        states = self.state.all()
        out = []
        for tenant in tenants:
            s = states.get(tenant.tenant_id, {})
            watermark = s.get("Watermark")
            pending = s.get("PendingLow")
            out.append(
                {
                    "tenant": tenant.name,
                    "tenant_id": tenant.tenant_id,
                    "api": tenant.api,
                    "enabled": tenant.enabled,
                    "last_success": s.get("LastSuccessAt") or None,
                    "last_outcome": s.get("LastOutcome") or None,
                    "watermark": format_ticks(int(watermark)) if watermark not in (None, "") else None,
                    "in_progress_window": pending not in (None, ""),
                    "counts": {
                        "stored": _int(s.get("Stored")),
                        "refused": _int(s.get("Refused")),
                        "merged": _int(s.get("Merged")),
                    },
                    "api_calls": {"total": _int(s.get("ApiCalls")), "last_run": _int(s.get("LastRunCalls"))},
                    "last_error": s.get("LastError") or None,
                    "last_error_at": s.get("LastErrorAt") or None,
                    "consecutive_failures": _int(s.get("Failures")),
                    "poisoned": bool(s.get("Poisoned", False)),
                }
            )
        return out


def _int(value: Any) -> int:
    try:
        return int(str(value or 0))
    except ValueError:
        return 0


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def base64_queue(storage: StorageAccount, name: str) -> QueueClient:
    """The sync queue, base64-encoded as the Functions queue trigger expects (its default encoding)."""
    storage.queue(name)  # created on first use
    return storage.queues.get_queue_client(
        name, message_encode_policy=TextBase64EncodePolicy(), message_decode_policy=TextBase64DecodePolicy()
    )


# ---------------------------------------------------------------------------------------------------------
# Cursors for the HTTP API


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
    if not _KEY.fullmatch(key):
        raise ValueError("malformed cursor")
    return key
