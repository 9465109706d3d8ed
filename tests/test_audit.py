"""The audit log: every decision is recorded (never a token), queryable by admins, chained per day so
edits and deletions are found, safe with concurrent writers, and strict mode issues no unrecorded token.
Concurrent records share one chain row (one round trip); index rows follow the chain and verify repairs them."""

from __future__ import annotations

import asyncio
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
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.data.tables import TableClient, TableServiceClient, UpdateMode
from conftest import ROOT, BrokerServer, broker_environment
from entra_callers import ALL_ROLES, Identity, bearer, grant, new_identity, policy, start_entra_broker, token_for

from broker.audit import AuditLog, AuditRecord
from sandbox.server import Sandbox


@pytest.fixture
def table(azurite: str) -> Iterator[TableClient]:
    service = TableServiceClient.from_connection_string(azurite)
    client = service.create_table(f"v{uuid.uuid4().hex[:12]}audit")  # the tables of prefix v<hex>
    yield client
    client.delete_table()


def _record(i: int, tenant: str = "t1") -> AuditRecord:
    return AuditRecord(action="token", outcome="issued", code="ok", caller=f"caller-{i % 3}", tenant=tenant, scope="s")


def _today() -> str:
    return datetime.now(UTC).strftime("%Y%m%d")


def _rows(entity: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads("".join(entity[f"R{i}"] for i in range(entity["Chunks"])))
    return rows


def _chain(table: TableClient) -> list[dict[str, Any]]:
    """Today's chain rows, oldest first."""
    rows = (e for e in table.query_entities(f"PartitionKey eq '{_today()}'") if e["RowKey"].startswith("c"))
    return sorted(rows, key=lambda e: e["First"])


def _rewrite(table: TableClient, entity: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Replace the records a row holds (as someone with write access to the table could)."""
    payload = json.dumps(rows, separators=(",", ":"), sort_keys=True)
    assert len(payload) < 30_000
    table.update_entity({**entity, "R0": payload, "Chunks": 1}, mode=UpdateMode.REPLACE)


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


def _hooked(azurite: str, table: TableClient, hook: Requests) -> Callable[[], TableClient]:
    return lambda: TableClient.from_connection_string(azurite, table.table_name, raw_request_hook=hook)


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
    """Issued and denied requests appear in ``GET /api/audit`` with fingerprint, never the token."""
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
    anon = next(r for r in everything if r["request_id"] == "req-anon-1")
    assert (anon["outcome"], anon["reason"]) == ("denied", "no_token")
    by_tenant = server.client.get("/api/audit", params={"tenant": "contoso"}, headers=admin).json()["records"]
    assert {r["tenant_name"] for r in by_tenant} == {"contoso"}


def test_strict_mode_issues_no_token_without_its_record(
    sandbox: Sandbox, azurite: str, server: BrokerServer, people: dict[str, Identity]
) -> None:
    """With the audit table unreachable, strict mode answers 503 ``audit_unavailable`` instead of a token."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    conn = re.sub(r"TableEndpoint=http://127.0.0.1:\d+", f"TableEndpoint=http://127.0.0.1:{dead}", azurite)
    working = server.container.audit
    server.container.audit = AuditLog(lambda: TableClient.from_connection_string(conn, "audit"), write_timeout=3)
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


def test_chain_verification_finds_edits_and_deletions(sandbox: Sandbox, azurite: str, table: TableClient) -> None:
    """``python -m broker audit verify`` passes an intact day, then reports an edited and a deleted record."""
    log = AuditLog(lambda: table)
    for i in range(6):
        log.record_sync(_record(i))
    log.close()
    assert log.verify(datetime.now(UTC).date(), datetime.now(UTC).date()).ok
    day = _today()
    blocks = _chain(table)
    assert [b["First"] for b in blocks] == [1, 2, 3, 4, 5, 6]  # one at a time: one record per row
    edited = _rows(blocks[1])
    edited[0]["outcome"] = "denied"
    _rewrite(table, blocks[1], edited)
    table.delete_entity(day, blocks[3]["RowKey"])
    index_row = next(e for e in table.query_entities(f"PartitionKey eq '{day}'") if e["RowKey"].startswith("t|"))
    table.delete_entity(day, index_row["RowKey"])  # as if the process had stopped between chain and index

    prefix = table.table_name.removesuffix("audit")
    env = {**os.environ, **broker_environment(sandbox, azurite), "STORAGE_PREFIX": prefix}
    run = subprocess.run(
        [sys.executable, "-m", "broker", "audit", "verify"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "seq 2 content does not match its hash (edited)" in run.stdout
    assert "seq 4 missing (deleted)" in run.stdout
    assert f"index row {index_row['RowKey']} missing" in run.stdout
    repair = subprocess.run(
        [sys.executable, "-m", "broker", "audit", "verify", "--repair"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert repair.returncode == 1, repair.stdout + repair.stderr  # the chain's own damage is not repairable
    assert f"REPAIRED {day}: index row {index_row['RowKey']} missing" in repair.stdout
    assert "seq 2 content does not match its hash (edited)" in repair.stdout
    assert table.get_entity(day, index_row["RowKey"])["R0"] == index_row["R0"]


def test_concurrent_writers_do_not_fork_the_chain(table: TableClient) -> None:
    """Two instances appending to the same day interleave into one gapless chain."""
    logs = [AuditLog(lambda: table), AuditLog(lambda: table)]

    def write(log: AuditLog, n: int) -> None:
        for i in range(n):
            log.record_sync(_record(i))

    threads = [threading.Thread(target=write, args=(log, 40)) for log in logs for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    today = datetime.now(UTC).date()
    report = logs[0].verify(today, today)
    assert report.ok, report.problems
    assert report.records == 160


def test_query_pages_with_a_cursor(table: TableClient) -> None:
    """``limit`` and ``cursor`` walk every record once, newest first."""
    log = AuditLog(lambda: table)
    for i in range(7):
        log.record_sync(_record(i, tenant="t2"))
    log.close()
    start, end = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)
    seen: list[int] = []
    cursor = None
    while True:
        page, cursor = log.query(start, end, tenant="t2", limit=3, cursor=cursor)
        seen += [r["seq"] for r in page]
        if cursor is None:
            break
    assert seen == [7, 6, 5, 4, 3, 2, 1]


def test_concurrent_records_share_one_chain_row(azurite: str, table: TableClient) -> None:
    """Records queued while a write is in flight go out together: one insert for all of them."""
    hook = Requests()
    log = AuditLog(_hooked(azurite, table, hook))
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
    assert [(b["First"], b["Seq"]) for b in _chain(table)] == [(1, 1), (2, 2), (3, 34)]
    today = datetime.now(UTC).date()
    report = log.verify(today, today)
    assert report.ok, report.problems
    assert report.records == 34


def test_chain_links_across_rows_and_instances(table: TableClient) -> None:
    """Many writers in two instances: rows of several records each, one gapless chain linking across rows."""
    logs = [AuditLog(lambda: table), AuditLog(lambda: table)]

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
    blocks = _chain(table)
    records = [r for b in blocks for r in _rows(b)]
    assert [r["seq"] for r in records] == list(range(1, 241))
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"]
    assert sum(log.batches for log in logs) == len(blocks) < 240  # round trips were shared
    today = datetime.now(UTC).date()
    report = logs[0].verify(today, today)
    assert report.ok, report.problems
    assert report.records == 240


def test_index_rows_follow_the_chain_and_verify_repairs_them(azurite: str, table: TableClient) -> None:
    """A record is stored once its chain row is in; its index rows come after, and ``verify --repair``
    rewrites index rows that are missing or edited so queries by tenant and caller find every record."""
    hook = Requests()
    hook.hold = ("upsert", "transaction")  # index writes
    log = AuditLog(_hooked(azurite, table, hook))
    start, end = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)
    today = datetime.now(UTC).date()
    written = log.record_sync(_record(0, tenant="t3"))  # returns while the index write is held
    assert hook.held.wait(10)
    assert hook.seen[-2:] == ["insert", "upsert"]  # the chain row, then its tenant and caller rows
    assert log.query(start, end, tenant="t3")[0] == []
    assert [r["seq"] for r in log.query(start, end)[0]] == [written.seq]  # the chain has it already
    assert any("missing" in p for p in log.verify(today, today).problems)
    hook.hold = ()
    hook.release.set()
    log.flush()
    for i in range(1, 5):
        log.record_sync(_record(i, tenant="t3"))
    log.flush()
    assert [r["seq"] for r in log.query(start, end, tenant="t3")[0]] == [5, 4, 3, 2, 1]
    assert log.verify(today, today).ok

    day = _today()
    index = {e["RowKey"]: e for e in table.query_entities(f"PartitionKey eq '{day}'") if e["RowKey"][0] in "tk"}
    lost = [k for k in index if k.startswith("t|t3|")][:2]
    for key in lost:  # a crash between the chain row and its index rows
        table.delete_entity(day, key)
    caller_key = next(k for k in index if k.startswith("k|"))
    edited = _rows(index[caller_key])
    edited[0]["outcome"] = "denied"
    _rewrite(table, index[caller_key], edited)

    report = log.verify(today, today)
    assert sorted(report.problems) == sorted(
        [f"{day}: index row {k} missing" for k in lost] + [f"{day}: index row {caller_key} differs from the chain"]
    )
    assert len(log.query(start, end, tenant="t3")[0]) == 3
    repaired = log.verify(today, today, repair=True)
    assert repaired.ok, repaired.problems
    assert len(repaired.repaired) == 3
    assert log.verify(today, today).ok
    assert [r["seq"] for r in log.query(start, end, tenant="t3")[0]] == [5, 4, 3, 2, 1]
    caller = edited[0]["caller"]
    assert all(r["outcome"] == "issued" for r in log.query(start, end, caller=caller)[0])
    log.close()
