"""The fault matrix: each row a fault injected through the sandbox (or between the broker and storage), and
the outcome the README's fault table promises — cached tokens keep serving, a 503 with Retry-After,
nothing lost, nothing doubled. Rows already proved elsewhere are named in that table, not repeated here."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import DEFENDER, INSTANT, BrokerServer, build_container, start_broker

from broker.errors import UpstreamUnavailable
from broker.tenants import Tenant
from broker.wiring import Container
from sandbox.server import Sandbox
from sandbox.state import Fault

SYNC = {"SYNC_LOOKBACK_DAYS": "3650"}
pytestmark = pytest.mark.slow  # a few minutes in all: `make check` runs it, `make test-fast` leaves it out


def new_tenant(sandbox: Sandbox, c: Container, count: int) -> Tenant:
    name = "f" + uuid.uuid4().hex[:10]
    directory_tenant = sandbox.directory.add_customer_tenant(name)
    if count:
        sandbox.incidents.seed_tenant(directory_tenant.tenant_id, count, alerts_per_incident=1)
    return c.tenants.add(name, directory_tenant.tenant_id)


def assert_exact(sandbox: Sandbox, c: Container, tenant: Tenant) -> None:
    """Nothing lost, nothing doubled: the stored incidents are the API's, each once, byte for byte."""
    docs = list(c.incidents.store.documents(tenant.tenant_id))
    ids = [str(d["incidentId"]) for d in docs]
    assert len(ids) == len(set(ids)), "an incident is stored twice"
    want = {str(d["incidentId"]): d for d in sandbox.incidents.truth(tenant.tenant_id)}
    assert dict(zip(ids, docs, strict=True)) == want


@pytest.fixture
def container(sandbox: Sandbox, azurite: str) -> Iterator[Container]:
    c = build_container(sandbox, azurite, retry=INSTANT, **SYNC)
    try:
        yield c
    finally:
        c.close()


# -- identity provider ---------------------------------------------------------------------------------


@pytest.fixture
def broker(sandbox: Sandbox, azurite: str) -> Iterator[BrokerServer]:
    server = start_broker(sandbox, azurite, tenants=False)
    try:
        yield server
    finally:
        server.stop()


def registered(sandbox: Sandbox, broker: BrokerServer) -> str:
    name = "f" + uuid.uuid4().hex[:10]
    tenant = sandbox.directory.add_customer_tenant(name)
    broker.container.tenants.add(name, tenant.tenant_id)
    return name


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault("entra", 429, "Too Many Requests", "text/plain", {"Retry-After": "30"}), "upstream_throttled"),
        (Fault("entra", 503, '{"error":"temporarily_unavailable"}'), "upstream_unavailable"),
        (Fault("entra", 500, '{"error":"server_error"}'), "upstream_unavailable"),
    ],
    ids=["429-storm", "503", "500"],
)
def test_while_the_identity_provider_fails_cached_tokens_keep_serving_and_the_rest_get_503_retry_after(
    sandbox: Sandbox, broker: BrokerServer, fault: Fault, code: str
) -> None:
    """Every token request to Entra fails (a 429 storm, 5xx): the tenant whose token is cached is served
    from cache, 40 times out of 40; a tenant without one gets 503 + Retry-After each time, never a 500,
    and under a 429 the broker waits out Retry-After instead of asking again."""
    warm, cold = registered(sandbox, broker), registered(sandbox, broker)
    assert broker.token(warm).status_code == 200
    fault_everywhere = Fault(
        fault.service, fault.status, fault.body, fault.content_type, fault.headers, "/oauth2/v2.0/token", None
    )
    sandbox.recorder.inject(fault_everywhere)
    try:
        for _ in range(40):
            assert broker.token(warm).status_code == 200
        for _ in range(5):
            response = broker.token(cold)
            assert response.status_code == 503, response.text
            assert response.json()["code"] == code
            assert int(response.headers["retry-after"]) >= 1
        if fault.status == 429:  # Retry-After is honoured: the storm is not fed, one call reached Entra
            assert sandbox.recorder.count("entra.fault") == 1
    finally:
        sandbox.recorder.clear_faults()


def test_while_the_identity_provider_is_slow_cached_tokens_are_served_at_once(
    sandbox: Sandbox, broker: BrokerServer
) -> None:
    """Entra answering in 2 s: a cached tenant's token does not wait for it."""
    warm = registered(sandbox, broker)
    assert broker.token(warm).status_code == 200
    sandbox.recorder.set_latency("entra", 2.0)
    try:
        started = time.monotonic()
        for _ in range(10):
            assert broker.token(warm).status_code == 200
        assert time.monotonic() - started < 2.0
    finally:
        sandbox.recorder.set_latency("entra", 0.0)


def test_while_the_identity_provider_is_down_cached_tokens_keep_serving(sandbox: Sandbox, azurite: str) -> None:
    """Entra unreachable (connections refused, through a relay in front of it): cached tokens are
    served, the rest get 503 + Retry-After; when it is back, tokens flow again."""
    entra = sandbox.env()["AUTHORITY_HOST"]
    outage = Outage({"AUTHORITY_HOST": entra})
    server = start_broker(sandbox, azurite, tenants=False, AUTHORITY_HOST=outage.urls["AUTHORITY_HOST"])
    try:
        warm, cold = registered(sandbox, server), registered(sandbox, server)
        assert server.token(warm).status_code == 200
        outage.down.set()
        for _ in range(20):
            assert server.token(warm).status_code == 200
        response = server.token(cold)
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        outage.down.clear()
        assert server.token(cold).status_code == 200
    finally:
        server.stop()
        outage.close()


# -- Defender ------------------------------------------------------------------------------------------


def test_a_defender_429_without_retry_after_defers_a_minute_and_blocks_every_instance(
    sandbox: Sandbox, container: Container
) -> None:
    """No Retry-After and no window in the body: the run defers for 60 s at its checkpoint and the
    tenant's budget is blocked for everyone; what was stored stays, exact, when it resumes."""
    tenant = new_tenant(sandbox, container, 350)
    body = json.dumps({"error": {"code": "TooManyRequests", "message": "Rate limit is exceeded."}})

    def throttle(_: Any) -> None:
        sandbox.recorder.inject(Fault("defender", 429, body, path_contains="/api/incidents"))

    sandbox.incidents.on_page(tenant.tenant_id, 2, throttle)
    report = container.incidents.run(tenant)
    assert (report.outcome, report.retry_after, report.throttled) == ("deferred", 60, 1)
    before = sandbox.recorder.count(f"defender.incidents:{tenant.tenant_id}")
    again = container.incidents.run(tenant)
    assert again.outcome == "deferred"
    assert sandbox.recorder.count(f"defender.incidents:{tenant.tenant_id}") == before
    assert container.incidents.state.load(tenant.tenant_id).pending is not None


@pytest.mark.parametrize("page", [1, 2, 4])
def test_a_defender_5xx_on_page_k_is_retried_and_nothing_is_lost_or_doubled(
    sandbox: Sandbox, container: Container, page: int
) -> None:
    """One 503 on page k: retried (the GET is idempotent), the run completes exact with one call more."""
    tenant = new_tenant(sandbox, container, 450)

    def fail_next(_: Any) -> None:
        sandbox.recorder.inject(Fault("defender", 503, '{"error":"busy"}', path_contains="/api/incidents"))

    if page == 1:
        fail_next(None)
    else:
        sandbox.incidents.on_page(tenant.tenant_id, page - 1, fail_next)
    report = container.incidents.run(tenant)
    assert report.outcome == "complete"
    assert report.calls == report.pages + 1
    assert_exact(sandbox, container, tenant)


@pytest.mark.parametrize("page", range(1, 6))
def test_a_run_dying_after_any_page_of_a_window_resumes_exact(
    sandbox: Sandbox, container: Container, page: int
) -> None:
    """A six-page window whose run dies after page k (every k before the last): its checkpoint covers what is stored, an
    incident changes meanwhile, and the next run ends with every incident once, as the API has it."""
    tenant = new_tenant(sandbox, container, 550)

    def die(_: Any) -> None:
        sandbox.recorder.inject(Fault("defender", 500, path_contains="/api/incidents", times=None))

    sandbox.incidents.on_page(tenant.tenant_id, page, die)
    with pytest.raises(UpstreamUnavailable):
        container.incidents.run(tenant)
    sandbox.recorder.clear_faults()
    first = sandbox.incidents.truth(tenant.tenant_id)[0]["incidentId"]
    sandbox.incidents.update_incident(tenant.tenant_id, first, severity="High")
    report = container.incidents.run(tenant)
    assert report.outcome == "complete"
    assert report.resumed
    assert_exact(sandbox, container, tenant)


@pytest.mark.parametrize("skew_hours", [-6.0, 6.0])
def test_clock_skew_between_broker_and_api_loses_nothing(sandbox: Sandbox, azurite: str, skew_hours: float) -> None:
    """The API's clock hours ahead of or behind the broker's: windows come from the API's own times, so
    a backfill and an incremental run with changes both end exact, and a quiet run costs one call."""
    world = sandbox.incidents
    c = build_container(sandbox, azurite, retry=INSTANT, SYNC_LOOKBACK_DAYS="1")
    world.clock = lambda: time.time() + skew_hours * 3600
    try:
        tenant = new_tenant(sandbox, c, 0)
        for _ in range(80):  # all inside one overlap window, so a quiet run's window is one page
            world.add_incident(tenant.tenant_id)
        assert c.incidents.run(tenant).outcome == "complete"
        assert_exact(sandbox, c, tenant)
        for doc in world.truth(tenant.tenant_id)[50:53]:
            world.update_incident(tenant.tenant_id, doc["incidentId"], status="Resolved")
        world.add_incident(tenant.tenant_id)
        report = c.incidents.run(tenant)
        assert (report.outcome, report.stored) == ("complete", 4)
        assert_exact(sandbox, c, tenant)
        assert c.incidents.run(tenant).calls == 1
    finally:
        world.clock = time.time
        c.close()


# -- storage ---------------------------------------------------------------------------------------------


class Outage:
    """Loopback TCP relays in front of services (``name -> URL``) that can refuse service: ``down`` set,
    new connections are closed at once and open ones are cut."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.down = threading.Event()
        self._servers: list[socket.socket] = []
        self.urls: dict[str, str] = {}
        for name, url in urls.items():
            target = int(url.split(":")[2].split("/")[0])
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            self._servers.append(listener)
            self.urls[name] = url.replace(f":{target}", f":{listener.getsockname()[1]}", 1)
            threading.Thread(target=self._accept, args=(listener, target), daemon=True).start()

    @classmethod
    def storage(cls, connection_string: str) -> tuple[Outage, str]:
        """Relays in front of an Azurite account's three services, and the connection string through them."""
        parts = dict(p.split("=", 1) for p in connection_string.split(";") if p)
        outage = cls({k: parts[k] for k in ("BlobEndpoint", "QueueEndpoint", "TableEndpoint")})
        parts.update(outage.urls)
        return outage, ";".join(f"{k}={v}" for k, v in parts.items()) + ";"

    def _accept(self, listener: socket.socket, target: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data or self.down.is_set():
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.down.set()
        for listener in self._servers:
            listener.close()


def test_storage_down_mid_sync_fails_the_run_and_the_next_resumes_exact(sandbox: Sandbox, azurite: str) -> None:
    """Storage refuses connections from page 3 on: the run fails (503-class, never a half-written page
    counted as done); once storage is back the next run resumes and ends exact."""
    outage, connection = Outage.storage(azurite)
    c = build_container(sandbox, connection, retry=INSTANT, **SYNC)
    try:
        tenant = new_tenant(sandbox, c, 500)
        sandbox.incidents.on_page(tenant.tenant_id, 3, lambda _: outage.down.set())
        with pytest.raises(UpstreamUnavailable):
            c.incidents.run(tenant)
        outage.down.clear()
        report = c.incidents.run(tenant)
        assert report.outcome == "complete"
        assert report.resumed
        assert_exact(sandbox, c, tenant)
    finally:
        c.close()
        outage.close()


def test_storage_down_mid_audit_refuses_tokens_in_strict_mode(sandbox: Sandbox, azurite: str) -> None:
    """AUDIT_MODE=strict and the audit table unreachable: no token leaves without its record (503 with
    Retry-After); once storage is back tokens flow again."""
    outage, connection = Outage.storage(azurite)
    server = start_broker(sandbox, connection, tenants=False, AUDIT_MODE="strict")
    try:
        name = registered(sandbox, server)
        assert server.token(name, DEFENDER).status_code == 200
        outage.down.set()
        response = server.token(name, DEFENDER)
        assert response.status_code == 503, response.status_code
        assert int(response.headers.get("retry-after", "0")) >= 1, (response.headers, response.text)
        outage.down.clear()
        deadline = time.monotonic() + 30
        while server.token(name, DEFENDER).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        server.stop()
        outage.close()
