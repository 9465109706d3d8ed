"""Typed settings, parsed once, every problem reported at once and by name.

Settings come from the process environment (Azure app settings arrive that way) laid over the ``Values``
of ``local.settings.json`` when that file exists, as Azure Functions Core Tools does. ``SETTINGS`` is the
catalogue: the README table, ``local.settings.sample.json`` and the Bicep templates are tested against it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from broker.clouds import (
    CLOUDS,
    Cloud,
    EndpointRefused,
    check_authority,
    check_defender,
    check_graph,
    check_key_vault,
    is_loopback_host,
    scope_cloud,
)
from broker.identifiers import parse_guid
from broker.policy import Policy, PolicyError

DEFENDER_SCOPE = CLOUDS["public"].defender_scope
GRAPH_SCOPE = CLOUDS["public"].graph_scope
AZURITE_CONNECTION_STRING = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
    "QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;"
)
STORAGE_SERVICES = ("blob", "queue", "table")
_KV_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,19}$")
_HOSTNAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62})(?:\.[a-z0-9](?:[a-z0-9-]{0,62}))*(?::[0-9]{1,5})?$")
CONSENT_CALLBACK_PATH = "/api/consent/callback"
_QUEUE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,40}$")


class SettingsError(Exception):
    """One or more settings are missing or malformed; ``problems`` names each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings: " + "; ".join(problems))


@dataclass(frozen=True)
class Setting:
    """One entry of the catalogue."""

    name: str
    description: str
    default: str | None = None
    required: bool = False
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("BROKER_CLIENT_ID", "Client ID (GUID) of the multi-tenant app registration.", required=True),
    Setting(
        "KEY_VAULT_URL", "https URL of the Key Vault holding the app's credential and the audit key.", required=True
    ),
    Setting("CLIENT_CREDENTIAL_MODE", "`secret`, `certificate` or `federated` (managed identity).", "secret"),
    Setting("CLIENT_SECRET_NAME", "Key Vault secret holding the app's client secret.", "broker-client-secret"),
    Setting(
        "CLIENT_CERTIFICATE_NAME",
        "Key Vault certificate (its secret: PFX or PEM with the key) used in `certificate` mode.",
        "broker-client-certificate",
    ),
    Setting(
        "CLIENT_CERTIFICATE_SEND_X5C",
        "`true`: each certificate assertion carries the chain (`x5c`), for an app that trusts certificates by "
        "subject name and issuer; `false`: the SHA-256 thumbprint (`x5t#S256`) alone.",
        "false",
    ),
    Setting(
        "MANAGED_IDENTITY_CLIENT_ID",
        "Client ID of the user-assigned identity for Key Vault (and the app credential in `federated` mode). "
        "Empty: system-assigned identity, or developer login locally.",
        "",
    ),
    Setting(
        "AZURE_CLOUD",
        "`public`, `usgovernment` (GCC High and DoD) or `china`: picks the default Entra ID, Defender, Graph "
        "and Key Vault hosts and scopes, and the only hosts the endpoint settings may name (loopback aside).",
        "public",
    ),
    Setting("AUTHORITY_HOST", "Entra ID authority host. Empty: the cloud's (`https://login.microsoftonline.com`).", ""),
    Setting(
        "AzureWebJobsStorage",
        "Storage connection string (`UseDevelopmentStorage=true` for Azurite). In Azure use the "
        "identity-based `AzureWebJobsStorage__accountName` instead.",
        "",
        secret=True,
    ),
    Setting(
        "AzureWebJobsStorage__accountName",
        "Storage account name for identity-based access; the broker builds its endpoints on `AZURE_CLOUD`'s "
        "storage suffix, the Functions host on the public cloud's (elsewhere set the service URIs).",
        "",
    ),
    *(
        Setting(
            f"AzureWebJobsStorage__{service}ServiceUri",
            f"https URI of the account's {service} service for identity-based access; set all three service "
            "URIs instead of the account name in a sovereign cloud or with custom DNS.",
            "",
        )
        for service in STORAGE_SERVICES
    ),
    Setting("STORAGE_PREFIX", "Prefix of the broker's tables, queues and containers.", "broker"),
    Setting(
        "ALLOWED_SCOPES",
        "Comma-separated scopes callers may ask for. Empty: the cloud's Defender XDR and Graph `/.default` scopes.",
        "",
    ),
    Setting(
        "SCOPE_ROLES",
        "JSON object: the app role each scope's tokens must carry (checked on every new token). Empty: "
        "`Incident.Read.All` for Defender XDR, `SecurityIncident.Read.All` for Graph.",
        "",
    ),
    Setting("SECRET_REFRESH_SECONDS", "How long a credential read from Key Vault is used before re-reading.", "300"),
    Setting("CALLER_AUTH", "`entra` (callers present Entra tokens) or `none` (loopback development only).", "entra"),
    Setting("CALLER_TENANT_ID", "Home tenant (GUID) of the internal callers; required with `entra`.", ""),
    Setting(
        "CALLER_AUDIENCE",
        "Audience of caller tokens: `api://<BROKER_CLIENT_ID>` (v1 tokens) or the client ID itself (v2).",
        "",
    ),
    Setting(
        "CALLER_POLICY",
        "JSON policy (deny by default): which caller (object or app id) may have which tenants, groups of "
        "tenants or `*`, which scopes, and who is admin; see `broker/policy.py`. A change restarts the app.",
        "",
    ),
    Setting(
        "CALLER_RATE_PER_MINUTE",
        "Requests a caller may make per minute on each instance (token bucket; 429 with Retry-After).",
        "600",
    ),
    Setting("AUDIT_MODE", "`strict`: no token leaves unless its audit record was written; `best_effort`.", "strict"),
    Setting(
        "AUDIT_KEY_NAME",
        "Key Vault secret holding the audit log's MAC key (at least 32 random characters; rotate by adding a version).",
        "broker-audit-key",
    ),
    Setting(
        "AUDIT_WRITER",
        "`process`: audit storage writes run in a child process fed over a pipe; `thread`: in the broker's process.",
        "process",
    ),
    Setting(
        "AUDIT_DRAIN_SECONDS",
        "On shutdown, how long the audit writer may take to write what is queued (keep it within the host's shutdown window).",
        "5",
    ),
    Setting(
        "DEFENDER_API_URL",
        "Defender XDR API base URL. Empty: the cloud's (`https://api.security.microsoft.com`); per-tenant "
        "regional hosts are set in the registry (`tenants add --region`).",
        "",
    ),
    Setting(
        "GRAPH_API_URL",
        "Microsoft Graph base URL with version. Empty: the cloud's (`https://graph.microsoft.com/v1.0`).",
        "",
    ),
    Setting("INCIDENT_SYNC_SCHEDULE", "NCRONTAB schedule of the incident prefetch timer.", "0 */5 * * * *"),
    Setting("INCIDENT_SYNC_QUEUE", "Queue of per-tenant sync messages.", "incident-sync"),
    Setting("SYNC_OVERLAP_SECONDS", "Watermark overlap window re-read on every sync.", "300"),
    Setting("SYNC_LOOKBACK_DAYS", "How far back the first sync of a tenant reaches.", "30"),
    Setting(
        "SYNC_LEASE_SECONDS", "Lease a sync run holds on its tenant (15-60); a killed run's lapses after it.", "60"
    ),
    Setting("SYNC_BUDGET_PER_MINUTE", "Incident API calls per tenant per minute (documented quota: 50).", "40"),
    Setting("SYNC_BUDGET_PER_HOUR", "Incident API calls per tenant per hour (documented quota: 1,500).", "1200"),
    Setting(
        "WEBSITE_HOSTNAME",
        "Set by Azure: the app's default host name. The admin-consent redirect URI is "
        "`https://<it>/api/consent/callback` unless `CONSENT_REDIRECT_URI` says otherwise; set it for the CLI "
        "so `tenants add` prints the app's link.",
        "",
    ),
    Setting(
        "CONSENT_REDIRECT_URI",
        "Where admin consent sends the administrator back (registered on the app): overrides the URI derived "
        "from `WEBSITE_HOSTNAME` (a custom domain, or `http://127.0.0.1:7071/...` locally).",
        "",
    ),
    Setting("CONSENT_LINK_TTL_HOURS", "How long an admin-consent link (its `state`) can be used, once.", "168"),
    Setting(
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
        "Application Insights connection string: when set, requests, dependencies and log lines go there "
        "through OpenTelemetry (azure-monitor-opentelemetry); empty: no telemetry at all.",
        "",
    ),
)
SETTING_NAMES = frozenset(s.name for s in SETTINGS)


class Secret:
    """A string whose repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


CredentialMode = Literal["secret", "certificate", "federated"]
CallerAuth = Literal["none", "entra"]
AuditMode = Literal["strict", "best_effort"]
AuditWriter = Literal["process", "thread"]


@dataclass(frozen=True)
class StorageSettings:
    """Where the broker's tables, queues and blobs live: a connection string or an identity-based account,
    whose service URIs (``blob``, ``queue``, ``table``) are as set, else the public cloud's for its name."""

    connection_string: Secret | None
    account_name: str | None
    prefix: str
    service_uris: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    cloud: Cloud
    broker_client_id: str
    key_vault_url: str
    credential_mode: CredentialMode
    client_secret_name: str
    client_certificate_name: str
    client_certificate_send_x5c: bool
    managed_identity_client_id: str | None
    authority_host: str
    storage: StorageSettings
    allowed_scopes: tuple[str, ...]
    scope_roles: Mapping[str, str]
    secret_refresh_seconds: int
    caller_auth: CallerAuth
    caller_tenant_id: str | None
    caller_audience: str | None
    caller_policy: Policy
    caller_rate_per_minute: int
    audit_mode: AuditMode
    audit_key_name: str
    audit_writer: AuditWriter
    audit_drain_seconds: int
    defender_api_url: str
    graph_api_url: str
    sync_queue: str
    sync_overlap_seconds: int
    sync_lookback_days: int
    sync_lease_seconds: int
    sync_budget_per_minute: int
    sync_budget_per_hour: int
    consent_redirect_uri: str | None = None
    consent_link_ttl_hours: int = 168
    applicationinsights_connection_string: str | None = field(default=None, repr=False)
    raw: Mapping[str, str] = field(repr=False, default_factory=dict)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse settings from ``environ`` (default: ``local.settings.json`` Values overlaid by os.environ)."""
        return _Parser(environ if environ is not None else read_environment()).parse()


def read_environment(cwd: Path | None = None) -> dict[str, str]:
    """The process environment laid over ``local.settings.json`` ``Values`` (as Core Tools does)."""
    merged: dict[str, str] = {}
    path = (cwd or Path.cwd()) / "local.settings.json"
    if path.is_file():
        try:
            values = json.loads(path.read_text(encoding="utf-8")).get("Values", {})
        except (OSError, ValueError) as exc:
            raise SettingsError([f"local.settings.json: cannot read it ({exc.__class__.__name__})"]) from exc
        merged.update({str(k): str(v) for k, v in values.items()})
    merged.update(os.environ)
    return merged


_ANGLE_PLACEHOLDER = re.compile(r"<[A-Za-z][A-Za-z0-9 _.-]*>")
_ZERO_GUID = "00000000-0000-0000-0000-000000000000"


def is_placeholder(value: str) -> bool:
    """Whether ``value`` is one of the sample file's stand-ins for a real value: an ``<angle-bracketed>`` word
    (``https://<your-vault>.vault.azure.net``) or the all-zero GUID (as itself or inside a URI)."""
    return bool(_ANGLE_PLACEHOLDER.search(value)) or _ZERO_GUID in value.lower()


class _Parser:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.env = environ
        self.problems: list[str] = []
        self.defaults = {s.name: s.default or "" for s in SETTINGS}
        self.placeholders: set[str] = set()

    def get(self, name: str) -> str:
        value = self.env.get(name)
        text = (value if value is not None else self.defaults[name]).strip()
        if name not in self.placeholders and is_placeholder(text):
            self.placeholders.add(name)
            self.problems.append(f"{name}: still the placeholder from local.settings.sample.json ({text!r})")
        return text

    def fail(self, name: str, why: str) -> None:
        if name not in self.placeholders:  # one problem per setting: the placeholder says it all
            self.problems.append(f"{name}: {why}")

    def guid(self, name: str, *, required: bool) -> str:
        value = self.get(name).lower()
        if not value:
            if required:
                self.fail(name, "missing (a tenant or client GUID)")
            return ""
        if parse_guid(value) is None:
            self.fail(name, "not a GUID")
        return value

    def integer(self, name: str, low: int, high: int) -> int:
        raw = self.get(name)
        try:
            value = int(raw)
        except ValueError:
            self.fail(name, f"not an integer: {raw!r}")
            return low
        if not low <= value <= high:
            self.fail(name, f"must be between {low} and {high}")
        return value

    def choice(self, name: str, options: tuple[str, ...]) -> str:
        value = self.get(name).lower()
        if value not in options:
            self.fail(name, f"must be one of {', '.join(options)}")
            return options[0]
        return value

    def pattern(self, name: str, regex: re.Pattern[str], what: str) -> str:
        value = self.get(name)
        if not regex.fullmatch(value):
            self.fail(name, f"must be {what}")
        return value

    def parse(self) -> Settings:
        cloud = CLOUDS[self.choice("AZURE_CLOUD", tuple(CLOUDS))]
        mode = self.choice("CLIENT_CREDENTIAL_MODE", ("secret", "certificate", "federated"))
        mi_client_id = self.guid("MANAGED_IDENTITY_CLIENT_ID", required=mode == "federated")
        caller_auth = self.choice("CALLER_AUTH", ("entra", "none"))
        client_id = self.guid("BROKER_CLIENT_ID", required=True)
        scopes = self._scopes(cloud)
        settings = Settings(
            cloud=cloud,
            broker_client_id=client_id,
            key_vault_url=self.endpoint("KEY_VAULT_URL", "", check_key_vault, cloud, required=True),
            credential_mode=mode,  # type: ignore[arg-type]
            client_secret_name=self.pattern("CLIENT_SECRET_NAME", _KV_NAME, "a Key Vault secret name"),
            client_certificate_name=self.pattern("CLIENT_CERTIFICATE_NAME", _KV_NAME, "a Key Vault name"),
            client_certificate_send_x5c=self.choice("CLIENT_CERTIFICATE_SEND_X5C", ("false", "true")) == "true",
            managed_identity_client_id=mi_client_id or None,
            authority_host=self.endpoint("AUTHORITY_HOST", cloud.authority_host, check_authority, cloud),
            storage=self._storage(cloud),
            allowed_scopes=scopes,
            scope_roles=self._scope_roles(scopes, cloud),
            secret_refresh_seconds=self.integer("SECRET_REFRESH_SECONDS", 1, 86_400),
            caller_auth=caller_auth,  # type: ignore[arg-type]
            caller_tenant_id=self.guid("CALLER_TENANT_ID", required=caller_auth == "entra") or None,
            caller_audience=self._caller_audience(client_id, required=caller_auth == "entra"),
            caller_policy=self._caller_policy(scopes, caller_auth),
            caller_rate_per_minute=self.integer("CALLER_RATE_PER_MINUTE", 1, 1_000_000),
            audit_mode=self.choice("AUDIT_MODE", ("strict", "best_effort")),  # type: ignore[arg-type]
            audit_key_name=self.pattern("AUDIT_KEY_NAME", _KV_NAME, "a Key Vault secret name"),
            audit_writer=self.choice("AUDIT_WRITER", ("process", "thread")),  # type: ignore[arg-type]
            audit_drain_seconds=self.integer("AUDIT_DRAIN_SECONDS", 0, 600),
            defender_api_url=self.endpoint(
                "DEFENDER_API_URL", cloud.defender_url, check_defender, cloud, required=bool(cloud.defender_url)
            ),
            graph_api_url=self.endpoint("GRAPH_API_URL", cloud.graph_url, check_graph, cloud),
            sync_queue=self.pattern("INCIDENT_SYNC_QUEUE", _QUEUE, "a storage queue name"),
            sync_overlap_seconds=self.integer("SYNC_OVERLAP_SECONDS", 0, 86_400),
            sync_lookback_days=self.integer("SYNC_LOOKBACK_DAYS", 1, 3650),
            sync_lease_seconds=self.integer("SYNC_LEASE_SECONDS", 15, 60),
            sync_budget_per_minute=self.integer("SYNC_BUDGET_PER_MINUTE", 1, 50),
            sync_budget_per_hour=self.integer("SYNC_BUDGET_PER_HOUR", 1, 1500),
            consent_redirect_uri=self._consent_redirect_uri(),
            consent_link_ttl_hours=self.integer("CONSENT_LINK_TTL_HOURS", 1, 24 * 90),
            applicationinsights_connection_string=self.get("APPLICATIONINSIGHTS_CONNECTION_STRING") or None,
            raw={k: v for k, v in self.env.items() if k in SETTING_NAMES},
        )
        if self.problems:
            raise SettingsError(self.problems)
        return settings

    def endpoint(
        self, name: str, preset: str, check: Callable[[str, Cloud], None], cloud: Cloud, *, required: bool = True
    ) -> str:
        """An endpoint URL: the setting, else the cloud's preset; a documented host of that cloud or loopback."""
        value = self.get(name).rstrip("/") or preset
        if not value:
            if required:
                self.fail(name, f"missing (an https URL; the {cloud.name} cloud has no default)")
            return ""
        try:
            check(value, cloud)
        except EndpointRefused as exc:
            self.fail(name, str(exc))
        return value

    def _scopes(self, cloud: Cloud) -> tuple[str, ...]:
        raw = self.get("ALLOWED_SCOPES")
        scopes = tuple(s.strip() for s in raw.split(",") if s.strip()) if raw else cloud.allowed_scopes
        if not scopes:
            self.fail("ALLOWED_SCOPES", "no scope listed")
        for scope in scopes:
            if not scope.endswith("/.default") or not urlsplit(scope).scheme:
                self.fail("ALLOWED_SCOPES", f"{scope!r} is not a resource '/.default' scope")
                continue
            owner = scope_cloud(scope)
            if owner is not None and owner is not cloud:
                self.fail("ALLOWED_SCOPES", f"{scope!r} belongs to the {owner.name} cloud, not {cloud.name}")
        return scopes

    def _storage(self, cloud: Cloud) -> StorageSettings:
        connection = self.get("AzureWebJobsStorage")
        account = self.get("AzureWebJobsStorage__accountName")
        prefix = self.pattern("STORAGE_PREFIX", _PREFIX, "lowercase letters and digits, starting with a letter")
        if connection.lower().replace(" ", "") == "usedevelopmentstorage=true":
            connection = AZURITE_CONNECTION_STRING
        uris = {service: self._service_uri(f"AzureWebJobsStorage__{service}ServiceUri") for service in STORAGE_SERVICES}
        if any(uris.values()):
            for service, uri in uris.items():
                if not uri:
                    self.fail(f"AzureWebJobsStorage__{service}ServiceUri", "missing (set all three service URIs)")
        if not connection and not account and not any(uris.values()):
            self.fail("AzureWebJobsStorage", "missing (or set AzureWebJobsStorage__accountName or the service URIs)")
        if account and not re.fullmatch(r"[a-z0-9]{3,24}", account):
            self.fail("AzureWebJobsStorage__accountName", "not a storage account name")
        elif account and not any(uris.values()):
            uris = {service: f"https://{account}.{service}.{cloud.storage_suffix}" for service in STORAGE_SERVICES}
        return StorageSettings(Secret(connection) if connection else None, account or None, prefix, uris)

    def _service_uri(self, name: str) -> str:
        """A storage service URI: https, no credentials, query or fragment. No host list: an account may use
        Azure DNS zone endpoints, and the host itself connects to whatever the setting names."""
        value = self.get(name).rstrip("/")
        parts = urlsplit(value)
        if value and (parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment or parts.username):
            self.fail(name, "not an https URL without credentials, query or fragment")
        return value

    def _scope_roles(self, scopes: tuple[str, ...], cloud: Cloud) -> dict[str, str]:
        raw = self.get("SCOPE_ROLES")
        if not raw:
            roles: Any = dict(cloud.scope_roles)
        else:
            try:
                roles = json.loads(raw)
            except ValueError:
                self.fail("SCOPE_ROLES", "not JSON")
                return {}
        if not isinstance(roles, dict) or not all(isinstance(v, str) for v in roles.values()):
            self.fail("SCOPE_ROLES", "must be a JSON object of scope to role name")
            return {}
        for scope, role in roles.items():
            if not role.strip():
                # An empty role would switch the issued-token role check off for that scope.
                self.fail("SCOPE_ROLES", f"the role for {scope!r} is empty")
        for scope in scopes:
            if scope not in roles:
                self.fail("SCOPE_ROLES", f"names no role for allowed scope {scope!r}")
        return {str(k): v.strip() for k, v in roles.items()}

    def _caller_policy(self, scopes: tuple[str, ...], caller_auth: str) -> Policy:
        if caller_auth == "none":
            return Policy.allow_all()
        try:
            return Policy.parse(self.get("CALLER_POLICY"), scopes)
        except PolicyError as exc:
            self.problems.extend(f"CALLER_POLICY: {problem}" for problem in exc.problems)
            return Policy()

    def _consent_redirect_uri(self) -> str | None:
        """``CONSENT_REDIRECT_URI``, else the callback on ``WEBSITE_HOSTNAME``; None when neither is set."""
        override = self.get("CONSENT_REDIRECT_URI")
        if override:
            parts = urlsplit(override)
            loopback_http = parts.scheme == "http" and is_loopback_host(parts.hostname or "")
            if (
                not (parts.scheme == "https" or loopback_http)
                or not parts.hostname
                or parts.query
                or parts.fragment
                or "@" in parts.netloc
            ):
                self.fail("CONSENT_REDIRECT_URI", "not an https URL (http only on a loopback host) without query")
            return override
        host = self.get("WEBSITE_HOSTNAME").lower()
        if not host:
            return None
        if not _HOSTNAME.fullmatch(host):
            self.fail("WEBSITE_HOSTNAME", "not a host name")
            return None
        return f"https://{host}{CONSENT_CALLBACK_PATH}"

    def _caller_audience(self, client_id: str, *, required: bool) -> str | None:
        """``api://<client id>`` (the app ID URI of v1 tokens) or the client ID (v2 tokens), nothing else.

        Other app ID URIs (a verified-domain ``https://…``, ``api://<tenant>/…``) are refused on purpose:
        the broker then accepts only audiences derived from its own client ID, so a mistyped or foreign
        audience cannot widen what it accepts. An app registration that uses another URI adds
        ``api://<client id>`` as a second identifier URI, or callers ask for v2 tokens.
        """
        value = self.get("CALLER_AUDIENCE")
        if not value:
            if required:
                self.fail("CALLER_AUDIENCE", "missing (the broker's app ID URI, api://<client id>)")
            return None
        if client_id and value.lower() not in (f"api://{client_id}", client_id):
            self.fail("CALLER_AUDIENCE", "must be api://<BROKER_CLIENT_ID> or BROKER_CLIENT_ID itself")
        return value.lower()
