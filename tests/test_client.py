"""The caller client (``client/``, distribution ``partner-broker-client``) against a running broker and the
sandbox, driven by real SDK clients: azure-core's sync and async pipelines with their bearer-token
policies, and msgraph-sdk's ``GraphServiceClient`` listing security incidents from the Graph stand-in. The
caller's own identity is the sandbox's managed identity (azure-identity, sync and aio) or an app secret.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import partner_broker_client.aio
import pytest
from azure.core import AsyncPipelineClient, PipelineClient
from azure.core.credentials import TokenCredential
from azure.core.pipeline.policies import AsyncBearerTokenCredentialPolicy, BearerTokenCredentialPolicy
from azure.core.rest import HttpRequest
from azure.identity import ClientSecretCredential, ManagedIdentityCredential
from azure.identity.aio import ManagedIdentityCredential as AsyncManagedIdentityCredential
from conftest import DEFENDER, GRAPH, BrokerServer, decode_claims
from entra_callers import Identity, bearer, grant, new_identity, policy, start_entra_broker, token_for
from kiota_authentication_azure.azure_identity_authentication_provider import AzureIdentityAuthenticationProvider
from msgraph import GraphRequestAdapter, GraphServiceClient
from partner_broker_client import BrokerAuthenticationError, BrokerCredential

from broker import requestlog
from sandbox.server import Sandbox
from sandbox.state import Fault

CLAIMS = json.dumps({"access_token": {"nbf": {"essential": True, "value": "1700000000"}}})


@pytest.fixture(scope="module")
def caller(sandbox: Sandbox) -> Identity:
    return new_identity(sandbox, "client-a")


@pytest.fixture(scope="module")
def server(sandbox: Sandbox, azurite: str, caller: Identity) -> Iterator[BrokerServer]:
    app = sandbox.directory.add_caller_app("client-app", roles=["Broker.Token.Request"])
    text = policy(
        grant(caller, ["contoso", "fabrikam"], [DEFENDER, GRAPH]),
        {"name": "client-app", "app_id": app.client_id, "tenants": ["fabrikam"], "scopes": [GRAPH]},
    )
    broker = start_entra_broker(sandbox, azurite, text)
    try:
        yield broker
    finally:
        broker.stop()


def _broker_scope(sandbox: Sandbox) -> str:
    return sandbox.directory.broker_audience + "/.default"


def _credential(sandbox: Sandbox, server: BrokerServer, own: TokenCredential, tenant: str) -> BrokerCredential:
    return BrokerCredential(tenant=tenant, broker_url=server.url, credential=own, broker_scope=_broker_scope(sandbox))


@contextlib.asynccontextmanager
async def _async_credential(
    sandbox: Sandbox, server: BrokerServer, caller: Identity, tenant: str
) -> AsyncIterator[partner_broker_client.aio.BrokerCredential]:
    """The async twin over the caller's async managed identity; both closed on the way out."""
    async with (
        AsyncManagedIdentityCredential(client_id=caller.app_id) as own,
        partner_broker_client.aio.BrokerCredential(
            tenant=tenant, broker_url=server.url, credential=own, broker_scope=_broker_scope(sandbox)
        ) as credential,
    ):
        yield credential


def _guid(sandbox: Sandbox, name: str) -> str:
    tenant = sandbox.directory.tenant(name)
    assert tenant is not None
    return tenant.tenant_id


def _graph_url(sandbox: Sandbox) -> str:
    return str(sandbox.env()["GRAPH_API_URL"])


def test_managed_identity_caller_gets_and_caches_a_token(
    sandbox: Sandbox, server: BrokerServer, caller: Identity
) -> None:
    """With the caller's managed identity, one broker round trip, then the cache until near expiry."""
    with _credential(sandbox, server, ManagedIdentityCredential(client_id=caller.app_id), "contoso") as credential:
        mine = f"mi.token:{caller.app_id}"
        before = sandbox.recorder.count(mine)
        first = credential.get_token(DEFENDER)
        second = credential.get_token_info(DEFENDER)
        assert decode_claims(first.token)["tid"] == _guid(sandbox, "contoso")
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


def test_a_fresh_credential_accepts_its_tenants_guid(sandbox: Sandbox, server: BrokerServer, caller: Identity) -> None:
    """``tenant_id=`` the bound tenant's GUID works before the GUID was ever seen; another tenant's does not."""
    own = ManagedIdentityCredential(client_id=caller.app_id)
    with _credential(sandbox, server, own, "contoso") as credential:
        token = credential.get_token(DEFENDER, tenant_id=_guid(sandbox, "contoso"))
        assert decode_claims(token.token)["tid"] == _guid(sandbox, "contoso")
        with pytest.raises(BrokerAuthenticationError) as refused:
            credential.get_token(DEFENDER, tenant_id=_guid(sandbox, "fabrikam"))
        assert refused.value.code == "tenant_mismatch"


def test_azure_core_sync_pipeline_reads_graph_incidents(
    sandbox: Sandbox, server: BrokerServer, caller: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    """azure-core's sync ``PipelineClient`` with ``BearerTokenCredentialPolicy`` reads the tenant's incidents,
    three calls on one broker round trip."""
    caplog.set_level(logging.INFO, logger="partner_broker_client")
    own = ManagedIdentityCredential(client_id=caller.app_id)
    with (
        _credential(sandbox, server, own, "fabrikam") as credential,
        PipelineClient(_graph_url(sandbox), policies=[BearerTokenCredentialPolicy(credential, GRAPH)]) as graph,
    ):
        for _ in range(3):
            response = graph.send_request(HttpRequest("GET", f"{_graph_url(sandbox)}/security/incidents?$top=5"))
            assert response.status_code == 200, response.text()
            incidents = response.json()["value"]
            assert incidents
            assert {i["tenantId"] for i in incidents} == {_guid(sandbox, "fabrikam")}
    fetches = [r for r in caplog.records if r.getMessage().startswith("broker.token tenant=fabrikam")]
    assert len(fetches) == 1


def test_azure_core_async_pipeline_reads_graph_incidents(
    sandbox: Sandbox, server: BrokerServer, caller: Identity
) -> None:
    """azure-core's ``AsyncPipelineClient`` with ``AsyncBearerTokenCredentialPolicy`` and the async twin."""

    async def scenario() -> list[dict[str, Any]]:
        async with _async_credential(sandbox, server, caller, "contoso") as credential:
            policy = AsyncBearerTokenCredentialPolicy(credential, GRAPH)
            graph_client = AsyncPipelineClient(
                _graph_url(sandbox), policies=[policy], connection_verify=os.environ["SSL_CERT_FILE"]
            )
            async with graph_client as graph:
                response = await graph.send_request(
                    HttpRequest("GET", f"{_graph_url(sandbox)}/security/incidents?$top=5")
                )
                await response.read()
                assert response.status_code == 200, response.text()
                return list(response.json()["value"])

    incidents = asyncio.run(scenario())
    assert incidents
    assert {i["tenantId"] for i in incidents} == {_guid(sandbox, "contoso")}


def _graph_client(sandbox: Sandbox, credential: Any) -> tuple[GraphServiceClient, httpx.AsyncClient]:
    """msgraph-sdk's client pointed at the Graph stand-in (TLS from the sandbox CA), authenticating with
    ``credential`` through kiota's azure-identity provider. (msgraph's optional retry/redirect middleware is
    left out: it leaves a pooled connection unclosed, which the suite's warnings-as-errors reports.)"""
    tls = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    http = httpx.AsyncClient(base_url=_graph_url(sandbox), verify=tls, trust_env=False)
    auth = AzureIdentityAuthenticationProvider(credential, scopes=[GRAPH], allowed_hosts=["127.0.0.1"])
    adapter = GraphRequestAdapter(auth, client=http)
    adapter.base_url = _graph_url(sandbox)
    return GraphServiceClient(request_adapter=adapter), http


@pytest.mark.slow  # importing msgraph-sdk takes seconds
def test_msgraph_sdk_lists_security_incidents_with_the_async_credential(
    sandbox: Sandbox, server: BrokerServer, caller: Identity
) -> None:
    """``GraphServiceClient`` with the async credential lists the tenant's security incidents."""

    async def scenario() -> list[Any]:
        async with _async_credential(sandbox, server, caller, "fabrikam") as credential:
            graph, http = _graph_client(sandbox, credential)
            async with http:
                page = await graph.security.incidents.get()
        assert page is not None
        assert page.value is not None
        return list(page.value)

    incidents = asyncio.run(scenario())
    assert incidents
    assert {i.tenant_id for i in incidents} == {_guid(sandbox, "fabrikam")}
    assert all(i.id for i in incidents)


@pytest.mark.slow
def test_a_claims_challenge_reaches_entra_and_the_retry_succeeds(
    sandbox: Sandbox, server: BrokerServer, caller: Identity
) -> None:
    """A 401 claims challenge from Graph: msgraph-sdk asks the credential again with the claims, the broker
    skips its caches and passes them to Entra ID, and the retried call is served."""
    fabrikam = _guid(sandbox, "fabrikam")
    challenge = base64.b64encode(CLAIMS.encode()).decode()
    header = f'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", error="insufficient_claims", claims="{challenge}"'
    body = json.dumps(
        {
            "error": {
                "code": "InvalidAuthenticationToken",
                "message": "Continuous access evaluation resulted in challenge",
            }
        }
    )

    async def scenario() -> tuple[str, str, list[Any]]:
        async with _async_credential(sandbox, server, caller, "fabrikam") as credential:
            before = (await credential.get_token(GRAPH)).token
            sandbox.recorder.inject(
                Fault(
                    service="graph",
                    status=401,
                    body=body,
                    headers={"WWW-Authenticate": header},
                    path_contains="/security/incidents",
                )
            )
            graph, http = _graph_client(sandbox, credential)
            async with http:
                page = await graph.security.incidents.get()
            after = (await credential.get_token(GRAPH)).token
        assert page is not None
        assert page.value is not None
        return before, after, list(page.value)

    claims_before = sandbox.recorder.count(f"entra.token.claims:{fabrikam}")
    before, after, incidents = asyncio.run(scenario())
    assert sandbox.recorder.count(f"entra.token.claims:{fabrikam}") - claims_before == 1
    assert after != before  # the challenged token was replaced in the credential's cache
    assert incidents


def test_the_event_loop_keeps_running_during_a_cold_fetch(
    sandbox: Sandbox, server: BrokerServer, caller: Identity
) -> None:
    """While the broker waits on a slow Entra ID for a cold token, other tasks on the loop keep running."""
    sandbox.recorder.set_latency("entra", 1.0)

    async def scenario() -> tuple[int, str]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        async with _async_credential(sandbox, server, caller, "contoso") as credential:
            task = asyncio.create_task(ticker())
            token = await credential.get_token(GRAPH)
            done.set()
            await task
        return ticks, token.token

    contoso = _guid(sandbox, "contoso")
    server.container.issuer.evict(contoso)  # cold: the broker holds no token for the tenant
    before = sandbox.recorder.count(f"entra.token:{contoso}")
    ticks, token = asyncio.run(scenario())
    assert sandbox.recorder.count(f"entra.token:{contoso}") - before == 1  # cold: the broker went to Entra ID
    assert decode_claims(token)["tid"] == contoso
    assert ticks >= 20  # about 100 in the second Entra ID takes; a blocked loop ticks once


def test_the_brokers_retry_after_is_honoured(
    sandbox: Sandbox, azurite: str, caller: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller over its rate gets 429 with Retry-After; the credential waits that long and gets its token."""
    broker = start_entra_broker(
        sandbox, azurite, policy(grant(caller, ["contoso"], [GRAPH])), CALLER_RATE_PER_MINUTE="60"
    )
    try:
        headers = bearer(token_for(sandbox, caller))
        while broker.token("contoso", GRAPH, headers=headers).status_code != 429:
            pass
        caplog.set_level(logging.INFO, logger="broker")
        own = ManagedIdentityCredential(client_id=caller.app_id)
        with _credential(sandbox, broker, own, "contoso") as credential:
            token = credential.get_token(GRAPH)
        assert decode_claims(token.token)["tid"] == _guid(sandbox, "contoso")
        requestlog.flush_all()  # summary lines reach the log in batches
        lines = [line for r in caplog.records for line in r.getMessage().split("\n")]
        outcomes = [line for line in lines if line.startswith("token.issue")]
        assert len(outcomes) == 2
        assert "code=rate_limited" in outcomes[0]
        assert "outcome=issued" in outcomes[1]
    finally:
        broker.stop()
