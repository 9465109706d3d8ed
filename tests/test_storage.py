"""Storage clients: one per table, queue and container, built once even when many threads ask at once."""

from __future__ import annotations

import concurrent.futures

from broker.settings import Secret, StorageSettings
from broker.storage import StorageAccount


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
