"""The incident store: what the sync copied, in one table partitioned by tenant.

One table, partitioned by tenant GUID, so no read ever scans another tenant:

- ``t_{lastUpdate ticks:019}_{id}``: the incident as of that update - its JSON exactly as the API sent it
  (parsed and re-serialised; ``json.loads`` of it equals the API's object), zlib-compressed (alerts with
  ~30 null entity fields each compress about 8x, which is most of a page's storage cost) in 60 KB binary
  chunks (``Body0`` ...), with status, severity and the merge target beside it for filtering. "Updated
  since" is a range scan over these keys, paginated. A body still above 900 KB compressed (an entity holds
  1 MB) goes, uncompressed, to a blob,
  ``{tenant}/{id}/{ticks}.json``, and the row names it (``BlobName``): a 2 MB, 500-alert incident
  round-trips byte for byte.
- ``i_{id}``: which version is stored (``LastUpdate``) and whether its body is a blob (``InBlob``), so an
  update can delete its old time row and its old blob.

A page's incidents are written in entity-group transactions (at most 100 operations or 4 MB each); each
incident's new time row, id row and old-row delete sit in the same transaction, so a reader never sees an
incident twice or not at all. Upsert is idempotent and de-duplicated by (incident id, last update): the
page's time span is checked with one key-only range query, and only incidents not already stored at that
version are written (a first backfill skips the range query and the id lookups: nothing can be stored
yet, and the sync leaves out the rows it re-reads at a page boundary). A 100-incident backfill page is two
transactions of 50 incidents.
"""

from __future__ import annotations

import contextlib
import json
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import AzureError, ResourceNotFoundError, ServiceRequestError, ServiceResponseError
from azure.data.tables import TableClient, TableTransactionError, UpdateMode
from azure.storage.blob import ContainerClient, ContentSettings

from broker.errors import UpstreamUnavailable
from broker.incidents.records import IncidentRecord, time_key
from broker.incidents.ticks import format_ticks

OPS_PER_TRANSACTION = 100  # an incident takes 2 or 3 and never straddles two transactions
POOL_WORKERS = 8  # the storage SDK's connection pool holds 10
CHUNK_BYTES = 60_000  # a binary property holds 64 KiB
MAX_INLINE_BYTES = 15 * CHUNK_BYTES  # an entity holds 1 MiB; bigger bodies go to a blob
MAX_TRANSACTION_BYTES = 3_500_000  # a transaction holds 4 MiB
TRANSACTION_ATTEMPTS = 3


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
        return {i: ticks for i, (ticks, _) in self._versions(tenant_id, ids).items()}

    def _versions(self, tenant_id: str, ids: Sequence[str]) -> dict[str, tuple[int, bool]]:
        """Per stored id: its ``lastUpdate`` ticks, and whether that version's body may be in a blob (id
        rows written before ``InBlob`` existed say nothing, so they count as maybe)."""
        table = self._table()

        def read(incident_id: str) -> tuple[str, tuple[int, bool] | None]:
            try:
                entity = table.get_entity(tenant_id, f"i_{incident_id}", select=["LastUpdate", "InBlob"])
            except ResourceNotFoundError:
                return incident_id, None
            return incident_id, (int(str(entity["LastUpdate"])), entity.get("InBlob") is not False)

        return {i: v for i, v in self._pool.map(read, ids) if v is not None}

    def save(
        self, tenant_id: str, api: str, records: Sequence[IncidentRecord], *, maybe_stored: bool = True
    ) -> tuple[int, int]:
        """Upsert ``records``; returns (written, unchanged). ``maybe_stored=False`` (a tenant's very first
        window) skips looking for stored copies and older versions, since there are none: the caller
        leaves out what it stored itself earlier in that window."""
        latest: dict[str, IncidentRecord] = {}
        for record in records:
            kept = latest.get(record.incident_id)
            if kept is None or record.last_update >= kept.last_update:
                latest[record.incident_id] = record
        if not latest:
            return 0, len(records)
        try:
            table = self._table()
            fresh = list(latest.values())
            if maybe_stored:
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
            versions = self._versions(tenant_id, [r.incident_id for r in fresh]) if maybe_stored else {}
            stored = {i: ticks for i, (ticks, _) in versions.items()}
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
            # 3. Old bodies in blobs: their rows are gone, so they go too (a crash just here leaves an
            # unreferenced blob, never a row without its body).
            old_blobs = [
                f"{tenant_id}/{r.incident_id}/{versions[r.incident_id][0]:019d}.json"
                for r in changed
                if r.incident_id in versions and versions[r.incident_id][1]
            ]
            if old_blobs:
                container = self._blobs()

                def remove(name: str) -> None:
                    with contextlib.suppress(ResourceNotFoundError):
                        container.delete_blob(name)

                list(self._pool.map(remove, old_blobs))
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
                        "InBlob": len(record.packed) > MAX_INLINE_BYTES,
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
