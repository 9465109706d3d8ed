"""Incident prefetch end to end: the real sync against the sandbox's Defender and Graph over HTTPS, stored
in Azurite through the Azure SDKs, read back through the broker's HTTP API."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.storage.blob import BlobLeaseClient
from conftest import INSTANT, ROOT, BrokerServer, broker_environment, build_container, start_broker

from broker.errors import RoleMissing, SyncInProgress, UpstreamUnavailable
from broker.incidents.checkpoint import SyncState
from broker.incidents.sync import MAX_DEQUEUE_COUNT
from broker.incidents.ticks import TICKS_PER_SECOND, format_ticks, parse_ticks
from broker.tenants import Tenant
from broker.wiring import Container
from sandbox.server import Sandbox
from sandbox.state import Fault

SYNC = {"SYNC_LOOKBACK_DAYS": "3650"}


def build(sandbox: Sandbox, azurite: str, **overrides: str) -> Container:
    return build_container(sandbox, azurite, retry=INSTANT, **{**SYNC, **overrides})


@pytest.fixture
def container(sandbox: Sandbox, azurite: str) -> Iterator[Container]:
    c = build(sandbox, azurite)
    try:
        yield c
    finally:
        c.close()


def new_tenant(sandbox: Sandbox, c: Container, count: int, *, api: str = "defender", **seed: Any) -> Tenant:
    """A fresh customer tenant in the sandbox, seeded with ``count`` incidents, registered in the broker."""
    name = "t" + uuid.uuid4().hex[:10]
    directory_tenant = sandbox.directory.add_customer_tenant(name)
    if count:
        sandbox.incidents.seed_tenant(directory_tenant.tenant_id, count, **seed)
    return c.tenants.add(name, directory_tenant.tenant_id, api=api)  # type: ignore[arg-type]


def stored(c: Container, tenant: Tenant) -> dict[str, Any]:
    return {str(doc["incidentId"] if tenant.api == "defender" else doc["id"]): doc for doc in _docs(c, tenant)}


def _docs(c: Container, tenant: Tenant) -> list[Any]:
    return list(c.incidents.store.documents(tenant.tenant_id))


def truth(sandbox: Sandbox, tenant: Tenant) -> dict[str, Any]:
    return {str(doc["incidentId"]): doc for doc in sandbox.incidents.truth(tenant.tenant_id)}


def assert_store_equals_truth(sandbox: Sandbox, c: Container, tenant: Tenant) -> None:
    have, want = stored(c, tenant), truth(sandbox, tenant)
    assert sorted(have) == sorted(want)
    if tenant.api == "defender":
        for key, doc in want.items():
            assert have[key] == doc, key
    else:
        for key, doc in want.items():
            assert parse_ticks(have[key]["lastUpdateDateTime"]) == parse_ticks(doc["lastUpdateTime"]), key


def calls(sandbox: Sandbox, tenant: Tenant, api: str = "defender") -> int:
    return sandbox.recorder.count(f"{api}.incidents:{tenant.tenant_id}")


def test_first_run_backfills_exactly_and_a_quiet_run_costs_one_call(sandbox: Sandbox, container: Container) -> None:
    """A backfill stores every incident as the API returned it; a run with nothing new makes one API call."""
    tenant = new_tenant(sandbox, container, 250)
    report = container.incidents.run(tenant)
    assert report.outcome == "complete", report
    assert report.stored == 250
    assert_store_equals_truth(sandbox, container, tenant)
    before = calls(sandbox, tenant)
    again = container.incidents.run(tenant)
    assert calls(sandbox, tenant) - before == 1
    assert again.calls == 1
    assert again.stored == 0
    assert again.unchanged >= 1
    assert container.incidents.state.load(tenant.tenant_id).pending is None


def test_graph_tenant_syncs_and_refuses_incidents_of_another_tenant(sandbox: Sandbox, container: Container) -> None:
    """Graph pages of 50 with $expand=alerts; an incident carrying a foreign tenantId is never stored, but counted."""
    tenant = new_tenant(sandbox, container, 120, api="graph")
    ids = [d["incidentId"] for d in sandbox.incidents.truth(tenant.tenant_id)]
    sandbox.incidents.set_tenant_id_override(tenant.tenant_id, str(uuid.uuid4()), ids[:2])
    report = container.incidents.run(tenant)
    assert report.outcome == "complete"
    assert report.refused == 2
    assert report.pages >= 3
    have = stored(container, tenant)
    assert sorted(have) == sorted(str(i) for i in ids[2:])
    assert all(doc["tenantId"] == tenant.tenant_id and "alerts" in doc for doc in have.values())
    status = container.incidents.status([tenant])[0]
    assert status["counts"]["refused"] == 2
    assert status["counts"]["stored"] == 118


def test_incidents_updated_while_paging_are_not_skipped(sandbox: Sandbox, container: Container) -> None:
    """Updates to rows already read (which shift every later row under $skip), merges and new incidents during
    a run: the run misses nothing it covered, and the next run makes the store equal the truth."""
    tenant = new_tenant(sandbox, container, 450)
    world = sandbox.incidents
    newest_first = [d["incidentId"] for d in world.truth(tenant.tenant_id)]
    for page, index in ((1, 3), (1, 40), (2, 150), (3, 10), (3, 420)):
        world.queue_mutation(
            tenant.tenant_id, page, "update", incident_id=newest_first[index], changes={"status": "Resolved"}
        )
    world.queue_mutation(tenant.tenant_id, 2, "merge", source_id=newest_first[300], target_id=newest_first[5])
    world.queue_mutation(tenant.tenant_id, 2, "add", fields={})
    first = container.incidents.run(tenant)
    assert first.outcome == "complete"
    watermark = container.incidents.state.load(tenant.tenant_id).watermark
    assert watermark is not None
    have = stored(container, tenant)
    for key, doc in truth(sandbox, tenant).items():  # everything at or below the run's high mark is exact
        if parse_ticks(doc["lastUpdateTime"]) <= watermark:
            assert have.get(key) == doc, key
    second = container.incidents.run(tenant)
    assert second.outcome == "complete"
    assert_store_equals_truth(sandbox, container, tenant)
    source = stored(container, tenant)[str(newest_first[300])]
    assert source["redirectIncidentId"] == newest_first[5]
    assert source["status"] == "Redirected"
    items, _ = container.incidents.store.page(tenant.tenant_id, status="redirected")
    assert [i.merged_into for i in items] == [str(newest_first[5])]


def test_a_merge_target_outside_the_window_is_fetched_by_id(sandbox: Sandbox, container: Container) -> None:
    """A merged incident whose target was not updated with it: the target is fetched by id and stored."""
    tenant = new_tenant(sandbox, container, 30)
    container.incidents.run(tenant)
    ids = [d["incidentId"] for d in sandbox.incidents.truth(tenant.tenant_id)]
    target = sandbox.incidents.add_incident(tenant.tenant_id, createdTime="2020-01-01T00:00:00Z")
    sandbox.incidents.update_incident(tenant.tenant_id, ids[0], redirectIncidentId=target["incidentId"])
    report = container.incidents.run(tenant)
    assert report.targets_fetched == 1
    assert report.merged == 1
    assert stored(container, tenant)[str(target["incidentId"])] == truth(sandbox, tenant)[str(target["incidentId"])]


@pytest.mark.parametrize("api", ["defender", "graph"])
def test_a_merge_target_that_is_not_a_number_does_not_fail_the_run(
    sandbox: Sandbox, container: Container, api: str
) -> None:
    """Where the two incident-id rules disagreed: the store took letters, the client digits only, so one
    merged incident whose target is not a number failed the whole run. Now the incident is stored, its
    target asked for once over HTTPS (Defender answers 400, Graph 404), and the run completes."""
    tenant = new_tenant(sandbox, container, 0, api=api)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if api == "defender":
        doc = {"incidentId": 990001, "lastUpdateTime": stamp, "status": "Redirected", "redirectIncidentId": "inc-7b"}
        path = "/api/incidents"
    else:
        doc = {"id": "990001", "tenantId": tenant.tenant_id, "lastUpdateDateTime": stamp, "status": "redirected"}
        doc["redirectIncidentId"] = "inc-7b"
        path = "/security/incidents"
    sandbox.recorder.inject(Fault(service=api, status=200, body=json.dumps({"value": [doc]}), path_contains=path))
    report = container.incidents.run(tenant)
    assert report.outcome == "complete", report
    assert (report.stored, report.merged, report.calls) == (1, 1, 2)  # the page, then the target by id
    assert report.targets_fetched == 0
    [item], _ = container.incidents.store.page(tenant.tenant_id)
    assert (item.incident_id, item.merged_into) == ("990001", "inc-7b")
    assert container.incidents.status([tenant])[0]["last_outcome"] == "complete"


@pytest.mark.slow
def test_a_run_killed_after_page_k_resumes_and_ends_equal_to_the_truth(sandbox: Sandbox, container: Container) -> None:
    """A 500 that persists from page 3 on: the run fails with its error in the status, its checkpoint covers
    only stored pages, and the next run resumes there and ends exact."""
    tenant = new_tenant(sandbox, container, 600)
    world = sandbox.incidents

    def break_api(_: Any) -> None:
        sandbox.recorder.inject(Fault(service="defender", status=500, path_contains="/api/incidents", times=None))

    world.on_page(tenant.tenant_id, 2, break_api)
    with pytest.raises(UpstreamUnavailable):
        container.incidents.run(tenant)
    state = container.incidents.state.load(tenant.tenant_id)
    assert state.pending is not None
    assert state.watermark is None
    _low, cursor, high, _ = state.pending
    assert cursor is not None
    assert high is not None
    have = stored(container, tenant)
    for key, doc in truth(sandbox, tenant).items():  # the checkpoint is never ahead of the stored data
        if cursor < parse_ticks(doc["lastUpdateTime"]) <= high:
            assert key in have
    status = container.incidents.status([tenant])[0]
    assert status["last_error"].startswith("upstream_unavailable")
    assert status["in_progress_window"]
    assert not status["poisoned"]
    world.update_incident(tenant.tenant_id, world.truth(tenant.tenant_id)[-1]["incidentId"], severity="High")
    sandbox.recorder.clear_faults()
    report = container.incidents.run(tenant)
    assert report.outcome == "complete"
    assert report.resumed
    assert_store_equals_truth(sandbox, container, tenant)
    assert container.incidents.status([tenant])[0]["last_success"]


def sync_command(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "broker", "sync", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_pages(sandbox: Sandbox, tenant: Tenant, pages: int, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + 60
    while sandbox.incidents.pages_served(tenant.tenant_id, "defender") < pages:
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_sync_process_killed_or_stopped_mid_run_loses_nothing(
    sandbox: Sandbox, azurite: str, signum: signal.Signals
) -> None:
    """`python -m broker sync` killed (SIGKILL) or stopped (SIGTERM, what the Functions host sends) mid-run,
    then run again: the store equals the truth. SIGTERM ends the run `stopped` at its last checkpoint and
    releases the lease, so the next run starts at once; SIGKILL leaves the lease held until it lapses."""
    c = build(sandbox, azurite)
    env = broker_environment(sandbox, azurite, STORAGE_PREFIX=c.storage.prefix, **SYNC)
    try:
        tenant = new_tenant(sandbox, c, 900, alerts_per_incident=1)
        sandbox.recorder.set_latency("defender", 0.25)
        proc = sync_command(env, "--tenant", tenant.name)
        wait_for_pages(sandbox, tenant, 4, proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
        sandbox.recorder.set_latency("defender", 0.0)
        time.sleep(0.3)  # the request in flight when it died is answered into the void
        assert c.incidents.state.load(tenant.tenant_id).pending is not None
        assert 0 < len(stored(c, tenant)) < 900
        if signum == signal.SIGTERM:
            assert proc.returncode == 1, out + err
            assert "outcome=stopped" in out
        else:
            # The dead process's lease would lapse within 60 s; break it instead of waiting.
            assert c.incidents.run(tenant).outcome == "busy"
            blob = c.storage.container("sync").get_blob_client(f"leases/{tenant.tenant_id}")
            BlobLeaseClient(blob).break_lease(lease_break_period=0)
        report = c.incidents.run(tenant)
        assert report.outcome == "complete"
        assert report.resumed
        assert_store_equals_truth(sandbox, c, tenant)
    finally:
        c.close()


@pytest.mark.slow
def test_the_cli_reports_a_busy_tenant_and_until_when_and_waits_for_it_with_wait(
    sandbox: Sandbox, azurite: str
) -> None:
    """A tenant another run holds: `sync` says busy and until when, exit 1; `sync --wait` syncs it after."""
    c = build(sandbox, azurite)
    env = broker_environment(sandbox, azurite, STORAGE_PREFIX=c.storage.prefix, **SYNC)
    try:
        tenant = new_tenant(sandbox, c, 3000, alerts_per_incident=1)
        sandbox.recorder.set_latency("defender", 0.3)
        reports: list[Any] = []
        holder = threading.Thread(target=lambda: reports.append(c.incidents.run(tenant)))
        holder.start()
        wait_for_pages(sandbox, tenant, 1)
        asked = time.time()
        busy = sync_command(env, "--tenant", tenant.name)
        waiting = sync_command(env, "--tenant", tenant.name, "--wait")
        busy_out, busy_err = busy.communicate(timeout=120)
        holder.join(timeout=120)
        sandbox.recorder.set_latency("defender", 0.0)
        wait_out, wait_err = waiting.communicate(timeout=120)
        assert reports[0].outcome == "complete"
        assert busy.returncode == 1, busy_out + busy_err
        assert "outcome=busy" in busy_out
        until = busy_out.split("busy_until=")[1].split()[0]
        assert asked < parse_ticks(until) / TICKS_PER_SECOND <= asked + 61
        assert "1 tenant(s), 1 not synced" in busy_out
        assert waiting.returncode == 0, wait_out + wait_err
        assert "busy until" in wait_out
        assert "outcome=complete" in wait_out
        assert_store_equals_truth(sandbox, c, tenant)
    finally:
        c.close()


@pytest.mark.slow
def test_a_killed_runs_tenant_is_synced_by_the_next_timer_tick_after_its_lease_lapses(
    sandbox: Sandbox, azurite: str
) -> None:
    """SIGKILL leaves the lease held: a tick before it lapses finds the tenant busy; the first tick after
    it lapses resumes the window, and the store equals the API."""
    queue_name = "q" + uuid.uuid4().hex[:12]
    c = build(sandbox, azurite, SYNC_LEASE_SECONDS="15", INCIDENT_SYNC_QUEUE=queue_name)
    env = broker_environment(sandbox, azurite, STORAGE_PREFIX=c.storage.prefix, SYNC_LEASE_SECONDS="15", **SYNC)

    def tick() -> list[str]:
        assert c.incidents.fan_out() == 1
        messages = list(c.storage.queue(queue_name).receive_messages(max_messages=32, visibility_timeout=60))
        outcomes = []
        for m in messages:
            report = c.incidents.handle_message(base64.b64decode(m.content), m.dequeue_count)
            assert report is not None
            outcomes.append(report.outcome)
            c.storage.queue(queue_name).delete_message(m)
        return outcomes

    try:
        tenant = new_tenant(sandbox, c, 900, alerts_per_incident=1)
        sandbox.recorder.set_latency("defender", 0.25)
        proc = sync_command(env, "--tenant", tenant.name)
        wait_for_pages(sandbox, tenant, 4, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        sandbox.recorder.set_latency("defender", 0.0)
        assert tick() == ["busy"]
        until = c.incidents.busy_until(tenant.tenant_id)
        assert until is not None
        assert parse_ticks(until) / TICKS_PER_SECOND <= time.time() + 15
        lease_blob = c.storage.container("sync").get_blob_client(f"leases/{tenant.tenant_id}")
        deadline = time.monotonic() + 30
        while lease_blob.get_blob_properties().lease.state == "leased":
            assert time.monotonic() < deadline
            time.sleep(0.25)
        assert tick() == ["complete"]
        assert_store_equals_truth(sandbox, c, tenant)
    finally:
        c.close()


def test_two_concurrent_runs_for_one_tenant_cannot_interleave(sandbox: Sandbox, container: Container) -> None:
    """The lease admits one run; the other reports busy. A writer with a stale ETag is refused."""
    tenant = new_tenant(sandbox, container, 300)
    sandbox.recorder.set_latency("defender", 0.1)
    reports: list[Any] = []

    def go() -> None:
        reports.append(container.incidents.run(tenant))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.outcome for r in reports) == ["busy", "complete"]
    assert_store_equals_truth(sandbox, container, tenant)
    stale = container.incidents.state.load(tenant.tenant_id)
    container.incidents.state.save(container.incidents.state.load(tenant.tenant_id))
    with pytest.raises(SyncInProgress):
        container.incidents.state.save(SyncState(stale.tenant_id, stale.data, stale.etag))


def test_the_budget_holds_across_instances_and_the_api_never_sees_it_exceeded(sandbox: Sandbox, azurite: str) -> None:
    """SYNC_BUDGET_PER_MINUTE=5: a run spends 5 calls and defers; another instance sharing the storage gets
    none; the sandbox never saw more than 5 calls in any minute."""
    one = build(sandbox, azurite, SYNC_BUDGET_PER_MINUTE="5")
    two = build(sandbox, azurite, SYNC_BUDGET_PER_MINUTE="5", STORAGE_PREFIX=one.storage.prefix)
    try:
        tenant = new_tenant(sandbox, one, 900, alerts_per_incident=1)
        first = one.incidents.run(tenant)
        assert first.outcome == "deferred"
        assert first.calls == 5
        assert first.retry_after
        second = two.incidents.run(tenant)
        assert second.outcome == "deferred"
        assert second.calls == 0
        assert sandbox.incidents.max_calls_in_window(tenant.tenant_id, "defender", 60) == 5
        assert two.incidents.state.load(tenant.tenant_id).pending is not None
        assert two.incidents.status([tenant])[0]["api_calls"]["total"] == 5
    finally:
        one.close()
        two.close()


def test_a_429_is_honoured_from_its_body_for_every_instance(sandbox: Sandbox, container: Container) -> None:
    """Defender's 429 names its window ("... per 00:01:00"): the run defers for it and the tenant stays blocked."""
    tenant = new_tenant(sandbox, container, 10)
    body = {"error": {"code": "429", "message": "API calls quota exceeded! maximum allowed 50 per 00:01:00"}}
    sandbox.recorder.inject(Fault(service="defender", status=429, body=json.dumps(body), path_contains="/api/inc"))
    report = container.incidents.run(tenant)
    assert report.outcome == "deferred"
    assert report.retry_after == 60
    assert report.throttled == 1
    before = calls(sandbox, tenant)
    assert container.incidents.run(tenant).outcome == "deferred"
    assert calls(sandbox, tenant) == before


def test_a_2mb_incident_with_500_alerts_round_trips_exactly(sandbox: Sandbox, container: Container) -> None:
    """Bigger than a table entity can hold: the blob body equals the API's JSON."""
    tenant = new_tenant(sandbox, container, 0)
    alert = sandbox.incidents.seed_tenant(str(uuid.uuid4()), 1, alerts_per_incident=1)[0]["alerts"][0]
    alerts = [dict(alert, alertId=f"da{i}", description=os.urandom(1600).hex()) for i in range(500)]
    big = sandbox.incidents.add_incident(tenant.tenant_id, alerts=alerts)
    assert len(json.dumps(big)) > 2_000_000  # random text: it stays over 1 MB compressed, so it goes to a blob
    assert container.incidents.run(tenant).stored == 1
    assert stored(container, tenant)[str(big["incidentId"])] == truth(sandbox, tenant)[str(big["incidentId"])]
    blobs = list(container.storage.container("incidents").list_blobs(name_starts_with=tenant.tenant_id))
    assert len(blobs) == 1
    assert blobs[0].size == len(json.dumps(big, separators=(",", ":"), ensure_ascii=False).encode())


def test_a_large_incidents_old_blob_is_removed_when_it_changes(sandbox: Sandbox, container: Container) -> None:
    """A blob-stored incident updated twice: after each sync exactly the current version's blob is kept,
    and the store still equals the API."""
    tenant = new_tenant(sandbox, container, 3, alerts_per_incident=1)
    alert = sandbox.incidents.truth(tenant.tenant_id)[0]["alerts"][0]
    alerts = [dict(alert, alertId=f"da{i}", description=os.urandom(1600).hex()) for i in range(500)]
    big = sandbox.incidents.add_incident(tenant.tenant_id, alerts=alerts)
    incident_id = int(big["incidentId"])

    def blobs() -> list[str]:
        found = container.storage.container("incidents").list_blobs(name_starts_with=tenant.tenant_id)
        return [b.name for b in found]

    assert container.incidents.run(tenant).stored == 4
    first = blobs()
    assert first == [f"{tenant.tenant_id}/{incident_id}/{parse_ticks(big['lastUpdateTime']):019d}.json"]
    changed = sandbox.incidents.update_incident(tenant.tenant_id, incident_id, severity="High")
    assert container.incidents.run(tenant).stored == 1
    assert blobs() == [f"{tenant.tenant_id}/{incident_id}/{parse_ticks(changed['lastUpdateTime']):019d}.json"]
    assert_store_equals_truth(sandbox, container, tenant)
    again = sandbox.incidents.update_incident(tenant.tenant_id, incident_id, status="Resolved")
    assert container.incidents.run(tenant).stored == 1
    assert blobs() == [f"{tenant.tenant_id}/{incident_id}/{parse_ticks(again['lastUpdateTime']):019d}.json"]
    assert_store_equals_truth(sandbox, container, tenant)


def test_queue_failures_are_recorded_and_marked_poisoned_at_the_max_dequeue(
    sandbox: Sandbox, container: Container
) -> None:
    """Each failure records the last error; at maxDequeueCount (host.json) the status says poisoned."""
    host = json.loads((ROOT / "host.json").read_text())
    assert host["extensions"]["queues"]["maxDequeueCount"] == MAX_DEQUEUE_COUNT
    tenant = new_tenant(sandbox, container, 5)
    sandbox.directory.set_roles(tenant.tenant_id, "https://api.security.microsoft.com", [])
    message = json.dumps({"tenant": tenant.tenant_id}).encode()
    with pytest.raises(RoleMissing):
        container.incidents.handle_message(message, 1)
    status = container.incidents.status([tenant])[0]
    assert status["last_error"]
    assert not status["poisoned"]
    assert status["consecutive_failures"] == 1
    with pytest.raises(RoleMissing):
        container.incidents.handle_message(message, MAX_DEQUEUE_COUNT)
    assert container.incidents.status([tenant])[0]["poisoned"]
    assert container.incidents.handle_message(b"not json", 1) is None


def test_the_timer_fans_out_one_base64_message_per_enabled_tenant(sandbox: Sandbox, azurite: str) -> None:
    """The queue trigger decodes base64 by default: messages are sent that way, one per enabled tenant."""
    queue_name = "q" + uuid.uuid4().hex[:12]
    c = build(sandbox, azurite, INCIDENT_SYNC_QUEUE=queue_name)
    try:
        a, b = new_tenant(sandbox, c, 0), new_tenant(sandbox, c, 0)
        c.tenants.set_enabled(b.name, False)
        assert c.incidents.fan_out() == len([t for t in c.tenants.all() if t.enabled])
        raw = c.storage.queue(queue_name).receive_messages(max_messages=32, visibility_timeout=5)
        bodies = [json.loads(base64.b64decode(m.content)) for m in raw]
    finally:
        c.close()
    assert {"tenant": a.tenant_id} in bodies
    assert {"tenant": b.tenant_id} not in bodies


@pytest.fixture
def served(sandbox: Sandbox, azurite: str) -> Iterator[BrokerServer]:
    server = start_broker(sandbox, azurite, tenants=False, retry=INSTANT, **SYNC)
    try:
        yield server
    finally:
        server.stop()


def test_http_lists_incidents_by_pages_and_filters(sandbox: Sandbox, served: BrokerServer) -> None:
    """Cursor pages cover every incident once, oldest update first; since/status/severity filter."""
    c = served.container
    tenant = new_tenant(sandbox, c, 130)
    other = new_tenant(sandbox, c, 20)
    c.incidents.run(tenant)
    c.incidents.run(other)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"tenant": tenant.name, "limit": "50", **({"cursor": cursor} if cursor else {})}
        r = served.client.get("/api/incidents", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        seen += [item["id"] for item in body["value"]]
        assert all(item["incident"]["incidentId"] == int(item["id"]) for item in body["value"])
        cursor = body["nextCursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(truth(sandbox, tenant))
    assert len(seen) == len(set(seen))
    times = [parse_ticks(d["lastUpdateTime"]) for d in truth(sandbox, tenant).values()]
    middle = sorted(times)[65]
    since = format_ticks(middle)
    r = served.client.get("/api/incidents", params={"tenant": tenant.tenant_id, "since": since, "limit": "100"})
    assert len(r.json()["value"]) == sum(1 for t in times if t >= middle)
    r = served.client.get("/api/incidents", params={"tenant": tenant.name, "status": "Resolved", "limit": "100"})
    want = sum(1 for d in truth(sandbox, tenant).values() if d["status"] == "Resolved")
    assert len(r.json()["value"]) == want
    r = served.client.get("/api/sync/status")
    by_name = {s["tenant"]: s for s in r.json()["tenants"]}
    assert by_name[tenant.name]["counts"]["stored"] == 130
    assert by_name[tenant.name]["watermark"]
    assert by_name[tenant.name]["api_calls"]["total"] >= 2


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"tenant": "../common"},
        {"tenant": "x", "limit": "0"},
        {"tenant": "x", "limit": "101"},
        {"tenant": "x", "limit": "ten"},
        {"tenant": "x", "since": "yesterday"},
        {"tenant": "x", "status": "open"},
        {"tenant": "x", "severity": "catastrophic"},
        {"tenant": "x", "cursor": "!!"},
        {"tenant": "x", "top": "5"},
    ],
)
def test_http_bad_parameters_are_4xx_problems_without_outbound_calls(
    sandbox: Sandbox, served: BrokerServer, params: dict[str, str]
) -> None:
    """Malformed input: a problem document, never a 500, and no call to any incident API."""
    before = sandbox.recorder.total("defender") + sandbox.recorder.total("graph")
    r = served.client.get("/api/incidents", params=params)
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert sandbox.recorder.total("defender") + sandbox.recorder.total("graph") == before


def test_http_cursor_of_another_tenant_is_refused(sandbox: Sandbox, served: BrokerServer) -> None:
    """A cursor only continues the tenant it was issued for; an unknown tenant is a 404."""
    c = served.container
    a, b = new_tenant(sandbox, c, 60), new_tenant(sandbox, c, 5)
    c.incidents.run(a)
    cursor = served.client.get("/api/incidents", params={"tenant": a.name, "limit": "10"}).json()["nextCursor"]
    assert cursor
    r = served.client.get("/api/incidents", params={"tenant": b.name, "cursor": cursor})
    assert r.status_code == 400
    assert r.json()["code"] == "bad_request"
    assert served.client.get("/api/incidents", params={"tenant": "nobody-here"}).status_code == 404
