"""The Defender XDR incidents API and the Microsoft Graph security incidents API, over HTTP, serving one
:class:`~sandbox.security.world.IncidentWorld`. Each renders its own view of the same records:

- Defender XDR (``create_defender_app``): ``GET /api/incidents`` and ``GET /api/incidents/{id}``. PascalCase
  enums, integer ids, alerts (with devices and entities, most fields null) always inline. ``$filter`` on
  ``lastUpdateTime`` / ``createdTime`` (``eq ge gt le lt``), ``status eq``, ``assignedTo eq``, joined with
  ``and``; ``$top`` (default and maximum 100), ``$skip``, ``$orderby=lastUpdateTime asc|desc`` (default: most
  recent first). ``@odata.nextLink`` only when ``world.defender_next_link`` is on (undocumented upstream).
  Quota per tenant: 50 calls a minute and 1,500 an hour; a 429 carries ``{"error": {"code": "429",
  "message": "API calls quota exceeded! maximum allowed 50 per 00:01:00", ...}}`` and no ``Retry-After``.
- Graph (``create_graph_app``): ``GET /v1.0/security/incidents`` and ``/v1.0/security/incidents/{id}``. String
  ids, camelCase enums, ``tenantId`` on every incident, alerts only with ``$expand=alerts``. ``$top`` at most 50,
  ``@odata.nextLink`` whenever rows remain, ``$count``. Quota 150 calls a minute per tenant; a 429 carries
  ``Retry-After``.

The bearer token decides whose data a call sees: its ``tid`` claim selects the tenant, its ``roles`` must
hold the API's incident permission (else 403); a missing or invalid token is a 401. Before any of that, the
shared :class:`~sandbox.state.Recorder` may serve an injected fault, then adds its injected latency. Every
answered request counts under ``defender.incidents`` / ``graph.incidents`` (with a ``:<tenant>`` suffix when
the token names one).
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from sandbox.security.odata import (
    DEFENDER_SCHEMA,
    GRAPH_SCHEMA,
    Clause,
    ODataError,
    parse_filter,
    parse_orderby,
    top_exceeded,
)
from sandbox.security.records import Incident
from sandbox.security.world import IncidentWorld, Throttle
from sandbox.state import Recorder

DEFENDER_AUDIENCE = "https://api.security.microsoft.com"
GRAPH_AUDIENCE = "https://graph.microsoft.com"
DEFENDER_ROLES = frozenset({"Incident.Read.All", "Incident.ReadWrite.All"})
GRAPH_ROLES = frozenset({"SecurityIncident.Read.All", "SecurityIncident.ReadWrite.All"})

DEFENDER_MAX_TOP = 100
GRAPH_MAX_TOP = 50


def _format_window(seconds: float) -> str:
    total = int(seconds)
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(data, status, headers=headers, media_type="application/json; charset=utf-8")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _peek_tid(token: str | None) -> str | None:
    """The ``tid`` an unverified token claims; only to label counters on requests answered before auth."""
    if not token:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    tid = claims.get("tid")
    return tid if isinstance(tid, str) else None


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ODataError(f"Invalid value '{raw}' for {name} query option found.") from None
    if value < 0:
        raise ODataError(f"Invalid value '{raw}' for {name} query option found. Value must be non-negative.")
    return value


@dataclass(frozen=True)
class _ListQuery:
    """The options of one list request, checked: what to match, in which order, which slice."""

    clauses: list[Clause]
    order: tuple[str, bool]  # (record attribute, descending)
    skip: int
    page_size: int


class _Api:
    """What differs between the two apps; the request flow is shared."""

    def __init__(
        self,
        name: str,
        world: IncidentWorld,
        recorder: Recorder,
        verify_bearer: Callable[[str, str], dict[str, Any]],
    ) -> None:
        self.name = name
        self.world = world
        self.recorder = recorder
        self.verify_bearer = verify_bearer
        self.counter = f"{name}.incidents"
        self.audience = DEFENDER_AUDIENCE if name == "defender" else GRAPH_AUDIENCE
        self.roles = DEFENDER_ROLES if name == "defender" else GRAPH_ROLES
        self.max_top = DEFENDER_MAX_TOP if name == "defender" else GRAPH_MAX_TOP
        self.schema = DEFENDER_SCHEMA if name == "defender" else GRAPH_SCHEMA
        self.order_fields = (
            {"lastUpdateTime": "last_update", "createdTime": "created"}
            if name == "defender"
            else {"lastUpdateDateTime": "last_update", "createdDateTime": "created"}
        )
        self.default_order = "lastUpdateTime" if name == "defender" else "lastUpdateDateTime"

    def list_query(self, request: Request, more_options: set[str]) -> _ListQuery:
        """``$filter``, ``$orderby``, ``$top`` and ``$skip`` of a list request; :class:`ODataError` if refused,
        as is any other ``$`` option not in ``more_options``."""
        problem = _unsupported_options(request, {"$filter", "$top", "$skip", "$orderby", *more_options})
        if problem:
            raise ODataError(problem)
        top = _int_param(request, "$top")
        if top is not None and top > self.max_top:
            raise ODataError(top_exceeded(self.max_top, top))
        skip = _int_param(request, "$skip") or 0
        raw_filter = request.query_params.get("$filter")
        clauses = parse_filter(raw_filter, self.schema) if raw_filter else []
        order = parse_orderby(request.query_params.get("$orderby"), self.order_fields, self.default_order)
        return _ListQuery(clauses, order, skip, self.max_top if top is None else top)

    def page(
        self, tenant_id: str, query: _ListQuery, render: Callable[[Incident], dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], int]:
        """(rendered page, total rows matching) from the world."""
        q = query
        return self.world.query(tenant_id, q.clauses, self.schema, q.order, q.skip, q.page_size, render)

    def page_response(
        self,
        request: Request,
        tenant_id: str,
        query: _ListQuery,
        body: dict[str, Any],
        page: list[dict[str, Any]],
        total: int,
        *,
        next_link: bool,
    ) -> Response:
        """The 200 for a list page: ``body`` with ``value``, and ``@odata.nextLink`` if ``next_link`` and rows
        remain. The world's page hooks run once the page is rendered, before the client can ask for the next."""
        body["value"] = page
        if next_link and query.skip + len(page) < total and page:
            body["@odata.nextLink"] = _next_link(request, query.skip + len(page), query.page_size)
        response = _json(200, body)
        self.world.page_served(tenant_id, self.name)
        return response

    # error bodies ------------------------------------------------------------------------------------

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        request_id = str(uuid.uuid4())
        if self.name == "defender":
            body: dict[str, Any] = {"error": {"code": code, "message": message, "target": request_id}}
        else:
            body = {
                "error": {
                    "code": code,
                    "message": message,
                    "innerError": {
                        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                        "request-id": request_id,
                        "client-request-id": request_id,
                    },
                }
            }
        all_headers = {"request-id": request_id, **(headers or {})}
        return _json(status, body, all_headers)

    def bad_request(self, message: str) -> Response:
        return self.error(400, "BadRequest", message)

    def throttled(self, throttle: Throttle) -> Response:
        if self.name == "defender":
            message = (
                f"API calls quota exceeded! maximum allowed {throttle.limit} per {_format_window(throttle.window)}"
            )
            return self.error(429, "429", message)
        retry = str(max(1, math.ceil(throttle.retry_after)))
        return self.error(429, "TooManyRequests", "Too many requests.", {"Retry-After": retry})

    # flow ----------------------------------------------------------------------------------------------

    async def guard(self, request: Request) -> tuple[Response | None, str]:
        """Fault, latency, auth, quota. Returns (a response to send instead, tenant id)."""
        token = _bearer(request)
        target = request.url.path + ("?" + request.url.query if request.url.query else "")
        fault = self.recorder.take_fault(self.name, target)
        if fault is not None:
            self.recorder.hit(self.counter, _peek_tid(token))
            if fault.delay_seconds > 0:
                await asyncio.sleep(fault.delay_seconds)
            return Response(fault.body, fault.status, headers=fault.headers, media_type=fault.content_type), ""
        await self.recorder.delay(self.name)
        if token is None:
            self.recorder.hit(self.counter)
            return self.unauthorized("Access token is empty." if self.name == "graph" else "Unauthorized"), ""
        try:
            claims = self.verify_bearer(token, self.audience)
        except ValueError:
            self.recorder.hit(self.counter)
            msg = "Access token validation failure." if self.name == "graph" else "Unauthorized"
            return self.unauthorized(msg), ""
        tenant_id = claims.get("tid")
        if not isinstance(tenant_id, str) or not tenant_id:
            self.recorder.hit(self.counter)
            return self.unauthorized("The token has no tenant (tid) claim."), ""
        self.recorder.hit(self.counter, tenant_id)
        roles = claims.get("roles") or []
        if not isinstance(roles, list) or not self.roles.intersection(roles):
            required = ", ".join(sorted(self.roles, reverse=True))
            if self.name == "defender":
                message = (
                    "The application does not have any of the required application permissions "
                    f"({required}) to access the resource."
                )
                return self.error(403, "Forbidden", message), tenant_id
            message = f"Missing application roles. API required roles: {required}. Application roles: {', '.join(map(str, roles))}."
            return self.error(403, "Forbidden", message), tenant_id
        throttle = self.world.admit(tenant_id, self.name)
        if throttle is not None:
            return self.throttled(throttle), tenant_id
        return None, tenant_id

    def unauthorized(self, message: str) -> Response:
        code = "InvalidAuthenticationToken" if self.name == "graph" else "Unauthorized"
        return self.error(401, code, message, {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'})


def _next_link(request: Request, skip: int, top: int) -> str:
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("$skip", "$top")]
    params += [("$top", str(top)), ("$skip", str(skip))]
    return str(request.url.replace(query=urlencode(params, safe="$'(),:")))


def _unsupported_options(request: Request, allowed: set[str]) -> str | None:
    for key in request.query_params:
        if key.startswith("$") and key not in allowed:
            return f"The query parameter '{key}' is not supported."
    return None


def create_defender_app(
    world: IncidentWorld, recorder: Recorder, verify_bearer: Callable[[str, str], dict[str, Any]]
) -> ASGIApp:
    """The Defender XDR incidents API: ``GET /api/incidents`` and ``GET /api/incidents/{id}``."""
    api = _Api("defender", world, recorder, verify_bearer)
    context = f"{DEFENDER_AUDIENCE}/api/$metadata#Incidents"

    async def list_incidents(request: Request) -> Response:
        refused, tenant_id = await api.guard(request)
        if refused is not None:
            return refused
        try:
            query = api.list_query(request, set())
        except ODataError as exc:
            return api.bad_request(str(exc))
        page, total = api.page(tenant_id, query, lambda i: i.defender())
        body: dict[str, Any] = {"@odata.context": context}
        return api.page_response(request, tenant_id, query, body, page, total, next_link=world.defender_next_link)

    async def get_incident(request: Request) -> Response:
        refused, tenant_id = await api.guard(request)
        if refused is not None:
            return refused
        raw = request.path_params["incident_id"]
        if not raw.isdigit():
            return api.bad_request(f"The incident id '{raw}' is not valid.")
        doc = world.find(tenant_id, int(raw), lambda i: i.defender())
        if doc is None:
            return api.error(404, "NotFound", f"Incident {raw} was not found")
        return _json(200, {"@odata.context": context + "/$entity", **doc})

    return Starlette(
        routes=[
            Route("/api/incidents", list_incidents, methods=["GET"]),
            Route("/api/incidents/{incident_id}", get_incident, methods=["GET"]),
        ]
    )


def create_graph_app(
    world: IncidentWorld, recorder: Recorder, verify_bearer: Callable[[str, str], dict[str, Any]]
) -> ASGIApp:
    """The Graph security incidents API: ``GET /v1.0/security/incidents`` and ``/v1.0/security/incidents/{id}``."""
    api = _Api("graph", world, recorder, verify_bearer)

    def expand_of(request: Request) -> bool:
        raw = request.query_params.get("$expand")
        if raw is None:
            return False
        if raw.strip() != "alerts":
            raise ODataError(f"Could not find a property named '{raw}' on type 'microsoft.graph.security.incident'.")
        return True

    def renderer(tenant_id: str, expand: bool) -> Callable[[Incident], dict[str, Any]]:
        def render(inc: Incident) -> dict[str, Any]:
            return inc.graph(world.graph_tenant_id(tenant_id, inc.incident_id), expand_alerts=expand)

        return render

    def context_of(expand: bool, entity: bool = False) -> str:
        base = f"{GRAPH_AUDIENCE}/v1.0/$metadata#security/incidents"
        return base + ("(alerts())" if expand else "") + ("/$entity" if entity else "")

    async def list_incidents(request: Request) -> Response:
        refused, tenant_id = await api.guard(request)
        if refused is not None:
            return refused
        try:
            query = api.list_query(request, {"$expand", "$count"})
            expand = expand_of(request)
            count = request.query_params.get("$count", "false").lower()
            if count not in ("true", "false"):
                raise ODataError(f"'{count}' is not a valid count option.")
        except ODataError as exc:
            return api.bad_request(str(exc))
        page, total = api.page(tenant_id, query, renderer(tenant_id, expand))
        body: dict[str, Any] = {"@odata.context": context_of(expand)}
        if count == "true":
            body["@odata.count"] = total
        return api.page_response(request, tenant_id, query, body, page, total, next_link=True)

    async def get_incident(request: Request) -> Response:
        refused, tenant_id = await api.guard(request)
        if refused is not None:
            return refused
        raw = request.path_params["incident_id"]
        try:
            problem = _unsupported_options(request, {"$expand"})
            if problem:
                raise ODataError(problem)
            expand = expand_of(request)
        except ODataError as exc:
            return api.bad_request(str(exc))
        doc = world.find(tenant_id, int(raw), renderer(tenant_id, expand)) if raw.isdigit() else None
        if doc is None:
            return api.error(404, "NotFound", f"Incident with id '{raw}' was not found.")
        return _json(200, {"@odata.context": context_of(expand, entity=True), **doc})

    return Starlette(
        routes=[
            Route("/v1.0/security/incidents", list_incidents, methods=["GET"]),
            Route("/v1.0/security/incidents/{incident_id}", get_incident, methods=["GET"]),
        ]
    )
