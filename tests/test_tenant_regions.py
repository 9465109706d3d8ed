"""A tenant's Defender XDR region: set through the admin API (or ``tenants add --region``), checked against
the cloud's documented hosts, and where that tenant's incident sync goes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from conftest import INSTANT, BrokerServer, start_broker

from broker.tenants import Tenant
from sandbox.server import Sandbox


@pytest.fixture
def served(sandbox: Sandbox, azurite: str) -> Iterator[BrokerServer]:
    server = start_broker(sandbox, azurite, tenants=False, retry=INSTANT, SYNC_LOOKBACK_DAYS="3650")
    try:
        yield server
    finally:
        server.stop()


def put(server: BrokerServer, name: str, **body: object) -> tuple[int, dict[str, object]]:
    response = server.client.put(f"/api/admin/tenants/{name}", json=body)
    return response.status_code, dict(response.json())


def test_the_admin_route_adds_and_updates_a_tenants_region(served: BrokerServer) -> None:
    """PUT adds a tenant with a documented region, then changes it in place (its switch survives); bad
    regions, hosts of no Microsoft cloud and a second GUID for a name are 400s that change nothing."""
    guid = str(uuid.uuid4())
    status, body = put(served, "acme", tenant_id=guid.upper(), region="eu")
    assert status == 200, body
    assert body == {
        "tenant": "acme",
        "tenant_id": guid,
        "api": "defender",
        "defender_url": "https://api-eu.security.microsoft.com",
        "enabled": True,
        "created": True,
    }
    assert served.client.post("/api/admin/tenants/acme/disable", json={}).status_code == 200
    status, body = put(served, "acme", tenant_id=guid, region="au")
    assert status == 200, body
    assert body["defender_url"] == "https://au.api.security.microsoft.com"
    assert body["created"] is False
    assert body["enabled"] is False  # an update keeps the kill switch as it was

    for bad, why in [
        ({"tenant_id": guid, "region": "mars"}, "'mars' is not a documented Defender XDR region of the public cloud"),
        ({"tenant_id": guid, "defender_url": "https://api.evil.example"}, "not a documented Defender XDR API host"),
        ({"tenant_id": guid, "defender_url": "https://api-gov.security.microsoft.us"}, "of the public cloud"),
        ({"tenant_id": guid, "region": "eu", "defender_url": "https://api-eu.security.microsoft.com"}, "not both"),
        ({"tenant_id": str(uuid.uuid4()), "region": "eu"}, "registered with another GUID"),
        ({"tenant_id": guid, "region": "eu", "authority": "x"}, "authority"),
    ]:
        status, problem = put(served, "acme", **bad)
        assert status == 400, problem
        assert problem["code"] == "bad_request"
        assert why in str(problem["detail"])
    assert served.container.tenants.resolve("acme").defender_url == "https://au.api.security.microsoft.com"
    status, problem = put(served, guid, tenant_id=guid)
    assert status == 400  # a GUID is never a name
    served.container.audit.flush()  # index rows (what a query by tenant reads) follow the chain row
    moment = datetime.now(UTC)
    records, _ = served.container.audit.query(moment - timedelta(minutes=5), moment, tenant=guid, limit=100)
    reasons = [r["reason"] for r in records]
    assert reasons.count("tenant_configure") >= 2


def test_a_tenants_regional_host_is_where_its_sync_goes(sandbox: Sandbox, served: BrokerServer) -> None:
    """Two tenants, one on the default Defender host and one on a regional host (a loopback stand-in under
    another name): each tenant's incident calls reach its own host, and only its own."""
    default_host = sandbox.urls["defender"].removeprefix("https://")
    regional_url = sandbox.urls["defender"].replace("127.0.0.1", "localhost")
    regional_host = regional_url.removeprefix("https://")
    tenants: dict[str, Tenant] = {}
    for name, region_url in (("home-region", None), ("eu-region", regional_url)):
        directory_tenant = sandbox.directory.add_customer_tenant(name + uuid.uuid4().hex[:6])
        sandbox.incidents.seed_tenant(directory_tenant.tenant_id, 30)
        body: dict[str, object] = {"tenant_id": directory_tenant.tenant_id}
        if region_url:
            body["defender_url"] = region_url
        status, answer = put(served, name, **body)
        assert status == 200, answer
        tenants[name] = served.container.tenants.resolve(name)
    for name, own, other in (
        ("home-region", default_host, regional_host),
        ("eu-region", regional_host, default_host),
    ):
        before = (sandbox.recorder.count(f"defender.host:{own}"), sandbox.recorder.count(f"defender.host:{other}"))
        report = served.container.incidents.run(tenants[name])
        assert report.outcome == "complete", report
        assert report.stored == 30
        assert sandbox.recorder.count(f"defender.host:{own}") - before[0] == report.calls
        assert sandbox.recorder.count(f"defender.host:{other}") == before[1]
