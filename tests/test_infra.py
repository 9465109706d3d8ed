"""infra/: the Bicep parses, is locked down as designed, and sets the app settings the broker reads.

Parsed with pycep-parser (no Bicep compiler is available offline); `make lint` adds checkov on top
(infra/validate.py).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

from broker import settings as broker_settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

# Built-in role definition IDs, by the kind of resource they are assigned on.
KEY_VAULT_SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"
STORAGE_BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
STORAGE_QUEUE_DATA_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
STORAGE_TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
EXPECTED_ROLES = {
    ("Microsoft.KeyVault/vaults", KEY_VAULT_SECRETS_USER),
    ("Microsoft.Storage/storageAccounts", STORAGE_BLOB_DATA_OWNER),
    ("Microsoft.Storage/storageAccounts", STORAGE_QUEUE_DATA_CONTRIBUTOR),
    ("Microsoft.Storage/storageAccounts", STORAGE_TABLE_DATA_CONTRIBUTOR),
}

# Settings the Functions host reads (not the broker), which main.bicep sets beside the broker's own.
HOST_SETTINGS = {
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
}
# Flex Consumption takes these from functionAppConfig or rejects them; they must not be app settings.
FLEX_FORBIDDEN = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_EXTENSION_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "SCM_DO_BUILD_DURING_DEPLOYMENT",
    "ENABLE_ORYX_BUILD",
}
GUID = "00000000-0000-4000-8000-00000000abcd"
# Stand-in values for the settings main.bicep computes at deployment time (outputs, tenant(), ternaries).
DEPLOYMENT_VALUES = {
    "AzureWebJobsStorage__accountName": "stbrokertest01",
    "AzureWebJobsStorage__clientId": GUID,
    "APPLICATIONINSIGHTS_CONNECTION_STRING": f"InstrumentationKey={GUID}",
    "KEY_VAULT_URL": "https://kv-brokertest.vault.azure.net/",
    "MANAGED_IDENTITY_CLIENT_ID": GUID,
    "BROKER_CLIENT_ID": GUID,
    "CALLER_TENANT_ID": GUID,
    "CALLER_AUDIENCE": f"api://{GUID}",
}


@cache
def parsed(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = BicepParser().parse(file_path=path)
    return result


def resources_of_type(kind: str) -> list[tuple[Path, str, dict[str, Any]]]:
    return [
        (path, name, body)
        for path in BICEP_FILES
        for name, body in (parsed(path).get("resources") or {}).items()
        if body["type"] == kind and not body["existing"]
    ]


def only_resource(kind: str) -> dict[str, Any]:
    found = resources_of_type(kind)
    assert len(found) == 1, f"expected one {kind}, found {[(p.name, n) for p, n, _ in found]}"
    config: dict[str, Any] = found[0][2]["config"]
    return config


def main_app_settings() -> dict[str, Any]:
    """The object literal main.bicep passes as the function app's settings (before extraAppSettings)."""
    value = parsed(INFRA / "main.bicep")["modules"]["app"]["config"]["params"]["appSettings"]
    if "function" in value:  # union({...}, extraAppSettings)
        assert value["function"]["type"] == "union"
        value = value["function"]["parameters"]["arg_1"]
    assert isinstance(value, dict)
    return {key.strip("'"): item for key, item in value.items()}


def deployed_environment(credential_mode: str) -> dict[str, str]:
    """What the app settings resolve to in Azure: literals as written, parameters at their defaults."""
    params = parsed(INFRA / "main.bicep")["parameters"]
    env: dict[str, str] = {}
    for name, value in main_app_settings().items():
        if name == "CLIENT_CREDENTIAL_MODE":
            env[name] = credential_mode
        elif name in DEPLOYMENT_VALUES:
            env[name] = DEPLOYMENT_VALUES[name]
        elif isinstance(value, str) and value in params and params[value].get("default") is not None:
            env[name] = str(params[value]["default"])
        elif isinstance(value, str) and "${" not in value and value not in params:
            env[name] = value
        else:
            pytest.fail(f"{name}: add a stand-in value for {value!r} to DEPLOYMENT_VALUES")
    return env


def role_definition(value: Any, variables: dict[str, Any]) -> str:
    """The GUID in subscriptionResourceId('Microsoft.Authorization/roleDefinitions', <GUID or var.key>)."""
    call = value["function"]
    assert call["type"] == "subscription_resource_id"
    assert call["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions"
    name = call["parameters"]["resource_name_1"]
    if isinstance(name, str):
        return name
    operands = name["operator"]["operands"]
    result: str = variables[operands["operand_1"]]["value"][operands["operand_2"]]
    return result


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_bicep_file_parses(path: Path) -> None:
    """pycep-parser reads every template and module into resources or modules."""
    result = parsed(path)
    assert result.get("resources") or result.get("modules")


def test_infra_has_main_template_and_uses_only_local_modules() -> None:
    """main.bicep exists and no module comes from a registry, which checkov could not scan."""
    assert INFRA / "main.bicep" in BICEP_FILES
    for path in BICEP_FILES:
        for name, module in (parsed(path).get("modules") or {}).items():
            assert module["type"] == "local", f"{path.name}: module {name} is not a local file"
            assert (path.parent / module["detail"]["path"]).is_file()


def test_key_vault_uses_rbac_soft_delete_and_purge_protection() -> None:
    """The vault is in RBAC mode, keeps deleted secrets 90 days and cannot be purged early."""
    props = only_resource("Microsoft.KeyVault/vaults")["properties"]
    assert props["enableRbacAuthorization"] is True
    assert props["enableSoftDelete"] is True
    assert props["enablePurgeProtection"] is True
    assert props["softDeleteRetentionInDays"] == 90
    assert "accessPolicies" not in props


def test_storage_accepts_only_entra_id_over_tls12() -> None:
    """Shared keys and anonymous blob access are disabled, and TLS 1.2 is the minimum."""
    props = only_resource("Microsoft.Storage/storageAccounts")["properties"]
    assert props["allowSharedKeyAccess"] is False
    assert props["allowBlobPublicAccess"] is False
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["supportsHttpsTrafficOnly"] is True


def test_identity_holds_exactly_the_expected_roles() -> None:
    """Key Vault Secrets User on the vault and the three storage data roles on the account, nothing else."""
    found = []
    for path, name, body in resources_of_type("Microsoft.Authorization/roleAssignments"):
        document = parsed(path)
        config = body["config"]
        scope = config.get("scope")
        assert isinstance(scope, str), f"{name}: scope must be a resource symbol, not the resource group"
        scope_type = document["resources"][scope]["type"]
        role = role_definition(config["properties"]["roleDefinitionId"], document.get("variables") or {})
        assert config["properties"]["principalType"] == "ServicePrincipal"
        found.append((scope_type, role))
    assert sorted(found) == sorted(EXPECTED_ROLES)


def test_function_app_runs_python_311_on_flex_consumption_as_its_identity() -> None:
    """FC1 plan, Python 3.11, HTTPS only, user-assigned identity, package pulled with that identity."""
    plan = only_resource("Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    site = only_resource("Microsoft.Web/sites")
    assert site["identity"]["type"] == "UserAssigned"
    props = site["properties"]
    assert props["httpsOnly"] is True
    config = props["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "3.11"}
    assert config["deployment"]["storage"]["type"] == "blobContainer"
    assert config["deployment"]["storage"]["authentication"]["type"] == "UserAssignedIdentity"
    assert props["siteConfig"]["minTlsVersion"] == "1.2"
    assert props["siteConfig"]["ftpsState"] == "Disabled"


def test_app_settings_are_settings_the_broker_or_the_host_reads() -> None:
    """Every name main.bicep sets is in broker.settings.SETTINGS or read by the Functions host."""
    names = set(main_app_settings())
    known = {s.name for s in broker_settings.SETTINGS} | HOST_SETTINGS
    assert names - known == set()
    assert names & FLEX_FORBIDDEN == set()


def test_app_settings_give_the_host_identity_based_storage() -> None:
    """AzureWebJobsStorage is the account name plus the user-assigned identity, never a connection string."""
    app_settings = main_app_settings()
    assert "AzureWebJobsStorage" not in app_settings
    assert app_settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert {"AzureWebJobsStorage__accountName", "AzureWebJobsStorage__clientId"} <= set(app_settings)
    assert app_settings["AzureWebJobsStorage__clientId"] == app_settings["MANAGED_IDENTITY_CLIENT_ID"]


def test_app_settings_set_every_required_setting_and_callers_must_use_entra() -> None:
    """Required settings are all set, and caller authentication is Entra ID in Azure."""
    app_settings = main_app_settings()
    required = {s.name for s in broker_settings.SETTINGS if s.required}
    assert required - set(app_settings) == set()
    assert app_settings["CALLER_AUTH"] == "entra"


@pytest.mark.parametrize("mode", ["secret", "certificate", "federated"])
def test_deployed_app_settings_parse_as_broker_settings(mode: str) -> None:
    """The settings as deployed, for each credential mode, pass the broker's own settings parser."""
    parsed_settings = broker_settings.Settings.from_environ(deployed_environment(mode))
    assert parsed_settings.caller_auth == "entra"
    assert parsed_settings.storage.connection_string is None
    assert parsed_settings.managed_identity_client_id == GUID


def test_settings_left_unset_are_optional_and_documented() -> None:
    """A setting main.bicep leaves out has a default and is listed in docs/deploy.md."""
    app_settings = set(main_app_settings())
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    for setting in broker_settings.SETTINGS:
        if setting.name in app_settings or setting.name == "AzureWebJobsStorage":
            continue
        assert not setting.required, setting.name
        assert f"`{setting.name}`" in deploy_doc, f"{setting.name} is not documented in docs/deploy.md"


def test_binding_expressions_resolve_from_app_settings() -> None:
    """Every %NAME% in a trigger binding is an app setting: the host resolves it before Python runs."""
    sources = [path.read_text(encoding="utf-8") for path in ROOT.glob("*.py")]
    names = {"INCIDENT_SYNC_SCHEDULE", "INCIDENT_SYNC_QUEUE"}
    names |= {m for text in sources for m in re.findall(r"""["']%([A-Za-z_][A-Za-z0-9_]*)%["']""", text)}
    assert names - set(main_app_settings()) == set()


def test_parameters_file_matches_main_template() -> None:
    """main.parameters.json names only parameters of main.bicep and gives each one without a default."""
    params = parsed(INFRA / "main.bicep")["parameters"]
    given = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    assert set(given) - set(params) == set()
    assert {name for name, p in params.items() if p.get("default") is None} - set(given) == set()


def test_azure_yaml_deploys_this_directory_as_the_broker_function() -> None:
    """azure.yaml declares the one service azd deploys: this directory, Python, on Azure Functions."""
    text = (ROOT / "azure.yaml").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    service = lines[lines.index("broker:") + 1 : lines.index("broker:") + 4]
    assert sorted(service) == ["host: function", "language: python", "project: ."]
    tags = parsed(INFRA / "main.bicep")["modules"]["app"]["config"]["params"]["tags"]
    assert tags["function"]["parameters"]["arg_2"] == {"'azd-service-name'": "broker"}
