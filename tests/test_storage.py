"""Storage clients: one per table, queue and container, built once even when many threads ask at once."""

from __future__ import annotations

import concurrent.futures

import pytest
from azure.core.exceptions import ServiceRequestError

from broker.errors import KillSwitchesStale, UpstreamUnavailable
from broker.settings import Secret, StorageSettings
from broker.storage import RETRY_FAILED_RELOAD_SECONDS, PartitionSnapshot, StorageAccount


def test_each_client_is_built_and_created_once_under_concurrency(azurite: str) -> None:
    """32 threads asking for the same table get one client; each can write through it."""
    account = StorageAccount(StorageSettings(Secret(azurite), None, "tstore"))

    def use(i: int) -> int:
        table = account.table("things")
        table.upsert_entity({"PartitionKey": "p", "RowKey": str(i)})
        account.queue("tstore-q").send_message(str(i))
        account.container("blobs").upload_blob(f"b{i}", b"x", overwrite=True)
        return id(table)

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        ids = set(pool.map(use, range(64)))
    assert len(ids) == 1
    assert len(list(account.table("things").list_entities())) == 64
    assert account.queue("tstore-q").get_queue_properties().approximate_message_count == 64
    assert len(list(account.container("blobs").list_blobs())) == 64


def test_names_carry_the_prefix(azurite: str) -> None:
    account = StorageAccount(StorageSettings(Secret(azurite), None, "tpre"))
    assert account.table("tenants").table_name == "tpretenants"
    assert account.container("incidents").container_name == "tpre-incidents"


class _FlakyTable:
    def __init__(self) -> None:
        self.rows = [{"RowKey": "a"}]
        self.fail = False
        self.reads = 0

    def query_entities(self, *_: object, **__: object) -> list[dict[str, object]]:
        self.reads += 1
        if self.fail:
            raise ServiceRequestError("storage is unreachable")
        return list(self.rows)


def _row_keys(table: _FlakyTable, now: list[float]) -> PartitionSnapshot[list[object]]:
    """A snapshot of ``table``'s row keys: refreshed every 10 s, trusted for 60 s while storage is down."""
    return PartitionSnapshot(
        lambda: table,  # type: ignore[arg-type,return-value]
        "p",
        lambda rows: [r["RowKey"] for r in rows],
        what="things",
        refresh_seconds=10,
        max_stale_seconds=60,
        clock=lambda: now[0],
    )


def test_a_snapshot_keeps_serving_through_a_storage_outage_and_backs_off() -> None:
    """The last good value serves; storage is tried again after the back-off, not on every read."""
    now = [0.0]
    table = _FlakyTable()
    snapshot = _row_keys(table, now)
    assert snapshot.get() == ["a"]
    table.fail = True
    now[0] = 11.0
    for _ in range(5):
        assert snapshot.get() == ["a"]
    assert table.reads == 2
    now[0] = 11.0 + RETRY_FAILED_RELOAD_SECONDS + 0.1
    table.fail = False
    table.rows = [{"RowKey": "b"}]
    assert snapshot.get() == ["b"]
    assert table.reads == 3


def test_a_snapshot_with_nothing_read_yet_reports_the_outage() -> None:
    table = _FlakyTable()
    table.fail = True
    snapshot = PartitionSnapshot(lambda: table, "p", list, what="things")  # type: ignore[arg-type,return-value]
    with pytest.raises(UpstreamUnavailable, match="things"):
        snapshot.get()


def test_a_snapshot_fails_closed_past_its_staleness_bound() -> None:
    """While storage is down the last value serves up to ``max_stale_seconds`` after the last good read;
    then every read is refused, and the first good read restores service."""
    now = [0.0]
    table = _FlakyTable()
    snapshot = _row_keys(table, now)
    assert snapshot.get() == ["a"]
    table.fail = True
    now[0] = 59.0
    assert snapshot.get() == ["a"]
    assert snapshot.current() == ["a"]  # backing off: no I/O, still within the bound
    now[0] = 61.0
    assert snapshot.current() is None
    with pytest.raises(KillSwitchesStale):
        snapshot.get()
    table.fail = False
    now[0] = 61.0 + RETRY_FAILED_RELOAD_SECONDS
    assert snapshot.get() == ["a"]


def test_invalidating_does_not_count_against_staleness() -> None:
    """After this instance writes, the next read goes to storage; if that read fails the value still serves."""
    now = [0.0]
    table = _FlakyTable()
    snapshot = PartitionSnapshot(lambda: table, "p", list, what="things", clock=lambda: now[0])  # type: ignore[arg-type,return-value]
    first = snapshot.get()
    snapshot.invalidate()
    assert snapshot.current() is None
    table.fail = True
    assert snapshot.get() == first
