"""The audit log: every decision (issued, denied, failed, allowed) in Azure Storage, hash-chained per day.

Table ``{prefix}audit``, one partition per UTC day (``PartitionKey`` = ``YYYYMMDD``), so a time-range
query reads only the days it spans. Every record has its own ``seq`` (1, 2, 3 … per day), ``prev`` (the
previous record's ``hash``, a per-day genesis value for ``seq`` 1) and ``hash`` (SHA-256 of its canonical
JSON including ``prev``). Records are stored in blocks::

    chain row   RowKey  c<inv first seq>            the records first..last, as JSON (the source of truth)
    index rows  RowKey  t|<tenant>|<inv first seq>  copies of that block's records for one tenant
                        k|<caller>|<inv first seq>  … and for one caller

``inv`` inverts the sequence number so the newest block sorts first (the head is the first ``c`` row);
a row's ``First``/``Seq``/``Hash`` name its first and last record and the last hash, ``MinTime``/``MaxTime``
bound its records' times so a time-range query filters rows on the server.

Writing is two steps, both on background threads (one of each per process):

1. the chain writer takes every pending record of a day (up to ``MAX_RECORDS_PER_BLOCK``), chains them
   and inserts them as **one** chain row: group commit, one round trip however many requests wait. The
   insert is insert-if-absent on ``c<inv first seq>``, so two instances that pick the same next ``seq``
   cannot both succeed; the loser gets a conflict, re-reads the head (recognising its own records if an
   earlier attempt did land), re-chains and retries — the chain never forks silently. Once the row is
   in, the records are durable and chained and their waiters are released (strict mode: the token
   leaves now, not before).
2. the index writer then upserts the block's index rows (derived data, idempotent), off the request
   path, taking every block that waited meanwhile into one transaction (or one or two single writes,
   which on Azurite cost less than a transaction). A crash between the steps loses nothing: ``verify``
   reports index rows that are missing or differ from the chain, and ``python -m broker audit verify
   --repair`` rewrites them from the chain.

Why a block row and not a transaction of one row per record: on Azurite one entity-group transaction
costs ~12 ms plus ~1.5 ms per entity, one insert ~5 ms, and one insert holding 32 records ~7 ms
(``bench/auth.py`` prints the insert floor of each run). ``verify`` recomputes every hash and link and
reports gaps (deleted records) and mismatches (edited records or index rows). Deleting a day's newest
records leaves no gap; the per-request log line carries ``audit=<day>/<seq>`` as an outside anchor.
Records never hold a token: only its fingerprint (a SHA-256 prefix).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from azure.core.exceptions import AzureError, HttpResponseError
from azure.data.tables import TableClient, UpdateMode

from broker.errors import AuditUnavailable, BadRequest

log = logging.getLogger(__name__)

AuditMode = Literal["strict", "best_effort"]
MAX_RECORDS_PER_BLOCK = 100
MAX_BLOCK_CHARS = 300_000  # JSON per row; stored as UTF-16, well under the 1 MiB entity limit
MAX_PENDING = 10_000
MAX_INDEX_BACKLOG = 10_000  # blocks awaiting index rows; beyond it they are dropped (verify --repair)
MAX_CONFLICT_RETRIES = 50
INDEX_LINGER_SECONDS = 0.0  # > 0: the index writer gathers blocks this long (fewer, larger requests)
INDEX_EAGER_ROWS = 50  # … unless this many blocks wait already
WRITE_TIMEOUT_SECONDS = 5.0
_CHUNK = 30_000  # characters per string property (the service allows 64 KiB, i.e. 32 Ki UTF-16 units)
_OPS_PER_TRANSACTION = 100
_SINGLE_WRITES_UP_TO = 2
_SEQ_SPACE = 10**12
_FIELDS = (
    "id",
    "time",
    "action",
    "outcome",
    "code",
    "reason",
    "caller",
    "caller_app",
    "tenant",
    "tenant_name",
    "scope",
    "request_id",
    "expires_on",
    "fingerprint",
)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AuditRecord:
    """One decision. ``fingerprint`` names an issued token without revealing it."""

    action: str
    outcome: str  # issued | denied | failed | allowed
    code: str  # the problem code the caller saw ("ok" when allowed)
    reason: str = "-"  # why, as a stable reason code (e.g. token_expired, tenant_not_granted)
    caller: str = "-"
    caller_app: str = "-"
    tenant: str = "-"
    tenant_name: str = "-"
    scope: str = "-"
    request_id: str = "-"
    expires_on: int = 0
    fingerprint: str = "-"
    time: str = field(default_factory=_now_iso)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def day(self) -> str:
        return self.time[:10].replace("-", "")


@dataclass(frozen=True)
class Written:
    day: str
    seq: int
    hash: str

    @property
    def ref(self) -> str:
        return f"{self.day}/{self.seq}"


def genesis(day: str) -> str:
    return hashlib.sha256(f"partner-token-broker audit genesis {day}".encode()).hexdigest()


def record_hash(record: dict[str, Any], day: str, seq: int, prev: str) -> str:
    canonical = {name: record[name] for name in _FIELDS} | {"day": day, "seq": seq, "prev": prev}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _inv(seq: int) -> str:
    return f"{_SEQ_SPACE - 1 - seq:012d}"


def _chain_key(first: int) -> str:
    return "c" + _inv(first)


def _safe_key(value: str) -> str:
    """A value usable inside a RowKey (no ``/ \\ # ?`` or control characters)."""
    return "".join(ch if ch.isprintable() and ch not in "/\\#?|" else "_" for ch in value)[:100]


def _index_prefix(kind: str, value: str) -> str:
    return f"{kind}|{_safe_key(value)}|"


def _chained(record: AuditRecord, day: str, seq: int, prev: str) -> dict[str, Any]:
    """The stored form of a record: its fields, ``seq``, ``prev`` and ``hash``."""
    row = asdict(record)
    row.update(seq=seq, prev=prev, hash=record_hash(row, day, seq, prev))
    return row


def _size(record: AuditRecord) -> int:
    """About the length of the record's JSON (fields plus seq, prev and hash)."""
    return sum(len(str(value)) + len(name) + 6 for name, value in asdict(record).items()) + 180


def _block_entity(day: str, row_key: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    payload = json.dumps(rows, separators=(",", ":"), sort_keys=True)
    chunks = [payload[i : i + _CHUNK] for i in range(0, len(payload), _CHUNK)]
    times = [str(row["time"]) for row in rows]
    entity: dict[str, Any] = {
        "PartitionKey": day,
        "RowKey": row_key,
        "First": rows[0]["seq"],
        "Seq": rows[-1]["seq"],
        "Hash": rows[-1]["hash"],
        "Count": len(rows),
        "MinTime": min(times),
        "MaxTime": max(times),
        "Chunks": len(chunks),
    }
    entity.update({f"R{i}": chunk for i, chunk in enumerate(chunks)})
    return entity


def _block_rows(entity: dict[str, Any]) -> list[dict[str, Any]]:
    """The records a chain or index row holds, oldest first; ``ValueError`` if it cannot be read."""
    try:
        payload = "".join(str(entity[f"R{i}"]) for i in range(int(entity["Chunks"])))
        rows = json.loads(payload)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"row {entity.get('RowKey')} cannot be read") from exc
    wanted = (*_FIELDS, "seq", "prev", "hash")
    if not (
        isinstance(rows, list)
        and rows
        and all(isinstance(r, dict) and all(k in r for k in wanted) and isinstance(r["seq"], int) for r in rows)
    ):
        raise ValueError(f"row {entity.get('RowKey')} does not hold records")
    return rows


def _index_entities(day: str, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The index rows for one chain block: one per tenant and one per caller it mentions."""
    first = _inv(rows[0]["seq"])
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        for kind, value in (("t", row["tenant"]), ("k", row["caller"])):
            if value not in ("", "-"):
                groups.setdefault(_index_prefix(kind, str(value)) + first, []).append(row)
    return {key: _block_entity(day, key, group) for key, group in groups.items()}


@dataclass
class _Pending:
    record: AuditRecord
    future: concurrent.futures.Future[Written]


class AuditLog:
    """Appends records through a group-committing background writer; queries and verifies the chain."""

    def __init__(
        self,
        table: Callable[[], TableClient],
        *,
        mode: AuditMode = "strict",
        write_timeout: float = WRITE_TIMEOUT_SECONDS,
    ) -> None:
        self._table_factory = table
        self._table: TableClient | None = None
        self._table_lock = threading.Lock()
        self.mode = mode
        self.write_timeout = write_timeout
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._heads: dict[str, tuple[int, str]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._in_flight = False
        self._index_cond = threading.Condition()
        self._index_queue: list[tuple[str, list[dict[str, Any]]]] = []
        self._index_thread: threading.Thread | None = None
        self._index_closed = False
        self._index_in_flight = False
        self._index_hurry = False
        self.dropped = 0
        self.batches = 0  # chain rows written (one round trip each)
        self.index_failures = 0

    # -- writing -------------------------------------------------------------------------------------

    async def record(self, record: AuditRecord, *, wait: bool) -> Written | None:
        """Queue ``record``; with ``wait`` return once it is chained and stored or raise ``AuditUnavailable``.

        Stored means its chain row is in; its index rows follow (see the module docstring).
        """
        future = self._submit(record, required=wait)
        if not wait or future is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.write_timeout)
        except TimeoutError as exc:
            raise AuditUnavailable(diagnostic="audit write timed out", retry_after=5) from exc

    def record_sync(self, record: AuditRecord) -> Written:
        """Write ``record`` and wait (CLI and other synchronous callers)."""
        future = self._submit(record, required=True)
        assert future is not None
        try:
            return future.result(self.write_timeout)
        except concurrent.futures.TimeoutError as exc:
            raise AuditUnavailable(diagnostic="audit write timed out", retry_after=5) from exc

    def _submit(self, record: AuditRecord, *, required: bool) -> concurrent.futures.Future[Written] | None:
        future: concurrent.futures.Future[Written] = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise AuditUnavailable(diagnostic="audit log closed")
            if len(self._pending) >= MAX_PENDING and not required:
                self.dropped += 1
                log.error("audit.drop outcome=%s code=%s dropped=%d", record.outcome, record.code, self.dropped)
                return None
            self._pending.append(_Pending(record, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is written (or failed), index rows included."""
        deadline = time.monotonic() + timeout
        with self._cond:
            futures = [p.future for p in self._pending]
        concurrent.futures.wait(futures, timeout)
        with self._cond:  # the batch in flight, if any
            while self._in_flight and time.monotonic() < deadline:
                self._cond.wait(0.01)
        with self._index_cond:
            self._index_hurry = True
            self._index_cond.notify_all()
            while (self._index_queue or self._index_in_flight) and time.monotonic() < deadline:
                self._index_cond.wait(0.01)
            self._index_hurry = False

    def close(self) -> None:
        """Stop the writers once they have written what is queued (index rows included)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.write_timeout + 1)
        with self._index_cond:
            self._index_closed = True
            self._index_cond.notify_all()
        if self._index_thread is not None:
            self._index_thread.join(timeout=self.write_timeout + 1)

    def _take(self) -> list[_Pending]:
        """The next block's worth of pending records (called with ``_cond`` held)."""
        count, chars = 0, 0
        for item in self._pending:
            chars += _size(item.record)
            if count and (count == MAX_RECORDS_PER_BLOCK or chars > MAX_BLOCK_CHARS):
                break
            count += 1
        batch = self._pending[:count]
        del self._pending[:count]
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = self._take()
                self._in_flight = True
            try:
                by_day: dict[str, list[_Pending]] = {}
                for item in batch:
                    by_day.setdefault(item.record.day, []).append(item)
                for day, items in by_day.items():
                    try:
                        self._commit(day, items)
                    except Exception as exc:  # every waiter must learn the outcome
                        log.error("audit.write outcome=failed records=%d error=%r", len(items), exc)
                        error = exc if isinstance(exc, AuditUnavailable) else AuditUnavailable(diagnostic=repr(exc))
                        for item in items:
                            if not item.future.done():
                                item.future.set_exception(error)
            finally:
                with self._cond:
                    self._in_flight = False
                    self._cond.notify_all()

    def _client(self) -> TableClient:
        with self._table_lock:
            if self._table is None:
                self._table = self._table_factory()
            return self._table

    def _commit(self, day: str, items: list[_Pending]) -> None:
        """Chain ``items`` onto the day's head and insert them as one chain row (retrying on conflict)."""
        table = self._client()
        head = self._heads.get(day) or self._read_head(table, day)
        for _ in range(MAX_CONFLICT_RETRIES):
            seq, prev = head
            rows: list[dict[str, Any]] = []
            for item in items:
                seq += 1
                rows.append(_chained(item.record, day, seq, prev))
                prev = rows[-1]["hash"]
            try:
                table.create_entity(_block_entity(day, _chain_key(rows[0]["seq"]), rows), retry_total=0)
            except HttpResponseError as exc:
                if exc.status_code != 409:
                    self._heads.pop(day, None)
                    raise
                head, landed = self._catch_up(table, day, head[0], {i.record.id for i in items})
                for block in landed:  # an earlier attempt did land (e.g. a lost reply)
                    ours = {row["id"]: row for row in block}
                    for item in items:
                        if item.record.id in ours:
                            row = ours[item.record.id]
                            item.future.set_result(Written(day, row["seq"], row["hash"]))
                    self._queue_index(day, block)
                items = [i for i in items if not i.future.done()]
                if not items:
                    self._heads[day] = head
                    return
                continue
            except AzureError:
                self._heads.pop(day, None)
                raise
            self.batches += 1
            self._heads[day] = (rows[-1]["seq"], rows[-1]["hash"])
            for item, row in zip(items, rows, strict=True):
                item.future.set_result(Written(day, row["seq"], row["hash"]))
            self._queue_index(day, rows)
            return
        raise AuditUnavailable(diagnostic=f"audit chain for {day}: too many concurrent writers")

    def _read_head(self, table: TableClient, day: str) -> tuple[int, str]:
        rows = table.query_entities(
            "PartitionKey eq @day and RowKey ge 'c' and RowKey lt 'd'",
            parameters={"day": day},
            select=["Seq", "Hash"],
            results_per_page=1,
            retry_total=0,
        )
        for entity in rows:
            return int(entity["Seq"]), str(entity["Hash"])
        return 0, genesis(day)

    def _catch_up(
        self, table: TableClient, day: str, known_seq: int, ids: set[str]
    ) -> tuple[tuple[int, str], list[list[dict[str, Any]]]]:
        """After a conflict: the new head, and the blocks after ``known_seq`` that hold any of ``ids``."""
        entities = table.query_entities(
            "PartitionKey eq @day and RowKey ge 'c' and RowKey lt @known",
            parameters={"day": day, "known": _chain_key(known_seq)},
            retry_total=0,
        )
        newest: tuple[int, str] | None = None
        landed: list[list[dict[str, Any]]] = []
        for entity in entities:
            seq, digest = int(entity["Seq"]), str(entity["Hash"])
            if newest is None or seq > newest[0]:
                newest = (seq, digest)
            try:
                rows = _block_rows(entity)
            except ValueError:
                continue  # not ours: ours are readable
            if any(row["id"] in ids for row in rows):
                landed.append(rows)
        head = newest if newest is not None else self._read_head(table, day)
        return head, landed

    # -- index rows ----------------------------------------------------------------------------------

    def _queue_index(self, day: str, rows: list[dict[str, Any]]) -> None:
        with self._index_cond:
            if len(self._index_queue) >= MAX_INDEX_BACKLOG:
                self.index_failures += 1
                log.error(
                    "audit.index outcome=dropped day=%s seq=%d..%d (audit verify --repair rewrites them)",
                    day,
                    rows[0]["seq"],
                    rows[-1]["seq"],
                )
                return
            self._index_queue.append((day, rows))
            if self._index_thread is None:
                self._index_thread = threading.Thread(target=self._run_index, name="audit-index", daemon=True)
                self._index_thread.start()
            self._index_cond.notify()

    def _run_index(self) -> None:
        while True:
            with self._index_cond:
                while not self._index_queue and not self._index_closed:
                    self._index_cond.wait()
                if not self._index_queue:
                    return
                until = time.monotonic() + INDEX_LINGER_SECONDS
                while (
                    len(self._index_queue) < INDEX_EAGER_ROWS
                    and not (self._index_closed or self._index_hurry)
                    and (left := until - time.monotonic()) > 0
                ):
                    self._index_cond.wait(left)
                jobs, self._index_queue = self._index_queue, []
                self._index_in_flight = True
            try:
                by_day: dict[str, list[dict[str, Any]]] = {}
                for day, rows in jobs:
                    by_day.setdefault(day, []).extend(_index_entities(day, rows).values())
                for day, entities in by_day.items():
                    try:
                        self._upsert(day, entities)
                    except Exception as exc:  # derived data: verify reports it, --repair rewrites it
                        self.index_failures += 1
                        log.error(
                            "audit.index outcome=failed day=%s rows=%d error=%r (audit verify --repair rewrites them)",
                            day,
                            len(entities),
                            exc,
                        )
            finally:
                with self._index_cond:
                    self._index_in_flight = False
                    self._index_cond.notify_all()

    def _upsert(self, day: str, entities: list[dict[str, Any]]) -> None:
        """Replace-or-insert index rows of one day: one request each when they are few (a transaction
        costs about as much as three single writes), else one transaction per 100 rows."""
        table = self._client()
        if len(entities) <= _SINGLE_WRITES_UP_TO:
            for entity in entities:
                table.upsert_entity(entity, mode=UpdateMode.REPLACE)
            return
        for i in range(0, len(entities), _OPS_PER_TRANSACTION):
            part = entities[i : i + _OPS_PER_TRANSACTION]
            table.submit_transaction([("upsert", e, {"mode": UpdateMode.REPLACE}) for e in part])

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
        """Records with ``start <= time <= end``, newest first; returns the page and the next cursor.

        Without ``tenant`` or ``caller`` this reads the chain rows themselves. With either it reads the
        index rows, which the index writer adds just after the chain row: a record whose index rows are
        not there yet (tens of milliseconds), or are missing because the process stopped between the two
        writes or the index write failed (logged as ``audit.index outcome=failed``), is not returned by
        such a query until ``python -m broker audit verify --repair`` rewrites them from the chain.
        """
        table = self._client()
        resume_day, resume_seq = _decode_cursor(cursor) if cursor else (None, None)
        if tenant:
            prefix = _index_prefix("t", tenant)
        elif caller:
            prefix = _index_prefix("k", caller)
        else:
            prefix = "c"
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        first, last = _iso(start), _iso(end)
        out: list[dict[str, Any]] = []
        for day in _days_desc(start.date(), end.date()):
            if resume_day is not None and day > resume_day:
                continue
            below = resume_seq if resume_day == day else None
            low, low_op = (prefix, "ge") if below is None else (prefix + _inv(below), "gt")
            entities = table.query_entities(
                f"PartitionKey eq @day and RowKey {low_op} @low and RowKey lt @high"
                " and MaxTime ge @from and MinTime le @to",
                parameters={"day": day, "low": low, "high": upper, "from": first, "to": last},
                results_per_page=min(limit, 1000),
            )
            for entity in entities:
                try:
                    rows = _block_rows(entity)
                except ValueError as exc:
                    log.error("audit.query day=%s error=%r (audit verify reports it)", day, exc)
                    continue
                for row in reversed(rows):
                    if below is not None and row["seq"] >= below:
                        continue
                    if not first <= row["time"] <= last:
                        continue
                    if (tenant and row["tenant"] != tenant) or (caller and row["caller"] != caller):
                        continue
                    out.append({**row, "day": day})
                    if len(out) == limit:
                        return out, _encode_cursor(day, int(row["seq"]))
        return out, None

    def verify(self, start: date, end: date, *, repair: bool = False) -> VerifyReport:
        """Check every chain row and index row of the days from ``start`` to ``end``.

        With ``repair``, index rows that are missing or differ from a chain block whose records all
        verify are rewritten from it (the chain is the source of truth). Nothing else is changed: an
        edited chain record keeps its index copies, which show what it said.
        """
        table = self._client()
        report = VerifyReport()
        for day in reversed(list(_days_desc(start, end))):
            entities = list(table.query_entities("PartitionKey eq @day", parameters={"day": day}))
            if not entities:
                continue
            report.days += 1
            chain: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
            index: dict[str, list[dict[str, Any]]] = {}
            for entity in entities:
                key = str(entity["RowKey"])
                try:
                    rows = _block_rows(entity)
                except ValueError:
                    report.problems.append(f"{day}: row {key} cannot be read (edited)")
                    continue
                if key.startswith("c"):
                    chain.append((entity, rows))
                else:
                    index[key] = rows
            chain.sort(key=lambda block: int(block[1][0]["seq"]))
            expected: dict[str, dict[str, Any]] = {}
            tainted: set[str] = set()
            next_seq, prev = 1, genesis(day)
            for block, rows in chain:
                key, intact = str(block["RowKey"]), True
                first, last = rows[0], rows[-1]
                if (key, block.get("First"), block.get("Seq"), block.get("Hash")) != (
                    _chain_key(first["seq"]),
                    first["seq"],
                    last["seq"],
                    last["hash"],
                ):
                    report.problems.append(f"{day}: row {key} does not match the records it holds (edited)")
                    intact = False
                for row in rows:
                    seq = row["seq"]
                    report.records += 1
                    if seq > next_seq:
                        missing = f"{next_seq}" if seq == next_seq + 1 else f"{next_seq}..{seq - 1}"
                        report.problems.append(f"{day}: record(s) seq {missing} missing (deleted)")
                    elif row["prev"] != prev:
                        report.problems.append(f"{day}: seq {seq} does not link to seq {seq - 1} (edited or replaced)")
                        intact = False
                    if record_hash(row, day, seq, row["prev"]) != row["hash"]:
                        report.problems.append(f"{day}: seq {seq} content does not match its hash (edited)")
                        intact = False
                    next_seq, prev = seq + 1, row["hash"]
                derived = _index_entities(day, rows)
                if intact:
                    expected.update(derived)
                else:
                    tainted.update(derived)
            report.heads[day] = (next_seq - 1, prev)
            rewrite: list[dict[str, Any]] = []
            for key, wanted in expected.items():
                found = index.pop(key, None)
                if found == _block_rows(wanted):
                    continue
                problem = f"{day}: index row {key} {'missing' if found is None else 'differs from the chain'}"
                if repair:
                    rewrite.append(wanted)
                    report.repaired.append(problem)
                else:
                    report.problems.append(problem)
            for key in index.keys() - tainted:
                report.problems.append(f"{day}: index row {key} points at no record")
            if rewrite:
                self._upsert(day, rewrite)
        return report


@dataclass
class VerifyReport:
    days: int = 0
    records: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _days_desc(start: date, end: date) -> Iterator[str]:
    day = end
    while day >= start:
        yield day.strftime("%Y%m%d")
        day -= timedelta(days=1)


def _encode_cursor(day: str, seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([day, seq]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, int]:
    try:
        day, seq = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not (isinstance(day, str) and day.isdigit() and len(day) == 8 and isinstance(seq, int) and seq > 0):
            raise ValueError("bad cursor")
    except (ValueError, TypeError) as exc:
        raise BadRequest("cursor is not one this API returned") from exc
    return day, seq


def parse_moment(value: str | None, *, default: datetime, end_of_day: bool = False) -> datetime:
    """A query bound: an ISO date (``2025-01-31``) or date-time (UTC when no offset is given)."""
    if not value:
        return default
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return moment + timedelta(days=1, microseconds=-1000) if end_of_day else moment
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequest(f"{value!r} is not an ISO date or date-time") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
