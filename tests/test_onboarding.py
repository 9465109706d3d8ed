"""Onboarding end to end: the consent link, the administrator's browser through the Entra stand-in and back
to the broker's callback, every way that answer can be wrong, tenant health and readiness."""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import DEFENDER, GRAPH, BrokerServer, build_container, loopback_socket

from broker import wiring
from broker.changes import CLI_OPERATOR
from broker.consent import ConsentStates
from broker.errors import BrokerError
from sandbox.directory import Tenant as SandboxTenant
from sandbox.server import Sandbox
from sandbox.state import Fault

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.fixture
def broker(sandbox: Sandbox, azurite: str) -> Iterator[BrokerServer]:
    """A broker whose consent redirect URI is its own callback, registered on the sandbox's app."""
    sock = loopback_socket()
    callback = f"http://127.0.0.1:{sock.getsockname()[1]}/api/consent/callback"
    sandbox.directory.add_redirect_uri(callback)
    server = BrokerServer(build_container(sandbox, azurite, CONSENT_REDIRECT_URI=callback), sock=sock).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser(sandbox: Sandbox) -> Iterator[httpx.Client]:
    """What the administrator uses: follows redirects, trusts the sandbox's CA, asks for HTML."""
    with httpx.Client(
        verify=ssl.create_default_context(cafile=sandbox.ca_bundle),
        trust_env=False,
        follow_redirects=True,
        headers={"Accept": BROWSER_ACCEPT},
    ) as client:
        yield client


def newcomer(sandbox: Sandbox) -> SandboxTenant:
    tenant = sandbox.directory.add_customer_tenant("n" + uuid.uuid4().hex[:10], consented=False, roles={})
    sandbox.incidents.seed_tenant(tenant.tenant_id, 2)
    return tenant


def state_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["state"][0]


def test_consent_round_trip_onboards_the_tenant_and_tokens_work_at_once(
    sandbox: Sandbox, broker: BrokerServer, browser: httpx.Client
) -> None:
    """Pending tenant, link, the administrator approves in Entra ID, the browser lands on the callback: the
    doctor passes, the tenant is onboarded, and a token is issued at once although MSAL holds the earlier
    "not consented" 400 for 60 s (the tenant's MSAL app was rebuilt)."""
    customer = newcomer(sandbox)
    created = broker.client.post("/api/admin/tenants", json={"name": "acme", "tenant_id": customer.tenant_id})
    assert created.status_code == 201, created.text
    assert (created.json()["tenant"], created.json()["onboarding"]) == ("acme", "pending")
    link_url = created.json()["consent_url"]
    parts = urlsplit(link_url)
    assert (
        f"{parts.scheme}://{parts.netloc}{parts.path}"
        == f"{sandbox.urls['entra']}/{customer.tenant_id}/v2.0/adminconsent"
    )
    query = parse_qs(parts.query)
    assert query["client_id"] == [sandbox.directory.broker.client_id]
    assert query["scope"] == [DEFENDER]
    assert query["redirect_uri"] == [f"{broker.url}/api/consent/callback"]
    refused = broker.token("acme")
    assert refused.status_code == 409
    assert refused.json()["code"] == "consent_required"

    page = browser.get(link_url)
    assert [r.status_code for r in page.history] == [302]
    assert page.url.path == "/api/consent/callback"
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<h1>Consent received</h1>" in page.text
    assert "<script" not in page.text.lower()
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["cache-control"] == "no-store"
    assert customer.tenant_id in page.text

    assert broker.container.tenants.resolve("acme").onboarding == "onboarded"
    issued = broker.token("acme", DEFENDER)
    assert issued.status_code == 200, issued.text
    assert broker.token("acme", GRAPH).status_code == 200
    health = broker.container.health.view()[customer.tenant_id]
    assert health.consent == "granted"
    assert health.consecutive_failures == 0

    replay = browser.get(str(page.url))
    assert replay.status_code == 409
    assert "already used" in replay.text


def test_the_callback_answers_json_when_the_client_asks(
    sandbox: Sandbox, broker: BrokerServer, browser: httpx.Client
) -> None:
    """Accept: application/json gets the outcome and the doctor's steps; failures as problem+json."""
    customer = newcomer(sandbox)
    _, link = broker.container.onboarding.start("jsonco", customer.tenant_id, api="graph", by=CLI_OPERATOR)
    assert parse_qs(urlsplit(link.url).query)["scope"] == [GRAPH]
    reply = browser.get(link.url, headers={"Accept": "application/json"})
    assert reply.status_code == 200
    body = reply.json()
    assert (body["outcome"], body["tenant"], body["tenant_id"]) == ("onboarded", "jsonco", customer.tenant_id)
    assert body["doctor"]["ok"] is True
    assert [s["step"] for s in body["doctor"]["steps"]][-1] == "probe"
    again = browser.get(str(reply.url), headers={"Accept": "application/json"})
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert again.json()["code"] == "consent_state_used"


@pytest.mark.parametrize(
    ("answer", "error", "title"),
    [
        ("decline", "access_denied", "Consent was declined"),
        ("consent_required", "consent_required", "Your account cannot consent for the organization"),
    ],
)
def test_a_refusal_is_reported_and_the_tenant_stays_pending(
    sandbox: Sandbox, broker: BrokerServer, browser: httpx.Client, answer: str, error: str, title: str
) -> None:
    """Entra's error redirect: a page that says what happened and what next; nothing onboarded."""
    customer = newcomer(sandbox)
    sandbox.directory.set_admin_answer(customer.tenant_id, answer)
    _, link = broker.container.onboarding.start("refuser", customer.tenant_id, by=CLI_OPERATOR)
    page = browser.get(link.url)
    assert page.status_code == 200
    assert f"<h1>{title}</h1>" in page.text
    assert "AADSTS65004" in page.text
    assert broker.container.tenants.resolve("refuser").onboarding == "pending"
    assert broker.container.health.view()[customer.tenant_id].consent == "refused"
    _, second = broker.container.onboarding.start("refuser", customer.tenant_id, by=CLI_OPERATOR)
    body = browser.get(second.url, headers={"Accept": "application/json"}).json()
    assert (body["outcome"], body["error"], body["aadsts"]) == ("refused", error, "AADSTS65004")


def test_a_state_that_cannot_be_trusted_is_refused_with_its_code(
    sandbox: Sandbox, broker: BrokerServer, browser: httpx.Client
) -> None:
    """Missing, altered, expired or replayed state, another tenant, or no answer at all: 4xx, nothing changes."""
    customer = newcomer(sandbox)
    other = newcomer(sandbox)
    _, link = broker.container.onboarding.start("target", customer.tenant_id, by=CLI_OPERATOR)
    state = state_of(link.url)
    altered = state[:-3] + ("AAA" if not state.endswith("AAA") else "BBB")
    expired, _ = ConsentStates(
        lambda: broker.container.storage.table("consent"), ttl_seconds=60, clock=lambda: time.time() - 3600
    ).issue("target", customer.tenant_id)
    success = {"admin_consent": "True", "tenant": customer.tenant_id, "scope": DEFENDER}
    cases = [
        ({**success}, 400, "consent_state_missing"),
        ({**success, "state": altered}, 400, "consent_state_invalid"),
        ({**success, "state": "not-a-state"}, 400, "consent_state_invalid"),
        ({**success, "state": expired}, 400, "consent_state_expired"),
        ({**success, "tenant": other.tenant_id, "state": state}, 400, "consent_tenant_mismatch"),
        ({**success, "state": state}, 409, "consent_state_used"),  # the mismatch spent it
    ]
    for params, status, code in cases:
        reply = broker.client.get("/api/consent/callback", params=params, headers={"Accept": "application/json"})
        assert (reply.status_code, reply.json()["code"]) == (status, code), params
        html = broker.client.get("/api/consent/callback", params=params, headers={"Accept": BROWSER_ACCEPT})
        assert html.status_code in (status, 409)
        assert html.headers["content-type"].startswith("text/html")
    _, fresh = broker.container.onboarding.start("target", customer.tenant_id, by=CLI_OPERATOR)
    bare = broker.client.get("/api/consent/callback", params={"state": state_of(fresh.url)})
    assert bare.status_code == 400
    assert "consent_answer_invalid" in bare.text
    assert broker.container.tenants.resolve("target").onboarding == "pending"
    assert not customer.consented


def test_the_page_escapes_whatever_the_answer_carries(
    sandbox: Sandbox, broker: BrokerServer, browser: httpx.Client
) -> None:
    """Markup in error and error_description never reaches the page as markup."""
    customer = newcomer(sandbox)
    _, link = broker.container.onboarding.start("escaper", customer.tenant_id, by=CLI_OPERATOR)
    params = {
        "state": state_of(link.url),
        "error": "<img src=x onerror=alert(1)>",
        "error_description": "AADSTS65004: <script>alert(1)</script> Correlation ID: <b>x</b>",
        "admin_consent": "True",
    }
    page = broker.client.get("/api/consent/callback", params=params, headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 200
    assert "<img" not in page.text
    assert "<script" not in page.text
    assert "<b>" not in page.text
    assert "Consent did not complete" in page.text


def test_health_shows_revoked_consent_after_one_failed_attempt_and_no_write_per_request(
    sandbox: Sandbox, broker: BrokerServer, browser: httpx.Client
) -> None:
    """Cached tokens write nothing; the first miss after revocation shows "revoked" in storage."""
    customer = newcomer(sandbox)
    _, link = broker.container.onboarding.start("revoker", customer.tenant_id, by=CLI_OPERATOR)
    assert browser.get(link.url).status_code == 200
    broker.container.health.flush()
    writes = broker.container.health.writes
    for _ in range(200):
        assert broker.token("revoker", DEFENDER).status_code == 200
    broker.container.health.flush()
    assert broker.container.health.writes == writes
    sandbox.directory.revoke_consent(customer.tenant_id)
    broker.container.issuer.evict(customer.tenant_id)  # as when the cached token nears its end
    failed = broker.token("revoker", DEFENDER)
    assert failed.json()["code"] == "consent_required"
    broker.container.health.flush()
    other_instance = wiring.build(broker.container.settings, bind_host="127.0.0.1")
    try:
        seen = other_instance.health.view()[customer.tenant_id]
    finally:
        other_instance.close()
    assert (seen.consent, seen.consecutive_failures, seen.last_failure_code) == ("revoked", 1, "consent_required")


def test_readiness_names_what_failed_and_is_cached(sandbox: Sandbox, broker: BrokerServer) -> None:
    """Key Vault failing: 503 not_ready naming key_vault; asked again within the TTL, no new vault call."""
    sandbox.recorder.inject(Fault(service="kv", status=500, times=None))
    first = broker.client.get("/api/health/ready")
    assert first.status_code == 503
    body = first.json()
    assert body["code"] == "not_ready"
    assert body["failed"] == ["key_vault"]
    assert body["checks"]["storage"]["ok"] is True
    assert body["checks"]["authority"]["ok"] is True
    vault_calls = sandbox.recorder.total("kv")
    for _ in range(20):
        assert broker.client.get("/api/health/ready").status_code == 503
    assert sandbox.recorder.total("kv") == vault_calls
    sandbox.recorder.clear_faults()
    sandbox.recorder.inject(Fault(service="entra", status=503, path_contains="openid-configuration", times=None))
    broker.container.readiness.ttl = 0
    second = broker.client.get("/api/health/ready")
    assert second.status_code == 503
    assert second.json()["failed"] == ["authority"]
    sandbox.recorder.clear_faults()
    ready = broker.client.get("/api/health/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert set(ready.json()["checks"]) == {"key_vault", "storage", "authority"}
    assert broker.client.get("/api/health").json() == {"status": "ok"}


def test_admin_routes_create_pending_tenants_run_the_doctor_and_show_health(
    sandbox: Sandbox, broker: BrokerServer, browser: httpx.Client
) -> None:
    """Bad bodies are 400 before anything is written; the doctor route reports steps; the list shows health."""
    for body in (
        {"name": "x"},
        {"name": "bad name", "tenant_id": str(uuid.uuid4())},
        {"name": "ok", "tenant_id": "nope"},
    ):
        reply = broker.client.post("/api/admin/tenants", json=body)
        assert reply.status_code == 400, body
        assert reply.headers["content-type"] == "application/problem+json"
    assert broker.container.tenants.all() == []
    customer = newcomer(sandbox)
    link = broker.client.post("/api/admin/tenants", json={"name": "docco", "tenant_id": customer.tenant_id})
    before = broker.client.post("/api/admin/tenants/docco/doctor", json={}).json()
    assert before["ok"] is False
    failed = [s for s in before["steps"] if s["status"] == "fail"]
    assert failed[0]["step"] == f"token {DEFENDER}"
    assert failed[0]["code"] == "consent_required"
    assert "consent" in failed[0]["fix"]
    assert browser.get(link.json()["consent_url"]).status_code == 200
    after = broker.client.post("/api/admin/tenants/docco/doctor", json={}).json()
    assert after["ok"] is True
    assert [s["status"] for s in after["steps"]] == ["pass"] * 9
    listed = broker.client.get("/api/admin/tenants").json()["tenants"]
    row = next(t for t in listed if t["tenant"] == "docco")
    assert row["onboarding"] == "onboarded"
    assert row["health"]["consent"] == "granted"
    assert row["health"]["healthy"] is True
    fresh = broker.client.post("/api/admin/tenants/docco/consent-link", json={})
    assert fresh.status_code == 200
    assert state_of(fresh.json()["consent_url"]) != state_of(link.json()["consent_url"])
    records, _ = broker.container.audit.query(
        datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC), tenant=customer.tenant_id, limit=100
    )
    reasons = {r["reason"] for r in records}
    assert {"tenant_add", "tenant_onboarded"} <= reasons


def test_without_a_redirect_uri_no_pending_tenant_is_created(sandbox: Sandbox, azurite: str) -> None:
    """No WEBSITE_HOSTNAME and no CONSENT_REDIRECT_URI: 503 not_configured naming them; nothing registered."""
    server = BrokerServer(build_container(sandbox, azurite)).start()
    try:
        reply = server.client.post("/api/admin/tenants", json={"name": "nowhere", "tenant_id": str(uuid.uuid4())})
        assert reply.status_code == 503
        assert reply.json()["code"] == "not_configured"
        assert "WEBSITE_HOSTNAME" in reply.json()["detail"]
        assert server.container.tenants.all() == []
    finally:
        server.stop()


def test_a_sync_reports_to_tenant_health(sandbox: Sandbox, broker: BrokerServer, browser: httpx.Client) -> None:
    """A sync the incident API refuses (403) marks the tenant failing with role_missing; the next good one heals it."""
    customer = newcomer(sandbox)
    link = broker.client.post("/api/admin/tenants", json={"name": "syncer", "tenant_id": customer.tenant_id})
    assert browser.get(link.json()["consent_url"]).status_code == 200
    tenant = broker.container.tenants.resolve("syncer")
    sandbox.recorder.inject(Fault(service="defender", status=403, times=None))
    with pytest.raises(BrokerError):
        broker.container.incidents.run(tenant)
    failing = broker.container.health.local(customer.tenant_id)
    assert failing is not None
    assert (failing.last_failure_code, failing.last_failure_source) == ("role_missing", "sync")
    assert failing.consent == "role_missing"
    sandbox.recorder.clear_faults()
    assert broker.container.incidents.run(tenant).outcome == "complete"
    healed = broker.container.health.local(customer.tenant_id)
    assert healed is not None
    assert (healed.healthy, healed.consent, healed.consecutive_failures) == (True, "granted", 0)


def test_consent_whose_check_fails_leaves_the_tenant_pending_and_says_so(
    sandbox: Sandbox, broker: BrokerServer, browser: httpx.Client
) -> None:
    """Consent granted but the probe refused (403): the page says the check has not passed, the JSON names the
    failing step and its fix, and the tenant stays pending until a doctor run passes."""
    customer = newcomer(sandbox)
    created = broker.client.post("/api/admin/tenants", json={"name": "slowpoke", "tenant_id": customer.tenant_id})
    sandbox.recorder.inject(Fault(service="defender", status=403, times=None))
    page = browser.get(created.json()["consent_url"])
    assert page.status_code == 200
    assert "<h1>Consent received; the check has not passed yet</h1>" in page.text
    assert "role_missing" in page.text
    assert broker.container.tenants.resolve("slowpoke").onboarding == "pending"
    again = broker.client.post("/api/admin/tenants/slowpoke/consent-link", json={}).json()["consent_url"]
    body = browser.get(again, headers={"Accept": "application/json"}).json()
    assert body["outcome"] == "consented"
    failing = [s for s in body["doctor"]["steps"] if s["status"] == "fail"]
    assert [s["step"] for s in failing] == ["probe"]
    assert failing[0]["fix"]
    sandbox.recorder.clear_faults()
    assert broker.client.post("/api/admin/tenants/slowpoke/doctor", json={}).json()["ok"] is True
    assert broker.container.tenants.resolve("slowpoke").onboarding == "onboarded"
