"""The incident sync: copy each tenant's incidents from Defender XDR or Graph into the store, exactly,
one queue-triggered run per tenant.

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

Checkpoint: after every second stored page (``CHECKPOINT_PAGES``), and whenever a run ends (deferred,
stopped, done), the state entity records the window still owed (``PendingLow``, ``PendingCursor``,
``PendingHigh``, ``PendingSkip``) as of the last stored page. The checkpoint therefore never claims more
than is stored: a run killed after page k resumes at the cursor of page k or k - 1 (a page re-read is
de-duplicated), finishes that window,
then runs a fresh window from HIGH - overlap in the same run (so changes made meanwhile come too). A run
with nothing new costs one call per tenant: the overlap window, which fits on one page.

A run holds the tenant's lease and writes its checkpoint under an ETag (:mod:`broker.incidents.checkpoint`),
so two runs never interleave their progress. The lease is renewed once a third of it has passed, not on
every page, and the state records until when it holds (``LeaseUntil``), which a run finding the tenant
busy reports. ``stopping`` (set on SIGTERM) ends every run at the checkpoint it has just written, with
outcome ``stopped``, and releases its lease, so the next run starts at once.

Storage per page of a backfill (a tenant with nothing stored yet): two entity-group transactions of 50
incidents and half a checkpoint write. The budget is reserved several calls at a time (see
:class:`~broker.incidents.upstream.CallCounter`), and no range query looks for copies already stored:
the rows a page re-reads at its cursor are left out from memory of the page before.

Merged incidents (``redirectIncidentId``) are stored with ``MergedInto``; a target not stored at least as
new as its merge is fetched by id at the end of the run. A Graph incident whose ``tenantId`` is not the
tenant being synced is refused: never stored, logged, counted in the status (``Refused``).

Merge targets are fetched only when they pass the one incident-id rule
(:func:`~broker.incidents.records.parse_incident_id`); a target the API refuses (Defender answers 400 to an
id that is not a number) or does not know is logged and skipped, never a failed run.

Budget: every call takes a slot from the tenant's persisted :class:`~broker.incidents.budget.CallBudget`.
When the budget (or a 429) needs a longer wait than the caller allows, the run stops at its last
checkpoint with outcome ``deferred``; the queue handler re-enqueues the tenant with that delay.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import AzureError
from azure.storage.blob import BlobLeaseClient
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

from broker.errors import BrokerError, IncidentApiError, SyncBudgetExhausted, SyncInProgress, UpstreamThrottled
from broker.incidents.checkpoint import SyncState, SyncStateTable, TenantLease
from broker.incidents.dialects import Dialect
from broker.incidents.records import IncidentRecord, parse_incident_id
from broker.incidents.store import IncidentStore
from broker.incidents.ticks import TICKS_PER_SECOND, format_ticks, now_ticks
from broker.incidents.upstream import CallCounter, IncidentApiClient
from broker.storage import StorageAccount
from broker.tenants import Tenant, TenantRegistry
from broker.tokens import AcquisitionObserver

log = logging.getLogger(__name__)

MAX_DEQUEUE_COUNT = 5  # host.json extensions.queues.maxDequeueCount (a test keeps them equal)
MAX_QUEUE_DELAY = 7 * 86_400
MAX_TARGET_HOPS = 3
CHECKPOINT_PAGES = 2  # the checkpoint is written after every second page (and whenever a run ends)
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
    busy_until: str | None = None
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
            "busy_until": self.busy_until or "-",
            "error": self.error or "-",
            "duration_s": f"{self.duration_s:.2f}",
        }
        return " ".join(f"{k}={v}" for k, v in fields.items())


class _Run:
    """The mutable context of one run."""

    def __init__(
        self, tenant: Tenant, state: SyncState, lease: BlobLeaseClient, report: RunReport, lease_seconds: int
    ) -> None:
        self.tenant = tenant
        self.lease_seconds = lease_seconds
        self.state = state
        self.lease = lease
        self.report = report
        self.counter = CallCounter()
        self.targets: dict[str, int] = {}
        # Nothing stored yet for this tenant: a backfill need not look for older versions.
        self.empty = state.watermark is None and state.pending is None
        self.base = {k: _int(state.data.get(k)) for k in ("ApiCalls", "Stored", "Refused", "Merged")}
        # In that backfill, the rows stored at the oldest update so far: the next page, which asks for
        # ``le CURSOR``, reads them again, and they are left out instead of looked up in storage.
        self.tied: set[str] = set()
        self.tied_at: int | None = None
        self.renewed_at = time.monotonic()
        self.unsaved = 0  # pages stored since the last checkpoint write

    def renew(self) -> None:
        """Renew the lease once a third of it has passed since it was last taken or renewed, not on
        every page: a run that then stalls past the lease fails at its next (ETag-guarded) checkpoint."""
        if time.monotonic() - self.renewed_at >= self.lease_seconds / 3:
            self.lease.renew()
            self.renewed_at = time.monotonic()
            self.state.data["LeaseUntil"] = _iso(time.time() + self.lease_seconds)

    def left_out(self, records: list[IncidentRecord]) -> list[IncidentRecord]:
        """In a backfill: the records not already stored by this run (see ``tied``)."""
        if not self.empty or not self.tied:
            return records
        return [r for r in records if r.time_key not in self.tied]

    def stored_page(self, records: list[IncidentRecord]) -> None:
        if not self.empty or not records:
            return
        oldest = min(r.last_update for r in records)
        if self.tied_at is None or oldest < self.tied_at:
            self.tied, self.tied_at = set(), oldest
        if oldest == self.tied_at:
            self.tied.update(r.time_key for r in records if r.last_update == oldest)


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
        observer: AcquisitionObserver | None = None,
    ) -> None:
        self.tenants = tenants
        self._observer = observer
        self.api = api
        self.store = store
        self.state = state
        self._leases = leases
        self._queue = queue
        self.overlap = overlap_seconds * TICKS_PER_SECOND
        self.lookback = lookback_days * 86_400 * TICKS_PER_SECOND
        self._clock = clock
        # Set (by SIGTERM) to stop every run at its next checkpoint: outcome "stopped", lease released.
        self.stopping = threading.Event()

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
            report.busy_until = self.busy_until(tenant.tenant_id)
            report.duration_s = time.perf_counter() - started
            log.info("sync.run %s", report.summary())
            return report
        run = _Run(tenant, self.state.load(tenant.tenant_id), lease, report, self._leases.seconds)
        run.state.data["LeaseUntil"] = _iso(time.time() + self._leases.seconds)
        try:
            self._run(run, max_wait)
        except _Stopped:
            report.outcome = "stopped"
            self._finish(run, started, error=None)
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
            if self._observer is not None:
                self._observer.failure(tenant.tenant_id, code, "sync")
            raise
        else:
            self._finish(run, started, error=None)
            if self._observer is not None:
                self._observer.success(tenant.tenant_id, "sync")
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
            run.renew()
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
            run.unsaved += 1
            if run.unsaved >= CHECKPOINT_PAGES or self.stopping.is_set():
                self._checkpoint(run)
                run.unsaved = 0
            if self.stopping.is_set():
                raise _Stopped()
        if high is not None:
            run.state.data["Watermark"] = max(high, run.state.watermark or 0)
        # Not written here: the next window's claim or the run's final save writes it (a run failing in
        # between resumes this window from its last cursor, which is never ahead of what is stored).
        run.state.data.update(PendingLow=None, PendingCursor=None, PendingHigh=None, PendingSkip=None)

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
                if parse_incident_id(record.merged_into) is None:
                    # Stored as sent, but never put into a request path.
                    log.warning(
                        "sync.target tenant=%s merged=%s outcome=unusable_id", tenant.tenant_id, record.incident_id
                    )
                else:
                    run.targets[record.merged_into] = max(run.targets.get(record.merged_into, 0), record.last_update)
        if refused:
            report.refused += len(refused)
            log.warning(
                "sync.incident tenant=%s outcome=refused reason=tenant_mismatch count=%d ids=%s",
                tenant.tenant_id,
                len(refused),
                ",".join(refused[:10]),
            )
        fresh = run.left_out(records)
        stored, unchanged = self.store.save(tenant.tenant_id, tenant.api, fresh, maybe_stored=not run.empty)
        run.stored_page(fresh)
        report.stored += stored
        report.unchanged += unchanged + len(records) - len(fresh)
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
                run.renew()
                try:
                    doc = self.api.get_incident(tenant, incident_id, run.counter, max_wait=max_wait)
                except IncidentApiError as exc:
                    # The API refused this one id (e.g. Defender's 400 for an id that is not a number): the
                    # merged incident is stored; one target it will not serve must not fail the whole run.
                    log.warning(
                        "sync.target tenant=%s id=%s outcome=refused code=%s", tenant.tenant_id, incident_id, exc.code
                    )
                    continue
                if doc is None:
                    log.warning("sync.target tenant=%s id=%s outcome=not_found", tenant.tenant_id, incident_id)
                    continue
                before = run.report.merged
                self._store_page(run, dialect, [doc])
                run.report.targets_fetched += 1
                if run.report.merged > before:
                    todo.update({k: v for k, v in run.targets.items() if k not in stored and k != incident_id})

    def busy_until(self, tenant_id: str) -> str | None:
        """When the lease of the run holding this tenant lapses unless that run renews it (as its last
        checkpoint recorded it), or None if unknown."""
        try:
            until = self.state.load(tenant_id).data.get("LeaseUntil")
        except AzureError:
            return None
        return str(until) if until else None

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
            data["LeaseUntil"] = ""  # released right after this write
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


class _Stopped(Exception):
    """The process is stopping (SIGTERM): the run ends at the checkpoint it just wrote."""


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
