"""The audit writer: a flood cannot push out a record somebody waits for, best-effort drops are counted, and
on SIGTERM the writer process drains within its window and says what it wrote and what it lost."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from azure.data.tables import TableClient
from conftest import ROOT, broker_environment
from test_audit import Requests

from broker import wiring
from broker.audit import AuditRecord
from broker.audit.chain import ChainWriter
from broker.audit.records import Written
from broker.audit.writer import GroupCommit
from broker.settings import Settings
from sandbox.azurite import free_port, wait_for_port
from sandbox.server import Sandbox


def _record(i: int) -> AuditRecord:
    return AuditRecord(
        action="token", outcome="issued", code="ok", caller="c", tenant="t", scope="s", request_id=f"r{i}"
    )


def _stored(table: TableClient) -> list[dict[str, Any]]:
    day = datetime.now(UTC).strftime("%Y%m%d")
    rows = [e for e in table.query_entities(f"PartitionKey eq '{day}'") if e["RowKey"].startswith("c")]
    return [r for e in rows for r in json.loads("".join(e[f"R{i}"] for i in range(e["Chunks"])))]


@pytest.fixture
def env(sandbox: Sandbox, azurite: str) -> Iterator[dict[str, str]]:
    values = broker_environment(sandbox, azurite)
    yield values
    TableClient.from_connection_string(azurite, f"{values['STORAGE_PREFIX']}audit").delete_table()


def test_a_full_queue_drops_best_effort_records_counts_them_and_keeps_waited_ones(
    azurite: str, env: dict[str, str]
) -> None:
    """With the storage write held and the queue full, best-effort records are dropped and counted; records
    somebody waits for are queued anyway and all written once storage answers."""
    store = wiring.audit_store(Settings.from_environ(env))
    store.table()
    hook = Requests()
    held = TableClient.from_connection_string(azurite, f"{env['STORAGE_PREFIX']}audit", raw_request_hook=hook)
    chain = ChainWriter(lambda: held, store.anchors, store.keys)
    group = GroupCommit(chain, max_pending=5)
    outcomes: list[Written | None] = []
    first = threading.Event()
    group.submit(_record(0), required=True, done=lambda w, e: (outcomes.append(w), first.set()))
    assert first.wait(10)  # written: the next insert is record 1's
    hook.hold = ("insert",)
    group.submit(_record(1), required=True, done=lambda w, e: outcomes.append(w))
    assert hook.held.wait(10)
    kept = [group.submit(_record(i), required=False, done=lambda w, e: None) for i in range(2, 12)]
    waited = [group.submit(_record(i), required=True, done=lambda w, e: outcomes.append(w)) for i in range(12, 15)]
    assert kept == [True] * 5 + [False] * 5  # the queue holds 5
    assert waited == [True, True, True]  # never dropped
    assert group.drops.count == 5
    hook.hold = ()
    hook.release.set()
    group.close()
    assert len(outcomes) == 5
    assert all(w is not None for w in outcomes)
    assert len(_stored(held)) == 10  # 5 waited for, 5 best effort kept


def test_sigterm_drains_the_writer_process_and_counts_what_it_lost(env: dict[str, str], azurite: str) -> None:
    """The writer process, killed with records queued, writes what it can within AUDIT_DRAIN_SECONDS,
    then exits; its last line says how many it wrote and lost, and the table holds exactly those written."""
    child = subprocess.Popen(
        [sys.executable, "-m", "broker.audit"],
        cwd=ROOT,
        env={**os.environ, **env, "AUDIT_DRAIN_SECONDS": "1"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    table = TableClient.from_connection_string(azurite, f"{env['STORAGE_PREFIX']}audit")

    def send(first: int, count: int, wait: bool = False) -> None:
        assert child.stdin is not None
        lines = (
            json.dumps({"n": i, "w": int(wait), "r": _record(i).fields()}) + "\n" for i in range(first, first + count)
        )
        child.stdin.write("".join(lines).encode())
        child.stdin.flush()

    key = wiring.audit_store(Settings.from_environ(env)).keys.current()  # the broker passes it on
    child.stdin.write(
        (json.dumps({"key": {"id": key.id, "secret": base64.b64encode(key.secret).decode()}}) + "\n").encode()
    )
    send(0, 200, wait=True)
    assert json.loads(child.stdout.readline()) == {"ready": 1}
    acked = 0
    while acked < 200:  # every awaited record is acknowledged once written
        assert json.loads(child.stdout.readline())["ok"]
        acked += 1
    assert len(_stored(table)) == 200
    queued = 9_000
    feeder = threading.Thread(target=send, args=(200, queued))
    feeder.start()
    feeder.join()
    started = time.monotonic()
    child.send_signal(signal.SIGTERM)
    child.stdin.close()
    try:
        child.wait(timeout=30)
    finally:
        child.kill()
    took = time.monotonic() - started
    assert child.stderr is not None
    err = child.stderr.read()
    child.stderr.close()
    child.stdout.close()
    stopped = re.search(rb"audit.writer outcome=stopped written=(\d+) lost=(\d+) dropped=(\d+)", err)
    assert stopped, err.decode()
    written, lost, dropped = (int(n) for n in stopped.groups())
    assert child.returncode == 0
    assert took < 1 + 5  # the drain window, plus the index rows' last write and start-up slack
    assert written + lost + dropped == 200 + queued
    assert len(_stored(table)) == written
    if lost:
        assert f"audit.writer outcome=lost records={lost}".encode() in err


def test_a_stopped_broker_writes_its_queued_records(sandbox: Sandbox, azurite: str, env: dict[str, str]) -> None:
    """``python -m broker serve`` in best effort, stopped with SIGTERM right after answering: the records
    of every answered request are in the table (the writer process drained them)."""
    port = free_port()
    container = wiring.build(Settings.from_environ(env), bind_host="127.0.0.1")
    tenant = sandbox.directory.customer_tenants()[0]
    container.tenants.add(tenant.name, tenant.tenant_id)
    container.close()
    broker = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, **env, "AUDIT_MODE": "best_effort"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, 30, broker)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30) as client:
            body = {"tenant": tenant.name, "scope": "https://api.security.microsoft.com/.default"}
            answered = [client.post("/api/token", json=body, headers={"X-Request-Id": f"stop-{i}"}) for i in range(50)]
        assert all(r.status_code == 200 for r in answered)
        broker.send_signal(signal.SIGTERM)
        _, err = broker.communicate(timeout=30)
    finally:
        if broker.poll() is None:
            broker.kill()
    table = TableClient.from_connection_string(azurite, f"{env['STORAGE_PREFIX']}audit")
    stored = {r["request_id"] for r in _stored(table)}
    assert {f"stop-{i}" for i in range(50)} <= stored, err.decode()[-2000:]
    assert b"audit.writer outcome=stopped written=50 lost=0" in err
