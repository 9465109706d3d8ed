"""The chain writer: appends blocks of keyed records to a day's chain, links days, anchors heads.

``ChainWriter.commit(day, records)`` writes one block (one insert) and returns where each record went.
It runs on one thread (the writer process's, or the broker's audit thread); index rows and anchors follow
on their own thread so they never hold up the next block.

- **Position and sequence.** A block's row key is its *position* in the day (``c<inverted pos>``), the
  next position after the head the writer knows; the insert is insert-if-absent, so two writers that
  raced for the same position cannot both land — the loser re-reads the head and tries again. Each
  record's ``seq`` is separate and never reused: a writer that starts on a day takes numbers from above
  every reservation in the day's anchor blob (and the table's head), and appends a new reservation before
  it uses a number beyond its own. Seq therefore has gaps after a restart; the MAC link, not seq, says
  that no record is missing.
- **Day links.** A day's first record carries ``link`` = ``<previous day>/<seq>`` and ``prev`` = that
  record's MAC: the newest record of the newest earlier day that has an anchor blob, however many empty
  days lie between. The very first record of a log has ``link`` "-" and ``prev`` all zeros.
- **Anchors.** At most every ``anchor_seconds`` (and when the writer stops) the head of each day written
  since the last anchor is appended to the day's anchor blob.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import AzureError, HttpResponseError
from azure.data.tables import TableClient, UpdateMode

from broker.audit.anchors import Anchors
from broker.audit.records import (
    ZERO_MAC,
    AuditRecord,
    KeySource,
    Written,
    block_entity,
    block_rows,
    chain,
    chain_key,
    index_entities,
)
from broker.errors import AuditUnavailable

log = logging.getLogger(__name__)

RESERVE = 10_000  # sequence numbers a reservation covers
ANCHOR_SECONDS = 10.0  # at most this long between a head moving and its anchor (bounds hidden truncation)
MAX_CONFLICT_RETRIES = 50
INDEX_LINGER_SECONDS = 0.0  # > 0: the index thread gathers blocks this long (fewer, larger index writes)
INDEX_EAGER_ROWS = 400  # … unless this many index rows wait already
MAX_INDEX_BACKLOG = 20_000  # blocks awaiting index rows; beyond it they are dropped (verify --repair)
_OPS_PER_TRANSACTION = 100
_SINGLE_WRITES_UP_TO = 2


@dataclass
class _Day:
    pos: int  # the next block's position
    seq: int  # the next record's sequence number
    prev: str  # the MAC the next record links to
    link: str  # "-" once the day has records; else what its first record links to
    reserved: int  # the highest seq this writer may use
    anchored: int  # the head seq last anchored by this writer
    head: int = 0  # the newest record's seq (0: the day has none yet)


@dataclass(frozen=True)
class Head:
    pos: int
    count: int
    seq: int
    mac: str


def read_head(table: TableClient, day: str) -> Head | None:
    """The newest chain block of ``day`` (by position), or None."""
    rows = table.query_entities(
        "PartitionKey eq @day and RowKey ge 'c' and RowKey lt 'd'",
        parameters={"day": day},
        select=["Pos", "Count", "Seq", "Mac"],
        results_per_page=1,
    )
    for entity in rows:
        return Head(int(entity["Pos"]), int(entity["Count"]), int(entity["Seq"]), str(entity["Mac"]))
    return None


class ChainWriter:
    def __init__(
        self,
        table: Callable[[], TableClient],
        anchors: Anchors,
        keys: KeySource,
        *,
        anchor_seconds: float = ANCHOR_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table = table
        self.anchors = anchors
        self.keys = keys
        self.anchor_seconds = anchor_seconds
        self._clock = clock
        self._days: dict[str, _Day] = {}
        self._last_anchor = clock()
        self.batches = 0
        self.index_failures = 0
        self._index_cond = threading.Condition()
        self._index_queue: list[tuple[str, int, list[dict[str, Any]]]] = []
        self._index_thread: threading.Thread | None = None
        self._index_closed = False
        self._index_in_flight = False
        self._index_hurry = False

    # -- the chain -----------------------------------------------------------------------------------

    def commit(self, day: str, records: list[AuditRecord]) -> list[Written]:
        """Chain ``records`` as one block of ``day`` and store it; one insert unless another writer raced."""
        table = self._table()
        key = self.keys.current()
        pending = list(records)
        written: dict[str, Written] = {}
        for _ in range(MAX_CONFLICT_RETRIES):
            state = self._days.get(day) or self._start_day(table, day)
            if state.seq + len(pending) - 1 > state.reserved:
                self._reserve(day, state, state.seq + len(pending) - 1)
            rows: list[dict[str, Any]] = []
            prev, link = state.prev, state.link
            for offset, record in enumerate(pending):
                row = chain(record, day, state.seq + offset, prev, link, key)
                rows.append(row)
                prev, link = row["mac"], "-"
            try:
                table.create_entity(block_entity(day, chain_key(state.pos), rows, state.pos))
            except HttpResponseError as exc:
                if exc.status_code != 409:
                    self._days.pop(day, None)
                    raise
                mine = {r.id for r in pending}
                for pos, block in self._catch_up(table, day, state, mine):
                    for row in block:  # an earlier attempt did land (e.g. a lost reply)
                        if row["id"] in mine:
                            written[row["id"]] = Written(day, row["seq"], row["mac"])
                    self._queue_index(day, pos, block)
                pending = [r for r in pending if r.id not in written]
                if not pending:
                    break
                continue
            except AzureError:
                self._days.pop(day, None)
                raise
            self.batches += 1
            self._queue_index(day, state.pos, rows)
            state.pos += 1
            state.seq += len(rows)
            state.prev, state.link, state.head = rows[-1]["mac"], "-", rows[-1]["seq"]
            written.update((row["id"], Written(day, row["seq"], row["mac"])) for row in rows)
            break
        else:
            raise AuditUnavailable(diagnostic=f"audit chain for {day}: too many concurrent writers")
        return [written[r.id] for r in records]

    def _start_day(self, table: TableClient, day: str) -> _Day:
        """What this writer needs to append to ``day``: the head, the link if the day is empty, and a
        reservation above every number used before (by anyone, before any restart)."""
        head = read_head(table, day)
        anchors, _ = self.anchors.read(day)
        floor = max([a.reserved for a in anchors] + [a.seq for a in anchors] + [head.seq if head else 0])
        if head is not None:
            state = _Day(head.pos + 1, floor + 1, head.mac, "-", 0, 0, head.seq)
        else:
            link, prev = self._link(table, day)
            state = _Day(1, floor + 1, prev, link, 0, 0)
        self._reserve(day, state, state.seq)
        self._days[day] = state
        return state

    def _link(self, table: TableClient, day: str) -> tuple[str, str]:
        """The ``link`` and ``prev`` of a day's first record: the newest earlier day's head."""
        for earlier in reversed([d for d in self.anchors.days() if d < day]):
            head = read_head(table, earlier)
            if head is not None:
                return f"{earlier}/{head.seq}", head.mac
            anchored = [a for a in self.anchors.read(earlier)[0] if a.seq > 0]
            if anchored:  # its records are gone from the table; link to what the anchor proves existed
                newest = max(anchored, key=lambda a: a.seq)
                log.error("audit.link day=%s links to %s/%d: that day's records are missing", day, earlier, newest.seq)
                return f"{earlier}/{newest.seq}", newest.head
        return "-", ZERO_MAC

    def _reserve(self, day: str, state: _Day, needed: int) -> None:
        reserved = max(needed, state.seq) + RESERVE - 1
        head = state.prev if state.head else ""
        self.anchors.append(self.keys.current(), day, state.head, head, reserved)
        state.reserved = reserved

    def _catch_up(
        self, table: TableClient, day: str, state: _Day, ids: set[str]
    ) -> list[tuple[int, list[dict[str, Any]]]]:
        """After a conflict: move ``state`` to the newest block; return the blocks since that hold ``ids``."""
        entities = table.query_entities(
            "PartitionKey eq @day and RowKey ge 'c' and RowKey le @known",
            parameters={"day": day, "known": chain_key(state.pos)},
        )
        newest: Head | None = None
        landed: list[tuple[int, list[dict[str, Any]]]] = []
        for entity in entities:
            head = Head(int(entity["Pos"]), int(entity["Count"]), int(entity["Seq"]), str(entity["Mac"]))
            if newest is None or head.pos > newest.pos:
                newest = head
            try:
                rows = block_rows(entity)
            except ValueError:
                continue  # not ours: ours are readable
            if any(row["id"] in ids for row in rows):
                landed.append((head.pos, rows))
        if newest is None:
            self._days.pop(day, None)
            return landed
        state.pos = newest.pos + 1
        state.seq = max(state.seq, newest.seq + 1)
        state.prev, state.link, state.head = newest.mac, "-", newest.seq
        return landed

    # -- anchors -------------------------------------------------------------------------------------

    def anchor_due(self) -> bool:
        return self._clock() - self._last_anchor >= self.anchor_seconds and any(
            s.head > s.anchored for s in self._days.values()
        )

    def anchor(self) -> None:
        """Append the head of every day this writer moved since its last anchor."""
        self._last_anchor = self._clock()
        for day, state in list(self._days.items()):
            if state.head > state.anchored:
                self.anchors.append(self.keys.current(), day, state.head, state.prev, state.reserved)
                state.anchored = state.head

    # -- index rows ----------------------------------------------------------------------------------

    def _queue_index(self, day: str, pos: int, rows: list[dict[str, Any]]) -> None:
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
            self._index_queue.append((day, pos, rows))
            if self._index_thread is None:
                self._index_thread = threading.Thread(target=self._run_index, name="audit-index", daemon=True)
                self._index_thread.start()
            self._index_cond.notify()

    def flush_index(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._index_cond:
            self._index_hurry = True
            self._index_cond.notify_all()
            while (self._index_queue or self._index_in_flight) and time.monotonic() < deadline:
                self._index_cond.wait(0.01)
            self._index_hurry = False

    def close(self, timeout: float) -> None:
        with self._index_cond:
            self._index_closed = True
            self._index_cond.notify_all()
        if self._index_thread is not None:
            self._index_thread.join(timeout)

    def _run_index(self) -> None:
        while True:
            with self._index_cond:
                while not self._index_queue and not self._index_closed:
                    self._index_cond.wait()
                if not self._index_queue:
                    return
                until = time.monotonic() + INDEX_LINGER_SECONDS
                while (
                    sum(len(rows) for _, _, rows in self._index_queue) < INDEX_EAGER_ROWS
                    and not (self._index_closed or self._index_hurry)
                    and (left := until - time.monotonic()) > 0
                ):
                    self._index_cond.wait(left)
                jobs, self._index_queue = self._index_queue, []
                self._index_in_flight = True
            try:
                by_day: dict[str, list[dict[str, Any]]] = {}
                for day, pos, rows in jobs:
                    by_day.setdefault(day, []).extend(index_entities(day, rows, pos).values())
                for day, entities in by_day.items():
                    try:
                        upsert(self._table(), entities)
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


def upsert(table: TableClient, entities: list[dict[str, Any]]) -> None:
    """Replace-or-insert rows of one day: one request each when they are few (a transaction costs about
    as much as three single writes), else one transaction per 100 rows."""
    if len(entities) <= _SINGLE_WRITES_UP_TO:
        for entity in entities:
            table.upsert_entity(entity, mode=UpdateMode.REPLACE)
        return
    for i in range(0, len(entities), _OPS_PER_TRANSACTION):
        part = entities[i : i + _OPS_PER_TRANSACTION]
        table.submit_transaction([("upsert", e, {"mode": UpdateMode.REPLACE}) for e in part])
