"""The app's credential in `certificate` and `federated` mode, end to end: the broker over real HTTP, the
real MSAL, azure-identity and Key Vault SDKs, against the sandbox's Entra ID, managed identity and vault."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import requests
from conftest import DEFENDER, GRAPH, BrokerServer, decode_claims, start_broker, trusting_session

from broker.keyvault import CertificateCredential, certificate_credential
from sandbox.directory import CertificateMaterial, make_client_certificate
from sandbox.server import Sandbox

PEM = "application/x-pem-file"
PFX = "application/x-pkcs12"


def fresh_tenant(sandbox: Sandbox, broker: BrokerServer) -> str:
    name = "c" + uuid.uuid4().hex[:10]
    tenant = sandbox.directory.add_customer_tenant(name)
    broker.container.tenants.add(name, tenant.tenant_id)
    return name


def store_certificate(sandbox: Sandbox, name: str, material: CertificateMaterial, content_type: str) -> str:
    """A Key Vault certificate's secret, as the vault gives it out: PEM with the key, or base64 PFX."""
    value = material.pem_bundle() if content_type == PEM else material.pfx_base64()
    return sandbox.directory.set_secret(name, value, content_type=content_type)


@pytest.fixture
def http(sandbox: Sandbox) -> Iterator[requests.Session]:
    with trusting_session(sandbox) as session:
        yield session


# -- certificate mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [PEM, PFX])
def test_certificate_mode_signs_with_the_vault_certificate(sandbox: Sandbox, azurite: str, content_type: str) -> None:
    """PEM-with-key and PFX secrets both work; the assertion names the SHA-256 thumbprint and carries no x5c;
    the vault is read with the managed identity, once."""
    name = "cert-" + uuid.uuid4().hex[:8]
    material = sandbox.directory.create_client_certificate()
    store_certificate(sandbox, name, material, content_type)
    before = sandbox.recorder.counts()
    server = start_broker(sandbox, azurite, CLIENT_CREDENTIAL_MODE="certificate", CLIENT_CERTIFICATE_NAME=name)
    try:
        for scope in (DEFENDER, GRAPH):
            response = server.token("contoso", scope)
            assert response.status_code == 200, response.text
            claims = decode_claims(response.json()["access_token"])
            assert claims["appidacr"] == "2"  # a certificate or assertion, not a secret
    finally:
        server.stop()
    after = sandbox.recorder.counts()
    assert after.get("entra.assertion:x5t#S256", 0) - before.get("entra.assertion:x5t#S256", 0) == 2
    assert after.get("entra.assertion:x5t#S256+x5c", 0) == before.get("entra.assertion:x5t#S256+x5c", 0)
    assert after.get(f"kv.get:{name}", 0) - before.get(f"kv.get:{name}", 0) == 1
    uami = sandbox.directory.broker_identity.client_id
    assert after.get(f"mi.token:{uami}", 0) - before.get(f"mi.token:{uami}", 0) == 1


def test_subject_name_issuer_trust_needs_x5c(sandbox: Sandbox, azurite: str) -> None:
    """A certificate trusted only by subject and issuer works when the chain is sent (x5c), not without."""
    ca = make_client_certificate("sandbox-issuing-ca", ca=True)
    subject = "broker-sni-" + uuid.uuid4().hex[:6]
    leaf = make_client_certificate(subject, issuer=ca)  # never registered by thumbprint
    sandbox.directory.trust_subject_name(subject, ca.certificate_pem)
    name = "sni-" + uuid.uuid4().hex[:8]
    store_certificate(sandbox, name, leaf, PEM)
    settings = {"CLIENT_CREDENTIAL_MODE": "certificate", "CLIENT_CERTIFICATE_NAME": name}

    without = start_broker(sandbox, azurite, **settings)
    try:
        response = without.token("contoso")
        assert response.status_code == 502, response.text
        assert response.json()["code"] == "credential_rejected"
    finally:
        without.stop()

    before = sandbox.recorder.count("entra.assertion:x5t#S256+x5c")
    with_chain = start_broker(sandbox, azurite, CLIENT_CERTIFICATE_SEND_X5C="true", **settings)
    try:
        response = with_chain.token("contoso")
        assert response.status_code == 200, response.text
        assert decode_claims(response.json()["access_token"])["appidacr"] == "2"
    finally:
        with_chain.stop()
    assert sandbox.recorder.count("entra.assertion:x5t#S256+x5c") == before + 1
    other_ca = make_client_certificate("another-ca", ca=True)
    impostor = make_client_certificate(subject, issuer=other_ca)  # same subject, untrusted issuer
    store_certificate(sandbox, name, impostor, PEM)
    server = start_broker(sandbox, azurite, CLIENT_CERTIFICATE_SEND_X5C="true", **settings)
    try:
        assert server.token("fabrikam").json()["code"] == "credential_rejected"
    finally:
        server.stop()


def test_the_sandbox_checks_signature_audience_expiry_and_replay(sandbox: Sandbox, http: requests.Session) -> None:
    """The broker's own assertions, posted by hand: a replayed jti, a wrong audience, an expired assertion and
    a key that does not match the thumbprint are each refused with Entra's error for it."""
    d = sandbox.directory
    material = d.create_client_certificate()
    credential = certificate_credential(material.pem_bundle(), PEM)
    contoso = d.tenant("contoso")
    assert contoso is not None
    endpoint = d.token_endpoint(contoso.tenant_id)

    def post(assertion: str) -> requests.Response:
        return http.post(
            endpoint,
            data={
                "grant_type": "client_credentials",
                "client_id": d.broker.client_id,
                "scope": DEFENDER,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
            },
        )

    def refused(response: requests.Response, code: int) -> None:
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "invalid_client"
        assert response.json()["error_codes"] == [code]

    assertion = credential.assertion(d.broker.client_id, endpoint)
    assert post(assertion).status_code == 200
    refused(post(assertion), 700030)  # the same jti again
    assert post(credential.assertion(d.broker.client_id, endpoint)).status_code == 200  # a fresh one is fine
    refused(post(credential.assertion(d.broker.client_id, endpoint + "/other")), 700023)
    expired = credential.assertion(d.broker.client_id, endpoint, issued_at=int(time.time()) - 720)
    refused(post(expired), 700024)
    forger = certificate_credential(make_client_certificate().pem_bundle(), PEM)
    wrong_key = CertificateCredential(forger.key, credential.chain)  # the registered thumbprint, another key
    refused(post(wrong_key.assertion(d.broker.client_id, endpoint)), 700027)


def test_a_rotated_certificate_takes_over_with_no_failed_request(sandbox: Sandbox, azurite: str) -> None:
    """Requests keep flowing while a new certificate is registered, becomes the vault's new version, and the
    old one is removed from the app: every request succeeds, and the last ones use the new certificate."""
    d = sandbox.directory
    name = "rot-" + uuid.uuid4().hex[:8]
    old = d.create_client_certificate()
    store_certificate(sandbox, name, old, PEM)
    server = start_broker(
        sandbox, azurite, CLIENT_CREDENTIAL_MODE="certificate", CLIENT_CERTIFICATE_NAME=name, SECRET_REFRESH_SECONDS="1"
    )
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as client:
            while not stop.is_set():
                tenant = fresh_tenant(sandbox, server)  # a new tenant each time: a new assertion each time
                statuses.append(client.post("/api/token", json={"tenant": tenant, "scope": DEFENDER}).status_code)

    worker = threading.Thread(target=traffic)
    refusals = sandbox.recorder.count("entra.token:error")
    try:
        worker.start()
        time.sleep(0.5)
        new = d.create_client_certificate()  # 1. register the new public key on the app
        new_version = store_certificate(sandbox, name, new, PFX)  # 2. import it as the vault's new version
        deadline = time.monotonic() + 10
        while server.container.credentials.current().version != new_version:
            assert time.monotonic() < deadline, "the broker never read the new version"
            time.sleep(0.1)
        # A request already in flight may have signed with the old key; one more must start and finish
        # after the switch before the old key goes (as an operator waits before deleting it).
        switched = len(statuses)
        while len(statuses) < switched + 2:
            assert time.monotonic() < deadline + 20, "no request completed after the switch"
            time.sleep(0.05)
        d.unregister_certificate(old.thumbprint)  # 3. remove the old key from the app
        served_before_removal = len(statuses)
        while len(statuses) <= served_before_removal + 3:  # requests keep coming, however loaded the machine
            assert time.monotonic() < deadline + 40, "too few requests after the old certificate was removed"
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=30)
        server.stop()
    assert len(statuses) > served_before_removal + 3, "too few requests after the old certificate was removed"
    assert set(statuses) == {200}, statuses
    assert sandbox.recorder.count("entra.token:error") == refusals, "Entra ID refused an assertion on the way"


# -- federated mode ------------------------------------------------------------------------------------


def test_federated_mode_reads_no_secret_at_all(sandbox: Sandbox, azurite: str) -> None:
    """The managed identity's exchange token is the client assertion; Key Vault is asked for no credential
    (its one read is the audit log's key)."""
    before = sandbox.recorder.counts()
    server = start_broker(sandbox, azurite, CLIENT_CREDENTIAL_MODE="federated")
    try:
        for tenant in ("contoso", "fabrikam"):
            for scope in (DEFENDER, GRAPH):
                response = server.token(tenant, scope)
                assert response.status_code == 200, response.text
                assert decode_claims(response.json()["access_token"])["appidacr"] == "2"
    finally:
        server.stop()
    after = sandbox.recorder.counts()
    audit_key = f"kv.get:{sandbox.directory.audit_key_name}"
    reads = {k: after[k] - before.get(k, 0) for k in after if k.startswith("kv.get") and after[k] != before.get(k, 0)}
    assert reads == {"kv.get": 1, audit_key: 1}, "Key Vault was asked for a credential"
    assert after.get("entra.assertion:federated", 0) - before.get("entra.assertion:federated", 0) == 4
    uami = sandbox.directory.broker_identity.client_id
    # the exchange token, cached between uses, and one for Key Vault (the audit key)
    assert after.get(f"mi.token:{uami}", 0) - before.get(f"mi.token:{uami}", 0) == 2


@pytest.mark.slow
def test_federated_assertion_is_refreshed_before_it_expires(sandbox: Sandbox, azurite: str) -> None:
    """An exchange token within five minutes of expiry is replaced before it is presented again."""
    d = sandbox.directory
    uami = d.broker_identity.client_id
    server = start_broker(sandbox, azurite, CLIENT_CREDENTIAL_MODE="federated")
    d.mi_token_lifetime = 304  # usable for 4 s, then inside azure-identity's 300 s refresh margin
    try:
        first = sandbox.recorder.count(f"mi.token:{uami}")
        assert server.token(fresh_tenant(sandbox, server)).status_code == 200
        assert server.token(fresh_tenant(sandbox, server)).status_code == 200
        assert sandbox.recorder.count(f"mi.token:{uami}") == first + 1  # the same assertion, still fresh
        time.sleep(5)
        assert server.token(fresh_tenant(sandbox, server)).status_code == 200
        assert sandbox.recorder.count(f"mi.token:{uami}") == first + 2  # refreshed, though not yet expired
    finally:
        d.mi_token_lifetime = 86399
        server.stop()


def test_federated_mode_without_a_matching_credential_is_rejected(sandbox: Sandbox, azurite: str) -> None:
    """Entra checks issuer, subject and audience: with the app's FIC naming another subject, no token."""
    d = sandbox.directory
    saved = list(d.broker.federated)
    d.remove_federated_credentials()
    d.add_federated_credential(issuer=d.exchange_issuer, subject=str(uuid.uuid4()))
    d.add_federated_credential(
        issuer=d.exchange_issuer, subject=d.broker_identity.principal_id, audiences=("api://AzureADTokenExchangeUSGov",)
    )
    server = start_broker(sandbox, azurite, CLIENT_CREDENTIAL_MODE="federated")
    try:
        response = server.token("northwind")
        assert response.status_code == 502, response.text
        assert response.json()["code"] == "credential_rejected"
        assert "AADSTS" not in response.text
    finally:
        server.stop()
        d.broker.federated = saved
