"""The HTTP surface: one FastAPI app, served by ``func.AsgiFunctionApp`` in Azure and by uvicorn locally.

Routes carry the ``/api`` prefix themselves (host.json sets ``routePrefix`` to ""). Every failure leaves
as an ``application/problem+json`` document with a stable ``code``; bad input is refused before any
outbound call. One summary line is logged per request, with ``key=value`` pairs and never a token.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import wiring
from broker.callers import Caller
from broker.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    BrokerError,
    InvalidJson,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ScopeNotAllowed,
    TenantDisabled,
    UnsupportedMediaType,
)
from broker.tenants import Tenant, normalize_reference
from broker.tokens import MAX_MIN_TTL, AccessToken
from broker.wiring import Container

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class TokenRequest(BaseModel):
    """The body of ``POST /api/token``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    scope: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    min_ttl_seconds: Annotated[StrictInt, Field(ge=0, le=MAX_MIN_TTL)] = 0


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
        summary: dict[str, Any] = {"outcome": "issued", "code": "-", "tenant": "-", "scope": "-", "caller": "-"}
        try:
            c = container()
            caller = _authenticate(c, request)
            summary["caller"] = caller.label
            body = await _json_body(request, TokenRequest)
            ref = normalize_reference(body.tenant)
            if body.scope not in c.settings.allowed_scopes:
                raise ScopeNotAllowed(f"scope must be one of: {', '.join(c.settings.allowed_scopes)}")
            summary["scope"] = body.scope
            tenant = c.tenants.cached(ref)
            if tenant is None:
                tenant = await run_in_threadpool(c.tenants.resolve, ref)
            summary["tenant"] = tenant.tenant_id
            _check_tenant(tenant)
            token = c.issuer.cached(tenant.tenant_id, body.scope, body.min_ttl_seconds)
            summary["source"] = "memory"
            if token is None:
                summary["source"] = "msal"
                token = await run_in_threadpool(c.issuer.acquire, tenant.tenant_id, body.scope, body.min_ttl_seconds)
            summary["fp"] = token.fingerprint
            return _token_response(token, rid)
        except BrokerError as exc:
            summary["outcome"] = "denied" if exc.status < 500 and exc.code != "consent_required" else "failed"
            summary["code"] = exc.code
            if exc.diagnostic:
                summary["diagnostic"] = exc.diagnostic
            raise
        finally:
            summary["duration_ms"] = f"{(time.perf_counter() - started) * 1000:.2f}"
            summary["request_id"] = rid
            log.info("token.issue %s", " ".join(f"{k}={_logsafe(v)}" for k, v in summary.items()))

    return app


def _authenticate(c: Container, request: Request) -> Caller:
    return c.authenticator.authenticate(request.headers)


def _check_tenant(tenant: Tenant) -> None:
    if not tenant.enabled:
        raise TenantDisabled(f"tenant {tenant.name} is disabled")


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
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.headers.get("x-request-id", "")
        if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum() and rid.isascii()):
            rid = uuid.uuid4().hex
        request.state.request_id = rid
    return str(rid)


def _logsafe(value: object) -> str:
    text = str(value)
    return text if text.isprintable() and " " not in text and len(text) < 300 else json.dumps(text[:300])
