"""Caller authentication (``CALLER_AUTH=entra``): Entra bearer tokens from internal services' managed
identities are checked against the home tenant's keys, issuer, audience, lifetime and tenant; every forged
or misdirected token is refused with 401 before any outbound call."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator

import pytest
from azure.identity import ManagedIdentityCredential
from conftest import DEFENDER, GRAPH, BrokerServer
from cryptography.hazmat.primitives import serialization
from entra_callers import Identity, bearer, grant, new_identity, policy, start_entra_broker, token_for

from broker.callers import EntraAuthenticator, SigningKeys
from sandbox.directory import GRAPH_RESOURCE
from sandbox.server import Sandbox


@pytest.fixture(scope="module")
def caller(sandbox: Sandbox) -> Identity:
    return new_identity(sandbox, "callers-a")


@pytest.fixture(scope="module")
def server(sandbox: Sandbox, azurite: str, caller: Identity) -> Iterator[BrokerServer]:
    """One broker for the module: ``caller`` may have contoso's Defender tokens."""
    broker = start_entra_broker(sandbox, azurite, policy(grant(caller, ["contoso"])))
    try:
        yield broker
    finally:
        broker.stop()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_with_public_key(box: Sandbox, claims_token: str) -> str:
    """The classic key-confusion forgery: HS256 keyed with the published RSA public key."""
    payload = claims_token.split(".")[1]
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": box.directory.signing_key.kid}).encode())
    pem = box.directory.signing_key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def _attacks(box: Sandbox, who: Identity) -> dict[str, Callable[[], dict[str, str]]]:
    d = box.directory
    other = d.add_customer_tenant(f"evil{time.monotonic_ns()}")
    return {
        "no token": lambda: {},
        "not bearer": lambda: {"Authorization": "Basic dXNlcjpwYXNz"},
        "malformed bearer": lambda: {"Authorization": "Bearer not a jwt"},
        "garbage jwt": lambda: bearer("eyJhbGciOiJSUzI1NiJ9.e30.c2ln"),
        "alg none": lambda: bearer(token_for(box, who, signing="none")),
        "forged signature": lambda: bearer(token_for(box, who, signing="bad-signature")),
        "unknown kid": lambda: bearer(token_for(box, who, signing="unknown-kid")),
        "hs256 with public key": lambda: bearer(_hs256_with_public_key(box, token_for(box, who))),
        "expired": lambda: bearer(token_for(box, who, iat=int(time.time()) - 7200, exp=int(time.time()) - 600)),
        "not yet valid": lambda: bearer(token_for(box, who, nbf=int(time.time()) + 600)),
        "wrong audience": lambda: bearer(token_for(box, who, aud="api://someone-else")),
        "wrong issuer": lambda: bearer(token_for(box, who, iss=f"https://evil.example/{d.home.tenant_id}/v2.0")),
        "other tenant": lambda: bearer(token_for(box, who, tid=other.tenant_id, iss=d.issuer_v2(other.tenant_id))),
        "graph token": lambda: bearer(
            d.mint_access_token(
                tenant_id=d.home.tenant_id, audience=GRAPH_RESOURCE, client_id=who.app_id, object_id=who.object_id
            )
        ),
        "user token": lambda: bearer(token_for(box, who, scp="user_impersonation", idtyp="user")),
        "missing oid": lambda: bearer(token_for(box, who, oid=None)),
    }


ATTACKS = [
    "no token",
    "not bearer",
    "malformed bearer",
    "garbage jwt",
    "alg none",
    "forged signature",
    "unknown kid",
    "hs256 with public key",
    "expired",
    "not yet valid",
    "wrong audience",
    "wrong issuer",
    "other tenant",
    "graph token",
    "user token",
    "missing oid",
]


def test_managed_identity_token_gets_a_customer_token(sandbox: Sandbox, server: BrokerServer, caller: Identity) -> None:
    """A caller's own managed-identity token for the broker's app ID URI buys a customer token."""
    mi = ManagedIdentityCredential(client_id=caller.app_id)
    own = mi.get_token(sandbox.directory.broker_audience + "/.default")
    response = server.token("contoso", headers=bearer(own.token))
    assert response.status_code == 200, response.text
    assert response.json()["tenant_id"] == sandbox.directory.tenant("contoso").tenant_id  # type: ignore[union-attr]


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_is_refused_before_any_outbound_call(
    sandbox: Sandbox, server: BrokerServer, caller: Identity, attack: str
) -> None:
    """Forged, misdirected or malformed bearers get 401 ``unauthenticated`` and Entra is never asked."""
    headers = _attacks(sandbox, caller)[attack]()
    before = sandbox.recorder.count("entra.token")
    response = server.token("contoso", headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "unauthenticated"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "access_token" not in response.text
    assert sandbox.recorder.count("entra.token") == before


def test_garbage_kids_do_not_hammer_entra(sandbox: Sandbox, server: BrokerServer, caller: Identity) -> None:
    """Unknown ``kid``s trigger at most one JWKS refetch per interval, however many arrive."""
    server.token("contoso", headers=bearer(token_for(sandbox, caller)))  # keys loaded
    before = sandbox.recorder.count("entra.jwks")
    for i in range(25):
        forged = sandbox.directory.sign({"tid": sandbox.directory.home.tenant_id, "n": i}, signing="unknown-kid")
        assert server.token("contoso", headers=bearer(forged)).status_code == 401
    assert sandbox.recorder.count("entra.jwks") - before <= 1


@pytest.mark.parametrize("idtyp", ["app", None])
def test_v1_token_for_the_app_id_uri_is_accepted(
    sandbox: Sandbox, server: BrokerServer, caller: Identity, idtyp: str | None
) -> None:
    """A v1 token (``aud`` = app ID URI, ``iss`` = sts.windows.net, the app in ``appid``) is as good as a v2
    one, with or without the optional ``idtyp`` claim (without it, ``oid`` = ``sub`` marks it app-only)."""
    d = sandbox.directory
    v1 = d.mint_access_token(
        tenant_id=d.home.tenant_id,
        audience=d.broker_audience,
        client_id=caller.app_id,
        object_id=caller.object_id,
        roles=caller.mi.api_roles,
        version="1.0",
        idtyp=idtyp,
    )
    assert server.token("contoso", headers=bearer(v1)).status_code == 200


def test_token_without_the_role_is_forbidden(sandbox: Sandbox, server: BrokerServer, caller: Identity) -> None:
    """A valid token without ``Broker.Token.Request`` gets 403, whatever the policy says."""
    response = server.token("contoso", headers=bearer(token_for(sandbox, caller, roles=["Something.Else"])))
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"


@pytest.mark.slow
def test_cold_keys_are_fetched_off_the_event_loop(sandbox: Sandbox, azurite: str, caller: Identity) -> None:
    """With Entra slow, a cold JWKS fetch does not stall other requests (the fetch runs in a thread)."""
    broker = start_entra_broker(sandbox, azurite, policy(grant(caller, ["contoso"])))
    try:
        sandbox.recorder.set_latency("entra", 0.5)
        import threading

        results: list[int] = []
        slow = threading.Thread(
            target=lambda: results.append(
                broker.token("contoso", headers=bearer(token_for(sandbox, caller))).status_code
            )
        )
        slow.start()
        time.sleep(0.1)
        started = time.monotonic()
        assert broker.client.get("/api/health").status_code == 200
        assert time.monotonic() - started < 0.3
        slow.join()
        sandbox.recorder.set_latency("entra", 0.0)
        assert results
        assert results[0] in (200, 503)
    finally:
        broker.stop()


def test_graph_scope_not_granted_is_forbidden(sandbox: Sandbox, server: BrokerServer, caller: Identity) -> None:
    """The caller may have contoso's Defender tokens, not its Graph tokens."""
    response = server.token("contoso", GRAPH, headers=bearer(token_for(sandbox, caller)))
    assert response.status_code == 403
    assert DEFENDER  # the granted scope


def test_signing_key_rotation_is_followed(sandbox: Sandbox, azurite: str, caller: Identity) -> None:
    """(Last in the module: it rotates the session sandbox's key.) After Entra rotates its signing key, a new ``kid`` is accepted once the refetch interval allows."""
    broker = start_entra_broker(sandbox, azurite, policy(grant(caller, ["contoso"])))
    now = [1000.0]
    c = broker.container
    keys = SigningKeys(
        f"{c.settings.authority_host}/{c.settings.caller_tenant_id}/v2.0/.well-known/openid-configuration",
        sandbox.directory.home.tenant_id,
        min_refetch_seconds=10,
        clock=lambda: now[0],
    )
    c.authenticator = EntraAuthenticator(
        tenant_id=sandbox.directory.home.tenant_id, audiences=(sandbox.directory.broker.client_id,), keys=keys
    )
    try:
        assert broker.token("contoso", headers=bearer(token_for(sandbox, caller))).status_code == 200
        sandbox.directory.rotate_signing_key()
        rotated = bearer(token_for(sandbox, caller))
        before = sandbox.recorder.count("entra.jwks")
        assert broker.token("contoso", headers=rotated).status_code == 401  # within the refetch interval
        now[0] += 10
        response = broker.token("contoso", headers=rotated)
        assert response.status_code == 200, response.text
        assert sandbox.recorder.count("entra.jwks") == before + 1
    finally:
        broker.stop()
