"""The multi-tenant app's credential, read from Key Vault and nowhere else.

Three modes: a client secret; a certificate (the Key Vault certificate's secret: PFX or PEM with the key);
or ``federated``, where the user-assigned managed identity's token is the app's client assertion and no
secret exists at all. A credential read from the vault is used for ``refresh_seconds``, then re-read, so a
rotated version is picked up without a restart; ``refresh()`` re-reads at once (after ``invalid_client``).
If the vault cannot be reached, a credential already in memory keeps serving.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.keyvault.secrets import SecretClient
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
    pkcs12,
)
from cryptography.x509 import load_pem_x509_certificates

from broker.clouds import is_loopback_host
from broker.errors import CredentialUnavailable

log = logging.getLogger(__name__)

FEDERATION_SCOPE = "api://AzureADTokenExchange/.default"
RETRY_FAILED_READ_SECONDS = 15.0


@dataclass(frozen=True)
class AppCredential:
    """What MSAL takes as ``client_credential``, and which vault version it came from."""

    version: str
    value: str | dict[str, Any] = field(repr=False)


class CredentialSource(Protocol):
    def current(self) -> AppCredential: ...

    def refresh(self) -> AppCredential: ...


def secret_client(vault_url: str, credential: TokenCredential) -> SecretClient:
    """A Key Vault client; the challenge-resource check is relaxed only for a loopback vault."""
    host = urlsplit(vault_url).hostname or ""
    return SecretClient(
        vault_url,
        credential,
        verify_challenge_resource=not is_loopback_host(host),
        retry_total=1,
        retry_backoff_factor=0.2,
        connection_timeout=5,
        read_timeout=10,
    )


class KeyVaultCredentialSource:
    """A client secret or certificate from Key Vault, cached for ``refresh_seconds``."""

    def __init__(
        self,
        client: SecretClient,
        name: str,
        *,
        certificate: bool = False,
        refresh_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._name = name
        self._certificate = certificate
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: AppCredential | None = None
        self._next_read = float("-inf")

    def current(self) -> AppCredential:
        if self._cached is not None and self._clock() < self._next_read:
            return self._cached
        return self._read(force=False)

    def refresh(self) -> AppCredential:
        return self._read(force=True)

    def _read(self, *, force: bool) -> AppCredential:
        with self._lock:
            if not force and self._cached is not None and self._clock() < self._next_read:
                return self._cached
            started = time.perf_counter()
            try:
                secret = self._client.get_secret(self._name)
            except ResourceNotFoundError as exc:
                # A missing secret is a deployment error; never fall back to a stale one silently.
                log.error("keyvault.read outcome=not_found name=%s", self._name)
                raise CredentialUnavailable(
                    "the app's credential is not in Key Vault", diagnostic=repr(exc), retry_after=30
                ) from exc
            except AzureError as exc:
                self._next_read = self._clock() + RETRY_FAILED_READ_SECONDS
                if self._cached is not None:
                    log.warning(
                        "keyvault.read outcome=stale name=%s error=%s serving_version=%s",
                        self._name,
                        exc.__class__.__name__,
                        self._cached.version,
                    )
                    return self._cached
                log.error("keyvault.read outcome=unavailable name=%s error=%s", self._name, exc.__class__.__name__)
                raise CredentialUnavailable(
                    "Key Vault cannot be reached", diagnostic=repr(exc), retry_after=int(RETRY_FAILED_READ_SECONDS)
                ) from exc
            version = secret.properties.version or ""
            value = secret.value or ""
            if not value:
                raise CredentialUnavailable("the app's credential in Key Vault is empty", retry_after=30)
            parsed: str | dict[str, Any] = (
                certificate_credential(value, secret.properties.content_type) if self._certificate else value
            )
            previous = self._cached.version if self._cached else None
            self._cached = AppCredential(version, parsed)
            self._next_read = self._clock() + self._refresh_seconds
            log.info(
                "keyvault.read outcome=ok name=%s version=%s changed=%s duration_ms=%.1f",
                self._name,
                version,
                previous is not None and previous != version,
                (time.perf_counter() - started) * 1000,
            )
            return self._cached


class FederatedCredentialSource:
    """No secret at all: the user-assigned managed identity's token is the app's client assertion."""

    def __init__(self, identity: TokenCredential) -> None:
        self._identity = identity
        self._credential = AppCredential("federated", {"client_assertion": self._assertion})

    def _assertion(self) -> str:
        try:
            return self._identity.get_token(FEDERATION_SCOPE).token
        except AzureError as exc:
            raise CredentialUnavailable(
                "the managed identity cannot sign the app in", diagnostic=repr(exc), retry_after=15
            ) from exc

    def current(self) -> AppCredential:
        return self._credential

    def refresh(self) -> AppCredential:
        return self._credential


def certificate_credential(value: str, content_type: str | None) -> dict[str, Any]:
    """MSAL's certificate credential from a Key Vault certificate secret (base64 PFX or PEM)."""
    try:
        if content_type == "application/x-pem-file" or value.lstrip().startswith("-----BEGIN"):
            key = load_pem_private_key(value.encode(), password=None)
            certificates = load_pem_x509_certificates(value.encode())
            leaf = certificates[0]
        else:
            pfx_key, pfx_leaf, _ = pkcs12.load_key_and_certificates(base64.b64decode(value), password=None)
            if pfx_key is None or pfx_leaf is None:
                raise ValueError("the PFX holds no private key or certificate")
            key, leaf = pfx_key, pfx_leaf
    except ValueError as exc:
        raise CredentialUnavailable(
            "the app's certificate in Key Vault cannot be read", diagnostic=exc.__class__.__name__
        ) from exc
    key_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    return {"private_key": key_pem, "public_certificate": leaf.public_bytes(Encoding.PEM).decode()}
