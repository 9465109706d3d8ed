"""The broker's token contract, shared by the sync and the async credential: no I/O happens here.

``POST {broker}/api/token`` with ``{"tenant", "scope", "min_ttl_seconds", "claims"?}`` answers either
``200 {"access_token", "expires_on", "tenant_id", ...}`` or an ``application/problem+json`` refusal with a
stable ``code``. This module builds that request, reads either answer, keeps the per-scope cache and
decides which ``tenant_id=`` a bound credential accepts.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from azure.core.credentials import AccessTokenInfo
from azure.core.exceptions import ClientAuthenticationError
from azure.core.rest import HttpRequest

log = logging.getLogger("partner_broker_client")

DEFAULT_MIN_TTL = 300
MAX_MIN_TTL = 3000  # the broker's own bound: Entra app-only tokens live 60-90 minutes
MAX_CLAIMS_LENGTH = 8192
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class BrokerAuthenticationError(ClientAuthenticationError):
    """The broker refused or failed; ``code`` is its stable problem code (see the broker's runbook).

    Codes made on this side: ``tenant_mismatch`` (a ``tenant_id=`` this credential is not bound to),
    ``broker_unreachable`` (no answer after the retries) and ``bad_response`` (an answer that is not a token).
    """

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


def broker_base_url(url: str) -> tuple[str, bool]:
    """The broker's base URL without a trailing slash, and whether it is plain http on loopback.

    Bearer tokens travel over TLS only. Plain http is accepted for a loopback broker (a local run), where
    the caller's token never leaves the machine.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("broker_url must be an absolute https:// URL")
    if parts.query or parts.fragment:
        raise ValueError("broker_url must not carry a query or a fragment")
    if parts.scheme == "http":
        if not _is_loopback(parts.hostname):
            raise ValueError("broker_url must use https (plain http is accepted for a loopback broker only)")
        return url.rstrip("/"), True
    return url.rstrip("/"), False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_min_ttl(min_ttl_seconds: int) -> int:
    if isinstance(min_ttl_seconds, bool) or not isinstance(min_ttl_seconds, int):
        raise TypeError("min_ttl_seconds must be an integer")
    if not 0 <= min_ttl_seconds <= MAX_MIN_TTL:
        raise ValueError(f"min_ttl_seconds must be between 0 and {MAX_MIN_TTL}")
    return min_ttl_seconds


def one_scope(scopes: tuple[str, ...]) -> str:
    if len(scopes) != 1 or not scopes[0]:
        raise ValueError("a broker credential issues tokens for exactly one '<resource>/.default' scope")
    return scopes[0]


def check_claims(claims: str | None) -> str | None:
    """A claims challenge is a JSON object (decoded, as azure-core hands it to ``get_token``)."""
    if not claims:
        return None
    if len(claims) > MAX_CLAIMS_LENGTH:
        raise ValueError(f"claims must be at most {MAX_CLAIMS_LENGTH} characters")
    try:
        parsed = json.loads(claims)
    except ValueError as exc:
        raise ValueError("claims must be a JSON object (decode a base64 challenge first)") from exc
    if not isinstance(parsed, dict):
        raise ValueError("claims must be a JSON object")
    return claims


@dataclass
class TenantBinding:
    """The one customer tenant a credential is bound to: its registered name or GUID, and the GUID the
    broker named in its first answer."""

    tenant: str
    tenant_id: str | None = None

    def __post_init__(self) -> None:
        if not self.tenant or not self.tenant.strip():
            raise ValueError("tenant must be the customer tenant's registered name or GUID")
        if _GUID.fullmatch(self.tenant):
            self.tenant_id = self.tenant.lower()

    def admits(self, tenant_id: str | None) -> str | None:
        """``None`` when ``tenant_id`` is this tenant (or absent); the GUID still to confirm against the
        broker's answer when it is a GUID not yet seen. Any other value is refused here, before a request.
        """
        if not tenant_id:
            return None
        wanted = tenant_id.strip().lower()
        if wanted == self.tenant.lower() or (self.tenant_id is not None and wanted == self.tenant_id):
            return None
        if self.tenant_id is None and _GUID.fullmatch(wanted):
            return wanted
        raise self.mismatch(tenant_id)

    def learn(self, tenant_id: str, expected: str | None) -> None:
        """Record the GUID the broker issued for; a GUID still to confirm must be that one.

        A credential never changes tenant: an answer for another GUID than the one already known is refused.
        """
        if self.tenant_id is not None and tenant_id != self.tenant_id:
            raise BrokerAuthenticationError(
                f"the broker answered for tenant {tenant_id[:64]!r}, not {self.tenant_id!r}", code="bad_response"
            )
        self.tenant_id = tenant_id
        if expected is not None and tenant_id != expected:
            raise self.mismatch(expected)

    def mismatch(self, tenant_id: str) -> BrokerAuthenticationError:
        return BrokerAuthenticationError(
            f"this credential is bound to tenant {self.tenant!r}, not {tenant_id[:64]!r}", code="tenant_mismatch"
        )


class TokenCache:
    """Tokens per scope, good while more than ``min_ttl`` seconds remain."""

    def __init__(self, min_ttl: int) -> None:
        self.min_ttl = min_ttl
        self._tokens: dict[str, AccessTokenInfo] = {}

    def fresh(self, scope: str) -> AccessTokenInfo | None:
        token = self._tokens.get(scope)
        if token is not None and token.expires_on - time.time() > self.min_ttl:
            return token
        return None

    def put(self, scope: str, token: AccessTokenInfo) -> None:
        self._tokens[scope] = token

    def clear(self) -> None:
        self._tokens.clear()


class CredentialCore:
    """What the sync and async credentials share, all but the I/O and the locks: the checked settings, the
    tenant binding, the cache, the request to send and what to make of the answer."""

    def __init__(self, *, tenant: str, broker_url: str, min_ttl_seconds: int, timeout: float) -> None:
        self.broker_url, loopback = broker_base_url(broker_url)
        self.min_ttl_seconds = check_min_ttl(min_ttl_seconds)
        self.binding = TenantBinding(tenant)
        self.timeout = timeout
        # azure-core's bearer policy refuses plain http unless told; only a loopback broker is allowed it.
        self.run_options: dict[str, Any] = {"enforce_https": False} if loopback else {}
        self.cache = TokenCache(self.min_ttl_seconds)

    def lookup(self, scopes: tuple[str, ...], claims: str | None, tenant_id: str | None) -> Lookup:
        """The scope asked, and the cached token when one may answer (no claims, nothing to confirm)."""
        scope, claims = one_scope(scopes), check_claims(claims)
        confirm = self.binding.admits(tenant_id)
        usable = claims is None and confirm is None
        return Lookup(scope, claims, confirm, usable)

    def request(self, lookup: Lookup) -> HttpRequest:
        return token_request(self.broker_url, self.binding.tenant, lookup.scope, self.min_ttl_seconds, lookup.claims)

    def accept(
        self, lookup: Lookup, status: int, headers: Mapping[str, str], body: bytes, started: float
    ) -> AccessTokenInfo:
        """The token in the broker's answer, checked, cached and logged (or the refusal raised)."""
        log_fetch(self.binding.tenant, lookup.scope, status, _rid(headers), started, lookup.claims is not None)
        info, issued_for = read_answer(status, headers, body, self.min_ttl_seconds)
        self.binding.learn(issued_for, lookup.confirm)
        self.cache.put(lookup.scope, info)
        return info

    def unreachable(self, lookup: Lookup, exc: Exception, started: float) -> BrokerAuthenticationError:
        log_fetch(self.binding.tenant, lookup.scope, "unreachable", "", started, lookup.claims is not None)
        return BrokerAuthenticationError(
            f"the broker is unreachable ({exc.__class__.__name__})", code="broker_unreachable"
        )


@dataclass(frozen=True)
class Lookup:
    scope: str
    claims: str | None
    confirm: str | None  # a GUID ``tenant_id`` to check against the answer
    cache_usable: bool


def token_request(base_url: str, tenant: str, scope: str, min_ttl: int, claims: str | None) -> HttpRequest:
    body: dict[str, Any] = {"tenant": tenant, "scope": scope, "min_ttl_seconds": min_ttl}
    if claims is not None:
        body["claims"] = claims
    return HttpRequest("POST", f"{base_url}/api/token", json=body, headers={"Accept": "application/json"})


def read_answer(status: int, headers: Mapping[str, str], body: bytes, min_ttl: int) -> tuple[AccessTokenInfo, str]:
    """The token and the tenant GUID it is for, or the refusal raised as ``BrokerAuthenticationError``."""
    if status != 200:
        raise refusal(status, headers, body)
    try:
        answer = json.loads(body)
        token, expires_on, tenant_id = str(answer["access_token"]), int(answer["expires_on"]), answer["tenant_id"]
        if not token or not isinstance(tenant_id, str):
            raise ValueError("empty token or tenant")
    except (ValueError, KeyError, TypeError) as exc:
        raise BrokerAuthenticationError(
            "the broker's answer is not a token", code="bad_response", status_code=status, request_id=_rid(headers)
        ) from exc
    refresh_on = max(0, expires_on - min_ttl)
    info = AccessTokenInfo(token, expires_on, token_type="Bearer", refresh_on=refresh_on)  # noqa: S106 (a scheme)
    return info, tenant_id.lower()


def refusal(status: int, headers: Mapping[str, str], body: bytes) -> BrokerAuthenticationError:
    code, detail = "unknown", ""
    try:
        problem = json.loads(body)
        if isinstance(problem, dict):
            code, detail = str(problem.get("code", "unknown"))[:64], str(problem.get("detail", ""))[:200]
    except ValueError:
        pass
    retry = headers.get("Retry-After", "")
    return BrokerAuthenticationError(
        f"the broker refused the token request: {code} (HTTP {status}): {detail}",
        code=code,
        status_code=status,
        request_id=_rid(headers),
        retry_after=int(retry) if retry.isdigit() else None,
    )


def _rid(headers: Mapping[str, str]) -> str:
    return str(headers.get("X-Request-Id", ""))[:64]


def log_fetch(tenant: str, scope: str, status: int | str, request_id: str, started: float, claims: bool) -> None:
    """One line per broker round trip; never a token."""
    log.info(
        "broker.token tenant=%s scope=%s status=%s claims=%s request_id=%s duration_ms=%.1f",
        tenant,
        scope,
        status,
        "yes" if claims else "no",
        request_id or "-",
        (time.perf_counter() - started) * 1000,
    )
