"""Token issuance: one long-lived MSAL app per customer tenant, single-flight on a miss, every new token checked.

MSAL Python has no per-call tenant, so each tenant gets its own ``ConfidentialClientApplication`` with the
authority ``{AUTHORITY_HOST}/{tenant-guid}`` (a GUID from the registry, never caller text). In front of MSAL
sits a small map of tokens already checked, read without a lock or a thread: the hot path. On a miss one
thread per (tenant, scope) goes to MSAL — and so maybe to Entra ID — while the others wait for its result,
because MSAL does not merge concurrent misses.

Every token that comes back is decoded and checked as Microsoft's partner guide says: ``tid`` is the
tenant asked for and ``roles`` holds the permission the scope needs. Failures are translated once, here,
into the error tree; the raw MSAL result never leaves this module.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import msal
import requests
from requests.adapters import HTTPAdapter

from broker.errors import (
    BrokerError,
    ConsentRequired,
    CredentialRejected,
    RoleMissing,
    TenantNotFound,
    TokenMismatch,
    UpstreamThrottled,
    UpstreamUnavailable,
)
from broker.keyvault import CredentialSource

log = logging.getLogger(__name__)

MSAL_REFRESH_MARGIN = 300  # MSAL treats a token with fewer seconds left as expired
MAX_MIN_TTL = 3000  # Entra app-only tokens live 60-90 minutes; asking for more cannot be met
NEGATIVE_CACHE_SECONDS = 10.0  # how long a consent or unknown-tenant answer is reused before asking again
DEFAULT_RETRY_AFTER = 5
_CONSENT_CODES = {700016, 65001, 7000112, 500011, 50020}
# 70021: no federated identity credential matches the assertion; 700212: its audience matches none.
_CREDENTIAL_CODES = {7000215, 7000222, 700027, 7000218, 700021, 700023, 700024, 70021, 700212}


class AcquisitionObserver(Protocol):
    """Told the outcome of every acquisition that went past the in-memory token map."""

    def success(self, tenant_id: str, source: str) -> None: ...

    def failure(self, tenant_id: str, code: str, source: str) -> None: ...


@dataclass(frozen=True)
class AccessToken:
    """An issued token: the value is never shown by repr."""

    value: str = field(repr=False)
    expires_on: int
    tenant_id: str
    scope: str

    def expires_in(self, now: float) -> int:
        return int(self.expires_on - now)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash naming the token in logs and audit records without revealing it (computed once
        per token, not per request: a cached token is handed out many times)."""
        return hashlib.sha256(self.value.encode()).hexdigest()[:16]


def admin_consent_url(authority_host: str, tenant_id: str, client_id: str) -> str:
    return f"{authority_host}/{tenant_id}/adminconsent?client_id={quote(client_id)}"


class IdentityHttpClient:
    """MSAL's ``http_client``: one pooled session, a timeout, and the last status seen per thread.

    MSAL swallows the response of a throttled call (Entra's 429 body is plain text, which MSAL fails to
    parse), so the status and ``Retry-After`` are kept here to tell throttling from an outage.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=64)
        self._session.mount("https://", adapter)
        self._local = threading.local()

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self._send("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self._send("POST", url, **kwargs)

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        self._local.status = None
        self._local.retry_after = None
        response = self._session.request(method, url, **kwargs)
        self._local.status = response.status_code
        self._local.retry_after = response.headers.get("Retry-After")
        return response

    def last(self) -> tuple[int | None, int]:
        status = getattr(self._local, "status", None)
        raw = getattr(self._local, "retry_after", None)
        try:
            retry_after = max(1, min(int(raw), 3600)) if raw else DEFAULT_RETRY_AFTER
        except ValueError:
            retry_after = DEFAULT_RETRY_AFTER
        return status, retry_after

    def close(self) -> None:
        self._session.close()


@dataclass
class _Slot:
    """One tenant's MSAL app. The token cache survives rebuilds (credential rotation, consent)."""

    cache: msal.TokenCache = field(default_factory=msal.TokenCache)
    http_cache: dict[Any, Any] = field(default_factory=dict)
    app: msal.ConfidentialClientApplication | None = None
    credential_version: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class TokenIssuer:
    """Issues app-only tokens for registered tenants, from cache whenever possible."""

    def __init__(
        self,
        *,
        client_id: str,
        authority_host: str,
        credentials: CredentialSource,
        scope_roles: Mapping[str, str],
        http_client: IdentityHttpClient | None = None,
        clock: Callable[[], float] = time.time,
        observer: AcquisitionObserver | None = None,
    ) -> None:
        self.client_id = client_id
        self._observer = observer
        self.authority_host = authority_host.rstrip("/")
        self._credentials = credentials
        self._scope_roles = dict(scope_roles)
        self._http = http_client or IdentityHttpClient()
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._flights: dict[tuple[str, str], threading.Lock] = {}
        self._fresh: dict[tuple[str, str], AccessToken] = {}
        self._refused: dict[str, tuple[float, BrokerError]] = {}

    # -- public --------------------------------------------------------------------------------------

    def cached(self, tenant_id: str, scope: str, min_ttl: int = 0) -> AccessToken | None:
        """A checked token with at least ``min_ttl`` seconds left, from memory only (no lock, no I/O)."""
        token = self._fresh.get((tenant_id, scope))
        if token is not None and token.expires_on - self._clock() > max(MSAL_REFRESH_MARGIN, min_ttl):
            return token
        return None

    def acquire(self, tenant_id: str, scope: str, min_ttl: int = 0, claims: str | None = None) -> AccessToken:
        """A checked token for ``tenant_id`` (a registry GUID) and ``scope``; may call Entra ID.

        ``claims`` (a resource's claims challenge, a JSON object) skips every cache: MSAL sends it to Entra
        ID as ``claims`` and the new token replaces the one held for (tenant, scope).
        """
        if claims is None:
            token = self.cached(tenant_id, scope, min_ttl)
            if token is not None:
                return token
        with self._flight(tenant_id, scope):
            if claims is None:
                token = self.cached(tenant_id, scope, min_ttl)
                if token is not None:
                    return token
            refused = self._refused.get(tenant_id)
            if refused is not None and refused[0] > self._clock():
                raise refused[1]
            try:
                token = self._acquire(tenant_id, scope, min_ttl, claims)
            except BrokerError as exc:
                self._observe(tenant_id, exc)
                raise
            self._fresh[(tenant_id, scope)] = token
            self._observe(tenant_id, None)
            return token

    def _observe(self, tenant_id: str, error: BrokerError | None) -> None:
        """Tell the health record what Entra ID said (misses only: a cached token says nothing new)."""
        if self._observer is None:
            return
        try:
            if error is None:
                self._observer.success(tenant_id, "token")
            else:
                self._observer.failure(tenant_id, error.code, "token")
        except Exception:  # health is advisory: it must never fail a token request
            log.exception("token.acquire tenant=%s outcome=observer_failed", tenant_id)

    def evict(self, tenant_id: str) -> None:
        """Forget a tenant's app and tokens (after a consent change or offboarding)."""
        with self._lock:
            self._slots.pop(tenant_id, None)
            self._refused.pop(tenant_id, None)
            for key in [k for k in self._fresh if k[0] == tenant_id]:
                del self._fresh[key]

    def close(self) -> None:
        self._http.close()

    # -- the miss path -------------------------------------------------------------------------------

    def _flight(self, tenant_id: str, scope: str) -> threading.Lock:
        key = (tenant_id, scope)
        lock = self._flights.get(key)
        if lock is None:
            with self._lock:
                lock = self._flights.setdefault(key, threading.Lock())
        return lock

    def _slot(self, tenant_id: str) -> _Slot:
        slot = self._slots.get(tenant_id)
        if slot is None:
            with self._lock:
                slot = self._slots.setdefault(tenant_id, _Slot())
        return slot

    def _acquire(self, tenant_id: str, scope: str, min_ttl: int, claims: str | None) -> AccessToken:
        started = time.perf_counter()
        slot = self._slot(tenant_id)
        rotated = False
        forced = False
        while True:
            app = self._app(tenant_id, slot)
            result = self._call(app, scope, tenant_id, claims)
            if "access_token" in result:
                token = self._check(result, tenant_id, scope)
                if token.expires_in(self._clock()) <= max(MSAL_REFRESH_MARGIN, min_ttl) and not forced:
                    # MSAL served a cached token that is too close to expiry for this caller.
                    self._drop_cached(slot, scope)
                    forced = True
                    continue
                if token.expires_in(self._clock()) <= min_ttl:
                    raise UpstreamUnavailable(
                        f"Entra ID issued a token living less than the {min_ttl} seconds asked for",
                        retry_after=60,
                    )
                log.info(
                    "token.acquire tenant=%s scope=%s source=%s claims=%s expires_in=%d duration_ms=%.1f",
                    tenant_id,
                    scope,
                    result.get("token_source", "identity_provider"),
                    "yes" if claims else "no",
                    token.expires_in(self._clock()),
                    (time.perf_counter() - started) * 1000,
                )
                return token
            error = self._translate(result, tenant_id)
            if isinstance(error, CredentialRejected) and not rotated:
                # The secret may have been rotated: read the vault again and retry once.
                log.warning("token.acquire tenant=%s outcome=credential_rejected action=reread_vault", tenant_id)
                self._credentials.refresh()
                slot.app = None
                rotated = True
                continue
            if isinstance(error, ConsentRequired | TenantNotFound):
                self._refuse(tenant_id, slot, error)
            raise error

    def _app(self, tenant_id: str, slot: _Slot) -> msal.ConfidentialClientApplication:
        credential = self._credentials.current()
        with slot.lock:
            if slot.app is not None and slot.credential_version == credential.version:
                return slot.app
            authority = f"{self.authority_host}/{tenant_id}"
            try:
                slot.app = msal.ConfidentialClientApplication(
                    self.client_id,
                    client_credential=credential.for_msal(self.client_id, f"{authority}/oauth2/v2.0/token"),
                    authority=authority,
                    instance_discovery=False,
                    token_cache=slot.cache,
                    http_client=self._http,
                    http_cache=slot.http_cache,
                )
            except ValueError as exc:
                status, retry_after = self._http.last()
                if status == 400:
                    raise TenantNotFound(
                        f"Entra ID has no tenant {tenant_id}; check the registry", diagnostic=str(exc)
                    ) from exc
                raise self._outage(status, retry_after, exc) from exc
            except requests.RequestException as exc:
                raise UpstreamUnavailable(
                    "Entra ID cannot be reached", diagnostic=repr(exc), retry_after=DEFAULT_RETRY_AFTER
                ) from exc
            slot.credential_version = credential.version
            return slot.app

    def _call(
        self, app: msal.ConfidentialClientApplication, scope: str, tenant_id: str, claims: str | None
    ) -> dict[str, Any]:
        try:
            # With a claims challenge MSAL skips its cache and sends the claims to Entra ID.
            result = app.acquire_token_for_client(scopes=[scope], claims_challenge=claims)
        except msal.exceptions.MsalServiceError as exc:
            status, retry_after = self._http.last()
            raise self._outage(status, retry_after, exc) from exc
        except requests.RequestException as exc:
            raise UpstreamUnavailable(
                "Entra ID cannot be reached", diagnostic=repr(exc), retry_after=DEFAULT_RETRY_AFTER
            ) from exc
        except ValueError as exc:  # JSONDecodeError: Entra's plain-text 429 body, or a broken reply
            status, retry_after = self._http.last()
            raise self._outage(status, retry_after, exc) from exc
        if not isinstance(result, dict):
            raise UpstreamUnavailable("Entra ID returned no result", retry_after=DEFAULT_RETRY_AFTER)
        return result

    @staticmethod
    def _outage(status: int | None, retry_after: int, exc: Exception) -> BrokerError:
        diagnostic = f"status={status} error={exc.__class__.__name__}"
        if status == 429:
            return UpstreamThrottled(diagnostic=diagnostic, retry_after=retry_after)
        return UpstreamUnavailable(
            "Entra ID is not answering properly; retry later", diagnostic=diagnostic, retry_after=retry_after
        )

    def _translate(self, result: Mapping[str, Any], tenant_id: str) -> BrokerError:
        error = str(result.get("error", ""))
        codes = {int(c) for c in result.get("error_codes") or [] if isinstance(c, int)}
        diagnostic = f"error={error} codes={sorted(codes)} correlation_id={result.get('correlation_id', '')}"
        status, retry_after = self._http.last()
        if error == "invalid_client" or codes & _CREDENTIAL_CODES:
            return CredentialRejected(diagnostic=diagnostic)
        if error in ("unauthorized_client", "consent_required") or codes & _CONSENT_CODES:
            return ConsentRequired(
                f"tenant {tenant_id} has not consented to the app; an administrator must grant consent",
                diagnostic=diagnostic,
                consent_url=admin_consent_url(self.authority_host, tenant_id, self.client_id),
            )
        if error == "invalid_tenant" or 90002 in codes:
            return TenantNotFound(f"Entra ID has no tenant {tenant_id}", diagnostic=diagnostic)
        if error in ("temporarily_unavailable", "slow_down") or status == 429:
            return UpstreamThrottled(diagnostic=diagnostic, retry_after=retry_after)
        return UpstreamUnavailable("Entra ID refused the request", diagnostic=diagnostic, retry_after=retry_after)

    def _refuse(self, tenant_id: str, slot: _Slot, error: BrokerError) -> None:
        """Answer this tenant from memory for a while; then ask Entra again with a clean MSAL app.

        MSAL itself replays an HTTP 400 for 60 s from its HTTP cache, even after consent is granted, so
        the app and that cache are dropped: the next attempt after the pause reaches Entra ID.
        """
        with slot.lock:
            slot.app = None
            slot.http_cache.clear()
        self._refused[tenant_id] = (self._clock() + NEGATIVE_CACHE_SECONDS, error)

    def _check(self, result: Mapping[str, Any], tenant_id: str, scope: str) -> AccessToken:
        value = str(result["access_token"])
        try:
            claims = token_claims(value)
        except ValueError as exc:
            raise TokenMismatch("the issued token cannot be read", diagnostic=repr(exc)) from exc
        if str(claims.get("tid", "")).lower() != tenant_id:
            raise TokenMismatch(
                f"the issued token is not for tenant {tenant_id}",
                diagnostic=f"tid={claims.get('tid')!r}",
            )
        role = self._scope_roles.get(scope)
        roles = claims.get("roles") or []
        if role and role not in roles:
            raise RoleMissing(
                f"tenant {tenant_id} has not granted the application permission {role} needed for {scope}",
                missing_role=role,
                consent_url=admin_consent_url(self.authority_host, tenant_id, self.client_id),
            )
        now = self._clock()
        expires_on = int(now + int(result.get("expires_in", 0)))
        exp = claims.get("exp")
        if isinstance(exp, int):
            expires_on = min(expires_on, exp)
        return AccessToken(value, expires_on, tenant_id, scope)

    @staticmethod
    def _drop_cached(slot: _Slot, scope: str) -> None:
        entries = list(slot.cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN, target=[scope]))
        for entry in entries:
            slot.cache.remove_at(entry)


def token_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified: the token came straight from Entra ID over TLS.

    Tokens for Graph and Defender cannot be validated by their clients (Microsoft's docs say so); the
    check here is the partner guide's "validate the token" step: is it for this tenant, with this role.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    claims = json.loads(base64.urlsafe_b64decode(payload))
    if not isinstance(claims, dict):
        raise ValueError("JWT payload is not an object")
    return claims
