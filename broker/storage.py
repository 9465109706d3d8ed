"""The storage account the Functions host already needs: tables, queues and blobs, through the Azure SDKs.

A connection string (Azurite locally) or an identity-based account (``AzureWebJobsStorage__accountName``
with the managed identity) — the same two forms the Functions host itself accepts. Names carry the
``STORAGE_PREFIX`` so several brokers (or test runs) can share an account.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from azure.core.credentials import TokenCredential
from azure.core.exceptions import ResourceExistsError
from azure.data.tables import TableClient, TableServiceClient
from azure.storage.blob import BlobServiceClient, ContainerClient
from azure.storage.queue import QueueClient, QueueServiceClient

from broker.settings import StorageSettings


class StorageAccount:
    """Builds table, queue and blob clients once, and creates what they point at on first use."""

    def __init__(self, settings: StorageSettings, credential: TokenCredential | None = None) -> None:
        self.prefix = settings.prefix
        self._lock = threading.Lock()
        self._created: set[str] = set()
        kwargs: dict[str, Any] = {"connection_timeout": 5, "read_timeout": 20}
        if settings.connection_string:
            conn = settings.connection_string.reveal()
            self.tables = TableServiceClient.from_connection_string(conn, **kwargs)
            self.queues = QueueServiceClient.from_connection_string(conn, **kwargs)
            self.blobs = BlobServiceClient.from_connection_string(conn, **kwargs)
        else:
            if credential is None:
                raise ValueError("identity-based storage needs a credential")
            account = settings.account_name
            self.tables = TableServiceClient(
                f"https://{account}.table.core.windows.net", credential=credential, **kwargs
            )
            self.queues = QueueServiceClient(f"https://{account}.queue.core.windows.net", credential, **kwargs)
            self.blobs = BlobServiceClient(f"https://{account}.blob.core.windows.net", credential, **kwargs)

    def name(self, suffix: str, *, sep: str = "") -> str:
        return f"{self.prefix}{sep}{suffix}"

    def table(self, suffix: str) -> TableClient:
        name = self.name(suffix)
        client = self.tables.get_table_client(name)
        self._ensure(("table", name), client.create_table)
        return client

    def queue(self, name: str) -> QueueClient:
        client = self.queues.get_queue_client(name)
        self._ensure(("queue", name), client.create_queue)
        return client

    def container(self, suffix: str) -> ContainerClient:
        name = self.name(suffix, sep="-")
        client = self.blobs.get_container_client(name)
        self._ensure(("container", name), client.create_container)
        return client

    def _ensure(self, key: tuple[str, str], create: Any) -> None:
        marker = ":".join(key)
        if marker in self._created:
            return
        with self._lock:
            if marker in self._created:
                return
            with contextlib.suppress(ResourceExistsError):
                create()
            self._created.add(marker)
