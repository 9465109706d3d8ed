"""Where a tenant's sync stands, and who may move it: the state entity and the per-tenant lease.

The state entity holds the checkpoint (the watermark and the window still owed, which
:mod:`broker.incidents.sync` writes after each stored page) and the status counters.

One run per tenant at a time: a run holds a 60-second blob lease on ``{tenant}`` (renewed every 20 s while it pages)
and writes the state entity only with ``If-Match`` on the ETag it read, so a second run is refused at the
lease, and a run that lost its lease (stalled past 60 s) fails at its next checkpoint instead of
overwriting newer progress.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, UpdateMode
from azure.storage.blob import BlobLeaseClient, ContainerClient

from broker.errors import SyncInProgress

LEASE_SECONDS = 60
STATE_PARTITION = "sync"


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
    """A blob lease per tenant (``SYNC_LEASE_SECONDS``, 60 by default): one sync run per tenant at a
    time, across instances."""

    def __init__(self, container: Callable[[], ContainerClient], seconds: int = LEASE_SECONDS) -> None:
        self._container = container
        self.seconds = seconds  # blob leases last 15 to 60 s

    def acquire(self, tenant_id: str) -> BlobLeaseClient:
        blob = self._container().get_blob_client(f"leases/{tenant_id}")
        for _ in range(2):
            try:
                return blob.acquire_lease(lease_duration=self.seconds)
            except ResourceNotFoundError:
                with contextlib.suppress(ResourceExistsError):
                    blob.upload_blob(b"", overwrite=False)
            except HttpResponseError as exc:
                if exc.status_code == 409:
                    raise SyncInProgress(f"a sync run for tenant {tenant_id} is in progress") from exc
                raise
        raise SyncInProgress(f"the sync lease of tenant {tenant_id} cannot be taken")
