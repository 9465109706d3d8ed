"""The multi-tenant app's credential, read from Key Vault and nowhere else.

Three modes: a client secret; a certificate (the Key Vault certificate's secret: PFX or PEM with the key);
or ``federated``, where the user-assigned managed identity's token is the app's client assertion and no
secret exists at all.

A certificate becomes a client assertion signed here (PS256, header ``x5t#S256``, and ``x5c`` only when
``send_x5c`` — subject-name/issuer trust), handed to MSAL as a callable so every token request carries a
fresh one (new ``jti``, ten minutes of life, ``aud`` the tenant's token endpoint), as Microsoft's
"certificate credentials" page describes. MSAL Python would add ``x5c`` whenever it is given the public
certificate, and falls back to SHA-1 ``x5t`` without it; signing here keeps both choices ours. A credential read from the vault is used for ``refresh_seconds``, then re-read, so a
rotated version is picked up without a restart; ``refresh()`` re-reads at once (after ``invalid_client``).
If the vault cannot be reached, a credential already in memory keeps serving.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.keyvault.secrets import SecretClient
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key, pkcs12
from cryptography.x509 import Certificate, load_pem_x509_certificates

from broker.clouds import is_loopback_host
from broker.errors import CredentialUnavailable

log = logging.getLogger(__name__)

RETRY_FAILED_READ_SECONDS = 15.0
ASSERTION_LIFETIME = 600  # seconds; MSAL's own assertions live as long


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class CertificateCredential:
    """An RSA key and its certificate chain (leaf first); signs client assertions."""

    key: RSAPrivateKey = field(repr=False)
    chain: tuple[Certificate, ...]
    send_x5c: bool = False

    @functools.cached_property
    def x5t_s256(self) -> str:
        """The leaf's SHA-256 thumbprint, base64url (the ``x5t#S256`` header)."""
        return _b64url(hashlib.sha256(self.chain[0].public_bytes(Encoding.DER)).digest())

    @functools.cached_property
    def _headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {"typ": "JWT", "x5t#S256": self.x5t_s256}
        if self.send_x5c:
            headers["x5c"] = [base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in self.chain]
        return headers

    def assertion(self, client_id: str, token_endpoint: str, *, issued_at: int | None = None) -> str:
        """A fresh client assertion for one token request to ``token_endpoint`` (issued now by default)."""
        now = int(time.time()) if issued_at is None else issued_at
        claims = {
            "aud": token_endpoint,
            "iss": client_id,
            "sub": client_id,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        return jwt.encode(claims, self.key, algorithm="PS256", headers=self._headers)


@dataclass(frozen=True)
class AppCredential:
    """The app's credential as read (a secret, a certificate, or the managed identity's assertion source)
    and the vault version it came from."""

    version: str
    value: str | CertificateCredential | Callable[[], str] = field(repr=False)

    def for_msal(self, client_id: str, token_endpoint: str) -> str | dict[str, Any]:
        """What MSAL takes as ``client_credential`` for one tenant's token endpoint."""
        if isinstance(self.value, str):
            return self.value
        if isinstance(self.value, CertificateCredential):
            return {"client_assertion": functools.partial(self.value.assertion, client_id, token_endpoint)}
        return {"client_assertion": self.value}


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
        send_x5c: bool = False,
        refresh_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._name = name
        self._certificate = certificate
        self._send_x5c = send_x5c
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
            parsed: str | CertificateCredential = (
                certificate_credential(value, secret.properties.content_type, send_x5c=self._send_x5c)
                if self._certificate
                else value
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

    def __init__(self, identity: TokenCredential, audience: str) -> None:
        self._identity = identity
        self._scope = audience + "/.default"
        self._credential = AppCredential("federated", self._assertion)

    def _assertion(self) -> str:
        """The identity's token for the cloud's token-exchange audience. azure-identity caches it and asks
        for a new one before it expires (five minutes ahead, or at half its life for long-lived ones)."""
        try:
            return self._identity.get_token(self._scope).token
        except AzureError as exc:
            raise CredentialUnavailable(
                "the managed identity cannot sign the app in", diagnostic=repr(exc), retry_after=15
            ) from exc

    def current(self) -> AppCredential:
        return self._credential

    def refresh(self) -> AppCredential:
        return self._credential

    def assertion_check(self) -> None:
        """Raise unless the managed identity can sign the app in now (readiness; the doctor)."""
        self._assertion()


def certificate_credential(value: str, content_type: str | None, *, send_x5c: bool = False) -> CertificateCredential:
    """The signing credential in a Key Vault certificate secret (base64 PFX, or PEM with the key)."""
    try:
        if content_type == "application/x-pem-file" or value.lstrip().startswith("-----BEGIN"):
            key: Any = load_pem_private_key(value.encode(), password=None)
            chain = tuple(load_pem_x509_certificates(value.encode()))
        else:
            key, leaf, extra = pkcs12.load_key_and_certificates(base64.b64decode(value), password=None)
            if key is None or leaf is None:
                raise ValueError("the PFX holds no private key or certificate")
            chain = (leaf, *extra)
        if not isinstance(key, RSAPrivateKey):
            raise ValueError("the certificate's key is not RSA")
        leaf_key = chain[0].public_key()
        if not isinstance(leaf_key, RSAPublicKey) or leaf_key.public_numbers() != key.public_key().public_numbers():
            raise ValueError("the first certificate is not the key's")
    except ValueError as exc:
        raise CredentialUnavailable(
            "the app's certificate in Key Vault cannot be read", diagnostic=exc.__class__.__name__
        ) from exc
    return CertificateCredential(key, chain, send_x5c)
