"""The storage account the Functions host already needs: tables, queues and blobs, through the Azure SDKs.

A connection string (Azurite locally) or an identity-based account (the service URIs
``AzureWebJobsStorage__blobServiceUri`` and its queue and table twins, or in the public cloud just
``AzureWebJobsStorage__accountName``, with the managed identity) — the forms the Functions host itself accepts. Names carry the
``STORAGE_PREFIX`` so several brokers (or test runs) can share an account.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar, cast

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, ResourceExistsError
from azure.core.pipeline.transport import HttpRequest, HttpResponse, HttpTransport, RequestsTransport
from azure.data.tables import TableClient, TableServiceClient
from azure.storage.blob import BlobServiceClient, ContainerClient
from azure.storage.queue import QueueClient, QueueServiceClient

from broker.errors import KillSwitchesStale, UpstreamUnavailable
from broker.settings import StorageSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_FAILED_RELOAD_SECONDS = 5.0
# How long kill switches (the tenant registry, the caller switches) may be served from memory while
# storage cannot be read: six refresh periods. Past it every request is refused (503 kill_switches_stale).
MAX_STALE_SECONDS = 60.0


class CountingTransport(HttpTransport[HttpRequest, HttpResponse]):
    """The SDKs' own HTTP transport, counting every request it sends (retries included) by kind:
    ``"{service} $batch"`` for an entity-group transaction, else ``"{service} {METHOD}"``. The count is
    what the incident benchmark reports as storage requests per page."""

    def __init__(self, service: str, counts: dict[str, int], lock: threading.Lock, **kwargs: Any) -> None:
        self._inner = RequestsTransport(**kwargs)
        self._service = service
        self._counts = counts
        self._count_lock = lock

    def send(self, request: HttpRequest, **kwargs: Any) -> HttpResponse:
        kind = "$batch" if request.url.split("?")[0].endswith("$batch") else request.method
        key = f"{self._service} {kind}"
        with self._count_lock:
            self._counts[key] = self._counts.get(key, 0) + 1
        response: HttpResponse = self._inner.send(request, **kwargs)
        return response

    def open(self) -> None:
        self._inner.open()

    def close(self) -> None:
        self._inner.close()

    def __exit__(self, *args: object) -> None:
        self._inner.__exit__(*args)

    def sleep(self, duration: float) -> None:
        self._inner.sleep(duration)


class StorageAccount:
    """Builds table, queue and blob clients once, and creates what they point at on first use.

    ``requests`` counts the HTTP requests sent to each service (see :class:`CountingTransport`)."""

    def __init__(self, settings: StorageSettings, credential: TokenCredential | None = None) -> None:
        self.prefix = settings.prefix
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], Any] = {}
        self.requests: dict[str, int] = {}
        timeouts: dict[str, Any] = {"connection_timeout": 5, "read_timeout": 20}
        count_lock = threading.Lock()

        def kwargs_for(service: str) -> dict[str, Any]:
            return {**timeouts, "transport": CountingTransport(service, self.requests, count_lock, **timeouts)}

        if settings.connection_string:
            conn = settings.connection_string.reveal()
            self.tables = TableServiceClient.from_connection_string(conn, **kwargs_for("table"))
            self.queues = QueueServiceClient.from_connection_string(conn, **kwargs_for("queue"))
            self.blobs = BlobServiceClient.from_connection_string(conn, **kwargs_for("blob"))
        else:
            if credential is None:
                raise ValueError("identity-based storage needs a credential")
            uris = settings.service_uris
            self.tables = TableServiceClient(uris["table"], credential=credential, **kwargs_for("table"))
            self.queues = QueueServiceClient(uris["queue"], credential, **kwargs_for("queue"))
            self.blobs = BlobServiceClient(uris["blob"], credential, **kwargs_for("blob"))

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


class PartitionSnapshot(Generic[T]):
    """One table partition held in memory as a value built from its entities, re-read every
    ``refresh_seconds`` — the bound within which a change made elsewhere (another instance, the CLI)
    is seen, e.g. a kill switch.

    However many threads find it stale, one reads the table and the rest use what it read. When the
    table cannot be read, the last good value keeps serving and storage is tried again every few seconds,
    not on every request — but only for ``max_stale_seconds`` after the last good read. Past that the
    snapshot fails closed: ``KillSwitchesStale`` (503, logged), because a kill switch nobody can see being
    thrown is no switch. With no value yet, the caller gets ``UpstreamUnavailable``.
    """

    def __init__(
        self,
        table: Callable[[], TableClient],
        partition: str,
        build: Callable[[Sequence[Mapping[str, Any]]], T],
        *,
        what: str,
        refresh_seconds: float = 10.0,
        max_stale_seconds: float = MAX_STALE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.refresh_seconds = refresh_seconds
        self.max_stale_seconds = max_stale_seconds
        self._table = table
        self._partition = partition
        self._build = build
        self._what = what
        self._clock = clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._loaded_at = float("-inf")  # the last good read
        self._retry_at = float("-inf")  # after a failed read, the next read waits until then
        self._invalidated = False

    @property
    def value(self) -> T | None:
        """The last value read, however old (no I/O)."""
        return self._value

    def fresh(self) -> bool:
        return not self._invalidated and self._clock() - self._loaded_at < self.refresh_seconds

    def current(self) -> T | None:
        """The value if it may be used without I/O — fresh, or storage is failing and the next try is not
        due yet while the value is within its staleness bound — else None (call ``get``)."""
        if self._value is None:
            return None
        now = self._clock()
        age = now - self._loaded_at
        if not self._invalidated and age < self.refresh_seconds:
            return self._value
        if now < self._retry_at and age <= self.max_stale_seconds:
            return self._value
        return None

    def get(self, max_age: float | None = None) -> T:
        """The value, re-read first if it is older than ``max_age`` (default: ``refresh_seconds``)."""
        limit = self.refresh_seconds if max_age is None else max_age
        with self._lock:
            now = self._clock()
            if self._value is not None and not self._invalidated and now - self._loaded_at < limit:
                return self._value
            if self._value is not None and now < self._retry_at:
                return self._within_staleness(now)
            try:
                # One quick retry, not the SDK's default of three with growing back-off (~5 s): a request
                # is waiting, and a failed read is tried again RETRY_FAILED_RELOAD_SECONDS later anyway.
                entities = list(
                    self._table().query_entities(
                        "PartitionKey eq @pk",
                        parameters={"pk": self._partition},
                        retry_total=1,
                        retry_backoff_factor=0.2,
                    )
                )
            except AzureError as exc:
                now = self._clock()
                self._retry_at = now + RETRY_FAILED_RELOAD_SECONDS
                if self._value is None:
                    raise UpstreamUnavailable(
                        f"the {self._what} cannot be read", diagnostic=repr(exc), retry_after=5
                    ) from exc
                log.warning(
                    "%s.reload outcome=stale age_s=%.1f error=%s",
                    self._what.replace(" ", "_"),
                    now - self._loaded_at,
                    exc.__class__.__name__,
                )
                return self._within_staleness(now)
            self._value = self._build(entities)
            self._loaded_at = self._clock()
            self._retry_at = float("-inf")
            self._invalidated = False
            return self._value

    def _within_staleness(self, now: float) -> T:
        assert self._value is not None
        age = now - self._loaded_at
        if age > self.max_stale_seconds:
            log.error(
                "%s.reload outcome=stale_refused age_s=%.1f max_stale_s=%.0f",
                self._what.replace(" ", "_"),
                age,
                self.max_stale_seconds,
            )
            raise KillSwitchesStale(
                f"the {self._what} could not be read for {age:.0f} s; refusing until storage answers",
                diagnostic=f"{self._what} last read {age:.1f} s ago, limit {self.max_stale_seconds:.0f} s",
                retry_after=int(RETRY_FAILED_RELOAD_SECONDS),
            )
        return self._value

    def invalidate(self) -> None:
        """Make the next read go to the table (after this instance changed it)."""
        with self._lock:
            self._invalidated = True
            self._retry_at = float("-inf")


class SnapshotBacked:
    """A store served from a ``PartitionSnapshot`` (``self._snapshot``): its bounds, tunable at run time."""

    _snapshot: PartitionSnapshot[Any]

    @property
    def refresh_seconds(self) -> float:
        """The bound within which a change made on any instance (or the CLI) reaches this one."""
        return self._snapshot.refresh_seconds

    @refresh_seconds.setter
    def refresh_seconds(self, seconds: float) -> None:
        self._snapshot.refresh_seconds = seconds

    @property
    def max_stale_seconds(self) -> float:
        """How long the last snapshot serves while storage cannot be read, before requests are refused."""
        return self._snapshot.max_stale_seconds

    @max_stale_seconds.setter
    def max_stale_seconds(self, seconds: float) -> None:
        self._snapshot.max_stale_seconds = seconds
