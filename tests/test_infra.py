"""infra/: the Bicep parses, is locked down as designed, would pass ARM's checks for Flex Consumption, and
sets the app settings the broker reads — from the azd environment as azd renders main.parameters.json.

Parsed with pycep-parser (no Bicep compiler is available offline); `make lint` adds checkov on top
(infra/validate.py). The app settings are evaluated from the parsed template by a small evaluator that
knows only the expression forms main.bicep uses and fails on any other, so a new form cannot slip past.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

from broker import settings as broker_settings
from broker.clouds import CLOUDS
from broker.policy import ROLE_TOKEN

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

# Built-in role definition IDs, by the kind of resource they are assigned on.
KEY_VAULT_SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"
STORAGE_BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
STORAGE_QUEUE_DATA_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
STORAGE_TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
MONITORING_METRICS_PUBLISHER = "3913510d-42f4-4e42-8a64-420c390055eb"
EXPECTED_ROLES = {
    ("Microsoft.KeyVault/vaults", KEY_VAULT_SECRETS_USER),
    ("Microsoft.Storage/storageAccounts", STORAGE_BLOB_DATA_OWNER),
    ("Microsoft.Storage/storageAccounts", STORAGE_QUEUE_DATA_CONTRIBUTOR),
    ("Microsoft.Storage/storageAccounts", STORAGE_TABLE_DATA_CONTRIBUTOR),
    ("Microsoft.Insights/components", MONITORING_METRICS_PUBLISHER),
}

# Settings the Functions host reads (not the broker), which main.bicep sets beside the broker's own.
HOST_SETTINGS = {
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
}

# "Flex Consumption plan deprecations": site properties and app settings that are "deprecated and shouldn't
# be used when creating function app resources" on the plan; ARM rejects some outright (ftpsState: error
# 51021). Source: learn.microsoft.com/azure/azure-functions/functions-app-settings#flex-consumption-plan-deprecations
# (MicrosoftDocs/azure-docs, articles/azure-functions/functions-app-settings.md, ms.date 07/11/2025), copied
# as data. The table writes site properties as `properties.<name>`; they are matched by their last name
# wherever they sit under the site's properties (siteConfig included), ignoring case as ARM does.
FLEX_DEPRECATED_APP_SETTINGS = frozenset(
    {
        "ENABLE_ORYX_BUILD",
        "FUNCTIONS_EXTENSION_VERSION",
        "FUNCTIONS_WORKER_RUNTIME",
        "FUNCTIONS_WORKER_RUNTIME_VERSION",
        "FUNCTIONS_MAX_HTTP_CONCURRENCY",
        "FUNCTIONS_WORKER_PROCESS_COUNT",
        "FUNCTIONS_WORKER_DYNAMIC_CONCURRENCY_ENABLED",
        "SCM_DO_BUILD_DURING_DEPLOYMENT",
        "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
        "WEBSITE_CONTENTOVERVNET",
        "WEBSITE_CONTENTSHARE",
        "WEBSITE_DNS_SERVER",
        "WEBSITE_MAX_DYNAMIC_APPLICATION_SCALE_OUT",
        "WEBSITE_NODE_DEFAULT_VERSION",
        "WEBSITE_RUN_FROM_PACKAGE",
        "WEBSITE_SKIP_CONTENTSHARE_VALIDATION",
        "WEBSITE_VNET_ROUTE_ALL",
    }
)
FLEX_DEPRECATED_SITE_PROPERTIES = frozenset(
    name.lower()
    for name in (
        "alwaysOn",
        "containerSize",
        "ftpsState",
        "isReserved",
        "IsXenon",
        "javaVersion",
        "LinuxFxVersion",
        "netFrameworkVersion",
        "powerShellVersion",
        "functionAppScaleLimit",
        "preWarmedInstanceCount",
        "use32BitWorkerProcess",
        "vnetBackupRestoreEnabled",
        "vnetContentShareEnabled",
        "vnetImagePullEnabled",
        "vnetRouteAllEnabled",
        "windowsFxVersion",
    )
)

# Which resource types carry a `location` (Azure Resource Manager template reference, one page per type).
# Tracked resources take one; so does basicPublishingCredentialsPolicies, a child that ARM has rejected
# without one (the Azure Verified Module for web sites sets it). Every type infra/ uses must be listed in
# one set or the other, so a new type forces the question.
TAKES_LOCATION = frozenset(
    {
        "Microsoft.Resources/resourceGroups",
        "Microsoft.ManagedIdentity/userAssignedIdentities",
        "Microsoft.OperationalInsights/workspaces",
        "Microsoft.Insights/components",
        "Microsoft.Storage/storageAccounts",
        "Microsoft.KeyVault/vaults",
        "Microsoft.Web/serverfarms",
        "Microsoft.Web/sites",
        "Microsoft.Web/sites/basicPublishingCredentialsPolicies",
    }
)
NO_LOCATION = frozenset(
    {
        "Microsoft.Authorization/roleAssignments",
        "Microsoft.Web/sites/config",
        "Microsoft.Storage/storageAccounts/blobServices",
        "Microsoft.Storage/storageAccounts/blobServices/containers",
        "Microsoft.Storage/storageAccounts/blobServices/containers/immutabilityPolicies",
        "Microsoft.Storage/storageAccounts/queueServices",
        "Microsoft.Storage/storageAccounts/queueServices/queues",
        "Microsoft.Storage/storageAccounts/tableServices",
        "Microsoft.Storage/storageAccounts/tableServices/tables",
    }
)

GUID = "00000000-0000-4000-8000-00000000abcd"
TENANT = "00000000-0000-4000-8000-0000000071d0"
# What main.bicep's deployment-time expressions evaluate to, by their text: module outputs, the deployment's
# subscription and cloud. The storage suffix is a sovereign cloud's, so nothing can pass by assuming
# core.windows.net.
DEPLOYMENT = {
    "storage.outputs.name": "stbrokertest01",
    "identity.outputs.clientId": GUID,
    "monitoring.outputs.connectionString": f"InstrumentationKey={GUID};IngestionEndpoint=https://in.example/",
    "vault.outputs.uri": "https://kv-brokertest.vault.usgovcloudapi.net/",
    "environment().suffixes.storage": "core.usgovcloudapi.net",
    "environment().name": "AzureUSGovernment",
    "subscription().tenantId": TENANT,
}
# The azd environment of a first deployment: what `azd env new` / `azd env set` put in .azure/<env>/.env.
AZD_ENV = {
    "AZURE_ENV_NAME": "broker-prod",
    "AZURE_LOCATION": "westeurope",
    "BROKER_CLIENT_ID": GUID,
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


def app_settings_expression() -> Any:
    return parsed(INFRA / "main.bicep")["modules"]["app"]["config"]["params"]["appSettings"]


def main_app_settings() -> dict[str, Any]:
    """The object literal main.bicep writes as the function app's settings (the last argument of union())."""
    value = app_settings_expression()
    if "function" in value:  # union(extraAppSettings, {...})
        assert value["function"]["type"] == "union"
        arguments = value["function"]["parameters"]
        value = arguments[f"arg_{len(arguments)}"]
    assert isinstance(value, dict)
    return {key.strip("'"): item for key, item in value.items()}


def accessor_text(expression: Any) -> str:
    """`a.b.c` or `f().b` as written, from pycep's nested property_accessor form."""
    if isinstance(expression, str):
        return expression
    if "function" in expression and not (expression["function"].get("parameters") or {}).get("subscription_id"):
        return f"{expression['function']['type']}()"
    operator = expression.get("operator", {})
    if operator.get("type") != "property_accessor":
        raise AssertionError(f"not a property access: {expression!r}")
    operands = operator["operands"]
    return f"{accessor_text(operands['operand_1'])}.{accessor_text(operands['operand_2'])}"


class Evaluator:
    """main.bicep's expressions, evaluated for given parameter values and the DEPLOYMENT stand-ins.

    pycep writes identifiers and string literals alike as Python strings: a string naming a parameter is
    that parameter, any other is a literal (with ``${...}`` interpolated). Unknown forms fail the test.
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params

    def __call__(self, expression: Any) -> Any:
        if isinstance(expression, bool | int) or expression is None:
            return expression
        if isinstance(expression, str):
            if expression in self.params:
                return self.params[expression]
            return re.sub(r"\$\{([^}]*)\}", lambda m: str(self.path(m.group(1))), expression)
        if isinstance(expression, list):
            return [self(item) for item in expression]
        if "function" in expression:
            call = expression["function"]
            return self.function(call["type"], list((call.get("parameters") or {}).values()))
        if "operator" in expression:
            operator = expression["operator"]
            operands = operator["operands"]
            if operator["type"] == "conditional":
                branch = "true_value" if self(operands["condition"]) else "false_value"
                return self(operands[branch])
            if operator["type"] == "index_accessor":
                return self.variable(operands["operand_1"])[self(operands["operand_2"])]
            return self.path(accessor_text(expression))
        return {key.strip("'"): self(value) for key, value in expression.items()}

    def variable(self, name: str) -> Any:
        return self(parsed(INFRA / "main.bicep")["variables"][name]["value"])

    def path(self, text: str) -> Any:
        if text in self.params:
            return self.params[text]
        if text not in DEPLOYMENT:
            raise AssertionError(f"add a stand-in for {text!r} to DEPLOYMENT")
        return DEPLOYMENT[text]

    def function(self, name: str, arguments: list[Any]) -> Any:
        values = [self(argument) for argument in arguments]
        if name == "union":
            merged: dict[str, Any] = {}
            for value in values:
                merged.update(value)  # ARM: a later object's value wins
            return merged
        if name == "empty":
            return values[0] in ("", {}, [], None)
        if name == "string":
            value = values[0]
            return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        raise AssertionError(f"the evaluator does not know {name}()")


def main_parameters() -> dict[str, Any]:
    return dict(parsed(INFRA / "main.bicep")["parameters"])


def envsubst(text: str, env: Mapping[str, str], unset: set[str]) -> str:
    """azd's substitution (drone/envsubst): ${NAME}, and ${NAME=default} etc. taking the default when empty."""

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3) or ""
        if name not in env:
            unset.add(name)
        return env.get(name, "") or default

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[=-](.*?))?\}", one, text)


def render_parameters(env: Mapping[str, str]) -> dict[str, Any]:
    """main.parameters.json as azd (>= 1.23.4) resolves it against an azd environment.

    As in azd's loadParameters: an object or array parameter given as a string is substituted alone and
    then parsed as JSON (so a JSON policy needs no escaping); any other parameter is substituted inside its
    JSON text; a parameter that comes out empty because its variable is unset is left out, so the template's
    default applies.
    """
    template = main_parameters()
    given = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    rendered: dict[str, Any] = {}
    for name, parameter in given.items():
        unset: set[str] = set()
        if template[name]["type"] in ("object", "array") and isinstance(parameter["value"], str):
            text = envsubst(parameter["value"], env, unset)
            if text == "" and unset:
                continue
            rendered[name] = json.loads(text)
            continue
        value = json.loads(envsubst(json.dumps(parameter), env, unset))["value"]
        if value == "" and unset:
            continue
        rendered[name] = value
    return rendered


def provision(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parameters, app settings) of an `azd provision` from this azd environment."""
    rendered = render_parameters(env)
    params: dict[str, Any] = {}
    defaults = Evaluator(params)
    for name, parameter in main_parameters().items():
        if name in rendered:
            params[name] = rendered[name]
        elif parameter.get("default") is not None:
            params[name] = defaults(parameter["default"])
        else:
            raise AssertionError(f"azd would prompt for {name}: the environment does not give it")
    for name, value in params.items():  # ARM checks the decorators before it creates anything
        bounds = {d["type"]: d["argument"] for d in main_parameters()[name].get("decorators", [])}
        size = len(value) if isinstance(value, str) else value if isinstance(value, int) else None
        low, high = ("min_length", "max_length") if isinstance(value, str) else ("min_value", "max_value")
        if size is not None and not bounds.get(low, size) <= size <= bounds.get(high, size):
            raise ValueError(f"ARM rejects {name}={value!r}: outside {bounds}")
        if "allowed" in bounds and value not in bounds["allowed"]:
            raise ValueError(f"ARM rejects {name}={value!r}: not one of {bounds['allowed']}")
    return params, Evaluator(params)(app_settings_expression())


def deployed_environment(credential_mode: str) -> dict[str, str]:
    """The app settings in Azure after `azd up` with this credential mode and nothing else set."""
    _, app_settings = provision({**AZD_ENV, "CLIENT_CREDENTIAL_MODE": credential_mode})
    return app_settings


def site_property_names(value: Any) -> set[str]:
    """Every key under a site's properties, at any depth, lowercased."""
    if isinstance(value, dict):
        names = {key.strip("'").lower() for key in value}
        return names.union(*(site_property_names(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(site_property_names(item) for item in value))
    return set()


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


def test_scale_parameters_stay_within_what_flex_consumption_accepts() -> None:
    """Maximum instances 40..1000 and memory 512/2048/4096 MB ("Flex Consumption plan hosting", Considerations)."""
    params = main_parameters()
    bounds = {d["type"]: d["argument"] for d in params["maximumInstanceCount"]["decorators"]}
    assert (bounds["min_value"], bounds["max_value"]) == (40, 1000)
    memory = {d["type"]: d["argument"] for d in params["instanceMemoryMB"]["decorators"]}
    assert sorted(memory["allowed"]) == [512, 2048, 4096]


def test_no_site_property_or_app_setting_is_on_the_flex_consumption_deprecations_list() -> None:
    """Nothing the site sets (siteConfig included) or any app setting is on Microsoft's Flex list."""
    site = only_resource("Microsoft.Web/sites")
    used = site_property_names(site["properties"])
    assert used & FLEX_DEPRECATED_SITE_PROPERTIES == set()
    assert "functionappconfig" in used  # the walk reaches the properties at all
    assert set(main_app_settings()) & FLEX_DEPRECATED_APP_SETTINGS == set()
    local_only = {"FUNCTIONS_WORKER_RUNTIME"}  # Core Tools needs it locally; Azure takes functionAppConfig
    sample = json.loads((ROOT / "local.settings.sample.json").read_text(encoding="utf-8"))["Values"]
    assert set(sample) & FLEX_DEPRECATED_APP_SETTINGS == local_only


def test_every_resource_that_takes_a_location_has_one() -> None:
    """Each resource of a located type sets `location`; every type in infra/ is classified one way."""
    for path in BICEP_FILES:
        for name, body in (parsed(path).get("resources") or {}).items():
            if body["existing"]:
                continue
            kind = body["type"]
            assert kind in TAKES_LOCATION | NO_LOCATION, f"{path.name}: {name}: classify {kind} in this test"
            has_location = "location" in body["config"]
            assert has_location == (kind in TAKES_LOCATION), f"{path.name}: {name} ({kind}) location"


def test_the_azd_service_tag_is_on_the_site_alone() -> None:
    """`azd-service-name` tags the Function App only (older azd refuses two tagged resources)."""
    tagged = [
        (path.name, name, body["type"])
        for path in BICEP_FILES
        for name, body in (parsed(path).get("resources") or {}).items()
        if "azd-service-name" in json.dumps(body["config"].get("tags"))
    ]
    assert [kind for _, _, kind in tagged] == ["Microsoft.Web/sites"], tagged
    app_module = parsed(INFRA / "main.bicep")["modules"]["app"]["config"]["params"]
    assert "azd-service-name" not in json.dumps(app_module["tags"])  # the plan gets the module's tags
    plan = only_resource("Microsoft.Web/serverfarms")
    assert plan["tags"] == "tags"


def test_application_insights_takes_telemetry_only_from_the_apps_identity() -> None:
    """Local auth is off; the host authenticates as the user-assigned identity, which may publish."""
    component = only_resource("Microsoft.Insights/components")
    assert component["properties"]["DisableLocalAuth"] is True
    app_settings = deployed_environment("secret")
    assert app_settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == f"Authorization=AAD;ClientId={GUID}"
    assert app_settings["MANAGED_IDENTITY_CLIENT_ID"] == GUID
    assert ("Microsoft.Insights/components", MONITORING_METRICS_PUBLISHER) in EXPECTED_ROLES


def test_storage_service_uris_come_from_the_clouds_suffix() -> None:
    """The host and the broker get blob, queue and table URIs built on environment().suffixes.storage."""
    app_settings = deployed_environment("secret")
    for service in ("blob", "queue", "table"):
        uri = app_settings[f"AzureWebJobsStorage__{service}ServiceUri"]
        assert uri == f"https://stbrokertest01.{service}.core.usgovcloudapi.net"
    assert "AzureWebJobsStorage__accountName" not in app_settings  # the host would assume the public cloud
    storage = broker_settings.Settings.from_environ(app_settings).storage
    assert storage.service_uris["table"] == "https://stbrokertest01.table.core.usgovcloudapi.net"
    for path in BICEP_FILES:
        assert "core.windows.net" not in path.read_text(encoding="utf-8"), path.name


def test_guid_parameters_are_validated_before_anything_is_created() -> None:
    """Every client or tenant ID parameter must be 36 characters: an empty one fails at ARM validation."""
    guid_params = {name: p for name, p in main_parameters().items() if name.endswith(("ClientId", "TenantId"))}
    assert set(guid_params) == {"brokerClientId", "callerTenantId"}
    for name, parameter in guid_params.items():
        bounds = {d["type"]: d["argument"] for d in parameter.get("decorators", [])}
        assert bounds.get("min_length") == 36, name
        assert bounds.get("max_length") == 36, name
    with pytest.raises(ValueError, match="brokerClientId"):
        provision({**AZD_ENV, "BROKER_CLIENT_ID": "not-set-yet"})
    with pytest.raises(ValueError, match="callerTenantId"):
        provision({**AZD_ENV, "CALLER_TENANT_ID": "contoso.onmicrosoft.com"})
    with pytest.raises(ValueError, match="credentialMode"):
        provision({**AZD_ENV, "CLIENT_CREDENTIAL_MODE": "password"})
    params, _ = provision(AZD_ENV)
    assert params["callerTenantId"] == TENANT  # the default: the deployment's own tenant


def test_app_settings_are_settings_the_broker_or_the_host_reads() -> None:
    """Every name main.bicep sets is in broker.settings.SETTINGS or read by the Functions host."""
    names = set(main_app_settings())
    known = {s.name for s in broker_settings.SETTINGS} | HOST_SETTINGS
    assert names - known == set()


def test_app_settings_give_the_host_identity_based_storage() -> None:
    """AzureWebJobsStorage is the service URIs plus the user-assigned identity, never a connection string."""
    app_settings = main_app_settings()
    assert "AzureWebJobsStorage" not in app_settings
    assert app_settings["AzureWebJobsStorage__credential"] == "managedidentity"
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
    assert parsed(INFRA / "main.bicep")["modules"]["app"]["config"]["params"]["serviceName"] == "broker"
    site_tags = only_resource("Microsoft.Web/sites")["tags"]
    assert site_tags["function"]["parameters"]["arg_2"] == {"'azd-service-name'": "serviceName"}


POLICY = {
    "groups": {"eu": ["contoso", "fabrikam"]},
    "callers": [{"name": "soc-dashboard", "app_id": GUID, "tenants": ["group:eu"], "scopes": ["*"]}],
}


def test_caller_policy_and_extra_settings_come_from_the_azd_environment() -> None:
    """`azd env set CALLER_POLICY '<json>'` reaches the app as that policy; extras add settings, not overrides."""
    env = {
        **AZD_ENV,
        "CALLER_POLICY": json.dumps(POLICY, indent=2),  # quotes and newlines, as an operator pastes it
        "EXTRA_APP_SETTINGS": json.dumps({"CALLER_RATE_PER_MINUTE": "1200", "CALLER_AUTH": "none"}),
    }
    params, app_settings = provision(env)
    assert params["callerPolicy"] == POLICY
    assert json.loads(app_settings["CALLER_POLICY"]) == POLICY
    assert app_settings["CALLER_RATE_PER_MINUTE"] == "1200"
    assert app_settings["CALLER_AUTH"] == "entra"  # the template's own settings win over extras
    settings = broker_settings.Settings.from_environ(app_settings)
    assert settings.caller_rate_per_minute == 1200

    def decide(tenant: str) -> bool:
        return settings.caller_policy.decide(
            object_id="00000000-0000-4000-8000-0000000000aa",
            app_id=GUID,
            roles=frozenset({ROLE_TOKEN}),
            action="token",
            tenant_name=tenant,
            tenant_id="00000000-0000-4000-8000-0000000000bb",
            scope="https://api.security.microsoft.com/.default",
            app_only=True,
        ).allowed

    assert decide("fabrikam")  # through the group the pasted policy defines
    assert not decide("northwind")


def test_without_a_caller_policy_the_deployment_denies_everyone() -> None:
    """CALLER_POLICY unset in the azd environment: the parameter is left out and nobody is granted."""
    params, app_settings = provision(AZD_ENV)
    assert params["callerPolicy"] == {}
    assert app_settings["CALLER_POLICY"] == ""
    policy = broker_settings.Settings.from_environ(app_settings).caller_policy
    decision = policy.decide(
        object_id=GUID, app_id=GUID, roles=frozenset({ROLE_TOKEN}), action="token", tenant_name="contoso", app_only=True
    )
    assert decision.reason == "no_policy_entry"


def test_every_provision_renders_the_same_settings_from_the_azd_environment() -> None:
    """The policy lives in the azd environment, so each `azd provision` writes it again (nothing to lose)."""
    env = {**AZD_ENV, "CALLER_POLICY": json.dumps(POLICY), "CLIENT_CERTIFICATE_NAME": "broker-cert-2027"}
    first, second = provision(env)[1], provision(dict(env))[1]
    assert first == second
    assert first["CLIENT_CERTIFICATE_NAME"] == "broker-cert-2027"
    assert provision(AZD_ENV)[1]["CLIENT_CERTIFICATE_NAME"] == "broker-client-certificate"


def test_a_policy_that_is_not_json_stops_the_provision() -> None:
    """A mistyped CALLER_POLICY fails while azd reads the parameters, before anything is deployed."""
    with pytest.raises(json.JSONDecodeError):
        provision({**AZD_ENV, "CALLER_POLICY": "{callers: []}"})


def test_the_broker_is_told_which_cloud_it_was_deployed_in() -> None:
    """AZURE_CLOUD follows environment().name for each cloud the broker knows, and only those."""
    names = Evaluator({}).variable("brokerClouds")
    assert set(names.values()) == set(CLOUDS)
    assert set(names) == {"AzureCloud", "AzureUSGovernment", "AzureChinaCloud"}  # ARM's environment().name
    app_settings = deployed_environment("secret")
    assert app_settings["AZURE_CLOUD"] == "usgovernment"
    settings = broker_settings.Settings.from_environ(app_settings)
    assert settings.authority_host == "https://login.microsoftonline.us"


# `az keyvault certificate get-default-policy` as Azure CLI prints it (the keys its own scenario test reads;
# the lifetime action as Key Vault's default policy has it: renew by itself 90 days before expiry).
CLI_DEFAULT_CERTIFICATE_POLICY = {
    "issuerParameters": {"certificateTransparency": None, "certificateType": None, "name": "Self"},
    "keyProperties": {"curve": None, "exportable": True, "keySize": 2048, "keyType": "RSA", "reuseKey": True},
    "lifetimeActions": [{"action": {"actionType": "AutoRenew"}, "trigger": {"daysBeforeExpiry": 90}}],
    "secretProperties": {"contentType": "application/x-pkcs12"},
    "x509CertificateProperties": {"subject": "CN=CLIGetDefaultPolicy", "validityInMonths": 12},
}


def credentials_doc_policy_script() -> str:
    """The Python program docs/credentials.md pipes the default policy through."""
    text = (ROOT / "docs" / "credentials.md").read_text(encoding="utf-8")
    found = re.search(r"get-default-policy \| python3 -c '\n(.*?)' > broker-certificate-policy\.json", text, re.S)
    assert found, "docs/credentials.md no longer derives the certificate policy from the default one"
    return found.group(1)


@pytest.mark.parametrize("style", ["camelCase", "snake_case"])
def test_the_documented_certificate_policy_reminds_instead_of_renewing(style: str) -> None:
    """The doc's policy keeps the default's key and trigger but turns AutoRenew into EmailContacts."""
    policy = json.loads(json.dumps(CLI_DEFAULT_CERTIFICATE_POLICY))
    if style == "snake_case":
        policy["lifetime_actions"] = [{"action": {"action_type": "AutoRenew"}, "trigger": {"days_before_expiry": 90}}]
        del policy["lifetimeActions"]
    result = subprocess.run(
        [sys.executable, "-c", credentials_doc_policy_script()],
        input=json.dumps(policy),
        capture_output=True,
        text=True,
        check=True,
    )
    written = json.loads(result.stdout)
    assert "AutoRenew" not in result.stdout
    actions = written.get("lifetimeActions") or written["lifetime_actions"]
    assert [entry["action"] for entry in actions] in (
        [{"actionType": "EmailContacts"}],
        [{"action_type": "EmailContacts"}],
    )
    assert written["keyProperties"]["exportable"] is True  # the broker reads the key through the secret


def test_every_documented_certificate_uses_the_operator_controlled_policy() -> None:
    """No `az keyvault certificate create` in the docs takes the default, self-renewing policy."""
    for path in sorted((ROOT / "docs").glob("*.md")):
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        for command in re.findall(r"az keyvault certificate create[^\n]*", text):
            assert "--policy @broker-certificate-policy.json" in command, f"{path.name}: {command}"


def test_deploy_guide_ends_with_the_check_and_names_the_tool_versions() -> None:
    """docs/deploy.md's last section is the post-`azd up` check; both guides give the same minimums."""
    deploy = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    last = deploy.rsplit("\n## ", 1)[1]
    assert last.startswith("The check after `azd up`")
    for step in ("/api/health", "/api/health/ready", "python -m broker doctor", "/api/token"):
        assert step in last, step
    credentials = (ROOT / "docs" / "credentials.md").read_text(encoding="utf-8")
    for minimum in ("1.23.4", "2.60.0"):
        assert minimum in deploy.split("## Tools", 1)[1].split("\n## ", 1)[0], minimum
        assert minimum in credentials, minimum
    required = re.search(r"^requiredVersions:\n  azd: \"(.*)\"$", (ROOT / "azure.yaml").read_text(), re.M)
    assert required, "azure.yaml does not make azd refuse a version older than the guide needs"
    assert required.group(1) == ">= 1.23.4"
