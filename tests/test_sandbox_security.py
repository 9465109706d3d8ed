"""The Defender XDR and Graph incidents stand-ins behave like the documented services."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
import trustme
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette

from sandbox.security.apis import DEFENDER_AUDIENCE, GRAPH_AUDIENCE, create_defender_app, create_graph_app
from sandbox.security.control import SecurityControlClient, security_control_routes
from sandbox.security.timestamps import format_ticks, parse_timestamp
from sandbox.security.world import IncidentWorld
from sandbox.state import Fault, Recorder

TENANT = "8a0e3b1c-5f2d-4c6e-9b7a-1d2e3f4a5b6c"
OTHER = "f1e2d3c4-b5a6-4978-8a9b-0c1d2e3f4a5b"
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{7}Z$")
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
DEFENDER_ROLE = ["Incident.Read.All"]
GRAPH_ROLE = ["SecurityIncident.Read.All"]


def token(tid: str = TENANT, roles: list[str] | None = None, aud: str = DEFENDER_AUDIENCE, key: Any = KEY) -> str:
    now = int(time.time())
    claims = {"aud": aud, "tid": tid, "roles": roles if roles is not None else DEFENDER_ROLE, "iat": now}
    claims["exp"] = now + 3600
    return jwt.encode(claims, key, algorithm="RS256")


def verify(raw: str, audience: str) -> dict[str, Any]:
    try:
        return jwt.decode(raw, KEY.public_key(), algorithms=["RS256"], audience=audience)
    except jwt.PyJWTError as exc:
        raise ValueError(str(exc)) from exc


def auth(tid: str = TENANT, api: str = "defender", roles: list[str] | None = None) -> dict[str, str]:
    if api == "defender":
        return {"Authorization": "Bearer " + token(tid, roles if roles is not None else DEFENDER_ROLE)}
    return {"Authorization": "Bearer " + token(tid, roles if roles is not None else GRAPH_ROLE, GRAPH_AUDIENCE)}


class AsgiClient:
    """A synchronous face on httpx's ASGITransport (starlette's TestClient warns without httpx2)."""

    def __init__(self, app: Any, base_url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self._loop.run_until_complete(self._client.get(url, **kwargs))

    def __enter__(self) -> AsgiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0  # June 2025, after the seeded incidents

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world() -> IncidentWorld:
    w = IncidentWorld(clock=FakeClock())
    w.seed_tenant(TENANT, 30, seed=7)
    return w


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def defender(world: IncidentWorld, recorder: Recorder) -> Iterator[AsgiClient]:
    with AsgiClient(create_defender_app(world, recorder, verify), base_url="https://api.security.test") as c:
        yield c


@pytest.fixture
def graph(world: IncidentWorld, recorder: Recorder) -> Iterator[AsgiClient]:
    with AsgiClient(create_graph_app(world, recorder, verify), base_url="https://graph.test") as c:
        yield c


def ids(docs: list[dict[str, Any]]) -> list[int]:
    return [d["incidentId"] for d in docs]


@contextmanager
def serve(app: Any, **config: Any) -> Iterator[int]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield the port."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", ws="none", **config)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


# ---- documents -----------------------------------------------------------------------------------------


def test_seeding_is_deterministic() -> None:
    """The same tenant, seed and arguments give identical incidents; another seed gives others."""
    a = IncidentWorld().seed_tenant(TENANT, 20, seed=3, alerts_per_incident=2)
    b = IncidentWorld().seed_tenant(TENANT, 20, seed=3, alerts_per_incident=2)
    c = IncidentWorld().seed_tenant(TENANT, 20, seed=4, alerts_per_incident=2)
    assert a == b
    assert a != c
    assert all(len(i["alerts"]) == 2 for i in a)


def test_defender_documents_have_the_documented_fields(defender: AsgiClient, world: IncidentWorld) -> None:
    """Incidents, alerts, devices and entities carry Microsoft's field names, nulls and 7-digit timestamps."""
    body = defender.get("/api/incidents", headers=auth()).json()
    assert body["@odata.context"] == "https://api.security.microsoft.com/api/$metadata#Incidents"
    assert "@odata.nextLink" not in body
    inc = body["value"][0]
    assert list(inc) == [
        "incidentId",
        "redirectIncidentId",
        "incidentName",
        "createdTime",
        "lastUpdateTime",
        "assignedTo",
        "classification",
        "determination",
        "detectionSource",
        "status",
        "severity",
        "tags",
        "comments",
        "alerts",
    ]
    assert isinstance(inc["incidentId"], int)
    assert inc["status"] in {"Active", "InProgress", "Resolved", "Redirected"}
    assert inc["severity"] in {"Informational", "Low", "Medium", "High"}
    every = body["value"]
    alerts = [a for i in every for a in i["alerts"]]
    assert alerts
    assert all("lastUpdatedTime" in a and "lastUpdateTime" not in a for a in alerts)
    assert all(a["incidentId"] == i["incidentId"] for i in every for a in i["alerts"])
    for stamp in [i["createdTime"] for i in every] + [a["creationTime"] for a in alerts]:
        assert TS_RE.match(stamp), stamp
    entities = [e for a in alerts for e in a["entities"]]
    assert {len(e) for e in entities} == {31}
    assert {e["entityType"] for e in entities} >= {"User", "Ip", "File"}
    user = next(e for e in entities if e["entityType"] == "User")
    assert user["userPrincipalName"]
    assert user["sha1"] is None
    assert user["ipAddress"] is None
    device = next(d for a in alerts for d in a["devices"])
    assert {"mdatpDeviceId", "aadDeviceId", "deviceDnsName", "osPlatform", "osBuild", "riskScore"} <= set(device)
    assert every == world.truth(TENANT)


def test_graph_renders_the_same_records(graph: AsgiClient, world: IncidentWorld) -> None:
    """Graph shows the same incidents with string ids, camelCase enums and tenantId; alerts only on $expand."""
    truth = world.truth(TENANT)
    plain = graph.get("/v1.0/security/incidents", headers=auth(api="graph")).json()
    assert plain["@odata.context"] == "https://graph.microsoft.com/v1.0/$metadata#security/incidents"
    first, source = plain["value"][0], truth[0]
    assert first["id"] == str(source["incidentId"])
    assert first["tenantId"] == TENANT
    assert first["displayName"] == source["incidentName"]
    assert first["lastUpdateDateTime"] == source["lastUpdateTime"]
    assert first["createdDateTime"] == source["createdTime"]
    assert first["status"] == source["status"][0].lower() + source["status"][1:]
    assert first["severity"] == source["severity"].lower()
    assert first["incidentWebUrl"].endswith(f"/incidents/{first['id']}?tid={TENANT}")
    assert {"customTags", "systemTags"} <= set(first)
    assert all("alerts" not in i for i in plain["value"])
    expanded = graph.get("/v1.0/security/incidents?$expand=alerts", headers=auth(api="graph")).json()
    assert expanded["@odata.context"].endswith("#security/incidents(alerts())")
    got = expanded["value"][0]["alerts"]
    assert [a["id"] for a in got] == [a["alertId"] for a in source["alerts"]]
    assert all(a["incidentId"] == first["id"] and a["tenantId"] == TENANT for a in got)
    assert all(a["lastUpdateDateTime"] for a in got)


# ---- queries -------------------------------------------------------------------------------------------


def test_defender_orders_most_recent_first_unless_asked(defender: AsgiClient, world: IncidentWorld) -> None:
    """The default order is lastUpdateTime descending; $orderby=lastUpdateTime asc reverses it."""
    desc = defender.get("/api/incidents", headers=auth()).json()["value"]
    stamps = [parse_timestamp(i["lastUpdateTime"]) for i in desc]
    assert stamps == sorted(stamps, reverse=True)
    asc = defender.get("/api/incidents", params={"$orderby": "lastUpdateTime asc"}, headers=auth()).json()["value"]
    assert ids(asc) == ids(desc)[::-1]


def test_defender_filters_on_time_status_and_owner(defender: AsgiClient, world: IncidentWorld) -> None:
    """$filter on lastUpdateTime/createdTime (ge gt le lt), status and assignedTo, joined by and."""
    truth = world.truth(TENANT)
    pivot = truth[10]["lastUpdateTime"]
    p = parse_timestamp(pivot)

    def query(expr: str) -> list[int]:
        r = defender.get("/api/incidents", params={"$filter": expr}, headers=auth())
        assert r.status_code == 200, r.text
        return ids(r.json()["value"])

    def expect(pred: Any) -> list[int]:
        return [i["incidentId"] for i in truth if pred(i)]

    lu = "lastUpdateTime"
    assert query(f"{lu} ge {pivot}") == expect(lambda i: parse_timestamp(i[lu]) >= p)
    assert query(f"{lu} gt {pivot}") == expect(lambda i: parse_timestamp(i[lu]) > p)
    assert query(f"{lu} lt {pivot}") == expect(lambda i: parse_timestamp(i[lu]) < p)
    assert query(f"createdTime le {pivot}") == expect(lambda i: parse_timestamp(i["createdTime"]) <= p)
    assert query(f"{lu} ge {pivot} and status eq 'Active'") == expect(
        lambda i: parse_timestamp(i[lu]) >= p and i["status"] == "Active"
    )
    owner = next(i["assignedTo"] for i in truth if i["assignedTo"])
    assert query(f"assignedTo eq '{owner}'") == expect(lambda i: i["assignedTo"] == owner)
    # 7-digit precision is exact: one tick after the pivot excludes it.
    assert pivot not in [
        i["lastUpdateTime"]
        for i in defender.get(
            "/api/incidents", params={"$filter": f"{lu} ge {format_ticks(p + 1)}"}, headers=auth()
        ).json()["value"]
    ]


def test_graph_filters_on_its_own_field_names(graph: AsgiClient, world: IncidentWorld) -> None:
    """Graph filters lastUpdateDateTime and status (camelCase); Defender's names are refused."""
    truth = world.truth(TENANT)
    pivot = truth[5]["lastUpdateTime"]
    r = graph.get(
        "/v1.0/security/incidents",
        params={"$filter": f"lastUpdateDateTime ge {pivot} and status eq 'active'"},
        headers=auth(api="graph"),
    )
    assert r.status_code == 200
    want = [
        str(i["incidentId"])
        for i in truth
        if parse_timestamp(i["lastUpdateTime"]) >= parse_timestamp(pivot) and i["status"] == "Active"
    ]
    assert [i["id"] for i in r.json()["value"]] == want
    bad = graph.get(
        "/v1.0/security/incidents", params={"$filter": f"lastUpdateTime ge {pivot}"}, headers=auth(api="graph")
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "BadRequest"


@pytest.mark.parametrize(
    "expr",
    [
        "lastUpdateTime ge 2024-05-01T00:00:00Z or status eq 'Active'",
        "contains(assignedTo,'alex')",
        "severity eq 'High'",
        "lastUpdateTime ge '2024-05-01T00:00:00Z'",
        "lastUpdateTime ge yesterday",
        "status eq 'Sleeping'",
        "lastUpdateTime ge",
    ],
)
def test_defender_refuses_unsupported_filters(defender: AsgiClient, expr: str) -> None:
    """Syntax the API does not support is a 400 with an OData error body."""
    r = defender.get("/api/incidents", params={"$filter": expr}, headers=auth())
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "BadRequest"
    assert error["message"]
    assert error["target"]


def test_top_limits(defender: AsgiClient, graph: AsgiClient) -> None:
    """Defender allows $top up to 100, Graph up to 50, with Graph's real message beyond."""
    assert defender.get("/api/incidents?$top=100", headers=auth()).status_code == 200
    r = defender.get("/api/incidents?$top=101", headers=auth())
    assert r.status_code == 400
    assert "'100'" in r.json()["error"]["message"]
    assert graph.get("/v1.0/security/incidents?$top=50", headers=auth(api="graph")).status_code == 200
    r = graph.get("/v1.0/security/incidents?$top=100", headers=auth(api="graph"))
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith(
        "The limit of '50' for Top query has been exceeded. The value from the incoming request is '100'"
    )
    assert defender.get("/api/incidents?$top=-1", headers=auth()).status_code == 400
    assert defender.get("/api/incidents?$select=incidentId", headers=auth()).status_code == 400


# ---- paging --------------------------------------------------------------------------------------------


def test_defender_pages_by_skip_and_optionally_next_link(defender: AsgiClient, world: IncidentWorld) -> None:
    """$top/$skip walk the list; @odata.nextLink appears only when the world's switch is on."""
    got: list[int] = []
    for skip in range(0, 40, 7):
        body = defender.get(f"/api/incidents?$top=7&$skip={skip}", headers=auth()).json()
        assert "@odata.nextLink" not in body
        got += ids(body["value"])
    assert got == ids(world.truth(TENANT))

    world.defender_next_link = True
    url: str | None = "/api/incidents?$top=8&$filter=status ne 'Redirected'"
    got = []
    while url:
        body = defender.get(url, headers=auth()).json()
        got += ids(body["value"])
        url = body.get("@odata.nextLink")
    assert got == ids(world.truth(TENANT))


def test_graph_pages_with_next_link_and_expand(graph: AsgiClient, world: IncidentWorld) -> None:
    """Graph always links the next page while rows remain, keeping $expand and $filter."""
    url: str | None = "/v1.0/security/incidents?$top=12&$expand=alerts&$count=true"
    pages = []
    while url:
        body = graph.get(url, headers=auth(api="graph")).json()
        pages.append(body)
        url = body.get("@odata.nextLink")
    assert [len(p["value"]) for p in pages] == [12, 12, 6]
    assert pages[0]["@odata.count"] == 30
    assert all("alerts" in i for p in pages for i in p["value"])
    assert [i["id"] for p in pages for i in p["value"]] == [str(i) for i in ids(world.truth(TENANT))]


def test_skip_paging_over_changing_data_repeats_and_misses(defender: AsgiClient, world: IncidentWorld) -> None:
    """An update between pages moves a row to the top: $skip then repeats one row and misses the moved one."""
    before = ids(world.truth(TENANT))
    moved = before[15]
    world.on_page(TENANT, 1, lambda w: w.update_incident(TENANT, moved, assignedTo="soc@contoso.com"))
    got: list[int] = []
    for skip in (0, 10, 20):
        got += ids(defender.get(f"/api/incidents?$top=10&$skip={skip}", headers=auth()).json()["value"])
    assert moved not in got
    assert got.count(before[9]) == 2
    assert world.truth(TENANT)[0]["incidentId"] == moved
    assert world.truth(TENANT)[0]["assignedTo"] == "soc@contoso.com"


def test_queued_insert_appears_on_a_later_ascending_page(graph: AsgiClient, world: IncidentWorld) -> None:
    """A mutation queued for after page 1 is visible to a client walking ascending by lastUpdateDateTime."""
    world.queue_mutation(TENANT, 1, "add", fields={"incidentName": "Late arrival", "alerts": 1}, api="graph")
    url: str | None = "/v1.0/security/incidents?$top=10&$orderby=lastUpdateDateTime asc"
    names = []
    while url:
        body = graph.get(url, headers=auth(api="graph")).json()
        names += [i["displayName"] for i in body["value"]]
        url = body.get("@odata.nextLink")
    assert names[-1] == "Late arrival"
    assert len(names) == 31
    assert world.pages_served(TENANT, "graph") == 4


def test_merge_redirects_the_source(defender: AsgiClient, graph: AsgiClient, world: IncidentWorld) -> None:
    """A merged incident is Redirected with redirectIncidentId; its alerts move to the target."""
    source, target = ids(world.truth(TENANT))[3], ids(world.truth(TENANT))[4]
    source_alerts = len(world.truth(TENANT)[3]["alerts"])
    target_alerts = len(world.truth(TENANT)[4]["alerts"])
    world.merge(TENANT, source, target)
    doc = defender.get(f"/api/incidents/{source}", headers=auth()).json()
    assert doc["status"] == "Redirected"
    assert doc["redirectIncidentId"] == target
    assert doc["alerts"] == []
    merged = defender.get(f"/api/incidents/{target}", headers=auth()).json()
    assert len(merged["alerts"]) == source_alerts + target_alerts
    assert all(a["incidentId"] == target for a in merged["alerts"])
    r = defender.get("/api/incidents", params={"$filter": "status eq 'Redirected'"}, headers=auth())
    assert ids(r.json()["value"]) == [source]
    g = graph.get(f"/v1.0/security/incidents/{source}", headers=auth(api="graph")).json()
    assert g["status"] == "redirected"
    assert g["redirectIncidentId"] == str(target)
    assert defender.get("/api/incidents/1", headers=auth()).status_code == 404


# ---- identity ------------------------------------------------------------------------------------------


def test_bearer_is_required_and_checked(defender: AsgiClient, graph: AsgiClient) -> None:
    """No token or a bad one is 401; a token without the API's role is 403."""
    r = defender.get("/api/incidents")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "Unauthorized"
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = {"Authorization": "Bearer " + token(key=stranger)}
    assert defender.get("/api/incidents", headers=forged).status_code == 401
    assert defender.get("/api/incidents", headers=auth(api="graph")).status_code == 401  # Graph audience
    r = defender.get("/api/incidents", headers=auth(roles=["SecurityIncident.Read.All"]))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "Forbidden"
    assert defender.get("/api/incidents", headers=auth(roles=["Incident.ReadWrite.All"])).status_code == 200
    r = graph.get("/v1.0/security/incidents", headers=auth(api="graph", roles=["Incident.Read.All"]))
    assert r.status_code == 403
    r = graph.get("/v1.0/security/incidents")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "InvalidAuthenticationToken"
    assert "innerError" in r.json()["error"]


def test_the_token_tenant_decides_whose_incidents(defender: AsgiClient, world: IncidentWorld) -> None:
    """Two tenants see only their own incidents."""
    world.seed_tenant(OTHER, 3, seed=1)
    mine = ids(defender.get("/api/incidents", headers=auth()).json()["value"])
    theirs = ids(defender.get("/api/incidents", headers=auth(OTHER)).json()["value"])
    assert mine == ids(world.truth(TENANT))
    assert theirs == ids(world.truth(OTHER))
    assert not set(mine) & set(theirs)
    assert defender.get("/api/incidents", headers=auth("0bad0bad-0000-4000-8000-000000000000")).json()["value"] == []


def test_graph_can_report_a_wrong_tenant_id(graph: AsgiClient, world: IncidentWorld) -> None:
    """A confused upstream: the override puts another tenant's id on chosen incidents only."""
    victim = ids(world.truth(TENANT))[2]
    world.set_tenant_id_override(TENANT, OTHER, [victim])
    body = graph.get("/v1.0/security/incidents?$expand=alerts", headers=auth(api="graph")).json()
    wrong = [i["id"] for i in body["value"] if i["tenantId"] != TENANT]
    assert wrong == [str(victim)]
    assert all(a["tenantId"] == OTHER for i in body["value"] if i["id"] == str(victim) for a in i["alerts"])


# ---- quotas --------------------------------------------------------------------------------------------


def test_defender_429_after_fifty_a_minute(defender: AsgiClient, world: IncidentWorld) -> None:
    """The 51st call in a minute gets Microsoft's 429 body and no Retry-After; a minute later calls pass."""
    clock = world.clock
    assert isinstance(clock, FakeClock)
    for _ in range(50):
        assert defender.get("/api/incidents?$top=1", headers=auth()).status_code == 200
        clock.now += 0.1
    r = defender.get("/api/incidents?$top=1", headers=auth())
    assert r.status_code == 429
    assert "retry-after" not in r.headers
    error = r.json()["error"]
    assert error["code"] == "429"
    assert error["message"] == "API calls quota exceeded! maximum allowed 50 per 00:01:00"
    assert re.fullmatch(r"[0-9a-f-]{36}", error["target"])
    assert world.throttled_count(TENANT, "defender") == 1
    assert world.max_calls_in_window(TENANT, "defender", 60) == 51
    clock.now += 61
    assert defender.get("/api/incidents?$top=1", headers=auth()).status_code == 200
    assert len(world.call_times(TENANT, "defender")) == 52
    # The other tenant has its own budget.
    assert defender.get("/api/incidents?$top=1", headers=auth(OTHER)).status_code == 200


def test_hourly_and_per_tenant_limits(defender: AsgiClient, world: IncidentWorld) -> None:
    """Limits are configurable per tenant; the hourly message names the hour window."""
    clock = world.clock
    assert isinstance(clock, FakeClock)
    world.set_rate_limits("defender", [(50, 60), (3, 3600)], tenant_id=TENANT)
    for _ in range(3):
        assert defender.get("/api/incidents?$top=1", headers=auth()).status_code == 200
        clock.now += 120
    r = defender.get("/api/incidents?$top=1", headers=auth())
    assert r.status_code == 429
    assert r.json()["error"]["message"] == "API calls quota exceeded! maximum allowed 3 per 01:00:00"
    assert defender.get("/api/incidents?$top=1", headers=auth(OTHER)).status_code == 200
    world.set_rate_limits("defender", None, tenant_id=TENANT)
    clock.now += 3600
    assert defender.get("/api/incidents?$top=1", headers=auth()).status_code == 200


def test_graph_429_has_retry_after(graph: AsgiClient, world: IncidentWorld) -> None:
    """Graph refuses the 151st call in a minute with TooManyRequests and Retry-After."""
    clock = world.clock
    assert isinstance(clock, FakeClock)
    world.set_rate_limits("graph", [(150, 60)])
    for _ in range(150):
        assert graph.get("/v1.0/security/incidents?$top=1", headers=auth(api="graph")).status_code == 200
    clock.now += 20
    r = graph.get("/v1.0/security/incidents?$top=1", headers=auth(api="graph"))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "40"
    body = r.json()["error"]
    assert body["code"] == "TooManyRequests"
    assert body["message"] == "Too many requests."
    assert "request-id" in body["innerError"]


# ---- recorder, size, transport -------------------------------------------------------------------------


def test_faults_latency_and_counters(defender: AsgiClient, graph: AsgiClient, recorder: Recorder) -> None:
    """An injected fault is served first; every answered request is counted per service and tenant."""
    recorder.inject(Fault("defender", 503, body='{"error":"down"}', path_contains="/api/incidents", times=1))
    assert defender.get("/api/incidents", headers=auth()).status_code == 503
    assert defender.get("/api/incidents", headers=auth()).status_code == 200
    assert graph.get("/v1.0/security/incidents", headers=auth(api="graph")).status_code == 200
    assert defender.get("/api/incidents").status_code == 401
    assert recorder.count("defender.incidents") == 3
    assert recorder.count(f"defender.incidents:{TENANT}") == 2
    assert recorder.count(f"graph.incidents:{TENANT}") == 1


def test_an_incident_with_500_alerts(defender: AsgiClient, graph: AsgiClient, world: IncidentWorld) -> None:
    """A 500-alert incident (about 2 MB) is served whole by both APIs."""
    big = world.add_incident(TENANT, alerts=500, incidentName="Alert storm")
    r = defender.get(f"/api/incidents/{big['incidentId']}", headers=auth())
    assert r.status_code == 200
    assert len(r.content) > 1_500_000
    assert len(r.json()["alerts"]) == 500
    page = defender.get("/api/incidents?$top=1", headers=auth()).json()["value"]
    assert page[0]["incidentName"] == "Alert storm"
    g = graph.get(f"/v1.0/security/incidents/{big['incidentId']}?$expand=alerts", headers=auth(api="graph"))
    assert len(g.json()["alerts"]) == 500


def test_over_tls_and_driven_through_the_control_routes(world: IncidentWorld, recorder: Recorder) -> None:
    """Over a real TLS socket the API answers what the control client arranged from outside."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    control_app = Starlette(routes=security_control_routes(world))
    with (
        leaf.private_key_and_cert_chain_pem.tempfile() as pem,
        serve(create_defender_app(world, recorder, verify), ssl_certfile=pem, ssl_keyfile=pem) as api_port,
        serve(control_app) as control_port,
        SecurityControlClient(f"http://127.0.0.1:{control_port}") as control,
    ):
        control.reset()
        start = datetime(2025, 1, 1, tzinfo=UTC)
        seeded = control.seed_tenant(TENANT, 5, seed=9, alerts_per_incident=1, start=start)
        assert seeded == IncidentWorld().seed_tenant(TENANT, 5, seed=9, alerts_per_incident=1, start=start)
        added = control.add_incident(TENANT, incidentName="From outside", lastUpdateTime=start + timedelta(days=1))
        control.update_incident(TENANT, seeded[0]["incidentId"], status="Resolved")
        control.set_defender_next_link(True)
        control.set_rate_limits("defender", [(3, 60)], tenant_id=TENANT)
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with httpx.Client(base_url=f"https://127.0.0.1:{api_port}", verify=context, trust_env=False) as client:
            first = client.get("/api/incidents?$top=4", headers=auth())
            assert first.status_code == 200
            body = first.json()
            assert ids(body["value"])[:2] == [seeded[0]["incidentId"], added["incidentId"]]
            assert body["value"][0]["status"] == "Resolved"
            assert body["@odata.nextLink"].startswith(f"https://127.0.0.1:{api_port}/api/incidents?")
            second = client.get(body["@odata.nextLink"], headers=auth()).json()
            assert "@odata.nextLink" not in second
            assert ids(body["value"]) + ids(second["value"]) == ids(control.truth(TENANT))
            control.queue_mutation(
                TENANT, 1, "update", incident_id=added["incidentId"], changes={"severity": "High"}, api="defender"
            )
            assert client.get("/api/incidents", headers=auth()).status_code == 200
            assert client.get("/api/incidents", headers=auth()).status_code == 429
        stats = control.call_stats(TENANT, "defender")
        assert stats["calls"] == 4
        assert stats["throttled"] == 1
        assert stats["max_per_minute"] == 4
        assert control.truth(TENANT)[0]["incidentId"] == added["incidentId"]
        assert control.truth(TENANT)[0]["severity"] == "High"
        control.set_tenant_id_override(TENANT, OTHER)
        with AsgiClient(create_graph_app(world, recorder, verify), "https://graph.test") as graph:
            incidents = graph.get("/v1.0/security/incidents", headers=auth(api="graph")).json()["value"]
            assert {i["tenantId"] for i in incidents} == {OTHER}
        bad = httpx.post(
            f"http://127.0.0.1:{control_port}/_sandbox/security/tenants/{TENANT}/incidents",
            content=json.dumps({"nonsense": 1}),
            trust_env=False,
        )
        assert bad.status_code == 400
