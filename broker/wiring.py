"""The composition root: every dependency is built here, once per worker process.

Importing this module builds nothing. ``container()`` builds the process-wide ``Container`` on first use
(the HTTP app, the timer and the queue trigger all share it; FastAPI's lifespan never runs for timers).
Tests and benchmarks call ``build()`` with their own settings.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from azure.core.credentials import TokenCredential
from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

from broker.callers import Authenticator, LoopbackOnly
from broker.errors import NotConfigured
from broker.keyvault import CredentialSource, FederatedCredentialSource, KeyVaultCredentialSource, secret_client
from broker.settings import Settings, SettingsError, is_loopback_host
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

    def close(self) -> None:
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


def build(settings: Settings, *, bind_host: str | None = None) -> Container:
    """Build every dependency from ``settings``. ``bind_host`` is the HTTP bind when serving with uvicorn."""
    if settings.caller_auth == "none" and not (bind_host and is_loopback_host(bind_host)):
        raise SettingsError(["CALLER_AUTH: 'none' is accepted only when serving on a loopback address"])
    identity = azure_identity(settings)
    storage = StorageAccount(settings.storage, identity)
    credentials: CredentialSource
    if settings.credential_mode == "federated":
        assert settings.managed_identity_client_id  # enforced by the settings parser
        credentials = FederatedCredentialSource(
            ManagedIdentityCredential(client_id=settings.managed_identity_client_id)
        )
    else:
        credentials = KeyVaultCredentialSource(
            secret_client(settings.key_vault_url, identity),
            settings.client_certificate_name
            if settings.credential_mode == "certificate"
            else settings.client_secret_name,
            certificate=settings.credential_mode == "certificate",
            refresh_seconds=settings.secret_refresh_seconds,
        )
    issuer = TokenIssuer(
        client_id=settings.broker_client_id,
        authority_host=settings.authority_host,
        credentials=credentials,
        scope_roles=settings.scope_roles,
    )
    authenticator: Authenticator = LoopbackOnly()
    container = Container(
        settings=settings,
        identity=identity,
        storage=storage,
        tenants=TenantRegistry(lambda: storage.table("tenants")),
        credentials=credentials,
        issuer=issuer,
        authenticator=authenticator,
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
            except SettingsError as exc:
                log.error("broker.start outcome=not_configured problems=%s", "; ".join(exc.problems))
                raise NotConfigured(
                    "the broker's settings are incomplete; operators: see the log", diagnostic=str(exc)
                ) from exc
        return _container


def install(new: Container | None) -> None:
    """Make ``new`` the process-wide container (``serve`` builds it eagerly; tests reset it)."""
    global _container
    with _lock:
        _container = new
