"""``BrokerCredential``: an azure-core ``TokenCredential`` that an internal service uses with its own
identity to get customer-tenant tokens from a running broker, cached until close to expiry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from azure.core.credentials import TokenCredential
from azure.identity import ClientSecretCredential, ManagedIdentityCredential
from conftest import DEFENDER, GRAPH, BrokerServer, decode_claims
from entra_callers import Identity, grant, new_identity, policy, start_entra_broker

from broker.client import BrokerAuthenticationError, BrokerCredential
from sandbox.server import Sandbox


@pytest.fixture(scope="module")
def caller(sandbox: Sandbox) -> Identity:
    return new_identity(sandbox, "client-a")


@pytest.fixture(scope="module")
def server(sandbox: Sandbox, azurite: str, caller: Identity) -> Iterator[BrokerServer]:
    app = sandbox.directory.add_caller_app("client-app", roles=["Broker.Token.Request"])
    text = policy(
        grant(caller, ["contoso"]),
        {"name": "client-app", "app_id": app.client_id, "tenants": ["fabrikam"], "scopes": [GRAPH]},
    )
    broker = start_entra_broker(sandbox, azurite, text)
    try:
        yield broker
    finally:
        broker.stop()


def _credential(sandbox: Sandbox, server: BrokerServer, own: TokenCredential, tenant: str) -> BrokerCredential:
    return BrokerCredential(
        tenant=tenant,
        broker_url=server.url,
        credential=own,
        broker_scope=sandbox.directory.broker_audience + "/.default",
    )


def test_managed_identity_caller_gets_and_caches_a_token(
    sandbox: Sandbox, server: BrokerServer, caller: Identity
) -> None:
    """With the caller's managed identity, one broker round trip, then the cache until near expiry."""
    contoso = sandbox.directory.tenant("contoso")
    assert contoso is not None
    with _credential(sandbox, server, ManagedIdentityCredential(client_id=caller.app_id), "contoso") as credential:
        mine = f"mi.token:{caller.app_id}"
        before = sandbox.recorder.count(mine)
        first = credential.get_token(DEFENDER)
        second = credential.get_token_info(DEFENDER)
        assert decode_claims(first.token)["tid"] == contoso.tenant_id
        assert second.token == first.token
        assert second.expires_on == first.expires_on
        assert sandbox.recorder.count(mine) - before == 1


def test_client_secret_caller_through_sandbox_entra(sandbox: Sandbox, server: BrokerServer) -> None:
    """An app registration's secret credential (authority = the sandbox host) works the same way."""
    app = next(a for a in sandbox.directory.caller_apps() if a.display_name == "client-app")
    own = ClientSecretCredential(
        sandbox.directory.home.tenant_id,
        app.client_id,
        app.secrets[0].value,
        authority=sandbox.env()["AUTHORITY_HOST"],
        disable_instance_discovery=True,
    )
    with _credential(sandbox, server, own, "fabrikam") as credential:
        token = credential.get_token(GRAPH)
        assert decode_claims(token.token)["aud"] == "https://graph.microsoft.com"
        with pytest.raises(BrokerAuthenticationError) as refused:
            credential.get_token(DEFENDER)
        assert refused.value.code == "forbidden"
        assert refused.value.status_code == 403


def test_refusal_carries_the_problem_code(sandbox: Sandbox, server: BrokerServer, caller: Identity) -> None:
    """A tenant the caller may not have raises ClientAuthenticationError with the broker's code."""
    own = ManagedIdentityCredential(client_id=caller.app_id)
    with (
        _credential(sandbox, server, own, "northwind") as credential,
        pytest.raises(BrokerAuthenticationError) as refused,
    ):
        credential.get_token(DEFENDER)
    assert refused.value.code == "forbidden"
    assert refused.value.request_id
