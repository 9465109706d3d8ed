"""``BrokerCredential``: a sync azure-core ``TokenCredential`` and ``SupportsTokenInfo`` for one customer
tenant, whose tokens come from the partner token broker.

An internal service wraps its own credential (its managed identity, say) and names one customer tenant::

    from azure.identity import ManagedIdentityCredential
    from partner_broker_client import BrokerCredential

    with BrokerCredential(
        tenant="contoso",                                  # registered name or tenant GUID
        broker_url="https://broker.example.net",
        credential=ManagedIdentityCredential(client_id="<the service's identity>"),
        broker_scope="api://<broker client id>/.default",
    ) as credential:
        SecurityClient(credential=credential)              # any Azure SDK client, or get_token_info(scope)

Tokens are cached per scope until ``min_ttl_seconds`` remain (the broker is asked for tokens with at least
that much left; ``refresh_on`` tells azure-core's bearer policy the same). Concurrent misses for one scope
make one request. A refusal raises ``BrokerAuthenticationError`` (an azure-core
``ClientAuthenticationError``) with the broker's problem ``code``, ``status_code``, ``request_id`` and
``retry_after``. The wrapped credential belongs to the caller: ``close()`` does not close it.

``claims`` (a resource's claims challenge, as azure-core's bearer policy and msgraph-sdk pass it on a 401)
skips the cache: the broker asks Entra ID for a new token carrying the challenge, and that token replaces
the cached one. ``tenant_id`` may name the bound tenant by its registered name or its GUID; any other
tenant is refused without a request.

Continuous access evaluation: ``enable_cae`` is accepted and changes nothing. The broker's tokens are
app-only tokens of a multi-tenant application, which Entra ID's CAE for workload identities does not cover
(it is for single-tenant service principals, with Microsoft Graph as the only resource), so the broker never
declares the ``cp1`` capability and its tokens keep their ordinary 60-90 minute lifetime. A claims challenge
from any resource is still honoured as above.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
from azure.core.credentials import AccessToken, AccessTokenInfo, SupportsTokenInfo, TokenCredential, TokenRequestOptions
from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.core.pipeline import Pipeline
from azure.core.pipeline.transport import HttpTransport, RequestsTransport

from partner_broker_client._pipeline import sync_policies
from partner_broker_client._protocol import DEFAULT_MIN_TTL, CredentialCore, Lookup


class BrokerCredential:
    """Customer-tenant tokens from the broker, as a ``TokenCredential`` and ``SupportsTokenInfo``.

    :keyword str tenant: the customer tenant's registered name or GUID.
    :keyword str broker_url: the broker's base URL (https; plain http only on loopback).
    :keyword credential: the caller's own credential (``TokenCredential`` or ``SupportsTokenInfo``).
    :keyword str broker_scope: the broker's scope, ``api://<broker client id>/.default``.
    :keyword int min_ttl_seconds: seconds a token must have left to be handed out (0-3000, default 300).
    :keyword float timeout: connect and read timeout of one request, in seconds.
    :keyword transport: an azure-core ``HttpTransport`` (default: requests, with ``session=`` if given).
    Other keywords configure the pipeline as in any Azure SDK client: ``retry_total``,
    ``retry_backoff_factor``, ``max_retry_after``, ``user_agent``, ``headers``, ``logger``.
    """

    def __init__(
        self,
        *,
        tenant: str,
        broker_url: str,
        credential: TokenCredential | SupportsTokenInfo,
        broker_scope: str,
        min_ttl_seconds: int = DEFAULT_MIN_TTL,
        timeout: float = 30.0,
        session: requests.Session | None = None,
        transport: HttpTransport[Any, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._core = CredentialCore(
            tenant=tenant, broker_url=broker_url, min_ttl_seconds=min_ttl_seconds, timeout=timeout
        )
        if transport is None:
            transport = RequestsTransport(session=session, session_owner=session is None)
        self._pipeline: Pipeline[Any, Any] = Pipeline(
            transport=transport, policies=sync_policies(credential, broker_scope, kwargs)
        )
        self._lock = threading.Lock()
        self._flights: dict[str, threading.Lock] = {}

    @property
    def tenant(self) -> str:
        return self._core.binding.tenant

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        info = self._get(self._core.lookup(scopes, claims, tenant_id))
        return AccessToken(info.token, info.expires_on)

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        options = options or {}
        return self._get(self._core.lookup(scopes, options.get("claims"), options.get("tenant_id")))

    def _get(self, lookup: Lookup) -> AccessTokenInfo:
        cached = self._core.cache.fresh(lookup.scope) if lookup.cache_usable else None
        if cached is not None:
            return cached
        with self._lock:
            flight = self._flights.setdefault(lookup.scope, threading.Lock())
        with flight:  # concurrent misses for one scope: the first asks, the others find its token
            cached = self._core.cache.fresh(lookup.scope) if lookup.cache_usable else None
            return cached or self._fetch(lookup)

    def _fetch(self, lookup: Lookup) -> AccessTokenInfo:
        started = time.perf_counter()
        try:
            response = self._pipeline.run(
                self._core.request(lookup),
                connection_timeout=self._core.timeout,
                read_timeout=self._core.timeout,
                **self._core.run_options,
            ).http_response
            body = response.body()
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise self._core.unreachable(lookup, exc, started) from exc
        return self._core.accept(lookup, response.status_code, response.headers, body, started)

    def close(self) -> None:
        """Close the pipeline's transport and forget cached tokens (the wrapped credential stays open)."""
        self._pipeline.__exit__()
        self._core.cache.clear()

    def __enter__(self) -> BrokerCredential:
        self._pipeline.__enter__()
        return self

    def __exit__(self, *args: object) -> None:
        self.close()
