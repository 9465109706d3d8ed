"""The audit log: every decision (issued, denied, failed, allowed) in Azure Storage, keyed, chained and anchored.

Public API (what routes, the CLI and other modules use)::

    log = AuditLog(store, mode="strict")             # store: AuditStore (table, anchor container, KeyRing)
    written = await log.record(AuditRecord(...), wait=True)   # strict: returns once stored, or raises
    await log.record(AuditRecord(...), wait=False)            # best effort: queued; a drop is counted
    log.record_sync(AuditRecord(...))                # the same, waiting, for synchronous callers
    log.refused_before_auth(client, action, code, reason)     # counted per address and interval
    log.query(start, end, tenant=..., caller=..., limit=..., cursor=...)
    log.verify(start, end, repair=False)             # what ``python -m broker audit verify`` runs
    log.flush(); log.close()

``Written.ref`` (``<day>/<seq>``) names a record; the request's log line carries it as ``audit=``.

**Model.** Table ``{prefix}audit``, one partition per UTC day. Records are stored in blocks, one row per
block (``c<inverted position>``), written by one insert however many requests wait (group commit), with
index rows per tenant and per caller following just after (``records``, ``chain``). Every record
carries a MAC (HMAC-SHA256) under a key the storage account does not hold — the Key Vault secret
``AUDIT_KEY_NAME``, read through the broker's Key Vault client, its version recorded in each record —
and the MAC of the record before it; a day's first record links to the previous day's head, however
many empty days lie between. Heads and sequence reservations are appended to a per-day append blob in
the container ``{prefix}-audit``, which the Bicep puts under a time-based immutability policy with
protected appends (``anchors``). Sequence numbers are never reused: a writer numbers from above every
reservation. ``verify`` (``verify``) reports, with the position: an edited record, a deleted record,
reordered records, the newest records truncated back to the last anchor, a deleted day, and a forward
re-hash made without the key. What it cannot see: records written after the last anchor (at most
``ANCHOR_SECONDS``) and then deleted before anyone anchors again — the per-request log line is the
outside witness for those; and anyone who holds the audit key (Key Vault) can forge records.

**Where the storage work runs.** By default (``AUDIT_WRITER=process``) in a writer process the broker
starts with the server and feeds over a pipe (``writer``): the request path serialises the record and
appends one line to a buffer; best-effort lines go out coalesced, one pipe write per 5 ms, records
somebody waits for at once, and strict waiters get an acknowledgement per block. The broker reads the
key from Key Vault and hands it (and each rotated version) to the child, which talks to storage only.
Alternatives measured on this 2-core machine (``bench/token.py``, interleaved rounds, see the README):
with the writer in a thread, the storage SDK's work (azure-core's pipeline; ``submit_transaction``'s
thread pool per call for index rows) took about a third of the process's GIL time and held best-effort
issuance at 21 % of the HTTP ceiling (issue 10); the same run that measured the writer process at 1,094
req/s measured the thread at 567 (2,359 vs 1,192 in a calmer run). A write to the pipe per record cost
the broker 6 ms under load (waking the child preempts it), hence the coalescing; fewer, cheaper SDK
calls in-process would still share the GIL. ``AUDIT_WRITER=thread`` keeps everything in the broker's
process (hosts that forbid child processes; one-shot CLI commands). The child lives exactly as long as
its pipe: when the broker closes it or dies, the child drains (at most ``AUDIT_DRAIN_SECONDS``) and
exits; SIGTERM starts the same drain.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from azure.data.tables import TableClient
from azure.storage.blob import ContainerClient

from broker.audit.anchors import Anchors
from broker.audit.chain import ChainWriter
from broker.audit.records import AuditRecord, KeyRing, Written
from broker.audit.refusals import RefusalTally
from broker.audit.verify import VerifyReport, parse_moment, query, verify
from broker.audit.writer import DRAIN_SECONDS, GroupCommit, ProcessTransport
from broker.errors import AuditUnavailable

__all__ = [
    "AuditLog",
    "AuditMode",
    "AuditRecord",
    "AuditStore",
    "KeyRing",
    "VerifyReport",
    "Written",
    "parse_moment",
]

AuditMode = Literal["strict", "best_effort"]
WriterKind = Literal["process", "thread"]
WRITE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class AuditStore:
    """Where the log lives: its table, its anchor container, and its MAC key."""

    table: Callable[[], TableClient]
    container: Callable[[], ContainerClient]
    keys: KeyRing

    @property
    def anchors(self) -> Anchors:
        return Anchors(self.container)


class AuditLog:
    """Appends records through a group-committing writer (a process or a thread); queries and verifies."""

    def __init__(
        self,
        store: AuditStore,
        *,
        mode: AuditMode = "strict",
        writer: WriterKind = "thread",
        writer_env: Mapping[str, str] | None = None,
        write_timeout: float = WRITE_TIMEOUT_SECONDS,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self.store = store
        self.mode = mode
        self.write_timeout = write_timeout
        self.writer_kind = writer
        self._group: GroupCommit | None = None
        self._process: ProcessTransport | None = None
        if writer == "process":
            env = {**os.environ, **(writer_env or {})}
            self._process = ProcessTransport(env, store.keys, drain_seconds=drain_seconds)
        else:
            chain = ChainWriter(store.table, store.anchors, store.keys)
            self._group = GroupCommit(chain, drain_seconds=drain_seconds)
        self.refusals = RefusalTally(self._emit_refusals)

    @property
    def dropped(self) -> int:
        """Best-effort records not kept, in this process."""
        return (self._group or self._process).drops.count  # type: ignore[union-attr]

    @property
    def batches(self) -> int:
        """Blocks this process wrote (thread writer only)."""
        return self._group.writer.batches if self._group else 0

    # -- writing -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer process now rather than on the first record (a server calls this at start, so
        the first requests do not wait for it to import and read its key)."""
        if self._process is not None:
            self._process.start()

    async def record(self, record: AuditRecord, *, wait: bool) -> Written | None:
        """Queue ``record``; with ``wait`` return once it is chained and stored or raise ``AuditUnavailable``."""
        if not wait:
            self._submit(record, None)
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Written] = loop.create_future()

        def done(where: Written | None, error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, where, error)

        self._submit(record, done)
        try:
            return await asyncio.wait_for(future, self.write_timeout)
        except TimeoutError as exc:
            raise AuditUnavailable(diagnostic="audit write timed out", retry_after=5) from exc

    def record_sync(self, record: AuditRecord) -> Written:
        """Write ``record`` and wait (CLI and other synchronous callers)."""
        future: concurrent.futures.Future[Written] = concurrent.futures.Future()

        def done(where: Written | None, error: BaseException | None) -> None:
            if error is not None:
                future.set_exception(error)
            else:
                assert where is not None
                future.set_result(where)

        self._submit(record, done)
        try:
            return future.result(self.write_timeout)
        except concurrent.futures.TimeoutError as exc:
            raise AuditUnavailable(diagnostic="audit write timed out", retry_after=5) from exc

    def refused_before_auth(self, client: str, action: str, code: str, reason: str) -> None:
        """Count a refusal of a request that named nobody (no or bad token); recorded per interval."""
        self.refusals.add(client, action, code, reason)

    def _emit_refusals(self, record: AuditRecord) -> None:
        self._submit(record, None)

    def _submit(self, record: AuditRecord, done: Callable[[Written | None, BaseException | None], None] | None) -> None:
        required = done is not None
        callback = done or _ignore
        if self._process is not None:
            self._process.submit(record, required=required, done=callback)
        else:
            assert self._group is not None
            self._group.submit(record, required=required, done=callback)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is written (or failed), index rows included."""
        self.refusals.flush()
        if self._process is not None:
            self._process.barrier(timeout)
            return
        assert self._group is not None
        event = concurrent.futures.Future[None]()
        self._group.barrier(lambda: event.set_result(None))
        concurrent.futures.wait([event], timeout)

    def close(self) -> None:
        """Stop the writer once it has written what is queued (within the drain window)."""
        self.refusals.flush()
        if self._process is not None:
            self._process.close()
        else:
            assert self._group is not None
            self._group.close()

    # -- reading -------------------------------------------------------------------------------------

    def query(
        self,
        start: datetime,
        end: datetime,
        *,
        tenant: str | None = None,
        caller: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        return query(self.store.table(), start, end, tenant=tenant, caller=caller, limit=limit, cursor=cursor)

    def verify(self, start: date, end: date, *, repair: bool = False) -> VerifyReport:
        return verify(self.store.table(), self.store.anchors, self.store.keys, start, end, repair=repair)


def _settle(future: asyncio.Future[Written], where: Written | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert where is not None
        future.set_result(where)


def _ignore(_where: Written | None, _error: BaseException | None) -> None:
    return None
