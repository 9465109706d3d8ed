"""Reading the audit log: ``verify`` (what ``python -m broker audit verify`` runs) and ``query``.

``verify`` walks each day's chain blocks in position order and checks, with the key versions the
records name: every MAC; every link (``prev`` = the previous record's MAC, sequence numbers rising); the
day's first record's link to the previous day's head; each anchor line's signature, and that the record
it anchored is still there with the same MAC. Problems are reported with their position (``day/seq``).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from azure.data.tables import TableClient

from broker.audit.anchors import Anchor, Anchors
from broker.audit.chain import upsert
from broker.audit.records import (
    ZERO_MAC,
    KeyRing,
    block_rows,
    canonical,
    chain_key,
    index_entities,
    index_prefix,
    inv,
)
from broker.errors import BadRequest

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    days: int = 0
    records: int = 0
    anchors: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Day:
    records: list[dict[str, Any]]  # in chain order
    blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]]
    index: dict[str, list[dict[str, Any]]]
    unreadable: list[str]


def _read_day(table: TableClient, day: str) -> _Day:
    blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    index: dict[str, list[dict[str, Any]]] = {}
    unreadable: list[str] = []
    for entity in table.query_entities("PartitionKey eq @day", parameters={"day": day}):
        key = str(entity["RowKey"])
        try:
            rows = block_rows(entity)
        except ValueError:
            unreadable.append(key)
            continue
        if key.startswith("c"):
            blocks.append((entity, rows))
        else:
            index[key] = rows
    blocks.sort(key=lambda block: str(block[0]["RowKey"]), reverse=True)  # oldest position first
    return _Day([r for _, rows in blocks for r in rows], blocks, index, unreadable)


def verify(
    table: TableClient, anchors: Anchors, keys: KeyRing, start: date, end: date, *, repair: bool = False
) -> VerifyReport:
    """Check every record, link, anchor and index row of the days from ``start`` to ``end``.

    With ``repair``, index rows that are missing or differ from a chain block whose records all verify
    are rewritten from it (the chain is the source of truth). Nothing else is changed.
    """
    report = VerifyReport()
    read: dict[str, _Day] = {}

    def day_records(day: str) -> _Day:
        if day not in read:
            read[day] = _read_day(table, day)
        return read[day]

    for day in reversed(list(_days_desc(start, end))):
        found = day_records(day)
        lines, bad_lines = anchors.read(day)
        if not found.blocks and not found.index and not found.unreadable and not lines:
            continue
        report.days += 1
        problems = report.problems
        for key in found.unreadable:
            problems.append(f"{day}: row {key} cannot be read (edited)")
        for unreadable in bad_lines:
            problems.append(f"{day}: anchor {unreadable} cannot be read (edited)")

        tainted: set[str] = set()
        bad_mac: list[int] = []
        by_mac = {r["mac"]: r for r in found.records}
        previous: dict[str, Any] | None = None
        for entity, rows in found.blocks:
            key, intact = str(entity["RowKey"]), True
            if (key, entity.get("First"), entity.get("Seq"), entity.get("Mac")) != (
                chain_key(int(entity.get("Pos", 0))),
                rows[0]["seq"],
                rows[-1]["seq"],
                rows[-1]["mac"],
            ):
                problems.append(f"{day}: row {key} does not match the records it holds (edited)")
                intact = False
            for row in rows:
                report.records += 1
                seq = row["seq"]
                mac_key = keys.version(str(row["key"]))
                if mac_key is None or mac_key.mac(canonical(row, day)) != row["mac"]:
                    bad_mac.append(seq)
                    intact = False
                else:
                    _flush_bad_macs(problems, day, bad_mac)
                where = f"{day}/{seq}"
                if previous is None:
                    intact &= _check_day_start(problems, day, row, day_records)
                elif row["link"] != "-" or row["prev"] != previous["mac"]:
                    intact = False
                    moved = by_mac.get(row["prev"])
                    if row["seq"] <= previous["seq"] or (moved is not None and moved is not previous):
                        problems.append(
                            f"{where}: out of order after {day}/{previous['seq']}; it follows {day}/"
                            f"{moved['seq'] if moved else '?'} (reordered)"
                        )
                    else:
                        problems.append(
                            f"{where}: the record(s) between {day}/{previous['seq']} and it are missing (deleted)"
                        )
                previous = row
            if not intact:
                tainted.update(index_entities(day, rows, int(entity.get("Pos", 0))))

        _flush_bad_macs(problems, day, bad_mac)
        chain_seqs = {r["seq"]: r for r in found.records}
        top = max(chain_seqs, default=0)
        truncated: Anchor | None = None
        for line in lines:
            report.anchors += 1
            line_key = keys.version(line.key)
            if line_key is None or line_key.mac(line.payload()) != line.sig:
                problems.append(f"{day}: anchor line {line.line} does not verify (forged)")
                continue
            if line.seq == 0:
                continue
            record = chain_seqs.get(line.seq)
            if record is not None:
                if record["mac"] != line.head:
                    problems.append(f"{day}/{line.seq}: differs from anchor line {line.line} (edited)")
            elif not found.records or line.seq > top:
                truncated = truncated if truncated and truncated.seq > line.seq else line
            else:
                before = max((n for n in chain_seqs if n < line.seq), default=0)
                after = min(n for n in chain_seqs if n > line.seq)
                if before and chain_seqs[after]["prev"] == chain_seqs[before]["mac"]:
                    # the chain runs on intact from ``before``: a writer continued after a truncation
                    problems.append(
                        f"{day}/{before}: newest records truncated, then written on from: anchor line {line.line} at "
                        f"{line.time} records {day}/{line.seq}"
                    )
                else:
                    problems.append(f"{day}/{line.seq}: missing, anchored at line {line.line} (deleted)")
        if truncated is not None:
            if not found.records:
                problems.append(
                    f"{day}: the whole day is missing (deleted): anchor line {truncated.line} at {truncated.time} "
                    f"records {day}/{truncated.seq}"
                )
            else:
                problems.append(
                    f"{day}/{top}: newest records truncated: anchor line {truncated.line} at {truncated.time} "
                    f"records {day}/{truncated.seq}"
                )
        if found.records:
            report.heads[day] = (found.records[-1]["seq"], found.records[-1]["mac"])
        _check_index(report, table, day, found, tainted, repair=repair)
    return report


def _flush_bad_macs(problems: list[str], day: str, bad: list[int]) -> None:
    if not bad:
        return
    span = f"{day}/{bad[0]}" if len(bad) == 1 else f"{day}/{bad[0]}..{day}/{bad[-1]} ({len(bad)} records)"
    problems.append(f"{span}: MAC does not verify (edited, or re-hashed without the key)")
    bad.clear()


def _check_day_start(problems: list[str], day: str, row: dict[str, Any], records: Any) -> bool:
    """The oldest record of a day must link to the previous day's head (or start the log)."""
    where = f"{day}/{row['seq']}"
    if row["link"] == "-":
        if row["prev"] == ZERO_MAC:
            return True
        problems.append(f"{where}: the day's first record(s) before it are missing (deleted)")
        return False
    link_day, _, link_seq = str(row["link"]).partition("/")
    if not (link_day.isdigit() and len(link_day) == 8 and link_day < day and link_seq.isdigit()):
        problems.append(f"{where}: links to {row['link']!r}, not an earlier day (edited)")
        return False
    target = next((r for r in records(link_day).records if r["seq"] == int(link_seq)), None)
    if target is None:
        problems.append(f"{day}: links to {row['link']}, which is missing ({link_day} deleted or truncated)")
        return False
    if target["mac"] != row["prev"]:
        problems.append(f"{day}: links to {row['link']}, whose MAC differs (edited)")
        return False
    return True


def _check_index(
    report: VerifyReport, table: TableClient, day: str, found: _Day, tainted: set[str], *, repair: bool
) -> None:
    expected: dict[str, dict[str, Any]] = {}
    for entity, rows in found.blocks:
        derived = index_entities(day, rows, int(entity.get("Pos", 0)))
        expected.update({k: v for k, v in derived.items() if k not in tainted})
    rewrite: list[dict[str, Any]] = []
    index = dict(found.index)
    for key, wanted in expected.items():
        have = index.pop(key, None)
        if have == block_rows(wanted):
            continue
        problem = f"{day}: index row {key} {'missing' if have is None else 'differs from the chain'}"
        if repair:
            rewrite.append(wanted)
            report.repaired.append(problem)
        else:
            report.problems.append(problem)
    for key in index.keys() - tainted:
        report.problems.append(f"{day}: index row {key} points at no record")
    if rewrite:
        upsert(table, rewrite)


def query(
    table: TableClient,
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
    index rows, which the index writer adds just after the chain row (tens of milliseconds; more blocks
    share one index write when it is busy): a
    record whose index rows are not there yet, or are missing because the process stopped between the
    two writes (logged as ``audit.index outcome=failed``), is not returned by such a query until
    ``python -m broker audit verify --repair`` rewrites them from the chain.
    """
    resume = _decode_cursor(cursor) if cursor else None
    if tenant:
        prefix = index_prefix("t", tenant)
    elif caller:
        prefix = index_prefix("k", caller)
    else:
        prefix = "c"
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    first, last = _iso(start), _iso(end)
    out: list[dict[str, Any]] = []
    for day in _days_desc(start.date(), end.date()):
        if resume is not None and day > resume[0]:
            continue
        below = resume if resume is not None and resume[0] == day else None
        low = prefix if below is None else prefix + inv(below[2])
        entities = table.query_entities(
            "PartitionKey eq @day and RowKey ge @low and RowKey lt @high and MaxTime ge @from and MinTime le @to",
            parameters={"day": day, "low": low, "high": upper, "from": first, "to": last},
            results_per_page=min(limit, 1000),
        )
        for entity in entities:
            try:
                rows = block_rows(entity)
            except ValueError as exc:
                log.error("audit.query day=%s error=%r (audit verify reports it)", day, exc)
                continue
            for row in reversed(rows):
                if below is not None and row["seq"] >= below[1]:
                    continue
                if not first <= row["time"] <= last:
                    continue
                if (tenant and row["tenant"] != tenant) or (caller and row["caller"] != caller):
                    continue
                out.append({**row, "day": day})
                if len(out) == limit:
                    return out, _encode_cursor(day, int(row["seq"]), int(entity["Pos"]))
    return out, None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _days_desc(start: date, end: date) -> Iterator[str]:
    day = end
    while day >= start:
        yield day.strftime("%Y%m%d")
        day -= timedelta(days=1)


def _encode_cursor(day: str, seq: int, pos: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([day, seq, pos]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, int, int]:
    try:
        day, seq, pos = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not (
            isinstance(day, str)
            and day.isdigit()
            and len(day) == 8
            and all(isinstance(n, int) and n > 0 for n in (seq, pos))
        ):
            raise ValueError("bad cursor")
    except (ValueError, TypeError) as exc:
        raise BadRequest("cursor is not one this API returned") from exc
    return day, seq, pos


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
