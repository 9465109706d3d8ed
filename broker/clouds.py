"""The Microsoft clouds the broker can serve, and the hosts each one documents.

``AZURE_CLOUD`` picks one preset; it supplies the default Entra ID authority, Defender XDR and Graph hosts,
their token scopes, the Key Vault DNS suffix and the token-exchange audience of ``federated`` mode. An
explicit ``AUTHORITY_HOST``, ``KEY_VAULT_URL``, ``DEFENDER_API_URL`` or ``GRAPH_API_URL`` still wins, but
only with a host the chosen cloud documents, because the app's credential and customers' tokens go there.
A loopback address (``127.0.0.0/8``, ``::1``, ``localhost``) is always accepted: it can only be a stand-in
on the same machine, so production and tests run the same checks with no switch to turn them off.

Where each value comes from (Microsoft's documentation, by page):

- Entra ID authority hosts: "Microsoft Graph national cloud deployments" (App registration and token
  service root endpoints: ``login.microsoftonline.com``, ``login.microsoftonline.us``,
  ``login.chinacloudapi.cn``) and azure-identity's ``AzureAuthorityHosts``; ``login.partner.microsoftonline.cn``
  is the China issuer the Entra workload-identity pages use.
- Graph hosts and scopes: the same Graph page (``graph.microsoft.com``; US Government L4
  ``graph.microsoft.us`` and L5 (DoD) ``dod-graph.microsoft.us``; China ``microsoftgraph.chinacloudapi.cn``)
  and "Access national cloud deployments with the Microsoft Graph SDKs" (a ``.default`` scope must use the
  national cloud's Graph host).
- Defender XDR API: "Supported Microsoft Defender XDR APIs" (``api.security.microsoft.com``; regional
  ``api-us``, ``api-eu``, ``api-uk``; "tokens can be acquired by accessing https://api.security.microsoft.com",
  so a regional host keeps the global scope); "Supported Microsoft Defender for Endpoint APIs" (regional
  ``us.``, ``eu.``, ``uk.``, ``au.``, ``swa.``, ``ina.api.security.microsoft.com``); "Microsoft Defender XDR
  for US Government" (GCC High and DoD: login ``login.microsoftonline.us``, API
  ``api-gov.security.microsoft.us``; GCC: ``api-gcc.security.microsoft.us`` with the *public* login). The
  Gov scope is the Gov API host plus ``/.default``: that page replaces the public URIs, and the public page
  acquires tokens at the API host. No Defender XDR API host is documented for the China cloud, so the
  ``china`` preset has none and leaves the Defender scope out.
- Key Vault DNS suffixes: the Azure cloud metadata (``az cloud show``: ``vault.azure.net``,
  ``vault.usgovcloudapi.net``, ``vault.azure.cn``).
- Storage endpoint suffixes: the same metadata (``suffixes.storageEndpoint``: ``core.windows.net``,
  ``core.usgovcloudapi.net``, ``core.chinacloudapi.cn``); Bicep's ``environment().suffixes.storage``.
- Token-exchange audiences: Entra "Configure an application to trust a managed identity" (public
  ``api://AzureADTokenExchange``, Fairfax ``…USGov``, Mooncake ``…China``).

Not covered: GCC (moderate) customers of a public deployment (their Defender host is
``api-gcc.security.microsoft.us``, and no token audience for it is documented), USNat and USSec.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit

INCIDENT_ROLE = "Incident.Read.All"
GRAPH_INCIDENT_ROLE = "SecurityIncident.Read.All"


@dataclass(frozen=True)
class Cloud:
    """One Microsoft cloud: its default endpoints and every host it documents for them."""

    name: str
    authority_host: str
    authority_hosts: frozenset[str]
    graph_url: str
    graph_hosts: frozenset[str]
    #: Default Defender XDR API base URL; empty when the cloud documents none.
    defender_url: str
    #: Every documented Defender XDR API host of the cloud (global and regional).
    defender_hosts: frozenset[str]
    #: ``tenants add --region`` codes: region → documented regional host.
    defender_regions: Mapping[str, str]
    key_vault_suffix: str
    token_exchange_audience: str
    defender_scope: str = ""
    graph_scope: str = ""
    scope_roles: Mapping[str, str] = field(default_factory=dict)
    #: Where an identity-based storage account named alone lives: ``<account>.<service>.<suffix>``.
    storage_suffix: str = ""

    @property
    def allowed_scopes(self) -> tuple[str, ...]:
        return tuple(s for s in (self.defender_scope, self.graph_scope) if s)

    def region_url(self, region: str) -> str:
        """The https base URL of a documented regional Defender host (``KeyError`` if not one)."""
        return f"https://{self.defender_regions[region]}"


def _cloud(
    name: str,
    *,
    authority: tuple[str, ...],
    graph: tuple[str, ...],
    defender: tuple[str, ...],
    defender_also: tuple[str, ...] = (),
    regions: dict[str, str],
    vault: str,
    exchange: str,
    storage: str,
) -> Cloud:
    defender_scope = f"https://{defender[0]}/.default" if defender else ""
    graph_scope = f"https://{graph[0]}/.default"
    roles = {graph_scope: GRAPH_INCIDENT_ROLE}
    if defender_scope:
        roles = {defender_scope: INCIDENT_ROLE, **roles}
    return Cloud(
        name=name,
        authority_host=f"https://{authority[0]}",
        authority_hosts=frozenset(authority),
        graph_url=f"https://{graph[0]}/v1.0",
        graph_hosts=frozenset(graph),
        defender_url=f"https://{defender[0]}" if defender else "",
        defender_hosts=frozenset(defender) | frozenset(defender_also) | frozenset(regions.values()),
        defender_regions=MappingProxyType(dict(regions)),
        key_vault_suffix=vault,
        token_exchange_audience=exchange,
        defender_scope=defender_scope,
        graph_scope=graph_scope,
        scope_roles=MappingProxyType(roles),
        storage_suffix=storage,
    )


CLOUDS: Mapping[str, Cloud] = MappingProxyType(
    {
        "public": _cloud(
            "public",
            authority=("login.microsoftonline.com",),
            graph=("graph.microsoft.com",),
            defender=("api.security.microsoft.com",),
            # The Defender for Endpoint page's form of the US, EU and UK hosts (the region codes use the
            # Defender XDR page's form, the API the broker calls).
            defender_also=tuple(f"{r}.api.security.microsoft.com" for r in ("us", "eu", "uk")),
            regions={
                "us": "api-us.security.microsoft.com",
                "eu": "api-eu.security.microsoft.com",
                "uk": "api-uk.security.microsoft.com",
                "au": "au.api.security.microsoft.com",
                "swa": "swa.api.security.microsoft.com",
                "ina": "ina.api.security.microsoft.com",
            },
            vault="vault.azure.net",
            exchange="api://AzureADTokenExchange",
            storage="core.windows.net",
        ),
        "usgovernment": _cloud(
            "usgovernment",
            authority=("login.microsoftonline.us",),
            graph=("graph.microsoft.us", "dod-graph.microsoft.us"),
            defender=("api-gov.security.microsoft.us",),
            regions={},
            vault="vault.usgovcloudapi.net",
            exchange="api://AzureADTokenExchangeUSGov",
            storage="core.usgovcloudapi.net",
        ),
        "china": _cloud(
            "china",
            authority=("login.chinacloudapi.cn", "login.partner.microsoftonline.cn"),
            graph=("microsoftgraph.chinacloudapi.cn",),
            defender=(),
            regions={},
            vault="vault.azure.cn",
            exchange="api://AzureADTokenExchangeChina",
            storage="core.chinacloudapi.cn",
        ),
    }
)
_VAULT_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,23}$")


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP: a stand-in on this machine, never a remote service."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class EndpointRefused(ValueError):
    """An endpoint URL that is not one the cloud documents; the message says why (no setting name)."""


def _https_parts(url: str) -> tuple[str, str, bool]:
    """(lower-case host, path, is-loopback) of an https URL without credentials, query or fragment."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise EndpointRefused("not an https URL: its port is not a number") from exc
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment or "@" in parts.netloc:
        raise EndpointRefused("not an https URL without credentials, query or fragment")
    host = parts.hostname.lower()
    loopback = is_loopback_host(host)
    if port is not None and not loopback and port != 443:
        raise EndpointRefused(f"{host} is a Microsoft host: it takes no port")
    return host, parts.path.rstrip("/"), loopback


def _documented(host: str, hosts: frozenset[str], cloud: Cloud, what: str) -> None:
    if host not in hosts:
        listed = ", ".join(sorted(hosts)) or "none"
        raise EndpointRefused(f"{host} is not a documented {what} host of the {cloud.name} cloud ({listed})")


def _remote_host(url: str, why_no_path: str) -> str | None:
    """The host of an endpoint that takes no path; None for a loopback stand-in (accepted as it is)."""
    host, path, loopback = _https_parts(url)
    if loopback:
        return None
    if path:
        raise EndpointRefused(why_no_path)
    return host


def check_authority(url: str, cloud: Cloud) -> None:
    host = _remote_host(url, "the authority host takes no path (the tenant is added per request)")
    if host is not None:
        _documented(host, cloud.authority_hosts, cloud, "Entra ID authority")


def check_key_vault(url: str, cloud: Cloud) -> None:
    host = _remote_host(url, "a vault URL takes no path")
    if host is None:
        return
    name, _, suffix = host.partition(".")
    if suffix != cloud.key_vault_suffix or not _VAULT_NAME.fullmatch(name):
        raise EndpointRefused(f"{host} is not a Key Vault of the {cloud.name} cloud (<name>.{cloud.key_vault_suffix})")


def check_defender(url: str, cloud: Cloud) -> None:
    host = _remote_host(url, "the Defender XDR API URL takes no path (the broker adds /api/...)")
    if host is not None:
        _documented(host, cloud.defender_hosts, cloud, "Defender XDR API")


def check_graph(url: str, cloud: Cloud) -> None:
    host, path, loopback = _https_parts(url)
    if path not in ("/v1.0", "/beta"):
        raise EndpointRefused("the Graph URL must end in its version, /v1.0 or /beta")
    if not loopback:
        _documented(host, cloud.graph_hosts, cloud, "Microsoft Graph")


def scope_cloud(scope: str) -> Cloud | None:
    """The cloud whose Defender or Graph resource a scope names (None: not a Defender or Graph scope)."""
    host = (urlsplit(scope).hostname or "").lower()
    for cloud in CLOUDS.values():
        if host in cloud.graph_hosts or host in cloud.defender_hosts:
            return cloud
    return None
