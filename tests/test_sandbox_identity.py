"""The identity stand-ins (Entra ID, managed identity, Key Vault) behave like the real services, as seen
through the real SDKs: MSAL, azure-identity and azure-keyvault-secrets."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import msal
import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from azure.identity import ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient
from conftest import trusting_session

from sandbox.ca import SandboxCA
from sandbox.client import ControlClient
from sandbox.directory import DEFENDER_RESOURCE, GRAPH_RESOURCE, VAULT_RESOURCE, Tenant
from sandbox.server import Sandbox
from sandbox.state import Fault

ROOT = Path(__file__).resolve().parent.parent
DEFENDER_SCOPE = DEFENDER_RESOURCE + "/.default"
GRAPH_SCOPE = GRAPH_RESOURCE + "/.default"


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """One seeded sandbox for this module (the lead's session ``sandbox`` fixture is left alone)."""
    sandbox = Sandbox(tmp_path_factory.mktemp("identity-sandbox")).start()
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture(autouse=True)
def _no_leftover_faults(box: Sandbox) -> Iterator[None]:
    box.recorder.clear_faults()
    yield
    box.recorder.clear_faults()
    for service in ("entra", "kv", "mi"):
        box.recorder.set_latency(service, 0.0)


@pytest.fixture
def http(box: Sandbox) -> Iterator[requests.Session]:
    """A requests session that trusts the sandbox CA whatever the environment says."""
    with trusting_session(box) as session:
        yield session


@pytest.fixture
def mi_env(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The App Service managed-identity environment, with every AZURE_* variable cleared."""
    for name in list(os.environ):
        if name.startswith(("AZURE_", "MSI_")) or name == "IDENTITY_SERVER_THUMBPRINT":
            monkeypatch.delenv(name)
    env = box.env()
    monkeypatch.setenv("IDENTITY_ENDPOINT", env["IDENTITY_ENDPOINT"])
    monkeypatch.setenv("IDENTITY_HEADER", env["IDENTITY_HEADER"])
    return env


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def cca(box: Sandbox, http: requests.Session, tenant: str, credential: Any = None, client_id: str = "") -> Any:
    return msal.ConfidentialClientApplication(
        client_id or box.directory.broker.client_id,
        client_credential=credential if credential is not None else box.directory.client_secret(),
        authority=f"{box.env()['AUTHORITY_HOST']}/{tenant}",
        instance_discovery=False,
        http_client=http,
    )


def new_tenant(box: Sandbox, prefix: str, **kwargs: Any) -> Tenant:
    return box.directory.add_customer_tenant(f"{prefix}{time.monotonic_ns()}", **kwargs)


# -- Entra: discovery and keys ------------------------------------------------------------------------


def test_discovery_by_domain_names_the_tenant_guid(box: Sandbox, http: requests.Session) -> None:
    """OIDC discovery by domain returns endpoints and issuer under the tenant's GUID."""
    contoso = box.directory.tenant("contoso")
    assert contoso is not None
    base = box.env()["AUTHORITY_HOST"]
    doc = http.get(f"{base}/contoso.onmicrosoft.com/v2.0/.well-known/openid-configuration").json()
    assert doc["token_endpoint"] == f"{base}/{contoso.tenant_id}/oauth2/v2.0/token"
    assert doc["issuer"] == f"{base}/{contoso.tenant_id}/v2.0"
    assert doc["jwks_uri"] == f"{base}/{contoso.tenant_id}/discovery/v2.0/keys"
    assert doc["authorization_endpoint"].endswith(f"/{contoso.tenant_id}/oauth2/v2.0/authorize")


def test_unknown_tenant_is_aadsts90002_and_msal_refuses_it(box: Sandbox, http: requests.Session) -> None:
    """An unknown tenant gets 400 invalid_tenant AADSTS90002; MSAL's constructor raises."""
    response = http.get(f"{box.env()['AUTHORITY_HOST']}/nowhere.onmicrosoft.com/v2.0/.well-known/openid-configuration")
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_tenant"
    assert body["error_codes"] == [90002]
    assert body["error_description"].startswith("AADSTS90002: ")
    assert "\r\nTrace ID: " in body["error_description"]
    assert {"timestamp", "trace_id", "correlation_id"} <= body.keys()
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        cca(box, http, "nowhere.onmicrosoft.com")


def test_token_verifies_against_published_jwks(box: Sandbox, http: requests.Session) -> None:
    """A token's kid is in the JWKS document, whose key verifies it with PyJWT."""
    contoso = box.directory.tenant("contoso")
    assert contoso is not None
    token = cca(box, http, contoso.tenant_id).acquire_token_for_client([DEFENDER_SCOPE])["access_token"]
    jwks_uri = f"{box.env()['AUTHORITY_HOST']}/common/discovery/v2.0/keys"
    client = jwt.PyJWKClient(jwks_uri, ssl_context=ca_context(box))
    key = client.get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key.key, algorithms=["RS256"], audience=DEFENDER_RESOURCE)
    assert claims["tid"] == contoso.tenant_id
    jwks = http.get(jwks_uri).json()["keys"]
    assert {"kid", "x5t", "n", "e", "x5c", "issuer"} <= jwks[0].keys()
    assert jwks[0]["issuer"].endswith("/{tenantid}/v2.0")


def ca_context(box: Sandbox) -> Any:
    assert isinstance(box.ca, SandboxCA)
    return box.ca.client_context()


# -- Entra: client credentials ------------------------------------------------------------------------


def test_msal_secret_gets_v1_app_token_for_consented_tenant(box: Sandbox, http: requests.Session) -> None:
    """MSAL with the app secret gets a v1 Defender token carrying the customer's tid and roles."""
    fabrikam = box.directory.tenant("fabrikam")
    assert fabrikam is not None
    result = cca(box, http, "fabrikam.onmicrosoft.com").acquire_token_for_client([DEFENDER_SCOPE])
    assert result["token_type"] == "Bearer"
    assert result["expires_in"] == 3599
    token = result["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["kid"] == box.directory.signing_key.kid
    assert "x5t" in header
    claims = box.directory.verify_access_token(token, DEFENDER_RESOURCE)
    assert claims["aud"] == DEFENDER_RESOURCE
    assert claims["iss"] == f"https://sts.windows.net/{fabrikam.tenant_id}/"
    assert claims["tid"] == fabrikam.tenant_id
    assert claims["appid"] == box.directory.broker.client_id
    assert claims["appidacr"] == "1"
    assert claims["oid"] == claims["sub"]
    assert claims["idtyp"] == "app"
    assert claims["roles"] == ["Incident.Read.All"]
    assert claims["ver"] == "1.0"
    assert claims["exp"] - claims["iat"] == 3599
    assert claims["nbf"] <= time.time()
    assert not {"scp", "upn", "azp"} & claims.keys()
    graph = cca(box, http, fabrikam.tenant_id).acquire_token_for_client([GRAPH_SCOPE])
    assert claims_of(graph["access_token"])["roles"] == ["SecurityIncident.Read.All"]


def test_roles_claim_is_absent_when_nothing_is_granted(box: Sandbox, http: requests.Session) -> None:
    """A consented tenant without application permissions yields a token without ``roles``."""
    bare = new_tenant(box, "bare", roles={})
    token = cca(box, http, bare.tenant_id).acquire_token_for_client([DEFENDER_SCOPE])["access_token"]
    assert "roles" not in claims_of(token)


def test_unconsented_tenant_is_aadsts700016(box: Sandbox, http: requests.Session) -> None:
    """Without admin consent the token endpoint answers 400 unauthorized_client AADSTS700016."""
    pending = new_tenant(box, "pending", consented=False)
    result = cca(box, http, pending.tenant_id).acquire_token_for_client([DEFENDER_SCOPE])
    assert result["error"] == "unauthorized_client"
    assert result["error_codes"] == [700016]
    assert result["error_description"].startswith("AADSTS700016: ")
    raw = http.post(
        f"{box.env()['AUTHORITY_HOST']}/{pending.tenant_id}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": box.directory.broker.client_id,
            "client_secret": box.directory.client_secret(),
            "scope": DEFENDER_SCOPE,
        },
    )
    assert raw.status_code == 400
    box.directory.grant_consent(pending.tenant_id)
    fresh = cca(box, http, pending.tenant_id).acquire_token_for_client([DEFENDER_SCOPE])
    assert claims_of(fresh["access_token"])["tid"] == pending.tenant_id


def test_wrong_secret_is_invalid_client(box: Sandbox, http: requests.Session) -> None:
    """A wrong secret gets 401 invalid_client AADSTS7000215."""
    result = cca(box, http, "contoso", credential="not-the-secret").acquire_token_for_client([DEFENDER_SCOPE])
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]


def test_secret_in_basic_auth_is_accepted(box: Sandbox, http: requests.Session) -> None:
    """client_secret_basic works like client_secret_post."""
    response = http.post(
        f"{box.env()['AUTHORITY_HOST']}/contoso/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "scope": GRAPH_SCOPE},
        auth=(box.directory.broker.client_id, box.directory.client_secret() or ""),
    )
    assert response.status_code == 200
    assert set(response.json()) == {"token_type", "expires_in", "ext_expires_in", "access_token"}


def test_scope_must_be_one_default_scope(box: Sandbox, http: requests.Session) -> None:
    """A scope without /.default is invalid_scope; an unknown tenant at the token endpoint is 90002."""
    result = cca(box, http, "contoso").acquire_token_for_client([DEFENDER_RESOURCE + "/Incident.Read.All"])
    assert result["error"] == "invalid_scope"
    response = http.post(
        f"{box.env()['AUTHORITY_HOST']}/00000000-0000-0000-0000-000000000001/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "client_id": "x", "client_secret": "y", "scope": DEFENDER_SCOPE},
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert response.json()["error_codes"] == [90002]


def test_certificate_credentials_sha256_and_sha1(box: Sandbox, http: requests.Session) -> None:
    """Certificate assertions work with x5t#S256 (PS256) and x5t (RS256); an unknown key is 700027."""
    material = box.directory.create_client_certificate()
    by_cert = {"private_key": material.private_key_pem, "public_certificate": material.certificate_pem}
    result = cca(box, http, "northwind", credential=by_cert).acquire_token_for_client([DEFENDER_SCOPE])
    assert claims_of(result["access_token"])["appidacr"] == "2"
    by_thumbprint = {"private_key": material.private_key_pem, "thumbprint": material.thumbprint}
    result = cca(box, http, "northwind", credential=by_thumbprint).acquire_token_for_client([GRAPH_SCOPE])
    assert claims_of(result["access_token"])["appidacr"] == "2"
    stranger = box.directory.create_client_certificate(register=False)
    unknown = {"private_key": stranger.private_key_pem, "public_certificate": stranger.certificate_pem}
    result = cca(box, http, "northwind", credential=unknown).acquire_token_for_client([DEFENDER_SCOPE])
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700027]


def test_managed_identity_as_federated_credential(box: Sandbox, http: requests.Session, mi_env: dict[str, str]) -> None:
    """The broker's UAMI assertion is accepted through its FIC; another identity's is AADSTS70021."""
    d = box.directory

    def assertion_from(client_id: str) -> Any:
        def get() -> str:
            with ManagedIdentityCredential(client_id=client_id) as credential:
                return credential.get_token("api://AzureADTokenExchange/.default").token

        return get

    broker_uami = mi_env["MANAGED_IDENTITY_CLIENT_ID"]
    exchange = claims_of(assertion_from(broker_uami)())
    assert exchange["iss"] == f"https://login.microsoftonline.com/{d.home.tenant_id}/v2.0"
    assert exchange["sub"] == d.broker_identity.principal_id
    assert exchange["aud"] == "api://AzureADTokenExchange"
    result = cca(box, http, "contoso", credential={"client_assertion": assertion_from(broker_uami)})
    token = result.acquire_token_for_client([DEFENDER_SCOPE])["access_token"]
    assert claims_of(token)["appidacr"] == "2"
    other = next(i for i in d.managed_identities() if i.user_assigned and i is not d.broker_identity)
    refused = cca(box, http, "contoso", credential={"client_assertion": assertion_from(other.client_id)})
    result = refused.acquire_token_for_client([DEFENDER_SCOPE])
    assert result["error"] == "invalid_request"
    assert result["error_codes"] == [70021]


def test_caller_app_gets_v2_token_for_broker_api(box: Sandbox, http: requests.Session) -> None:
    """An internal caller app gets a v2 token whose aud is the broker's client id and roles its grants."""
    d = box.directory
    caller = d.caller_apps()[0]
    app = cca(box, http, d.home.tenant_id, credential=caller.secrets[0].value, client_id=caller.client_id)
    result = app.acquire_token_for_client([f"{box.env()['CALLER_AUDIENCE']}/.default"])
    claims = d.verify_access_token(result["access_token"], d.broker.client_id)
    assert claims["ver"] == "2.0"
    assert claims["iss"] == f"{box.env()['AUTHORITY_HOST']}/{d.home.tenant_id}/v2.0"
    assert claims["azp"] == caller.client_id
    assert claims["roles"] == ["Broker.Token.Request", "Broker.Incidents.Read"]
    assert "appid" not in claims
    outsider = cca(box, http, "contoso", credential=caller.secrets[0].value, client_id=caller.client_id)
    assert outsider.acquire_token_for_client([DEFENDER_SCOPE])["error_codes"] == [700016]


def test_forged_tokens_are_rejected_and_rotation_keeps_old_keys(box: Sandbox) -> None:
    """verify_access_token refuses forged, expired and misaddressed tokens; a rotated-out key still verifies."""
    d = box.directory
    audience = d.broker.client_id
    good = d.mint_caller_token()
    assert d.verify_access_token(good, audience)["tid"] == d.home.tenant_id
    forged = [
        d.mint_caller_token(signing="bad-signature"),
        d.mint_caller_token(signing="unknown-kid"),
        d.mint_caller_token(signing="none"),
        d.mint_caller_token(exp=int(time.time()) - 3600),
        d.mint_caller_token(aud="api://someone-else"),
        d.mint_caller_token(iss="https://evil.example/v2.0"),
        d.mint_caller_token(tid=None),
    ]
    for token in forged:
        with pytest.raises(ValueError, match=r".+"):
            d.verify_access_token(token, audience)
    assert "roles" not in claims_of(d.mint_caller_token(roles=[]))
    d.rotate_signing_key()
    assert jwt.get_unverified_header(d.mint_caller_token())["kid"] != jwt.get_unverified_header(good)["kid"]
    assert d.verify_access_token(good, audience)


# -- managed identity and Key Vault ------------------------------------------------------------------


def test_keyvault_via_managed_identity_reads_secret_and_rotation(box: Sandbox, mi_env: dict[str, str]) -> None:
    """ManagedIdentityCredential + SecretClient read the app secret, then the rotated version."""
    box.recorder.reset_counts()
    name = mi_env["CLIENT_SECRET_NAME"]
    with (
        ManagedIdentityCredential(client_id=mi_env["MANAGED_IDENTITY_CLIENT_ID"]) as credential,
        SecretClient(
            mi_env["KEY_VAULT_URL"],
            credential,
            verify_challenge_resource=False,
            connection_verify=box.ca_bundle,
        ) as client,
    ):
        first = client.get_secret(name)
        assert first.value == box.directory.client_secret()
        assert first.name == name
        new_value = box.directory.rotate_client_secret()
        second = client.get_secret(name)
        assert second.value == new_value
        assert second.properties.version != first.properties.version
        assert client.get_secret(name, first.properties.version).value == first.value
        versions = [p.version for p in client.list_properties_of_secret_versions(name)]
        assert first.properties.version in versions
        assert second.properties.version in versions
        stored = client.set_secret("written-by-sdk", "v1", content_type="text/plain")
        assert box.directory.vault.get_secret("written-by-sdk").value == "v1"  # type: ignore[union-attr]
        assert stored.properties.content_type == "text/plain"
        with pytest.raises(ResourceNotFoundError) as missing:
            client.get_secret("no-such-secret")
        assert missing.value.error is not None
        assert missing.value.error.code == "SecretNotFound"
    assert box.recorder.count("kv.challenge") == 1
    assert box.recorder.count("kv.get") == 4
    assert box.recorder.count("kv.set") == 1
    assert box.recorder.count("mi.token") == 1
    assert box.recorder.count(f"mi.token:{mi_env['MANAGED_IDENTITY_CLIENT_ID']}") == 1


def test_keyvault_challenge_and_bearer_checks(box: Sandbox, http: requests.Session) -> None:
    """No bearer → 401 challenge; a Defender token → 401; a principal outside the allow-list → 403."""
    d = box.directory
    url = f"{box.env()['KEY_VAULT_URL']}/secrets/{d.client_secret_name}/?api-version=7.6"
    bare = http.get(url)
    assert bare.status_code == 401
    assert bare.headers["WWW-Authenticate"] == (
        f'Bearer authorization="https://login.microsoftonline.com/{d.home.tenant_id}", '
        'resource="https://vault.azure.net"'
    )
    defender = d.mint_access_token(tenant_id=d.home.tenant_id, audience=DEFENDER_RESOURCE, client_id="x")
    assert http.get(url, headers={"Authorization": f"Bearer {defender}"}).status_code == 401
    contoso = d.tenant("contoso")
    assert contoso is not None
    foreign = d.mint_access_token(tenant_id=contoso.tenant_id, audience=VAULT_RESOURCE, client_id="x")
    assert http.get(url, headers={"Authorization": f"Bearer {foreign}"}).status_code == 401
    vault_token = d.mint_access_token(
        tenant_id=d.home.tenant_id, audience=VAULT_RESOURCE, client_id="x", object_id=d.broker_identity.principal_id
    )
    ok = http.get(url, headers={"Authorization": f"Bearer {vault_token}"})
    assert ok.status_code == 200
    assert ok.json()["id"].startswith(f"{box.env()['KEY_VAULT_URL']}/secrets/{d.client_secret_name}/")
    assert ok.json()["attributes"]["enabled"] is True
    d.vault.allowed_principals = {"00000000-0000-0000-0000-00000000abcd"}
    try:
        denied = http.get(url, headers={"Authorization": f"Bearer {vault_token}"})
    finally:
        d.vault.allowed_principals = None
    assert denied.status_code == 403
    assert denied.json()["error"]["innererror"]["code"] == "ForbiddenByRbac"


def test_managed_identity_endpoint_checks_header(box: Sandbox, http: requests.Session) -> None:
    """A wrong X-IDENTITY-HEADER is 401 with the endpoint's JSON shape; the right one returns a token."""
    env = box.env()
    params = {"api-version": "2019-08-01", "resource": VAULT_RESOURCE}
    wrong = http.get(env["IDENTITY_ENDPOINT"], params=params, headers={"X-IDENTITY-HEADER": "nope"})
    assert wrong.status_code == 401
    assert wrong.json()["statusCode"] == 401
    right = http.get(env["IDENTITY_ENDPOINT"], params=params, headers={"X-IDENTITY-HEADER": env["IDENTITY_HEADER"]})
    body = right.json()
    assert set(body) == {"access_token", "expires_on", "resource", "token_type", "client_id"}
    assert int(body["expires_on"]) > time.time()
    claims = box.directory.verify_access_token(body["access_token"], VAULT_RESOURCE)
    assert claims["oid"] == box.directory.system_identity.principal_id
    caller_mi = next(i for i in box.directory.managed_identities() if i.api_roles)
    caller = http.get(
        env["IDENTITY_ENDPOINT"],
        params={**params, "resource": env["CALLER_AUDIENCE"], "client_id": caller_mi.client_id},
        headers={"X-IDENTITY-HEADER": env["IDENTITY_HEADER"]},
    ).json()
    caller_claims = box.directory.verify_access_token(caller["access_token"], env["BROKER_CLIENT_ID"])
    assert caller_claims["roles"] == caller_mi.api_roles


# -- faults, counters, control plane -----------------------------------------------------------------


def test_throttling_fault_reaches_msal(box: Sandbox, http: requests.Session) -> None:
    """Entra's plain-text 429 makes MSAL raise JSONDecodeError, which it replays for Retry-After."""
    tenant = new_tenant(box, "throttled")
    app = cca(box, http, tenant.tenant_id)
    box.recorder.reset_counts()
    box.recorder.inject(
        Fault(
            "entra",
            429,
            body="Too Many Requests",
            content_type="text/plain",
            headers={"Retry-After": "30"},
            path_contains="/oauth2/v2.0/token",
        )
    )
    with pytest.raises(json.JSONDecodeError):
        app.acquire_token_for_client([DEFENDER_SCOPE])
    with pytest.raises(json.JSONDecodeError):
        app.acquire_token_for_client([DEFENDER_SCOPE])
    assert box.recorder.count("entra.fault") == 1
    assert box.recorder.count("entra.token") == 0


def test_counters_count_discovery_and_token_per_tenant(box: Sandbox, http: requests.Session) -> None:
    """One discovery GET per CCA and one token POST per (tenant, scope); cache hits cost nothing."""
    tenant = new_tenant(box, "counted")
    box.recorder.reset_counts()
    app = cca(box, http, tenant.domain)
    for _ in range(3):
        assert app.acquire_token_for_client([DEFENDER_SCOPE])["token_type"] == "Bearer"
    assert box.recorder.count(f"entra.discovery:{tenant.tenant_id}") == 1
    assert box.recorder.count(f"entra.token:{tenant.tenant_id}") == 1
    assert box.recorder.total("entra") == 2


def test_latency_is_injected(box: Sandbox, http: requests.Session) -> None:
    """Per-service latency delays every response of that service."""
    box.recorder.set_latency("mi", 0.2)
    started = time.monotonic()
    http.get(box.env()["IDENTITY_ENDPOINT"], params={"api-version": "2019-08-01", "resource": VAULT_RESOURCE})
    assert time.monotonic() - started >= 0.2


def test_control_client_drives_the_sandbox(box: Sandbox, http: requests.Session) -> None:
    """ControlClient: counters, tenants, consent, rotation, caller tokens and faults over HTTP."""
    with ControlClient(box.control_url) as control:
        assert control.health()
        assert control.env()["BROKER_CLIENT_ID"] == box.directory.broker.client_id
        created = control.add_tenant(f"remote{time.monotonic_ns()}", consented=False)
        assert not box.directory.tenant(created["tenant_id"]).consented  # type: ignore[union-attr]
        assert control.grant_consent(created["tenant_id"])["consented"] is True
        assert control.revoke_consent(created["name"])["consented"] is False
        assert any(t["name"] == "contoso" for t in control.tenants())
        rotated = control.rotate_client_secret(revoke_old=False)
        assert box.directory.client_secret() == rotated["value"]
        assert box.directory.vault.get_secret(box.directory.client_secret_name).version == rotated["version"]  # type: ignore[union-attr]
        token = control.mint_caller_token(roles=["Broker.Token.Request"])
        assert box.directory.verify_access_token(token, box.directory.broker.client_id)["roles"] == [
            "Broker.Token.Request"
        ]
        expired = control.mint_caller_token(exp=1)
        with pytest.raises(ValueError, match="Expired"):
            box.directory.verify_access_token(expired, box.directory.broker.client_id)
        control.reset_counters()
        control.throttle("mi", retry_after=5)
        response = http.get(box.env()["IDENTITY_ENDPOINT"])
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "5"
        assert response.text == "Too Many Requests"
        assert control.count("mi.fault") == 1
        control.inject_fault(service="mi", status=503, times=None)
        control.clear_faults()
        assert box.recorder.take_fault("mi", "/msi/token") is None
        control.set_latency("kv", 0.0)
        assert control.set_secret("from-control", "value") == box.directory.vault.get_secret("from-control").version  # type: ignore[union-attr]


# -- runner ------------------------------------------------------------------------------------------


def test_sandbox_start_stop_leaves_no_thread_behind(tmp_path: Path) -> None:
    """start() then stop() serves every stand-in and leaves no thread, socket or warning behind."""
    before = set(threading.enumerate())
    sandbox = Sandbox(tmp_path, seed=False).start()
    session = requests.Session()
    session.trust_env = False
    session.verify = sandbox.ca_bundle
    try:
        home = sandbox.directory.home.tenant_id
        assert session.get(f"{sandbox.urls['entra']}/{home}/discovery/v2.0/keys").status_code == 200
        assert session.get(f"{sandbox.urls['kv']}/secrets?api-version=7.6").status_code == 401
        assert session.get(sandbox.control_url + "/_sandbox/health").json() == {"ok": True}
        bundle = Path(sandbox.env()["REQUESTS_CA_BUNDLE"]).read_text()
        assert bundle.count("BEGIN CERTIFICATE") > 10  # the sandbox CA plus the public roots
    finally:
        started = time.monotonic()
        sandbox.stop()
        session.close()
    assert time.monotonic() - started < 2
    assert set(threading.enumerate()) == before


def test_python_m_sandbox_writes_env_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    """``python -m sandbox`` writes the settings once listening and exits cleanly on SIGTERM; ``--cloud``
    plays a national cloud and says so in the settings."""
    env_file = tmp_path / "env.json"
    state = str(tmp_path / "state")
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--state-dir", state, "--env-file", str(env_file), "--cloud", "usgovernment"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not env_file.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no env file"
            time.sleep(0.05)
        env = json.loads(env_file.read_text())
        assert env["AZURE_CLOUD"] == "usgovernment"
        with ControlClient(env["SANDBOX_CONTROL_URL"]) as control:
            assert control.health()
            assert any(t["name"] == "northwind" for t in control.tenants())
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert out.startswith("sandbox ready ")
    assert out.count("\n") == 1


def test_security_stand_ins_accept_sandbox_tokens(box: Sandbox, http: requests.Session) -> None:
    """Defender and Graph are wired to the directory's verifier and the seeded incident world."""
    contoso = box.directory.tenant("contoso")
    assert contoso is not None
    app = cca(box, http, contoso.tenant_id)
    defender = app.acquire_token_for_client([DEFENDER_SCOPE])["access_token"]
    graph = app.acquire_token_for_client([GRAPH_SCOPE])["access_token"]
    env = box.env()
    listed = http.get(f"{env['DEFENDER_API_URL']}/api/incidents", headers={"Authorization": f"Bearer {defender}"})
    assert listed.status_code == 200, listed.text
    assert listed.json()["value"]
    listed = http.get(f"{env['GRAPH_API_URL']}/security/incidents", headers={"Authorization": f"Bearer {graph}"})
    assert listed.status_code == 200, listed.text
    assert http.get(f"{env['DEFENDER_API_URL']}/api/incidents").status_code == 401
    with ControlClient(box.control_url) as control:
        assert len(control.security.truth(contoso.tenant_id)) == 20


# -- admin consent (v2 endpoint) ---------------------------------------------------------------------


def _consent_url(box: Sandbox, tenant: str, redirect_uri: str, **extra: str) -> str:
    from urllib.parse import urlencode

    params = {"client_id": box.directory.broker.client_id, "scope": DEFENDER_SCOPE, "redirect_uri": redirect_uri}
    params.update(extra)
    return f"{box.urls['entra']}/{tenant}/v2.0/adminconsent?{urlencode(params)}"


def test_admin_consent_grants_the_app_and_redirects_with_tenant_and_state(box: Sandbox, http: requests.Session) -> None:
    """Approval consents the app in that tenant and sends the browser back with admin_consent, tenant, state."""
    from urllib.parse import parse_qs, urlsplit

    redirect = "https://broker.example/api/consent/callback"
    box.directory.add_redirect_uri(redirect)
    tenant = box.directory.add_customer_tenant("consent-ok", consented=False, roles={})
    reply = http.get(_consent_url(box, tenant.name, redirect, state="s-123"), allow_redirects=False)
    assert reply.status_code == 302
    location = urlsplit(reply.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == redirect
    query = {k: v[0] for k, v in parse_qs(location.query).items()}
    assert query == {"admin_consent": "True", "tenant": tenant.tenant_id, "scope": DEFENDER_SCOPE, "state": "s-123"}
    assert tenant.consented
    assert tenant.roles == {
        DEFENDER_RESOURCE: ["Incident.Read.All"],
        GRAPH_RESOURCE: ["SecurityIncident.Read.All"],
    }


@pytest.mark.parametrize(("answer", "error"), [("decline", "access_denied"), ("consent_required", "consent_required")])
def test_admin_consent_refusal_redirects_with_error_and_consents_nothing(
    box: Sandbox, http: requests.Session, answer: str, error: str
) -> None:
    """A refusal comes back as error, error_description (AADSTS65004) and state; the tenant stays unconsented."""
    from urllib.parse import parse_qs, urlsplit

    redirect = "https://broker.example/api/consent/callback"
    box.directory.add_redirect_uri(redirect)
    tenant = box.directory.add_customer_tenant(f"consent-{answer}".replace("_", "-"), consented=False)
    with ControlClient(box.control_url) as control:
        control.set_admin_answer(tenant.tenant_id, answer)
    reply = http.get(_consent_url(box, tenant.tenant_id, redirect, state="s-9"), allow_redirects=False)
    assert reply.status_code == 302
    query = {k: v[0] for k, v in parse_qs(urlsplit(reply.headers["Location"]).query).items()}
    assert query["error"] == error
    assert query["state"] == "s-9"
    assert query["admin_consent"] == "True"
    assert query["error_description"].startswith("AADSTS65004")
    assert not tenant.consented


@pytest.mark.parametrize(
    ("case", "code"),
    [("unregistered-redirect", "AADSTS50011"), ("unknown-app", "AADSTS700016"), ("unknown-tenant", "AADSTS90002")],
)
def test_admin_consent_never_redirects_to_an_untrusted_place(
    box: Sandbox, http: requests.Session, case: str, code: str
) -> None:
    """An unregistered redirect URI, an unknown app or tenant: an error page, no redirect, no consent."""
    box.directory.add_redirect_uri("https://broker.example/api/consent/callback")
    tenant = box.directory.add_customer_tenant(f"consent-{case}", consented=False)
    url = {
        "unregistered-redirect": _consent_url(box, tenant.tenant_id, "https://evil.example/steal"),
        "unknown-app": _consent_url(
            box, tenant.tenant_id, "https://broker.example/api/consent/callback", client_id=str(uuid_mod.uuid4())
        ),
        "unknown-tenant": _consent_url(box, str(uuid_mod.uuid4()), "https://broker.example/api/consent/callback"),
    }[case]
    reply = http.get(url, allow_redirects=False)
    assert reply.status_code == 400
    assert "Location" not in reply.headers
    assert code in reply.text
    assert reply.headers["content-type"].startswith("text/html")
    assert not tenant.consented
