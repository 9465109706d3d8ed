"""Settings are parsed once, every problem is reported at once by name, and secrets never show."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from azure.identity import DefaultAzureCredential

from broker import wiring
from broker.settings import AZURITE_CONNECTION_STRING, SETTINGS, Settings, SettingsError, read_environment
from broker.storage import StorageAccount

ROOT = Path(__file__).resolve().parent.parent
GOOD = {
    "BROKER_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
    "KEY_VAULT_URL": "https://partner-kv.vault.azure.net",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "CALLER_AUTH": "none",
}


def test_a_minimal_environment_parses_with_documented_defaults() -> None:
    """Three settings are enough for a loopback development broker; the rest have defaults."""
    settings = Settings.from_environ(GOOD)
    assert settings.authority_host == "https://login.microsoftonline.com"
    assert settings.allowed_scopes == (
        "https://api.security.microsoft.com/.default",
        "https://graph.microsoft.com/.default",
    )
    assert settings.scope_roles["https://graph.microsoft.com/.default"] == "SecurityIncident.Read.All"
    assert settings.storage.connection_string is not None
    assert settings.storage.connection_string.reveal() == AZURITE_CONNECTION_STRING


def test_every_problem_is_reported_at_once_by_name() -> None:
    """A broken environment names each bad setting in one error, not one per start attempt."""
    env = {
        "BROKER_CLIENT_ID": "not-a-guid",
        "KEY_VAULT_URL": "http://vault.example.net",
        "SECRET_REFRESH_SECONDS": "soon",
        "CALLER_AUTH": "entra",
        "ALLOWED_SCOPES": "https://graph.microsoft.com/User.Read",
    }
    with pytest.raises(SettingsError) as info:
        Settings.from_environ(env)
    names = {p.split(":")[0] for p in info.value.problems}
    assert names == {
        "BROKER_CLIENT_ID",
        "KEY_VAULT_URL",
        "SECRET_REFRESH_SECONDS",
        "AzureWebJobsStorage",
        "CALLER_TENANT_ID",
        "CALLER_AUDIENCE",
        "ALLOWED_SCOPES",
        "SCOPE_ROLES",
    }


def test_a_secret_setting_never_shows_in_repr() -> None:
    """The storage connection string (it holds an account key) is hidden from repr and str."""
    settings = Settings.from_environ(GOOD)
    assert "Eby8vdM02" not in repr(settings)
    assert "Eby8vdM02" not in str(settings.storage)


def test_environment_overrides_local_settings_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like Core Tools: local.settings.json Values first, the process environment wins."""
    (tmp_path / "local.settings.json").write_text(
        json.dumps({"Values": {"CLIENT_SECRET_NAME": "from-file", "STORAGE_PREFIX": "filep"}})
    )
    monkeypatch.setenv("STORAGE_PREFIX", "envp")
    env = read_environment(tmp_path)
    assert env["CLIENT_SECRET_NAME"] == "from-file"
    assert env["STORAGE_PREFIX"] == "envp"


def test_unreadable_local_settings_is_a_named_problem(tmp_path: Path) -> None:
    (tmp_path / "local.settings.json").write_text("{not json")
    with pytest.raises(SettingsError, match=r"local\.settings\.json"):
        read_environment(tmp_path)


@pytest.mark.parametrize("host", [None, "0.0.0.0", "10.1.2.3", "broker.example.net"])
def test_no_caller_authentication_is_refused_off_loopback(host: str | None) -> None:
    """CALLER_AUTH=none is a development mode: any bind but loopback (or the Functions host) refuses it."""
    with pytest.raises(SettingsError, match="CALLER_AUTH"):
        wiring.build(Settings.from_environ(GOOD), bind_host=host)


def test_sample_settings_file_lists_every_setting() -> None:
    """local.settings.sample.json carries every setting the broker reads, with its default."""
    values = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    for setting in SETTINGS:
        assert setting.name in values, setting.name
        if setting.default and not setting.required and setting.name != "AzureWebJobsStorage":
            assert values[setting.name] == setting.default, setting.name


def test_readme_configuration_table_lists_every_setting() -> None:
    """The README's configuration table and the catalogue name the same settings."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Za-z0-9_]+)` \|", section, flags=re.M))
    assert documented == {s.name for s in SETTINGS}


def test_the_consent_redirect_uri_follows_website_hostname_unless_overridden() -> None:
    """Azure's WEBSITE_HOSTNAME gives https://<host>/api/consent/callback; CONSENT_REDIRECT_URI wins."""
    assert Settings.from_environ(GOOD).consent_redirect_uri is None
    derived = Settings.from_environ({**GOOD, "WEBSITE_HOSTNAME": "Broker-Prod.azurewebsites.net"})
    assert derived.consent_redirect_uri == "https://broker-prod.azurewebsites.net/api/consent/callback"
    custom = "https://broker.partner.example/api/consent/callback"
    both = Settings.from_environ({**GOOD, "WEBSITE_HOSTNAME": "x.azurewebsites.net", "CONSENT_REDIRECT_URI": custom})
    assert both.consent_redirect_uri == custom
    local = Settings.from_environ({**GOOD, "CONSENT_REDIRECT_URI": "http://127.0.0.1:7071/api/consent/callback"})
    assert local.consent_redirect_uri == "http://127.0.0.1:7071/api/consent/callback"
    for bad in ("http://broker.example/cb", "https://broker.example/cb?x=1", "ftp://x/y"):
        with pytest.raises(SettingsError) as info:
            Settings.from_environ({**GOOD, "CONSENT_REDIRECT_URI": bad})
        assert info.value.problems[0].startswith("CONSENT_REDIRECT_URI")
    with pytest.raises(SettingsError):
        Settings.from_environ({**GOOD, "WEBSITE_HOSTNAME": "evil.example/x"})


IDENTITY_STORAGE = {k: v for k, v in GOOD.items() if k != "AzureWebJobsStorage"}
US_GOV_URIS = {
    f"AzureWebJobsStorage__{service}ServiceUri": f"https://stbroker.{service}.core.usgovcloudapi.net/"
    for service in ("blob", "queue", "table")
}


def test_identity_storage_uses_the_service_uris_it_is_given() -> None:
    """Service URIs (a sovereign cloud's suffix here) are used as set; nothing assumes core.windows.net."""
    storage = Settings.from_environ({**IDENTITY_STORAGE, **US_GOV_URIS}).storage
    assert storage.connection_string is None
    assert dict(storage.service_uris) == {
        service: f"https://stbroker.{service}.core.usgovcloudapi.net" for service in ("blob", "queue", "table")
    }
    account = StorageAccount(storage, credential=DefaultAzureCredential())
    assert account.blobs.url.startswith("https://stbroker.blob.core.usgovcloudapi.net")
    assert account.queues.url.startswith("https://stbroker.queue.core.usgovcloudapi.net")
    assert account.tables.url.startswith("https://stbroker.table.core.usgovcloudapi.net")


def test_an_account_name_alone_gets_the_clouds_endpoints() -> None:
    """`AzureWebJobsStorage__accountName` alone: endpoints on the storage suffix of `AZURE_CLOUD`."""
    env = {**IDENTITY_STORAGE, "AzureWebJobsStorage__accountName": "stbroker"}
    assert Settings.from_environ(env).storage.service_uris["table"] == "https://stbroker.table.core.windows.net"
    china = {**env, "AZURE_CLOUD": "china", "KEY_VAULT_URL": "https://vault1.vault.azure.cn"}
    assert Settings.from_environ(china).storage.service_uris["queue"] == "https://stbroker.queue.core.chinacloudapi.cn"


def test_service_uris_come_as_a_set_of_three_over_https() -> None:
    """One service URI missing, or one over http, is named; the storage setting itself is not blamed."""
    env = {**IDENTITY_STORAGE, **US_GOV_URIS}
    del env["AzureWebJobsStorage__queueServiceUri"]
    env["AzureWebJobsStorage__tableServiceUri"] = "http://stbroker.table.core.usgovcloudapi.net"
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ(env)
    names = sorted(problem.split(":")[0] for problem in caught.value.problems)
    assert names == ["AzureWebJobsStorage__queueServiceUri", "AzureWebJobsStorage__tableServiceUri"]


def test_the_sample_files_placeholders_are_refused_by_name() -> None:
    """Copying local.settings.sample.json unchanged must not pass: each placeholder is named, once."""
    values = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    with pytest.raises(SettingsError) as info:
        Settings.from_environ(values)
    problems = info.value.problems
    for name in ("BROKER_CLIENT_ID", "KEY_VAULT_URL", "CALLER_TENANT_ID", "CALLER_AUDIENCE"):
        mine = [p for p in problems if p.startswith(f"{name}:")]
        assert len(mine) == 1, problems
        assert "placeholder from local.settings.sample.json" in mine[0]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KEY_VAULT_URL", "https://<your-vault>.vault.azure.net"),
        ("BROKER_CLIENT_ID", "00000000-0000-0000-0000-000000000000"),
        ("CALLER_AUDIENCE", "api://00000000-0000-0000-0000-000000000000"),
    ],
)
def test_one_placeholder_among_real_values_is_refused(name: str, value: str) -> None:
    """A single forgotten placeholder stops the start, naming that setting."""
    with pytest.raises(SettingsError) as info:
        Settings.from_environ({**GOOD, name: value})
    assert any(p.startswith(f"{name}: still the placeholder") for p in info.value.problems), info.value.problems
