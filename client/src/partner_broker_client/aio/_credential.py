"""``BrokerCredential`` (async): the twin of the sync credential, an azure-core ``AsyncTokenCredential`` and
``AsyncSupportsTokenInfo`` with the same behaviour, for async SDK clients such as msgraph-sdk's
``GraphServiceClient``::

    from azure.identity.aio import ManagedIdentityCredential
    from partner_broker_client.aio import BrokerCredential

    async with BrokerCredential(
        tenant="contoso",
        broker_url="https://broker.example.net",
        credential=ManagedIdentityCredential(client_id="<the service's identity>"),
        broker_scope="api://<broker client id>/.default",
    ) as credential:
        graph = GraphServiceClient(credentials=credential)
        incidents = await graph.security.incidents.get()

Nothing here blocks the event loop: the caller's own credential is awaited, and the request to the broker
goes through an async azure-core pipeline whose default transport runs requests on the loop's executor
(pass ``transport=`` for any other ``AsyncHttpTransport``, e.g. azure-core's aiohttp one). Concurrent
misses for one scope wait on one request. Caching, ``claims``, ``tenant_id``, errors, retries, logging and
CAE are as documented in :mod:`partner_broker_client._credential`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.credentials_async import AsyncSupportsTokenInfo, AsyncTokenCredential
from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.core.pipeline import AsyncPipeline
from azure.core.pipeline.transport import AsyncHttpTransport, AsyncioRequestsTransport

from partner_broker_client._pipeline import async_policies
from partner_broker_client._protocol import DEFAULT_MIN_TTL, CredentialCore, Lookup


class BrokerCredential:
    """Customer-tenant tokens from the broker, as an ``AsyncTokenCredential`` and ``AsyncSupportsTokenInfo``.

    Keywords as for :class:`partner_broker_client.BrokerCredential`; ``credential`` is the caller's own
    async credential and ``transport`` an azure-core ``AsyncHttpTransport``.
    """

    def __init__(
        self,
        *,
        tenant: str,
        broker_url: str,
        credential: AsyncTokenCredential | AsyncSupportsTokenInfo,
        broker_scope: str,
        min_ttl_seconds: int = DEFAULT_MIN_TTL,
        timeout: float = 30.0,
        transport: AsyncHttpTransport[Any, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._core = CredentialCore(
            tenant=tenant, broker_url=broker_url, min_ttl_seconds=min_ttl_seconds, timeout=timeout
        )
        self._pipeline: AsyncPipeline[Any, Any] = AsyncPipeline(
            transport=transport or AsyncioRequestsTransport(), policies=async_policies(credential, broker_scope, kwargs)
        )
        self._flights: dict[str, asyncio.Lock] = {}

    @property
    def tenant(self) -> str:
        return self._core.binding.tenant

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        info = await self._get(self._core.lookup(scopes, claims, tenant_id))
        return AccessToken(info.token, info.expires_on)

    async def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        options = options or {}
        return await self._get(self._core.lookup(scopes, options.get("claims"), options.get("tenant_id")))

    async def _get(self, lookup: Lookup) -> AccessTokenInfo:
        cached = self._core.cache.fresh(lookup.scope) if lookup.cache_usable else None
        if cached is not None:
            return cached
        async with self._flights.setdefault(lookup.scope, asyncio.Lock()):
            cached = self._core.cache.fresh(lookup.scope) if lookup.cache_usable else None
            return cached or await self._fetch(lookup)

    async def _fetch(self, lookup: Lookup) -> AccessTokenInfo:
        started = time.perf_counter()
        try:
            # One timeout for connect and read: the executor-backed transport takes no separate read timeout.
            pipeline_response = await self._pipeline.run(
                self._core.request(lookup), connection_timeout=self._core.timeout, **self._core.run_options
            )
            response = pipeline_response.http_response
            await response.read()
            body = response.body()
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise self._core.unreachable(lookup, exc, started) from exc
        return self._core.accept(lookup, response.status_code, response.headers, body, started)

    async def close(self) -> None:
        """Close the pipeline's transport and forget cached tokens (the wrapped credential stays open)."""
        await self._pipeline.__aexit__()
        self._core.cache.clear()

    async def __aenter__(self) -> BrokerCredential:
        await self._pipeline.__aenter__()
        return self

    async def __aexit__(self, *args: object) -> None:
        await self.close()
