"""Cloud presets: one setting picks Microsoft's documented hosts and scopes; endpoint settings may name only
those hosts (or loopback stand-ins); each refusal names its setting."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import INSTANT, build_container, decode_claims, start_broker

from broker.clouds import CLOUDS
from broker.errors import NotConfigured
from broker.settings import Settings, SettingsError
from sandbox.directory import Directory
from sandbox.server import Sandbox

CLIENT = "11111111-2222-3333-4444-555555555555"
BASE = {
    "BROKER_CLIENT_ID": CLIENT,
    "KEY_VAULT_URL": "https://partner-kv.vault.azure.net",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "CALLER_AUTH": "none",
}


def refused(env: dict[str, str]) -> dict[str, str]:
    """The problems of a refused environment, by setting name."""
    with pytest.raises(SettingsError) as info:
        Settings.from_environ(env)
    return {p.split(":", 1)[0]: p.split(":", 1)[1] for p in info.value.problems}


def test_public_is_the_default_cloud() -> None:
    """With no AZURE_CLOUD the public cloud's documented hosts and scopes apply."""
    s = Settings.from_environ(BASE)
    assert s.cloud.name == "public"
    assert s.authority_host == "https://login.microsoftonline.com"
    assert s.defender_api_url == "https://api.security.microsoft.com"
    assert s.graph_api_url == "https://graph.microsoft.com/v1.0"
    assert s.allowed_scopes == ("https://api.security.microsoft.com/.default", "https://graph.microsoft.com/.default")
    assert s.scope_roles == {
        "https://api.security.microsoft.com/.default": "Incident.Read.All",
        "https://graph.microsoft.com/.default": "SecurityIncident.Read.All",
    }
    assert s.cloud.token_exchange_audience == "api://AzureADTokenExchange"


def test_usgovernment_preset_changes_every_host_and_scope() -> None:
    """GCC High and DoD: Entra ID, Defender, Graph, Key Vault and the FIC audience all move to .us hosts."""
    s = Settings.from_environ(
        {**BASE, "AZURE_CLOUD": "usgovernment", "KEY_VAULT_URL": "https://partner-kv.vault.usgovcloudapi.net"}
    )
    assert s.authority_host == "https://login.microsoftonline.us"
    assert s.defender_api_url == "https://api-gov.security.microsoft.us"
    assert s.graph_api_url == "https://graph.microsoft.us/v1.0"
    assert s.allowed_scopes == (
        "https://api-gov.security.microsoft.us/.default",
        "https://graph.microsoft.us/.default",
    )
    assert s.scope_roles["https://api-gov.security.microsoft.us/.default"] == "Incident.Read.All"
    assert s.scope_roles["https://graph.microsoft.us/.default"] == "SecurityIncident.Read.All"
    assert s.cloud.token_exchange_audience == "api://AzureADTokenExchangeUSGov"


def test_china_preset_has_no_defender_host_and_no_defender_scope() -> None:
    """No Defender XDR API host is documented for 21Vianet: Graph only, unless a stand-in is named."""
    s = Settings.from_environ({**BASE, "AZURE_CLOUD": "china", "KEY_VAULT_URL": "https://partner-kv.vault.azure.cn"})
    assert s.authority_host == "https://login.chinacloudapi.cn"
    assert s.graph_api_url == "https://microsoftgraph.chinacloudapi.cn/v1.0"
    assert s.defender_api_url == ""
    assert s.allowed_scopes == ("https://microsoftgraph.chinacloudapi.cn/.default",)
    assert s.cloud.token_exchange_audience == "api://AzureADTokenExchangeChina"
    problems = refused(
        {
            **BASE,
            "AZURE_CLOUD": "china",
            "KEY_VAULT_URL": "https://partner-kv.vault.azure.cn",
            "DEFENDER_API_URL": "https://api.security.microsoft.com",
        }
    )
    assert "not a documented Defender XDR API host of the china cloud (none)" in problems["DEFENDER_API_URL"]


def test_explicit_documented_hosts_override_the_preset() -> None:
    """Explicit settings win when they name a documented host: DoD Graph, a regional Defender host."""
    s = Settings.from_environ(
        {
            **BASE,
            "AZURE_CLOUD": "USGovernment",
            "KEY_VAULT_URL": "https://partner-kv.vault.usgovcloudapi.net/",
            "GRAPH_API_URL": "https://dod-graph.microsoft.us/v1.0",
        }
    )
    assert s.graph_api_url == "https://dod-graph.microsoft.us/v1.0"
    assert s.key_vault_url == "https://partner-kv.vault.usgovcloudapi.net"
    public = Settings.from_environ({**BASE, "DEFENDER_API_URL": "https://api-eu.security.microsoft.com"})
    assert public.defender_api_url == "https://api-eu.security.microsoft.com"
    mde_form = Settings.from_environ({**BASE, "DEFENDER_API_URL": "https://uk.api.security.microsoft.com"})
    assert mde_form.defender_api_url == "https://uk.api.security.microsoft.com"


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("AUTHORITY_HOST", "https://login.evil.example", "not a documented Entra ID authority host of the public"),
        ("AUTHORITY_HOST", "https://login.microsoftonline.us", "not a documented Entra ID authority host"),
        ("AUTHORITY_HOST", "https://login.microsoftonline.com/common", "takes no path"),
        ("AUTHORITY_HOST", "http://login.microsoftonline.com", "not an https URL"),
        ("AUTHORITY_HOST", "https://login.microsoftonline.com:8443", "takes no port"),
        ("KEY_VAULT_URL", "https://vault.example.net", "not a Key Vault of the public cloud"),
        ("KEY_VAULT_URL", "https://partner-kv.vault.usgovcloudapi.net", "not a Key Vault of the public cloud"),
        ("KEY_VAULT_URL", "https://evil.example/partner-kv.vault.azure.net", "takes no path"),
        ("KEY_VAULT_URL", "https://a.b.vault.azure.net", "not a Key Vault"),
        ("KEY_VAULT_URL", "https://user:pw@partner-kv.vault.azure.net", "without credentials"),
        ("DEFENDER_API_URL", "https://api.security.microsoft.com.evil.example", "not a documented Defender"),
        ("DEFENDER_API_URL", "https://api-gov.security.microsoft.us", "not a documented Defender"),
        ("DEFENDER_API_URL", "https://evil.security.microsoft.com", "not a documented Defender"),
        ("DEFENDER_API_URL", "https://api.security.microsoft.com/api", "takes no path"),
        ("GRAPH_API_URL", "https://graph.microsoft.com", "must end in its version"),
        ("GRAPH_API_URL", "https://graph.microsoft.us/v1.0", "not a documented Microsoft Graph host"),
        ("GRAPH_API_URL", "https://graph.evil.example/v1.0", "not a documented Microsoft Graph host"),
    ],
)
def test_an_undocumented_endpoint_is_refused_by_name(name: str, value: str, why: str) -> None:
    """The app's credential and customers' tokens would go there: only the cloud's documented hosts."""
    problems = refused({**BASE, name: value})
    assert set(problems) == {name}
    assert why in problems[name]


@pytest.mark.parametrize("host", ["127.0.0.1:8443", "127.5.6.7", "localhost:1", "[::1]:9000"])
def test_loopback_stand_ins_are_accepted_in_every_cloud(host: str) -> None:
    """A loopback address can only be a stand-in on this machine: accepted with no extra setting."""
    for cloud in CLOUDS:
        s = Settings.from_environ(
            {
                **BASE,
                "AZURE_CLOUD": cloud,
                "AUTHORITY_HOST": f"https://{host}",
                "KEY_VAULT_URL": f"https://{host}",
                "DEFENDER_API_URL": f"https://{host}",
                "GRAPH_API_URL": f"https://{host}/v1.0",
            }
        )
        assert s.authority_host == f"https://{host}"
        assert s.defender_api_url == f"https://{host}"


def test_a_scope_of_another_cloud_is_refused() -> None:
    """Public scopes copied into a Gov deployment would fail at Entra ID; they are refused at start."""
    problems = refused(
        {
            **BASE,
            "AZURE_CLOUD": "usgovernment",
            "KEY_VAULT_URL": "https://partner-kv.vault.usgovcloudapi.net",
            "ALLOWED_SCOPES": "https://api.security.microsoft.com/.default",
            "SCOPE_ROLES": '{"https://api.security.microsoft.com/.default": "Incident.Read.All"}',
        }
    )
    assert set(problems) == {"ALLOWED_SCOPES"}
    assert "belongs to the public cloud, not usgovernment" in problems["ALLOWED_SCOPES"]


@pytest.mark.parametrize("role", ["", "   "])
def test_an_empty_role_is_refused(role: str) -> None:
    """An empty role would silently switch the issued-token role check off for that scope."""
    roles = f'{{"https://api.security.microsoft.com/.default": "{role}", "https://graph.microsoft.com/.default": "R"}}'
    problems = refused({**BASE, "SCOPE_ROLES": roles})
    assert set(problems) == {"SCOPE_ROLES"}
    assert "is empty" in problems["SCOPE_ROLES"]


@pytest.mark.parametrize(
    ("audience", "ok"),
    [
        (f"api://{CLIENT}", True),
        (f"API://{CLIENT.upper()}", True),
        (CLIENT, True),
        ("api://22222222-2222-3333-4444-555555555555", False),
        ("https://broker.contoso.com", False),
        (f"api://{CLIENT}/extra", False),
        ("https://graph.microsoft.com", False),
    ],
)
def test_caller_audience_is_the_brokers_own_uri_or_client_id(audience: str, ok: bool) -> None:
    """Only audiences derived from BROKER_CLIENT_ID: a foreign audience cannot widen what is accepted."""
    env = {**BASE, "CALLER_AUTH": "entra", "CALLER_TENANT_ID": CLIENT, "CALLER_AUDIENCE": audience}
    if ok:
        assert Settings.from_environ(env).caller_audience == audience.lower()
    else:
        problems = refused(env)
        assert "CALLER_AUDIENCE" in problems
        assert "api://<BROKER_CLIENT_ID>" in problems["CALLER_AUDIENCE"]


def test_an_unknown_cloud_is_refused_by_name() -> None:
    problems = refused({**BASE, "AZURE_CLOUD": "germany"})
    assert "must be one of public, usgovernment, china" in problems["AZURE_CLOUD"]


# -- the sandbox in another cloud's shape, end to end --------------------------------------------------


@pytest.fixture(scope="module", params=["usgovernment", "china"])
def cloud_box(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A second sandbox playing a national cloud (its issuers, audiences and resources), and the process
    environment (CA bundle, managed-identity endpoint) pointing at it for this module only."""
    request.getfixturevalue("sandbox")  # the session's environment is set first, and restored after
    box = Sandbox(tmp_path_factory.mktemp(request.param), directory=Directory(cloud=request.param)).start()
    env = box.env()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "IDENTITY_ENDPOINT", "IDENTITY_HEADER"):
            patch.setenv(name, env[name])
        try:
            yield box
        finally:
            box.stop()


def test_a_national_cloud_broker_serves_that_clouds_scopes(cloud_box: Sandbox, azurite: str) -> None:
    """AZURE_CLOUD with loopback stand-ins: the cloud's scopes are issued (and only they), and the vault is read
    through the cloud's challenge (its sign-in host and vault resource)."""
    shape = cloud_box.directory.shape
    cloud = CLOUDS[shape.name]
    before = cloud_box.recorder.counts()
    server = start_broker(cloud_box, azurite)
    try:
        assert server.container.settings.cloud is cloud
        for scope in cloud.allowed_scopes:
            response = server.token("contoso", scope)
            assert response.status_code == 200, response.text
            assert decode_claims(response.json()["access_token"])["aud"] == scope.removesuffix("/.default")
        public = server.token("contoso", "https://graph.microsoft.com/.default")
        assert public.status_code == 400
        assert public.json()["code"] == "scope_not_allowed"
    finally:
        server.stop()
    after = cloud_box.recorder.counts()
    assert after.get("kv.get", 0) - before.get("kv.get", 0) == 2  # the app's credential and the audit key
    assert after.get("kv.challenge", 0) - before.get("kv.challenge", 0) == 1


def test_federated_mode_uses_the_clouds_exchange_audience(cloud_box: Sandbox, azurite: str) -> None:
    """The managed identity's assertion is asked for the cloud's audience (…USGov, …China) and accepted; a
    broker left on the public preset asks for the public audience, which that cloud does not issue."""
    cloud = CLOUDS[cloud_box.directory.shape.name]
    before = cloud_box.recorder.count("entra.assertion:federated")
    server = start_broker(cloud_box, azurite, CLIENT_CREDENTIAL_MODE="federated")
    try:
        response = server.token("fabrikam", cloud.graph_scope)
        assert response.status_code == 200, response.text
    finally:
        server.stop()
    assert cloud_box.recorder.count("entra.assertion:federated") == before + 1
    wrong = start_broker(cloud_box, azurite, CLIENT_CREDENTIAL_MODE="federated", AZURE_CLOUD="public")
    try:
        response = wrong.token("fabrikam", "https://graph.microsoft.com/.default")
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "credential_unavailable"
    finally:
        wrong.stop()


def test_incident_sync_asks_for_the_clouds_scopes(cloud_box: Sandbox, azurite: str) -> None:
    """The sync's tokens are for the cloud's Defender or Graph resource (the stand-ins accept no other); a
    Defender tenant in a cloud without a Defender API fails as not configured, sending nothing."""
    cloud = CLOUDS[cloud_box.directory.shape.name]
    c = build_container(cloud_box, azurite, retry=INSTANT, SYNC_LOOKBACK_DAYS="3650")
    try:
        contoso = cloud_box.directory.tenant("contoso")
        assert contoso is not None
        api = "defender" if cloud.defender_url else "graph"
        tenant = c.tenants.add("contoso", contoso.tenant_id, api=api)  # type: ignore[arg-type]
        report = c.incidents.run(tenant)
        assert report.outcome == "complete", report
        assert report.stored == len(cloud_box.incidents.truth(contoso.tenant_id))
        if not cloud.defender_url:
            fabrikam = cloud_box.directory.tenant("fabrikam")
            assert fabrikam is not None
            before = (
                cloud_box.recorder.total("defender"),
                cloud_box.recorder.count(f"entra.token:{fabrikam.tenant_id}"),
            )
            with pytest.raises(NotConfigured, match="no defender API"):
                c.incidents.run(c.tenants.add("fabrikam", fabrikam.tenant_id, api="defender"))
            after = (
                cloud_box.recorder.total("defender"),
                cloud_box.recorder.count(f"entra.token:{fabrikam.tenant_id}"),
            )
            assert after == before
    finally:
        c.close()
