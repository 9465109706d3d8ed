"""POST /api/token end to end: real HTTP, real MSAL, azure-identity and Key Vault SDKs, against the sandbox."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from conftest import DEFENDER, GRAPH, BrokerServer, decode_claims, start_broker

from broker.tokens import NEGATIVE_CACHE_SECONDS, IdentityHttpClient, TokenIssuer
from sandbox.server import Sandbox
from sandbox.state import Fault


class ShiftedClock:
    """Wall-clock time moved forward by ``offset`` seconds: the issuer's ``clock=`` seam."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def new_tenant(sandbox: Sandbox, broker: BrokerServer, **kwargs: object) -> tuple[str, str]:
    """A fresh customer tenant in the sandbox, registered with the broker: (name, guid)."""
    name = "t" + uuid.uuid4().hex[:10]
    tenant = sandbox.directory.add_customer_tenant(name, **kwargs)  # type: ignore[arg-type]
    broker.container.tenants.add(name, tenant.tenant_id)
    return name, tenant.tenant_id


def problem(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = dict(response.json())
    assert body["code"] == code
    assert body["status"] == status
    return body


# -- issuing ---------------------------------------------------------------------------------------------


def test_a_token_is_issued_for_the_tenant_and_scope_asked(broker: BrokerServer, sandbox: Sandbox) -> None:
    """The reply is OAuth-shaped, not cacheable, and the token is an app-only token for that tenant."""
    name, tid = new_tenant(sandbox, broker)
    response = broker.token(name, GRAPH)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "expires_on", "tenant_id", "scope"}
    assert body["token_type"] == "Bearer"
    assert body["tenant_id"] == tid
    assert body["scope"] == GRAPH
    assert 3000 < body["expires_in"] <= 3599
    assert abs(body["expires_on"] - (time.time() + body["expires_in"])) < 5
    claims = decode_claims(body["access_token"])
    assert claims["tid"] == tid
    assert claims["aud"] == "https://graph.microsoft.com"
    assert claims["appid"] == sandbox.directory.broker.client_id
    assert "SecurityIncident.Read.All" in claims["roles"]


def test_the_tenant_guid_works_as_well_as_its_name(broker: BrokerServer, sandbox: Sandbox) -> None:
    name, tid = new_tenant(sandbox, broker)
    by_name = broker.token(name).json()
    by_guid = broker.token(tid.upper()).json()
    assert by_name["access_token"] == by_guid["access_token"]


def test_a_repeated_request_is_served_from_cache(broker: BrokerServer, sandbox: Sandbox) -> None:
    """The second request for the same tenant and scope makes no identity-provider call."""
    name, tid = new_tenant(sandbox, broker)
    first = broker.token(name).json()
    calls = sandbox.recorder.count(f"entra.token:{tid}")
    second = broker.token(name).json()
    assert second["access_token"] == first["access_token"]
    assert sandbox.recorder.count(f"entra.token:{tid}") == calls == 1


@pytest.mark.slow
def test_200_concurrent_cold_requests_make_one_token_request(broker: BrokerServer, sandbox: Sandbox) -> None:
    """Single flight: MSAL alone would send one POST per concurrent miss."""
    name, tid = new_tenant(sandbox, broker)
    sandbox.recorder.set_latency("entra", 0.2)

    def ask(_: int) -> tuple[int, str]:
        with httpx.Client(base_url=broker.url, timeout=60, trust_env=False) as client:
            r = client.post("/api/token", json={"tenant": name, "scope": DEFENDER})
            return r.status_code, r.json().get("access_token", "")

    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(ask, range(200)))
    assert {status for status, _ in results} == {200}
    assert len({token for _, token in results}) == 1
    assert sandbox.recorder.count(f"entra.token:{tid}") == 1


def test_min_ttl_forces_a_fresh_token(broker: BrokerServer, sandbox: Sandbox) -> None:
    """A cached token that would expire within min_ttl_seconds is never handed out."""
    name, tid = new_tenant(sandbox, broker)
    sandbox.directory.token_lifetime = 600
    try:
        short = broker.token(name).json()
        assert short["expires_in"] <= 600
        assert broker.token(name).json()["access_token"] == short["access_token"]
    finally:
        sandbox.directory.token_lifetime = 3599
    fresh = broker.token(name, min_ttl_seconds=1200).json()
    assert fresh["access_token"] != short["access_token"]
    assert fresh["expires_in"] >= 1200
    assert sandbox.recorder.count(f"entra.token:{tid}") == 2


def test_a_claims_challenge_skips_the_caches_and_reaches_entra(broker: BrokerServer, sandbox: Sandbox) -> None:
    """A request with ``claims`` (a resource's challenge) is answered by Entra ID, not from memory or MSAL's
    cache; Entra gets the claims, and the new token is the one served afterwards."""
    name, tid = new_tenant(sandbox, broker)
    first = broker.token(name).json()
    claims = json.dumps({"access_token": {"nbf": {"essential": True, "value": "1700000000"}}})
    challenged = broker.token(name, claims=claims).json()
    assert challenged["access_token"] != first["access_token"]
    assert sandbox.recorder.count(f"entra.token:{tid}") == 2
    assert sandbox.recorder.count(f"entra.token.claims:{tid}") == 1
    assert broker.token(name).json()["access_token"] == challenged["access_token"]
    assert sandbox.recorder.count(f"entra.token:{tid}") == 2


# -- the token validation step -------------------------------------------------------------------------


def test_a_token_without_the_scope_role_is_refused(broker: BrokerServer, sandbox: Sandbox) -> None:
    """A tenant consented without Incident.Read.All gets role_missing naming the permission, not a token."""
    name, _ = new_tenant(sandbox, broker, roles={"https://graph.microsoft.com": ["SecurityIncident.Read.All"]})
    body = problem(broker.token(name, DEFENDER), 409, "role_missing")
    assert body["missing_role"] == "Incident.Read.All"
    assert "Incident.Read.All" in str(body["detail"])
    assert "access_token" not in body


def test_a_token_for_another_tenant_is_refused(broker: BrokerServer, sandbox: Sandbox) -> None:
    """If Entra ever answered with another tenant's token, the broker would not pass it on."""
    name, _ = new_tenant(sandbox, broker)
    _, other = new_tenant(sandbox, broker)
    wrong = sandbox.directory.mint_access_token(
        tenant_id=other,
        audience="https://api.security.microsoft.com",
        client_id=sandbox.directory.broker.client_id,
        roles=["Incident.Read.All"],
    )
    body = f'{{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"{wrong}"}}'
    sandbox.recorder.inject(Fault("entra", 200, body, path_contains="/oauth2/v2.0/token"))
    response = broker.token(name)
    problem(response, 502, "token_mismatch")
    assert wrong not in response.text


# -- upstream failures ---------------------------------------------------------------------------------


def test_missing_consent_gives_the_admin_consent_link(broker: BrokerServer, sandbox: Sandbox) -> None:
    name, tid = new_tenant(sandbox, broker, consented=False)
    body = problem(broker.token(name), 409, "consent_required")
    client_id = sandbox.directory.broker.client_id
    assert body["consent_url"] == f"{sandbox.env()['AUTHORITY_HOST']}/{tid}/adminconsent?client_id={client_id}"
    assert "AADSTS" not in str(body)


def test_consent_granted_later_is_picked_up_without_a_restart(sandbox: Sandbox, azurite: str) -> None:
    """MSAL replays a 400 for 60 s; the broker drops that tenant's MSAL app so consent takes effect sooner:
    a refusal is answered from memory for NEGATIVE_CACHE_SECONDS of the issuer's clock, then asked again."""
    clock = ShiftedClock()
    server = start_broker(sandbox, azurite, clock=clock)
    try:
        name, tid = new_tenant(sandbox, server, consented=False)
        problem(server.token(name), 409, "consent_required")
        problem(server.token(name), 409, "consent_required")
        assert sandbox.recorder.count(f"entra.token:{tid}") == 1, "a refused tenant is answered from memory"
        sandbox.directory.grant_consent(tid)
        problem(server.token(name), 409, "consent_required")  # still inside the pause
        clock.offset += NEGATIVE_CACHE_SECONDS + 1
        assert server.token(name).status_code == 200
        assert sandbox.recorder.count(f"entra.token:{tid}") == 2
    finally:
        server.stop()


def test_a_tenant_entra_does_not_know(broker: BrokerServer, sandbox: Sandbox) -> None:
    broker.container.tenants.add("ghost", str(uuid.uuid4()))
    body = problem(broker.token("ghost"), 409, "tenant_not_found")
    assert "AADSTS" not in str(body)


def test_entra_throttling_becomes_503_with_retry_after(broker: BrokerServer, sandbox: Sandbox) -> None:
    """Entra's 429 has a plain-text body (MSAL cannot parse it); the caller gets 503 and the Retry-After."""
    name, _ = new_tenant(sandbox, broker)
    sandbox.recorder.inject(
        Fault(
            "entra",
            429,
            "Too Many Requests",
            content_type="text/plain",
            headers={"Retry-After": "17"},
            path_contains="/oauth2/v2.0/token",
        )
    )
    response = broker.token(name)
    body = problem(response, 503, "upstream_throttled")
    assert response.headers["retry-after"] == "17"
    assert body["retry_after"] == 17


@pytest.mark.parametrize("status", [500, 503])
def test_entra_errors_become_503(broker: BrokerServer, sandbox: Sandbox, status: int) -> None:
    name, _ = new_tenant(sandbox, broker)
    sandbox.recorder.inject(Fault("entra", status, '{"error":"server_error"}', path_contains="/oauth2/v2.0/token"))
    response = broker.token(name)
    problem(response, 503, "upstream_unavailable")
    assert int(response.headers["retry-after"]) >= 1


def test_an_entra_timeout_becomes_503(broker: BrokerServer, sandbox: Sandbox) -> None:
    name, _ = new_tenant(sandbox, broker)
    c = broker.container
    broker.container.issuer = TokenIssuer(
        client_id=c.settings.broker_client_id,
        authority_host=c.settings.authority_host,
        credentials=c.credentials,
        scope_roles=c.settings.scope_roles,
        http_client=IdentityHttpClient(timeout=0.3),
    )
    sandbox.recorder.inject(Fault("entra", 200, "{}", path_contains="/oauth2/v2.0/token", delay_seconds=1.0))
    problem(broker.token(name), 503, "upstream_unavailable")


def test_a_wrong_secret_is_reread_once_then_refused(broker: BrokerServer, sandbox: Sandbox) -> None:
    """AADSTS7000215: the broker re-reads the vault once (it may have been rotated), then gives up."""
    name, _ = new_tenant(sandbox, broker)
    good = sandbox.directory.client_secret()
    assert good is not None
    sandbox.directory.set_secret(sandbox.directory.client_secret_name, "not-the-secret")
    try:
        reads = sandbox.recorder.count("kv.get")
        response = broker.token(name)
        problem(response, 502, "credential_rejected")
        assert sandbox.recorder.count("kv.get") == reads + 2
        assert "not-the-secret" not in response.text
    finally:
        sandbox.directory.set_secret(sandbox.directory.client_secret_name, good)


@pytest.fixture
def vault_down(sandbox: Sandbox) -> Iterator[None]:
    sandbox.recorder.inject(Fault("kv", 503, '{"error":{"code":"ServiceUnavailable"}}', times=None))
    yield
    sandbox.recorder.clear_faults()


def test_an_unreachable_vault_is_503_credential_unavailable(sandbox: Sandbox, azurite: str, vault_down: None) -> None:
    server = start_broker(sandbox, azurite)
    try:
        response = server.token("contoso")
        problem(response, 503, "credential_unavailable")
        assert sandbox.recorder.count("entra.token:" + sandbox.directory.tenant("contoso").tenant_id) >= 0
    finally:
        server.stop()


def test_a_credential_in_memory_keeps_serving_when_the_vault_goes_away(sandbox: Sandbox, azurite: str) -> None:
    """Cached tokens and the cached secret keep the broker issuing through a Key Vault outage."""
    server = start_broker(sandbox, azurite, SECRET_REFRESH_SECONDS="1")
    try:
        assert server.token("contoso").status_code == 200
        sandbox.recorder.inject(Fault("kv", 503, "{}", times=None))
        time.sleep(1.1)  # the secret is due for a re-read, which fails
        assert server.token("contoso").status_code == 200  # cached token
        assert server.token("fabrikam").status_code == 200  # new token, secret from memory
    finally:
        sandbox.recorder.clear_faults()
        server.stop()


# -- rotation -------------------------------------------------------------------------------------------


def test_a_rotated_secret_is_used_after_the_refresh_interval(sandbox: Sandbox, azurite: str) -> None:
    """New vault version + old app secret revoked later: no restart, no failed request."""
    server = start_broker(sandbox, azurite, SECRET_REFRESH_SECONDS="1")
    try:
        old = sandbox.directory.client_secret()
        assert old is not None
        assert server.token("contoso").status_code == 200
        sandbox.directory.rotate_client_secret(revoke_old=False)
        time.sleep(1.1)
        assert server.token("fabrikam").status_code == 200  # re-reads the vault: new version
        sandbox.directory.revoke_client_secret(old)
        failures_before = sandbox.recorder.count("entra.token:error")
        assert server.token("northwind").status_code == 200
        assert sandbox.recorder.count("entra.token:error") == failures_before
    finally:
        server.stop()


def test_a_rotated_secret_is_used_at_once_on_invalid_client(broker: BrokerServer, sandbox: Sandbox) -> None:
    """The old secret is revoked before the refresh interval: the first invalid_client triggers a re-read."""
    assert broker.token("contoso").status_code == 200
    reads = sandbox.recorder.count("kv.get")
    sandbox.directory.rotate_client_secret(revoke_old=True)
    response = broker.token("fabrikam")
    assert response.status_code == 200, response.text
    assert sandbox.recorder.count("kv.get") == reads + 1


# -- bad input ------------------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, bytes | str, str, int, str]] = [
    ("malformed json", b'{"tenant": "contoso",', "application/json", 400, "invalid_json"),
    ("not an object", b'["contoso"]', "application/json", 400, "bad_request"),
    ("missing scope", b'{"tenant": "contoso"}', "application/json", 400, "bad_request"),
    ("missing tenant", f'{{"scope": "{DEFENDER}"}}', "application/json", 400, "bad_request"),
    ("tenant not a string", f'{{"tenant": 7, "scope": "{DEFENDER}"}}', "application/json", 400, "bad_request"),
    (
        "extra field",
        f'{{"tenant": "contoso", "scope": "{DEFENDER}", "authority": "x"}}',
        "application/json",
        400,
        "bad_request",
    ),
    (
        "negative min ttl",
        f'{{"tenant": "contoso", "scope": "{DEFENDER}", "min_ttl_seconds": -1}}',
        "application/json",
        400,
        "bad_request",
    ),
    (
        "huge min ttl",
        f'{{"tenant": "contoso", "scope": "{DEFENDER}", "min_ttl_seconds": 99999}}',
        "application/json",
        400,
        "bad_request",
    ),
    ("unknown tenant", f'{{"tenant": "nobody", "scope": "{DEFENDER}"}}', "application/json", 404, "unknown_tenant"),
    (
        "unknown guid",
        f'{{"tenant": "{uuid.uuid4()}", "scope": "{DEFENDER}"}}',
        "application/json",
        404,
        "unknown_tenant",
    ),
    ("path escape", f'{{"tenant": "../common", "scope": "{DEFENDER}"}}', "application/json", 400, "invalid_tenant"),
    (
        "domain and path",
        f'{{"tenant": "evil.example/x", "scope": "{DEFENDER}"}}',
        "application/json",
        400,
        "invalid_tenant",
    ),
    ("encoded dots", f'{{"tenant": "%2e%2e", "scope": "{DEFENDER}"}}', "application/json", 400, "invalid_tenant"),
    (
        "organizations",
        f'{{"tenant": "organizations", "scope": "{DEFENDER}"}}',
        "application/json",
        400,
        "invalid_tenant",
    ),
    ("common", f'{{"tenant": "common", "scope": "{DEFENDER}"}}', "application/json", 400, "invalid_tenant"),
    ("non ascii", f'{{"tenant": "cöntoso", "scope": "{DEFENDER}"}}', "application/json", 400, "invalid_tenant"),
    ("null byte", f'{{"tenant": "contoso\\u0000", "scope": "{DEFENDER}"}}', "application/json", 400, "invalid_tenant"),
    (
        "unsupported scope",
        '{"tenant": "contoso", "scope": "https://management.azure.com/.default"}',
        "application/json",
        400,
        "scope_not_allowed",
    ),
    (
        "scope injection",
        '{"tenant": "contoso", "scope": "https://graph.microsoft.com/.default offline_access"}',
        "application/json",
        400,
        "scope_not_allowed",
    ),
    (
        "wrong content type",
        f'{{"tenant": "contoso", "scope": "{DEFENDER}"}}',
        "text/plain",
        415,
        "unsupported_media_type",
    ),
    ("form body", "tenant=contoso", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("not utf-8", b'{"tenant": "\xff\xfe"}', "application/json", 400, "invalid_json"),
    ("one megabyte", b'{"tenant": "' + b"a" * (1024 * 1024) + b'"}', "application/json", 413, "payload_too_large"),
    (
        "claims not an object",
        json.dumps({"tenant": "contoso", "scope": DEFENDER, "claims": "[1, 2]"}),
        "application/json",
        400,
        "bad_request",
    ),
    (
        "claims base64",
        json.dumps({"tenant": "contoso", "scope": DEFENDER, "claims": "eyJhY2Nlc3NfdG9rZW4iOnt9fQ=="}),
        "application/json",
        400,
        "bad_request",
    ),
    (
        "claims as json",
        json.dumps({"tenant": "contoso", "scope": DEFENDER, "claims": {"access_token": {}}}),
        "application/json",
        400,
        "bad_request",
    ),
    (
        "claims too long",
        json.dumps({"tenant": "contoso", "scope": DEFENDER, "claims": json.dumps({"a": "x" * 8200})}),
        "application/json",
        400,
        "bad_request",
    ),
]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
def test_bad_input_is_a_4xx_problem_and_calls_nothing(
    broker: BrokerServer, sandbox: Sandbox, body: bytes | str, content_type: str, status: int, code: str
) -> None:
    """Refused before any call to Entra ID, managed identity or Key Vault (the sandbox's counters agree)."""
    before = {service: sandbox.recorder.total(service) for service in ("entra", "mi", "kv")}
    response = broker.client.post("/api/token", content=body, headers={"Content-Type": content_type})
    problem(response, status, code)
    assert {service: sandbox.recorder.total(service) for service in ("entra", "mi", "kv")} == before


def test_a_chunked_body_over_the_limit_is_refused(broker: BrokerServer) -> None:
    """Without a Content-Length the limit still holds while the body streams in."""

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * 1024

    response = broker.client.post("/api/token", content=chunks(), headers={"Content-Type": "application/json"})
    problem(response, 413, "payload_too_large")


def test_unknown_routes_and_methods_are_problems(broker: BrokerServer) -> None:
    problem(broker.client.get("/api/nothing"), 404, "not_found")
    problem(broker.client.get("/api/token"), 405, "method_not_allowed")


def test_a_disabled_tenant_is_refused_without_an_outbound_call(broker: BrokerServer, sandbox: Sandbox) -> None:
    name, tid = new_tenant(sandbox, broker)
    broker.container.tenants.set_enabled(name, False)
    problem(broker.token(name), 403, "tenant_disabled")
    assert sandbox.recorder.count(f"entra.token:{tid}") == 0


# -- no leaks -------------------------------------------------------------------------------------------


def test_no_secret_or_token_reaches_a_log_or_an_error(
    sandbox: Sandbox, azurite: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every log record across success and failure paths is free of the secret and every issued token."""
    caplog.set_level(logging.DEBUG)
    server = start_broker(sandbox, azurite)
    issued: list[str] = []
    bodies: list[str] = []
    try:
        name, _ = new_tenant(sandbox, server)
        unconsented, _ = new_tenant(sandbox, server, consented=False)
        for scope in (DEFENDER, GRAPH):
            r = server.token(name, scope)
            issued.append(r.json()["access_token"])
        bodies.append(server.token(unconsented).text)
        sandbox.recorder.inject(Fault("entra", 500, "upstream says: boom", path_contains="/oauth2/v2.0/token"))
        bodies.append(server.token(new_tenant(sandbox, server)[0]).text)
        sandbox.recorder.inject(Fault("entra", 429, "Too Many Requests", content_type="text/plain"))
        bodies.append(server.token(new_tenant(sandbox, server)[0]).text)
        secret = sandbox.directory.client_secret()
        assert secret is not None
        sandbox.directory.set_secret(sandbox.directory.client_secret_name, "wrong-" + secret)
        server.container.credentials.refresh()
        bodies.append(server.token(new_tenant(sandbox, server)[0]).text)
        sandbox.directory.set_secret(sandbox.directory.client_secret_name, secret)
    finally:
        server.stop()
    text = "\n".join(record.getMessage() + repr(record.args) + str(record.exc_info) for record in caplog.records)
    assert caplog.records, "the broker logged nothing"
    assert "token.issue" in text
    for value in [secret, *issued]:
        assert value not in text
        assert all(value not in body for body in bodies)
    for body in bodies:
        assert "boom" not in body
        assert "AADSTS" not in body
