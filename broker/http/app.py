"""The HTTP surface: one FastAPI app, served by ``func.AsgiFunctionApp`` in Azure and by uvicorn locally.

Routes carry the ``/api`` prefix themselves (host.json sets ``routePrefix`` to ""). Every failure leaves
as an ``application/problem+json`` document with a stable ``code``; bad input is refused before any
outbound call. One summary line is logged per request, with ``key=value`` pairs and never a token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import wiring
from broker.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    BrokerError,
    InvalidJson,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ScopeNotAllowed,
    UnsupportedMediaType,
)
from broker.http import access
from broker.http.admin import admin_routes
from broker.http.incidents import incidents_router
from broker.tenants import Tenant
from broker.tokens import MAX_MIN_TTL, AccessToken, TokenIssuer
from broker.wiring import Container

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
MAX_CLAIMS_LENGTH = 8192
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class TokenRequest(BaseModel):
    """The body of ``POST /api/token``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    scope: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    min_ttl_seconds: Annotated[StrictInt, Field(ge=0, le=MAX_MIN_TTL)] = 0
    claims: Annotated[StrictStr, Field(min_length=2, max_length=MAX_CLAIMS_LENGTH)] | None = None

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


def problem_response(error: BrokerError, request_id: str) -> Response:
    headers = error.headers()
    headers["X-Request-Id"] = request_id
    return Response(
        error.render(request_id), status_code=error.status, media_type=PROBLEM_CONTENT_TYPE, headers=headers
    )


class BodyLimit:
    """Refuses bodies over ``limit`` bytes (declared or streamed) before a route reads them."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _send_problem(send, PayloadTooLarge(f"the body must be at most {self.limit} bytes"))
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise PayloadTooLarge(f"the body must be at most {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


async def _send_problem(send: Send, error: BrokerError) -> None:
    body = error.render()
    headers = [(b"content-type", PROBLEM_CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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


def create_app(container: Callable[[], Container] = wiring.container) -> FastAPI:
    """The broker's ASGI app. ``container`` is called per request (it is built once, lazily)."""
    app = FastAPI(
        title="Partner token broker",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )

    app.add_middleware(BodyLimit)
    app.include_router(admin_routes(container))
    app.include_router(incidents_router(container))
    flights = AsyncSingleFlight()

    @app.exception_handler(BrokerError)
    async def broker_error(request: Request, exc: BrokerError) -> Response:
        return problem_response(exc, _rid(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return problem_response(BadRequest(_describe(exc.errors())), _rid(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            return problem_response(MethodNotAllowed(f"{request.method} is not allowed here"), _rid(request))
        return problem_response(NotFound(f"no route {request.url.path}"), _rid(request))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("request.error path=%s request_id=%s", request.url.path, _rid(request))
        return problem_response(BrokerError("unexpected error; operators: see the log"), _rid(request))

    @app.get("/api/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/token")
    async def issue_token(request: Request) -> Response:
        started = time.perf_counter()
        rid = _rid(request)
        summary = access.summary(request)
        summary.update({"outcome": "issued", "code": "-", "tenant": "-", "scope": "-", "caller": "-"})
        c: Container | None = None
        scope: str | None = None
        target: Tenant | str = "-"
        try:
            c = container()
            caller = await access.authenticate(c, request, "token")
            body = await _json_body(request, TokenRequest)
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
                token = await flights.acquire(c.issuer, tenant.tenant_id, body.scope, body.min_ttl_seconds, body.claims)
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
            return _token_response(token, rid)
        except BrokerError as exc:
            summary["outcome"] = access.outcome_of(exc)
            summary["code"] = exc.code
            if exc.diagnostic:
                summary["diagnostic"] = exc.diagnostic
            if c is not None:
                await access.refused(c, request, exc, action="token", tenant=target, scope=scope)
            raise
        finally:
            summary["duration_ms"] = f"{(time.perf_counter() - started) * 1000:.2f}"
            summary["request_id"] = rid
            log.info("token.issue %s", " ".join(f"{k}={_logsafe(v)}" for k, v in summary.items()))

    return app


def _token_response(token: AccessToken, request_id: str) -> Response:
    now = time.time()
    body = {
        "access_token": token.value,
        "token_type": "Bearer",
        "expires_in": token.expires_in(now),
        "expires_on": token.expires_on,
        "tenant_id": token.tenant_id,
        "scope": token.scope,
    }
    return Response(json.dumps(body), media_type="application/json", headers={**NO_STORE, "X-Request-Id": request_id})


M = TypeVar("M", bound=BaseModel)


async def _json_body(request: Request, model: type[M]) -> M:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType()
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidJson(f"the body is not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_describe(exc.errors())) from exc


def _describe(errors: Any) -> str:
    parts = []
    for error in list(errors)[:5]:
        loc = ".".join(str(p)[:40] for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def _rid(request: Request) -> str:
    """The request's id: the caller's ``X-Request-Id`` when it is a sane token, else a new one."""
    return access.request_id(request)


def _logsafe(value: object) -> str:
    text = str(value)
    return text if text.isprintable() and " " not in text and len(text) < 300 else json.dumps(text[:300])
