"""The audit log: every decision is recorded (never a token), queryable by admins, safe with concurrent
writers, and strict mode issues no unrecorded token. Records are keyed with a Key Vault secret the storage
account does not hold, chained across days and anchored outside the table: ``verify`` finds each kind of
tampering done directly to storage, with its position."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from azure.data.tables import TableClient, UpdateMode
from azure.storage.blob import ContainerClient
from conftest import ROOT, BrokerServer, broker_environment
from entra_callers import ALL_ROLES, Identity, bearer, grant, new_identity, policy, start_entra_broker, token_for

from broker import wiring
from broker.audit import AuditLog, AuditRecord, AuditStore
from broker.audit.records import canonical
from broker.settings import Settings
from sandbox.server import Sandbox


@dataclass
class Store:
    """A fresh audit store in Azurite (own prefix) and raw SDK clients to tamper with it."""

    env: dict[str, str]
    store: AuditStore
    table: TableClient  # the same table, through a plain client: what someone with storage access holds
    container: ContainerClient

    def log(self, **kwargs: Any) -> AuditLog:
        return AuditLog(self.store, **kwargs)

    def store_with(self, table: Callable[[], TableClient]) -> AuditStore:
        return AuditStore(table, self.store.container, self.store.keys)


@pytest.fixture
def fresh(sandbox: Sandbox, azurite: str) -> Iterator[Store]:
    env = broker_environment(sandbox, azurite)
    settings = Settings.from_environ(env)
    store = wiring.audit_store(settings)
    table = TableClient.from_connection_string(azurite, f"{settings.storage.prefix}audit")
    container = ContainerClient.from_connection_string(azurite, f"{settings.storage.prefix}-audit")
    store.table()  # created on first use
    yield Store(env, store, table, container)
    table.delete_table()


def _record(i: int, tenant: str = "t1", when: datetime | None = None) -> AuditRecord:
    extra = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z")} if when else {}
    return AuditRecord(
        action="token", outcome="issued", code="ok", caller=f"caller-{i % 3}", tenant=tenant, scope="s", **extra
    )


def _today() -> str:
    return datetime.now(UTC).strftime("%Y%m%d")


def _rows(entity: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads("".join(entity[f"R{i}"] for i in range(entity["Chunks"])))
    return rows


def _chain(table: TableClient, day: str | None = None) -> list[dict[str, Any]]:
    """A day's chain rows, oldest first."""
    rows = (e for e in table.query_entities(f"PartitionKey eq '{day or _today()}'") if e["RowKey"].startswith("c"))
    return sorted(rows, key=lambda e: e["Pos"])


def _rewrite(table: TableClient, entity: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Replace the records a row holds, keeping the row's summary columns consistent with them."""
    payload = json.dumps(rows, separators=(",", ":"), sort_keys=True)
    assert len(payload) < 30_000
    changed = {**entity, "R0": payload, "Chunks": 1, "First": rows[0]["seq"], "Seq": rows[-1]["seq"]}
    table.update_entity({**changed, "Mac": rows[-1]["mac"]}, mode=UpdateMode.REPLACE)


def _write(log: AuditLog, n: int, **kwargs: Any) -> list[int]:
    """``n`` records, one at a time (one record per block)."""
    return [log.record_sync(_record(i, **kwargs)).seq for i in range(n)]


def _verify(log: AuditLog, start: date | None = None) -> list[str]:
    """The chain's problems (index rows that still hold a deleted record's copy are reported too, and
    left out here)."""
    today = datetime.now(UTC).date()
    return [p for p in log.verify(start or today, today).problems if "points at no record" not in p]


def _cli_verify(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "audit", "verify", *extra],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# -- decisions, end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def people(sandbox: Sandbox) -> dict[str, Identity]:
    return {"a": new_identity(sandbox, "audit-a"), "admin": new_identity(sandbox, "audit-admin", ALL_ROLES)}


@pytest.fixture(scope="module")
def server(sandbox: Sandbox, azurite: str, people: dict[str, Identity]) -> Iterator[BrokerServer]:
    broker = start_entra_broker(
        sandbox, azurite, policy(grant(people["a"], ["contoso"]), grant(people["admin"], [], admin=True))
    )
    try:
        yield broker
    finally:
        broker.stop()


def test_decisions_are_recorded_and_queryable_by_admins(
    sandbox: Sandbox, server: BrokerServer, people: dict[str, Identity]
) -> None:
    """Issued and denied requests appear in ``GET /api/audit`` with fingerprint, never the token; requests
    that name nobody are counted per client address instead of a record each."""
    a = bearer(token_for(sandbox, people["a"]))
    issued = server.token("contoso", headers={**a, "X-Request-Id": "req-issued-1"})
    assert issued.status_code == 200
    assert server.token("fabrikam", headers={**a, "X-Request-Id": "req-denied-1"}).status_code == 403
    assert server.token("contoso", headers={"X-Request-Id": "req-anon-1"}).status_code == 401
    server.container.audit.flush()
    admin = bearer(token_for(sandbox, people["admin"]))
    response = server.client.get("/api/audit", params={"caller": people["a"].object_id}, headers=admin)
    assert response.status_code == 200, response.text
    records = {r["request_id"]: r for r in response.json()["records"]}
    token = issued.json()["access_token"]
    assert token not in response.text
    mine = records["req-issued-1"]
    assert mine["outcome"] == "issued"
    assert mine["tenant_name"] == "contoso"
    assert mine["expires_on"] == issued.json()["expires_on"]
    assert mine["fingerprint"] == server.container.issuer.cached(mine["tenant"], mine["scope"], 0).fingerprint  # type: ignore[union-attr]
    assert records["req-denied-1"]["outcome"] == "denied"
    assert records["req-denied-1"]["reason"] == "tenant_not_granted"
    everything = server.client.get("/api/audit", params={"limit": 1000}, headers=admin).json()["records"]
    assert not any(r["request_id"] == "req-anon-1" for r in everything)
    anon = [r for r in everything if r["reason"] == "no_token" and r["client"] == "127.0.0.1"]
    assert anon
    assert sum(r["count"] for r in anon) >= 1
    by_tenant = server.client.get("/api/audit", params={"tenant": "contoso"}, headers=admin).json()["records"]
    assert {r["tenant_name"] for r in by_tenant} == {"contoso"}


def test_a_flood_of_anonymous_requests_is_counted_not_recorded_one_by_one(
    sandbox: Sandbox, server: BrokerServer, people: dict[str, Identity]
) -> None:
    """300 requests without a valid token become a handful of count records; the real request among them
    keeps its own record."""
    table = server.container.audit.store.table()
    server.container.audit.flush()
    before = sum(len(_rows(e)) for e in _chain(table))
    for i in range(150):
        server.token("contoso", headers={"X-Request-Id": f"flood-{i}"})
        server.token("contoso", headers={"Authorization": "Bearer not-a-jwt"})
    a = bearer(token_for(sandbox, people["a"]))
    assert server.token("contoso", headers={**a, "X-Request-Id": "real-1"}).status_code == 200
    server.container.audit.flush()
    new = [r for e in _chain(table) for r in _rows(e)][before:]
    counted = [r for r in new if r["count"] > 1 or r["request_id"].startswith("interval-")]
    assert sum(r["count"] for r in counted) == 300
    assert len(counted) <= 2  # one per (address, reason) and interval
    assert [r["outcome"] for r in new if r["request_id"] == "real-1"] == ["issued"]
    assert not any(r["request_id"].startswith("flood-") for r in new)


def test_strict_mode_issues_no_token_without_its_record(
    sandbox: Sandbox, azurite: str, server: BrokerServer, people: dict[str, Identity]
) -> None:
    """With the audit table unreachable, strict mode answers 503 ``audit_unavailable`` instead of a token."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    conn = re.sub(r"TableEndpoint=http://127.0.0.1:\d+", f"TableEndpoint=http://127.0.0.1:{dead}", azurite)
    working = server.container.audit
    broken = AuditStore(
        lambda: TableClient.from_connection_string(conn, "audit"), working.store.container, working.store.keys
    )
    server.container.audit = AuditLog(broken, write_timeout=3)
    try:
        a = bearer(token_for(sandbox, people["a"]))
        response = server.token("contoso", headers=a)
        assert response.status_code == 503
        assert response.json()["code"] == "audit_unavailable"
        assert "access_token" not in response.text
        server.container.audit.mode = "best_effort"
        assert server.token("contoso", headers=a).status_code == 200  # best effort: the token leaves anyway
    finally:
        server.container.audit.close()
        server.container.audit = working


# -- tamper evidence -----------------------------------------------------------------------------------


def test_verify_reports_an_edited_record_with_its_position(fresh: Store) -> None:
    """Changing a stored record's outcome breaks its MAC: reported at day/seq, by ``python -m broker audit verify``."""
    log = fresh.log()
    seqs = _write(log, 5)
    log.close()
    assert _verify(log) == []
    blocks = _chain(fresh.table)
    edited = _rows(blocks[2])
    edited[0]["outcome"] = "denied"
    _rewrite(fresh.table, blocks[2], edited)
    run = _cli_verify(fresh.env)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"PROBLEM {_today()}/{seqs[2]}: MAC does not verify" in run.stdout


def test_verify_reports_a_deleted_record(fresh: Store) -> None:
    """Deleting a record from the middle leaves its successor linking to nothing present."""
    log = fresh.log()
    seqs = _write(log, 5)
    log.close()
    blocks = _chain(fresh.table)
    fresh.table.delete_entity(_today(), blocks[2]["RowKey"])
    assert _verify(log) == [
        f"{_today()}/{seqs[3]}: the record(s) between {_today()}/{seqs[1]} and it are missing (deleted)"
    ]


def test_verify_reports_reordered_records(fresh: Store) -> None:
    """Swapping two stored records (rows made consistent again) is reported as out of order."""
    log = fresh.log()
    seqs = _write(log, 5)
    log.close()
    blocks = _chain(fresh.table)
    second, third = _rows(blocks[1]), _rows(blocks[2])
    _rewrite(fresh.table, blocks[1], third)
    _rewrite(fresh.table, blocks[2], second)
    problems = _verify(log)
    assert any(p.startswith(f"{_today()}/{seqs[2]}: out of order") for p in problems), problems
    assert not any("MAC" in p for p in problems)  # the records themselves are intact


def test_verify_reports_the_newest_records_truncated_back_to_the_last_anchor(fresh: Store) -> None:
    """Deleting the newest records leaves a valid chain, but the anchor blob (appended when the writer
    stopped) names a head the table no longer has."""
    log = fresh.log()
    seqs = _write(log, 6)
    log.close()  # anchors the head
    for block in _chain(fresh.table)[-3:]:
        fresh.table.delete_entity(_today(), block["RowKey"])
    problems = _verify(log)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{_today()}/{seqs[2]}: newest records truncated")
    assert f"records {_today()}/{seqs[5]}" in problems[0]


def test_verify_reports_a_deleted_day(fresh: Store) -> None:
    """Days are linked: deleting a whole day breaks the next day's link and contradicts its anchors."""
    now = datetime.now(UTC)
    days = [now - timedelta(days=2), now - timedelta(days=1), now]
    log = fresh.log()
    for when in days:
        for i in range(3):
            log.record_sync(_record(i, when=when))
    log.close()
    assert _verify(log, days[0].date()) == []
    gone = days[1].strftime("%Y%m%d")
    for block in _chain(fresh.table, gone):
        fresh.table.delete_entity(gone, block["RowKey"])
    problems = _verify(log, days[0].date())
    assert f"{_today()}: links to {gone}/" in problems[1]
    assert "which is missing" in problems[1]
    assert problems[0].startswith(f"{gone}: the whole day is missing (deleted)")


def test_an_empty_day_is_still_linked(fresh: Store) -> None:
    """A day with no records between two days with records: the later day links to the earlier one."""
    now = datetime.now(UTC)
    log = fresh.log()
    log.record_sync(_record(0, when=now - timedelta(days=3)))
    written = log.record_sync(_record(1, when=now))
    log.close()
    first = _rows(_chain(fresh.table)[0])[0]
    earlier = (now - timedelta(days=3)).strftime("%Y%m%d")
    assert first["link"].startswith(f"{earlier}/")
    assert written.seq == first["seq"]
    assert _verify(log, (now - timedelta(days=3)).date()) == []


def test_verify_reports_a_forward_rehash_made_without_the_key(fresh: Store) -> None:
    """Editing a record and recomputing every MAC after it with any key but the vault's is found at the edit."""
    log = fresh.log()
    seqs = _write(log, 5)
    log.close()
    guess = b"not-the-key-" + uuid.uuid4().bytes
    prev = None
    for block in _chain(fresh.table)[1:]:
        rows = _rows(block)
        for row in rows:
            if row["seq"] == seqs[1]:
                row["outcome"] = "denied"
            if prev is not None:
                row["prev"] = prev
            body = json.dumps(canonical(row, _today()), sort_keys=True, separators=(",", ":")).encode()
            row["mac"] = prev = hmac.new(guess, body, hashlib.sha256).hexdigest()
        _rewrite(fresh.table, block, rows)
    problems = _verify(log)
    assert problems[0] == (
        f"{_today()}/{seqs[1]}..{_today()}/{seqs[4]} (4 records): MAC does not verify (edited, or re-hashed without the key)"
    )
    assert problems[1:] == [f"{_today()}/{seqs[4]}: differs from anchor line 2 (edited)"]


def test_a_rotated_key_verifies_old_and_new_records(sandbox: Sandbox, fresh: Store) -> None:
    """Each record names its key version; after a rotation both versions verify."""
    log = fresh.log()
    _write(log, 2)
    log.close()
    sandbox.directory.set_secret(sandbox.directory.audit_key_name, "rotated-" + uuid.uuid4().hex * 2)
    rotated = wiring.audit_store(Settings.from_environ(fresh.env))  # a new instance reads the new version
    later = AuditLog(rotated)
    _write(later, 2)
    later.close()
    keys = {r["key"] for b in _chain(fresh.table) for r in _rows(b)}
    assert len(keys) == 2
    assert _verify(later) == []


# -- sequence numbers ----------------------------------------------------------------------------------


def test_sequence_numbers_are_not_reused_after_the_newest_records_were_deleted(fresh: Store) -> None:
    """A restarted writer numbers from above every reservation in the anchor blob, not from the table's head."""
    log = fresh.log()
    first = _write(log, 5)
    log.close()
    for block in _chain(fresh.table)[-2:]:
        fresh.table.delete_entity(_today(), block["RowKey"])
    restarted = fresh.log()
    again = _write(restarted, 3)
    restarted.close()
    assert min(again) > max(first)
    problems = _verify(restarted)
    assert any("newest records truncated" in p for p in problems), problems


def test_two_writers_never_share_a_sequence_number_or_fork_the_chain(fresh: Store) -> None:
    """Two instances appending to the same day interleave into one chain; every seq is used once."""
    logs = [fresh.log(), fresh.log()]

    def write(log: AuditLog, n: int) -> None:
        for i in range(n):
            log.record_sync(_record(i))

    threads = [threading.Thread(target=write, args=(log, 15)) for log in logs for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    records = [r for b in _chain(fresh.table) for r in _rows(b)]
    assert len(records) == 240
    assert [r["seq"] for r in records] == sorted({r["seq"] for r in records})
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["mac"]
    assert sum(log.batches for log in logs) == len(_chain(fresh.table)) < 240  # round trips were shared
    assert _verify(logs[0]) == []


# -- group commit, index rows, queries -----------------------------------------------------------------


class Requests:
    """A ``raw_request_hook`` that counts the table requests by kind and can hold one kind until released."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.hold: tuple[str, ...] = ()
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, request: Any) -> None:
        http = request.http_request
        kind = (
            "transaction"
            if "$batch" in http.url
            else "insert"
            if http.method == "POST"
            else "upsert"
            if http.method == "PUT"
            else http.method.lower()
        )
        self.seen.append(kind)
        if kind in self.hold:
            self.held.set()
            assert self.release.wait(10)

    def count(self, kind: str) -> int:
        return self.seen.count(kind)


def _hooked(azurite: str, fresh: Store, hook: Requests) -> Callable[[], TableClient]:
    client = TableClient.from_connection_string(azurite, fresh.table.table_name, raw_request_hook=hook)
    return lambda: client


def test_concurrent_records_share_one_chain_row(azurite: str, fresh: Store) -> None:
    """Records queued while a write is in flight go out together: one insert for all of them."""
    hook = Requests()
    log = AuditLog(fresh.store_with(_hooked(azurite, fresh, hook)))
    log.record_sync(_record(0))
    hook.hold = ("insert",)
    first = threading.Thread(target=log.record_sync, args=(_record(1),))
    first.start()
    assert hook.held.wait(10)  # the writer is inside the insert of record 2
    hook.hold = ()

    async def queue(n: int) -> None:
        for i in range(n):
            await log.record(_record(i, tenant=f"t{i % 2}"), wait=False)

    asyncio.run(queue(32))
    hook.release.set()
    first.join()
    log.flush()
    log.close()
    assert hook.count("insert") == 3  # record 1, record 2, then the 32 queued behind it
    assert log.batches == 3
    assert [b["Count"] for b in _chain(fresh.table)] == [1, 1, 32]
    assert _verify(log) == []


def test_query_pages_with_a_cursor(fresh: Store) -> None:
    """``limit`` and ``cursor`` walk every record once, newest first."""
    log = fresh.log()
    seqs = _write(log, 7, tenant="t2")
    log.flush()
    log.close()
    start, end = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)
    seen: list[int] = []
    cursor = None
    while True:
        page, cursor = log.query(start, end, tenant="t2", limit=3, cursor=cursor)
        seen += [r["seq"] for r in page]
        if cursor is None:
            break
    assert seen == seqs[::-1]


def test_index_rows_follow_the_chain_and_verify_repairs_them(azurite: str, fresh: Store) -> None:
    """A record is stored once its chain row is in; its index rows come after, and ``verify --repair``
    rewrites index rows that are missing or edited so queries by tenant and caller find every record."""
    hook = Requests()
    hook.hold = ("upsert", "transaction")  # index writes
    log = AuditLog(fresh.store_with(_hooked(azurite, fresh, hook)))
    start, end = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)
    written = log.record_sync(_record(0, tenant="t3"))  # returns while the index write waits
    flusher = threading.Thread(target=log.flush)
    flusher.start()
    assert hook.held.wait(10)
    assert log.query(start, end, tenant="t3")[0] == []
    assert [r["seq"] for r in log.query(start, end)[0]] == [written.seq]  # the chain has it already
    assert any("missing" in p for p in _verify(log))
    hook.hold = ()
    hook.release.set()
    flusher.join()
    seqs = [written.seq] + [log.record_sync(_record(i, tenant="t3")).seq for i in range(1, 5)]
    log.flush()
    assert [r["seq"] for r in log.query(start, end, tenant="t3")[0]] == seqs[::-1]
    assert _verify(log) == []

    day = _today()
    index = {e["RowKey"]: e for e in fresh.table.query_entities(f"PartitionKey eq '{day}'") if e["RowKey"][0] in "tk"}
    lost = [k for k in index if k.startswith("t|t3|")][:2]
    for key in lost:  # a crash between the chain row and its index rows
        fresh.table.delete_entity(day, key)
    caller_key = next(k for k in index if k.startswith("k|"))
    edited = _rows(index[caller_key])
    edited[0]["outcome"] = "denied"
    fresh.table.update_entity(
        {**index[caller_key], "R0": json.dumps(edited, separators=(",", ":"), sort_keys=True)}, mode=UpdateMode.REPLACE
    )
    today = datetime.now(UTC).date()
    report = log.verify(today, today)
    assert sorted(report.problems) == sorted(
        [f"{day}: index row {k} missing" for k in lost] + [f"{day}: index row {caller_key} differs from the chain"]
    )
    repaired = log.verify(today, today, repair=True)
    assert repaired.ok, repaired.problems
    assert len(repaired.repaired) == 3
    assert _verify(log) == []
    assert [r["seq"] for r in log.query(start, end, tenant="t3")[0]] == seqs[::-1]
    log.close()
