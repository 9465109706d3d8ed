"""``BrokerCredential``: an azure-core ``TokenCredential`` that gets customer-tenant tokens from the broker.

An internal service wraps its own credential (its managed identity, say) and names one customer tenant::

    credential = BrokerCredential(
        tenant="contoso",
        broker_url="https://broker.example.net",
        credential=ManagedIdentityCredential(client_id="<the service's identity>"),
        broker_scope="api://<broker client id>/.default",
    )
    SecurityClient(credential=credential)  # any Azure SDK client, or credential.get_token(scope).token

Tokens are cached per scope until fewer than ``min_ttl_seconds`` remain (the broker is asked for tokens
with at least that much left). A refusal raises ``BrokerAuthenticationError`` (an azure-core
``ClientAuthenticationError``) carrying the problem ``code``, ``status_code`` and ``request_id``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenCredential, TokenRequestOptions
from azure.core.exceptions import ClientAuthenticationError

DEFAULT_MIN_TTL = 300
MAX_MIN_TTL = 3000


class BrokerAuthenticationError(ClientAuthenticationError):
    """The broker refused or failed; ``code`` is its stable problem code."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status_code: int | None = None,
        request_id: str = "",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message=message)
        self.code = code
        self.status_code = status_code
        self.request_id = request_id
        self.retry_after = retry_after


class BrokerCredential:
    """A ``TokenCredential`` (and ``SupportsTokenInfo``) for one customer tenant, through the broker."""

    def __init__(
        self,
        *,
        tenant: str,
        broker_url: str,
        credential: TokenCredential,
        broker_scope: str,
        min_ttl_seconds: int = DEFAULT_MIN_TTL,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        if not 0 <= min_ttl_seconds <= MAX_MIN_TTL:
            raise ValueError(f"min_ttl_seconds must be between 0 and {MAX_MIN_TTL}")
        self.tenant = tenant
        self.broker_url = broker_url.rstrip("/")
        self.min_ttl_seconds = min_ttl_seconds
        self._credential = credential
        self._broker_scope = broker_scope
        self._timeout = timeout
        self._own_session = session is None
        self._session = session or requests.Session()
        self._lock = threading.Lock()
        self._cache: dict[str, AccessTokenInfo] = {}
        self._tenant_id: str | None = None

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        info = self._get(scopes, tenant_id)
        return AccessToken(info.token, info.expires_on)

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        return self._get(scopes, (options or {}).get("tenant_id"))

    def _get(self, scopes: tuple[str, ...], tenant_id: str | None) -> AccessTokenInfo:
        if len(scopes) != 1:
            raise ValueError("BrokerCredential issues tokens for exactly one '<resource>/.default' scope")
        scope = scopes[0]
        if tenant_id and tenant_id.lower() not in (self.tenant.lower(), self._tenant_id):
            raise BrokerAuthenticationError(
                f"this credential is bound to tenant {self.tenant!r}, not {tenant_id!r}", code="tenant_mismatch"
            )
        with self._lock:
            cached = self._cache.get(scope)
            if cached is not None and cached.expires_on - time.time() > self.min_ttl_seconds:
                return cached
            info = self._request(scope)
            self._cache[scope] = info
            return info

    def _request(self, scope: str) -> AccessTokenInfo:
        own = self._credential.get_token(self._broker_scope)
        try:
            response = self._session.post(
                f"{self.broker_url}/api/token",
                json={"tenant": self.tenant, "scope": scope, "min_ttl_seconds": self.min_ttl_seconds},
                headers={"Authorization": f"Bearer {own.token}"},
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            raise BrokerAuthenticationError(
                f"the broker is unreachable ({exc.__class__.__name__})", code="broker_unreachable"
            ) from exc
        if response.status_code != 200:
            raise _refusal(response)
        try:
            body = response.json()
            token, expires_on = str(body["access_token"]), int(body["expires_on"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BrokerAuthenticationError("the broker's answer is not a token", code="bad_response") from exc
        tenant_id = body.get("tenant_id")
        if isinstance(tenant_id, str):
            self._tenant_id = tenant_id.lower()
        return AccessTokenInfo(token, expires_on, refresh_on=max(0, expires_on - self.min_ttl_seconds))

    def close(self) -> None:
        if self._own_session:
            self._session.close()
        with self._lock:
            self._cache.clear()

    def __enter__(self) -> BrokerCredential:
        return self

    def __exit__(self, *args: object) -> None:
        self.close()


def _refusal(response: requests.Response) -> BrokerAuthenticationError:
    try:
        problem = response.json()
        code, detail = str(problem.get("code", "unknown")), str(problem.get("detail", ""))
    except ValueError:
        code, detail = "unknown", ""
    retry = response.headers.get("Retry-After", "")
    return BrokerAuthenticationError(
        f"the broker refused the token request: {code} (HTTP {response.status_code}): {detail[:200]}",
        code=code,
        status_code=response.status_code,
        request_id=response.headers.get("X-Request-Id", ""),
        retry_after=int(retry) if retry.isdigit() else None,
    )
