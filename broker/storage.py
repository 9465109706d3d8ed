"""The storage account the Functions host already needs: tables, queues and blobs, through the Azure SDKs.

A connection string (Azurite locally) or an identity-based account (``AzureWebJobsStorage__accountName``
with the managed identity) — the same two forms the Functions host itself accepts. Names carry the
``STORAGE_PREFIX`` so several brokers (or test runs) can share an account.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, cast

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
        self._clients: dict[tuple[str, str], Any] = {}
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
        return cast(TableClient, self._client(("table", self.name(suffix))))

    def queue(self, name: str) -> QueueClient:
        return cast(QueueClient, self._client(("queue", name)))

    def container(self, suffix: str) -> ContainerClient:
        return cast(ContainerClient, self._client(("container", self.name(suffix, sep="-"))))

    def _client(self, key: tuple[str, str]) -> Any:
        """One client per table, queue or container, built (and its resource created) once, under a lock.

        ``get_table_client`` and its kin build a pipeline over the service client's *shared* policy objects
        and re-link them as they go; two threads doing that at once leave a policy without its ``next``
        (seen under the incident sync's parallel tenants as an AttributeError inside azure-core).
        """
        client = self._clients.get(key)
        if client is not None:
            return client
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                kind, name = key
                create: Callable[[], object]
                if kind == "table":
                    client = self.tables.get_table_client(name)
                    create = client.create_table
                elif kind == "queue":
                    client = self.queues.get_queue_client(name)
                    create = client.create_queue
                else:
                    client = self.blobs.get_container_client(name)
                    create = client.create_container
                with contextlib.suppress(ResourceExistsError):
                    create()
                self._clients[key] = client
            return client
