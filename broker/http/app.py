"""The HTTP surface: one FastAPI app, served by ``func.AsgiFunctionApp`` in Azure and by uvicorn locally.

``create_app`` puts together the route groups (:mod:`~broker.http.issuance` for tokens,
:mod:`~broker.http.incidents`, :mod:`~broker.http.admin`), the body limit and the error handlers.
Routes carry the ``/api`` prefix themselves (host.json sets ``routePrefix`` to ""). Every failure leaves
as an ``application/problem+json`` document with a stable ``code``; bad input is refused before any
outbound call. One summary line is logged per request (:mod:`~broker.http.summary`), with escaped
``key=value`` pairs and never a token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import wiring
from broker.errors import PROBLEM_CONTENT_TYPE, BadRequest, BrokerError, MethodNotAllowed, NotFound, PayloadTooLarge
from broker.http.admin import admin_routes
from broker.http.bodies import describe
from broker.http.contract import contract, finish_document
from broker.http.guards import CrossSiteGuard
from broker.http.incidents import incidents_routes
from broker.http.issuance import token_routes
from broker.http.onboarding import onboarding_routes
from broker.http.summary import request_id
from broker.http.tracing import TracedApp
from broker.wiring import Container

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024


def problem_response(error: BrokerError, rid: str) -> Response:
    headers = error.headers()
    headers["X-Request-Id"] = rid
    return Response(error.render(rid), status_code=error.status, media_type=PROBLEM_CONTENT_TYPE, headers=headers)


class BodyLimit:
    """Refuses bodies over ``limit`` bytes (declared or streamed): reading one raises ``PayloadTooLarge``,
    so the route refuses it as it refuses any bad body (a problem response and an audit record) without
    a byte of it having been read."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared_too_large = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():
                    await _send_problem(send, BadRequest("the Content-Length header is not a number"))
                    return
                declared_too_large = int(value) > self.limit
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared_too_large:
                raise PayloadTooLarge(f"the body must be at most {self.limit} bytes")
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
        # FastAPI's own OpenTelemetry spans record the query string (the consent callback's state): off.
        # TracedApp traces requests instead, with the query hidden (broker/http/tracing.py).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )

    app.add_middleware(BodyLimit)
    app.add_middleware(
        CrossSiteGuard, container=container, refuse=_send_problem, serves=lambda scope: _serves(app, scope)
    )
    app.add_middleware(TracedApp)  # outermost: the request span covers everything else
    app.include_router(admin_routes(container))
    app.include_router(incidents_routes(container))
    app.include_router(token_routes(container))
    app.include_router(onboarding_routes(container))

    @app.exception_handler(BrokerError)
    async def broker_error(request: Request, exc: BrokerError) -> Response:
        return problem_response(exc, request_id(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return problem_response(BadRequest(describe(exc.errors())), request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            response = problem_response(MethodNotAllowed(f"{request.method} is not allowed here"), request_id(request))
            response.headers["Allow"] = _allowed_methods(app, request)
            return response
        return problem_response(NotFound(f"no route {request.url.path}"), request_id(request))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("request.error path=%s request_id=%s", request.url.path, request_id(request))
        return problem_response(BrokerError("unexpected error; operators: see the log"), request_id(request))

    @app.get("/api/health", **HEALTH)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish_document(app, _allowed_scopes(container))
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
    return app


class Health(BaseModel):
    """The app is up (it checks nothing else; readiness is another question)."""

    status: Literal["ok"]


HEALTH = contract(operation_id="health", summary="Liveness: the app answers", role=None, ok=Health, errors=())


def _serves(app: FastAPI, scope: Scope) -> bool:
    """Whether some route serves this method at this path."""
    return any(route.matches(scope)[0] is Match.FULL for route in iter_route_contexts(app.routes))


def _allowed_methods(app: FastAPI, request: Request) -> str:
    """Every method some route serves at this path (RFC 9110: a 405 says them in ``Allow``). Starlette names
    only the first matching route's, and a path may have one route per method."""
    methods: set[str] = set()
    for route in iter_route_contexts(app.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def _allowed_scopes(container: Callable[[], Container]) -> tuple[str, ...]:
    """This deployment's scopes for the document, when the broker is configured (else the document says less)."""
    try:
        return tuple(container().settings.allowed_scopes)
    except BrokerError:
        return ()
