"""``POST /api/token``: a checked, short-lived app-only token for one registered tenant and one scope.

The caller is authenticated and authorized by :mod:`broker.http.access`; the token comes from the
issuer's memory when it can, else from MSAL (one flight per tenant and scope); in strict audit mode it
leaves only once its audit record is stored. The reply is never cached by anyone on the way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator
from starlette.concurrency import run_in_threadpool

from broker.errors import (
    AuditUnavailable,
    BadRequest,
    BrokerError,
    ConsentRequired,
    CredentialRejected,
    CredentialUnavailable,
    InvalidJson,
    PayloadTooLarge,
    RoleMissing,
    ScopeNotAllowed,
    TenantNotFound,
    TokenMismatch,
    UnsupportedMediaType,
    UpstreamThrottled,
)
from broker.http import access
from broker.http.bodies import json_body
from broker.http.contract import GATE, GUID_PATTERN, TENANT, TENANT_REF, contract
from broker.http.summary import request_id, summarised
from broker.policy import ROLE_TOKEN
from broker.tenants import Tenant
from broker.tokens import MAX_MIN_TTL, AccessToken, TokenIssuer
from broker.wiring import Container

MAX_CLAIMS_LENGTH = 8192
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class TokenRequest(BaseModel):
    """The body of ``POST /api/token``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: Annotated[
        StrictStr,
        Field(
            min_length=1,
            max_length=64,
            description="The customer tenant: its registered name or its tenant GUID.",
            json_schema_extra=TENANT_REF,
        ),
    ]
    scope: Annotated[
        StrictStr,
        Field(min_length=1, max_length=256, description="One of the broker's ALLOWED_SCOPES (`<resource>/.default`)."),
    ]
    min_ttl_seconds: Annotated[
        StrictInt,
        Field(ge=0, le=MAX_MIN_TTL, description="Never hand out a token that expires within this many seconds."),
    ] = 0
    claims: (
        Annotated[
            StrictStr,
            Field(
                min_length=2,
                max_length=MAX_CLAIMS_LENGTH,
                description=(
                    "A resource's claims challenge, decoded: a JSON object. The token is then fetched from Entra ID "
                    "with these claims, never served from memory."
                ),
            ),
        ]
        | None
    ) = None

    @field_validator("claims")
    @classmethod
    def _claims_object(cls, value: str | None) -> str | None:
        """A claims challenge as a resource sent it (decoded): a JSON object, passed on to Entra ID."""
        if value is None:
            return None
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object (a decoded claims challenge)")
        return value


class AsyncSingleFlight:
    """Requests that miss the token cache together wait on the first one's result, not on a thread each.

    ``TokenIssuer`` already lets one thread per (tenant, scope) reach MSAL, but a herd of requests for a
    cold tenant would otherwise park one worker thread each on that lock and starve other tenants'
    misses. Here only the first request takes a thread; the rest await its future on the event loop.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[int, str, str, int, str | None], asyncio.Future[AccessToken]] = {}

    async def acquire(
        self, issuer: TokenIssuer, tenant_id: str, scope: str, min_ttl: int, claims: str | None = None
    ) -> AccessToken:
        key = (id(issuer), tenant_id, scope, min_ttl, claims)
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[AccessToken] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_mark_retrieved)
        self._pending[key] = future
        try:
            token = await run_in_threadpool(issuer.acquire, tenant_id, scope, min_ttl, claims)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(token)
            return token
        finally:
            del self._pending[key]


def _mark_retrieved(future: asyncio.Future[AccessToken]) -> None:
    """A failed flight nobody else awaited must not log "exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


class TokenResponse(BaseModel):
    """The token, for the tenant and scope asked (``Cache-Control: no-store``)."""

    access_token: str = Field(description="The app-only access token; send it as `Authorization: Bearer`.")
    token_type: Literal["Bearer"]
    expires_in: int = Field(description="Seconds until it expires (more than the min_ttl_seconds asked).")
    expires_on: int = Field(description="When it expires, in seconds since the Unix epoch.")
    tenant_id: str = Field(description="The tenant GUID the token is for (its `tid`).", pattern=GUID_PATTERN)
    scope: str = Field(description="The scope asked.")


ISSUE_TOKEN = contract(
    operation_id="issue_token",
    summary="A short-lived app-only token for one customer tenant and one resource",
    description=(
        "Issued from memory when a token with enough life left is held, else from Entra ID (one request per "
        "tenant and scope however many callers miss together). Every new token is checked: `tid` is the tenant "
        "asked for and `roles` holds the permission the scope needs. With AUDIT_MODE=strict no token leaves "
        "before its audit record is stored."
    ),
    role=ROLE_TOKEN,
    ok=TokenResponse,
    body=TokenRequest,
    body_example={"tenant": "contoso", "scope": "https://api.security.microsoft.com/.default", "min_ttl_seconds": 600},
    errors=(
        *GATE,
        *TENANT,
        BadRequest,
        InvalidJson,
        ScopeNotAllowed,
        UnsupportedMediaType,
        PayloadTooLarge,
        ConsentRequired,
        TenantNotFound,
        RoleMissing,
        CredentialRejected,
        TokenMismatch,
        UpstreamThrottled,
        CredentialUnavailable,
        AuditUnavailable,
    ),
    ok_headers={"Cache-Control": {"description": "`no-store`: never cache a token.", "schema": {"type": "string"}}},
)


def token_routes(container: Callable[[], Container]) -> APIRouter:
    router = APIRouter()
    flights = AsyncSingleFlight()

    @router.post("/api/token", **ISSUE_TOKEN)
    async def issue_token(request: Request) -> Response:
        async with summarised(request, "token.issue", outcome="issued", tenant="-", scope="-", caller="-") as summary:
            c: Container | None = None
            scope: str | None = None
            target: Tenant | str = "-"
            try:
                c = container()
                caller = await access.authenticate(c, request, "token")
                body = await json_body(request, TokenRequest)
                if body.scope not in c.settings.allowed_scopes:
                    raise ScopeNotAllowed(f"scope must be one of: {', '.join(c.settings.allowed_scopes)}")
                scope = summary["scope"] = body.scope
                granted = await access.authorize(c, request, body.tenant, "token", caller=caller, scope=body.scope)
                tenant = target = granted.tenant
                # A claims challenge means the resource refused the token held: never answer it from memory.
                token = None if body.claims else c.issuer.cached(tenant.tenant_id, body.scope, body.min_ttl_seconds)
                summary["source"] = "memory"
                if token is None:
                    summary["source"] = "msal_claims" if body.claims else "msal"
                    token = await flights.acquire(
                        c.issuer, tenant.tenant_id, body.scope, body.min_ttl_seconds, body.claims
                    )
                summary["fp"] = token.fingerprint
                # Strict mode: the token leaves only once its audit record is stored.
                await access.audit(
                    c,
                    request,
                    action="token",
                    outcome="issued",
                    code="ok",
                    reason="issued",
                    caller=caller,
                    tenant=tenant,
                    scope=body.scope,
                    token=token,
                    wait=c.audit.mode == "strict",
                )
                return _token_response(token, request_id(request))
            except BrokerError as exc:
                if c is not None:
                    await access.refused(c, request, exc, action="token", tenant=target, scope=scope)
                raise

    return router


def _token_response(token: AccessToken, rid: str) -> Response:
    now = time.time()
    body = {
        "access_token": token.value,
        "token_type": "Bearer",
        "expires_in": token.expires_in(now),
        "expires_on": token.expires_on,
        "tenant_id": token.tenant_id,
        "scope": token.scope,
    }
    return Response(json.dumps(body), media_type="application/json", headers={**NO_STORE, "X-Request-Id": rid})
