"""The composition root: every dependency is built here, once per worker process.

Importing this module builds nothing. ``container()`` builds the process-wide ``Container`` on first use
(the HTTP app, the timer and the queue trigger all share it; FastAPI's lifespan never runs for timers).
Tests and benchmarks call ``build()`` with their own settings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from azure.core.credentials import TokenCredential
from azure.identity import DefaultAzureCredential, ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient

from broker import requestlog, telemetry
from broker.audit import AuditLog, AuditStore, KeyRing
from broker.callers import Authenticator, CallerSwitches, EntraAuthenticator, LoopbackOnly, SigningKeys
from broker.changes import RegistryChanges
from broker.clouds import is_loopback_host
from broker.consent import ConsentLinks, ConsentStates
from broker.doctor import Doctor
from broker.errors import NotConfigured
from broker.health import HealthBook
from broker.incidents.budget import CallBudget
from broker.incidents.checkpoint import SyncStateTable, TenantLease
from broker.incidents.store import IncidentStore
from broker.incidents.sync import IncidentSync, base64_queue
from broker.incidents.upstream import IncidentApiClient, RetryPolicy
from broker.keyvault import CredentialSource, FederatedCredentialSource, KeyVaultCredentialSource, secret_client
from broker.onboarding import Onboarding
from broker.policy import RateLimiter
from broker.readiness import Readiness, authority_metadata_check
from broker.settings import Settings, SettingsError
from broker.storage import StorageAccount
from broker.tenants import TenantRegistry
from broker.tokens import TokenIssuer

log = logging.getLogger(__name__)


@dataclass
class Container:
    settings: Settings
    identity: TokenCredential
    storage: StorageAccount
    tenants: TenantRegistry
    credentials: CredentialSource
    issuer: TokenIssuer
    authenticator: Authenticator
    audit: AuditLog
    callers: CallerSwitches
    limiter: RateLimiter
    incidents: IncidentSync
    health: HealthBook
    consent: ConsentLinks
    doctor: Doctor
    readiness: Readiness
    onboarding: Onboarding

    def close(self) -> None:
        requestlog.flush_all()
        self.readiness.close()
        self.health.close()
        self.audit.close()
        self.incidents.close()
        self.issuer.close()
        close = getattr(self.identity, "close", None)
        if callable(close):
            close()


def azure_identity(settings: Settings) -> TokenCredential:
    """Managed identity in Azure, developer login locally (the DefaultAzureCredential chain)."""
    return DefaultAzureCredential(
        managed_identity_client_id=settings.managed_identity_client_id,
        exclude_interactive_browser_credential=True,
    )


def caller_authenticator(settings: Settings) -> Authenticator:
    """Entra bearer tokens from the home tenant, or (loopback development only) nobody checked."""
    if settings.caller_auth == "none":
        return LoopbackOnly()
    assert settings.caller_tenant_id  # enforced by the settings parser
    assert settings.caller_audience
    tenant = settings.caller_tenant_id
    keys = SigningKeys(f"{settings.authority_host}/{tenant}/v2.0/.well-known/openid-configuration", tenant)
    audiences = tuple(dict.fromkeys((settings.caller_audience, settings.broker_client_id)))
    return EntraAuthenticator(tenant_id=tenant, audiences=audiences, keys=keys)


def incident_api(
    settings: Settings, storage: StorageAccount, issuer: TokenIssuer, *, retry: RetryPolicy | None = None
) -> IncidentApiClient:
    """The Defender/Graph client, spending the persisted per-tenant call budget."""
    budget = CallBudget(
        lambda: storage.table("syncbudget"),
        ((settings.sync_budget_per_minute, 60.0), (settings.sync_budget_per_hour, 3600.0)),
    )
    return IncidentApiClient(
        issuer,
        budget,
        defender_url=settings.defender_api_url,
        graph_url=settings.graph_api_url,
        cloud=settings.cloud,
        retry=retry,
    )


def incident_sync(
    settings: Settings,
    storage: StorageAccount,
    tenants: TenantRegistry,
    api: IncidentApiClient,
    *,
    clock: Callable[[], float] = time.time,
    health: HealthBook | None = None,
) -> IncidentSync:
    """The incident prefetch: the API client, blob + table store, queue; each run reported to ``health``."""
    return IncidentSync(
        tenants=tenants,
        api=api,
        store=IncidentStore(lambda: storage.container("incidents"), lambda: storage.table("incidents")),
        state=SyncStateTable(lambda: storage.table("syncstate")),
        leases=TenantLease(lambda: storage.container("sync"), settings.sync_lease_seconds),
        queue=lambda: base64_queue(storage, settings.sync_queue),
        overlap_seconds=settings.sync_overlap_seconds,
        lookback_days=settings.sync_lookback_days,
        clock=clock,
        observer=health,
    )


def _discard(_: object) -> None:
    """A readiness check only needs the call to succeed (a secret's value is dropped at once)."""


def api_scope(settings: Settings, api_name: str) -> str:
    """The scope of a tenant's incident API (Defender or Graph), or the first allowed scope."""
    wanted = settings.cloud.graph_scope if api_name == "graph" else settings.cloud.defender_scope
    return wanted if wanted in settings.allowed_scopes else settings.allowed_scopes[0]


def quiet_sdk_loggers() -> None:
    """The Azure SDKs log every HTTP request and response at INFO (headers included): at the broker's
    request rates that formatting costs more than the requests themselves and floods the log. Keep
    their warnings; an operator who sets a level on the ``azure`` logger explicitly keeps that level."""
    sdk = logging.getLogger("azure")
    if sdk.level == logging.NOTSET:
        sdk.setLevel(logging.WARNING)


def audit_store(
    settings: Settings,
    storage: StorageAccount | None = None,
    identity: TokenCredential | None = None,
    vault: SecretClient | None = None,
) -> AuditStore:
    """The audit log's table, anchor container and MAC key (read from Key Vault by the broker's process;
    its writer process gets the key over its pipe and talks to storage only)."""
    identity = identity or azure_identity(settings)
    storage = storage or StorageAccount(settings.storage, identity)
    keys = KeyRing(
        vault or secret_client(settings.key_vault_url, identity),
        settings.audit_key_name,
        refresh_seconds=settings.secret_refresh_seconds,
    )
    return AuditStore(lambda: storage.table("audit"), lambda: storage.container("audit"), keys)


def audit_log(
    settings: Settings, storage: StorageAccount, identity: TokenCredential, vault: SecretClient | None = None
) -> AuditLog:
    return AuditLog(
        audit_store(settings, storage, identity, vault),
        mode=settings.audit_mode,
        writer=settings.audit_writer,
        writer_env=settings.raw,
        drain_seconds=settings.audit_drain_seconds,
    )


def build(
    settings: Settings,
    *,
    bind_host: str | None = None,
    retry: RetryPolicy | None = None,
    clock: Callable[[], float] = time.time,
) -> Container:
    """Build every dependency from ``settings``. ``bind_host`` is the HTTP bind when serving with uvicorn.

    ``retry`` (the incident APIs' retry policy) and ``clock`` (wall-clock time for token lifetimes, the
    negative cache and sync state) are seams for tests; production passes neither.
    """
    quiet_sdk_loggers()
    if settings.caller_auth == "none" and not (bind_host and is_loopback_host(bind_host)):
        raise SettingsError(["CALLER_AUTH: 'none' is accepted only when serving on a loopback address"])
    telemetry.setup(settings.applicationinsights_connection_string)
    identity = azure_identity(settings)
    storage = StorageAccount(settings.storage, identity)
    credentials: CredentialSource
    credential_check: tuple[str, Callable[[], None]]
    vault = secret_client(settings.key_vault_url, identity)  # the app's credential and the audit key
    if settings.credential_mode == "federated":
        assert settings.managed_identity_client_id  # enforced by the settings parser
        federated = FederatedCredentialSource(
            ManagedIdentityCredential(client_id=settings.managed_identity_client_id),
            settings.cloud.token_exchange_audience,
        )
        credentials = federated
        credential_check = ("managed_identity", federated.assertion_check)
    else:
        name = (
            settings.client_certificate_name
            if settings.credential_mode == "certificate"
            else settings.client_secret_name
        )
        credentials = KeyVaultCredentialSource(
            vault,
            name,
            certificate=settings.credential_mode == "certificate",
            send_x5c=settings.client_certificate_send_x5c,
            refresh_seconds=settings.secret_refresh_seconds,
        )
        credential_check = ("key_vault", lambda: _discard(vault.get_secret(name)))
    health = HealthBook(lambda: storage.table("tenanthealth"))
    issuer = TokenIssuer(
        client_id=settings.broker_client_id,
        authority_host=settings.authority_host,
        credentials=credentials,
        scope_roles=settings.scope_roles,
        observer=health,
        clock=clock,
    )
    authenticator = caller_authenticator(settings)
    if settings.caller_auth == "entra" and not settings.caller_policy.grants:
        log.warning("broker.start caller_policy=empty: every caller is refused until CALLER_POLICY grants access")
    tenants = TenantRegistry(lambda: storage.table("tenants"), cloud=settings.cloud)
    api = incident_api(settings, storage, issuer, retry=retry)
    metadata = requests.Session()
    readiness = Readiness(
        {
            credential_check[0]: credential_check[1],
            "storage": lambda: _discard(next(iter(storage.table("tenants").list_entities(results_per_page=1)), None)),
            "authority": authority_metadata_check(
                settings.authority_host, settings.caller_tenant_id or "organizations", metadata
            ),
        }
    )
    consent = ConsentLinks(
        ConsentStates(lambda: storage.table("consent"), ttl_seconds=settings.consent_link_ttl_hours * 3600),
        authority_host=settings.authority_host,
        client_id=settings.broker_client_id,
        redirect_uri=settings.consent_redirect_uri,
        scope_for=lambda api_name: api_scope(settings, api_name),
    )
    audit = audit_log(settings, storage, identity, vault)
    callers = CallerSwitches(lambda: storage.table("callers"))
    changes = RegistryChanges(audit, tenants, callers)
    doctor = Doctor(
        tenants=tenants,
        credentials=credentials,
        issuer=issuer,
        scopes=settings.allowed_scopes,
        scope_roles=settings.scope_roles,
        api_scope=lambda tenant: api_scope(settings, tenant.api),
        probe=api.probe,
        mark_onboarded=changes.mark_onboarded,
        health=health,
    )
    container = Container(
        settings=settings,
        identity=identity,
        storage=storage,
        tenants=tenants,
        credentials=credentials,
        issuer=issuer,
        authenticator=authenticator,
        audit=audit,
        callers=callers,
        limiter=RateLimiter(settings.caller_rate_per_minute),
        incidents=incident_sync(settings, storage, tenants, api, clock=clock, health=health),
        health=health,
        consent=consent,
        doctor=doctor,
        readiness=readiness,
        onboarding=Onboarding(
            tenants=tenants, changes=changes, links=consent, doctor=doctor, issuer=issuer, health=health
        ),
    )
    log.info(
        "broker.start mode=%s caller_auth=%s authority=%s vault=%s scopes=%d",
        settings.credential_mode,
        settings.caller_auth,
        urlsplit(settings.authority_host).hostname,
        urlsplit(settings.key_vault_url).hostname,
        len(settings.allowed_scopes),
    )
    return container


_lock = threading.Lock()
_container: Container | None = None


def container() -> Container:
    """The process-wide container, built from the environment on first use."""
    global _container
    if _container is not None:
        return _container
    with _lock:
        if _container is None:
            try:
                _container = build(Settings.from_environ())
                _container.audit.start()
            except SettingsError as exc:
                log.error("broker.start outcome=not_configured problems=%s", "; ".join(exc.problems))
                raise NotConfigured(
                    "the broker's settings are incomplete; operators: see the log", diagnostic=str(exc)
                ) from exc
        return _container


def current() -> Container | None:
    """The process-wide container if one has been built or installed; ``None`` until then."""
    return _container


def install(new: Container | None) -> None:
    """Make ``new`` the process-wide container (``serve`` builds it eagerly; tests reset it)."""
    global _container
    with _lock:
        _container = new
