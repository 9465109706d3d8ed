"""The callers' contract: what each route promises, declared beside the route, and the OpenAPI document
(``GET /api/openapi.json``) made from those declarations.

A route states its contract in its decorator, once::

    @router.get(
        "/api/incidents",
        **contract(
            operation_id="list_incidents",
            summary="The tenant's prefetched incidents, oldest update first",
            role=ROLE_INCIDENTS,                    # the app role its caller needs; None: anyone may call
            ok=IncidentPage,                        # the 200 body (a pydantic model)
            query=(Param("tenant", TENANT_REF, required=True, description="..."), ...),
            errors=(*GATE, *TENANT, BadRequest),    # every error it can send, by class
        ),
    )

``errors`` is what the route can answer besides 200; each class brings its status and ``code``, so the
document lists, per status, a problem+json schema whose ``code`` is one of exactly those codes, with an
example of each. ``GATE`` (authentication, kill switches, rate limit) and ``TENANT`` (a tenant reference)
are the groups most routes share. A JSON ``body`` model is documented as the request body (routes read it
with ``broker.http.bodies.json_body``, so the 415 / 400 / 413 answers hold). Query parameters are read by
the route itself; ``Param`` documents them with the same constraints the route enforces. Path parameters
are declared in the route's signature (``Annotated[str, Path(pattern=...)]``) and documented by FastAPI.

``ok_status`` is the success status when it is not 200; ``html=True`` says the route answers a browser with
a page (success and errors alike) and a client that asks for JSON with JSON.

``finish_document`` completes what FastAPI produces: the bearer security scheme, the shared ``Problem``
schema, and no ``422`` (the app answers bad input with a 400 problem, never FastAPI's 422). It refuses to
build a document in which a route declared no contract, so an undeclared route fails the suite loudly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel

from broker.errors import (
    PROBLEM_CONTENT_TYPE,
    BrokerError,
    CallerDisabled,
    Forbidden,
    HostNotAllowed,
    InvalidTenant,
    KillSwitchesStale,
    NotConfigured,
    OriginNotAllowed,
    RateLimited,
    TenantDisabled,
    Unauthenticated,
    UnknownTenant,
    UnsupportedMediaType,
    UpstreamUnavailable,
)
from broker.tenants import RESERVED_NAMES

CONTRACT_KEY = "x-contract"
SECURITY_SCHEME = "entraBearer"
PROBLEM_REF = "#/components/schemas/Problem"

# Every authenticated route passes the gate: a valid caller token, the caller kill switch (storage-backed:
# unreadable storage is a 503), the rate limit, and the app role.
GATE: tuple[type[BrokerError], ...] = (
    Unauthenticated,
    Forbidden,
    CallerDisabled,
    RateLimited,
    UpstreamUnavailable,
    KillSwitchesStale,
    NotConfigured,
)
# A route that names a tenant: its shape, the caller's grant, the tenant kill switch (a caller the policy
# lets see every tenant is told 404 for an unregistered one; anyone else gets the same 403 as for a tenant
# not granted, so the registry cannot be mapped).
TENANT: tuple[type[BrokerError], ...] = (InvalidTenant, Forbidden, TenantDisabled, UnknownTenant, UpstreamUnavailable)

GUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


def _any_case(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


# A registered tenant name or a tenant GUID, as ``broker.tenants.normalize_reference`` accepts it (in any
# case): a GUID, or 1-63 letters, digits and inner hyphens that are neither a reserved word nor 32 hex
# digits however hyphenated (names and GUIDs stay apart). Written out in both cases, since JSON Schema
# patterns have no case-insensitive flag.
_NAME = (
    f"(?!(?:{'|'.join(_any_case(w) for w in sorted(RESERVED_NAMES))})$)"
    "(?!-*(?:[0-9a-fA-F]-*){32}$)"
    "[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
)
TENANT_REF: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 63,
    "pattern": f"^(?:{GUID_PATTERN[1:-1]}|{_NAME})$",
    "examples": ["contoso", "7bba76b9-53c1-55af-9962-622c29d6e128"],
}
# A tenant's name alone (where a GUID is not accepted: registering a tenant under its name).
TENANT_NAME: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 63,
    "pattern": f"^{_NAME}$",
    "examples": ["contoso"],
}

_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "The bearer challenge (RFC 6750).",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    429: {
        "Retry-After": {"description": "Seconds to wait before asking again.", "schema": {"type": "integer"}},
    },
    503: {
        "Retry-After": {"description": "Seconds to wait before asking again.", "schema": {"type": "integer"}},
    },
}
_REQUEST_ID_HEADER = {
    "X-Request-Id": {
        "description": "The request's id (the caller's own X-Request-Id when it is a sane token); quote it.",
        "schema": {"type": "string", "maxLength": 64},
    }
}


@dataclass(frozen=True)
class Param:
    """A query (or path) parameter: its JSON schema, with the constraints the route enforces, and what it
    means. A path parameter's entry replaces the bare one FastAPI derives from the route's signature."""

    name: str
    schema: Mapping[str, Any]
    description: str
    required: bool = False
    example: Any = None
    location: Literal["query", "path"] = "query"

    def openapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "in": self.location,
            "required": self.required,
            "description": self.description,
            "schema": dict(self.schema),
        }
        if self.example is not None:
            out["example"] = self.example
        return out


def contract(
    *,
    operation_id: str,
    summary: str,
    role: str | None,
    ok: type[BaseModel],
    errors: Iterable[type[BrokerError]],
    description: str = "",
    body: type[BaseModel] | None = None,
    body_example: Mapping[str, Any] | None = None,
    query: Sequence[Param] = (),
    ok_headers: Mapping[str, Any] | None = None,
    ok_status: int = 200,
    html: bool = False,
) -> dict[str, Any]:
    """The keyword arguments for a route decorator that document the route completely."""
    errors = tuple(dict.fromkeys(errors))
    text = description.strip()
    if role is not None:
        text = f"{text}\n\nCaller: an Entra ID app-only token for the broker carrying the app role `{role}`.".strip()
    responses: dict[int | str, Any] = {
        ok_status: {
            "model": ok,
            "description": (ok.__doc__ or "OK").strip().splitlines()[0],
            "headers": {**_REQUEST_ID_HEADER, **(ok_headers or {})},
        }
    }
    if html:  # a browser's page, and JSON for a client that asks for it (``Accept``)
        responses[ok_status]["content"] = {"text/html": {"schema": {"type": "string"}}}
    for status, classes in sorted(_by_status(errors).items()):
        responses[status] = _problem_response(status, classes)
        if html:
            responses[status]["content"]["text/html"] = {"schema": {"type": "string"}}
    extra: dict[str, Any] = {CONTRACT_KEY: {"role": role, "codes": sorted({e.code for e in errors})}}
    extra["security"] = [{SECURITY_SCHEME: []}] if role is not None else []
    if role is not None:
        extra["x-app-role"] = role
    if query:
        extra["parameters"] = [p.openapi() for p in query]
    if body is not None:
        media: dict[str, Any] = {"schema": body.model_json_schema(ref_template="#/components/schemas/{model}")}
        if body_example is not None:
            media["example"] = dict(body_example)
        extra["requestBody"] = {"required": True, "content": {"application/json": media}}
    return {
        "operation_id": operation_id,
        "summary": summary,
        "description": text,
        "responses": responses,
        "openapi_extra": extra,
    }


def _by_status(errors: Iterable[type[BrokerError]]) -> dict[int, list[type[BrokerError]]]:
    out: dict[int, list[type[BrokerError]]] = {}
    for error in errors:
        out.setdefault(error.status, []).append(error)
    return out


def _problem_response(status: int, classes: Sequence[type[BrokerError]]) -> dict[str, Any]:
    codes = sorted({c.code for c in classes})
    examples = {
        c.code: {"summary": c.title, "value": c(retry_after=_retry_example(c)).problem("3f2a9c0e8b7d4e51")}
        for c in sorted(classes, key=lambda c: c.code)
    }
    return {
        "description": "; ".join(f"`{c.code}`: {c.title}" for c in sorted(classes, key=lambda c: c.code)),
        "headers": {**_REQUEST_ID_HEADER, **_HEADERS.get(status, {})},
        "content": {
            PROBLEM_CONTENT_TYPE: {
                "schema": {
                    "allOf": [
                        {"$ref": PROBLEM_REF},
                        {
                            "type": "object",
                            "properties": {"status": {"type": "integer", "enum": [status]}, "code": {"enum": codes}},
                        },
                    ]
                },
                "examples": examples,
            }
        },
    }


def _retry_example(error: type[BrokerError]) -> int | None:
    return 30 if error.status in (429, 503) and error is not NotConfigured else None


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem document. `code` is stable: branch on it (and on the HTTP status).",
    "type": "object",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string", "description": "`urn:partner-token-broker:problem:<code>`"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "code": {"type": "string", "description": "The stable problem code (see the runbook)."},
        "detail": {"type": "string", "description": "Safe to show: never upstream text, secrets or tokens."},
        "request_id": {"type": "string"},
        "retry_after": {"type": "integer", "minimum": 0, "description": "Seconds; also in Retry-After."},
        "consent_url": {"type": "string", "description": "The admin-consent link (`consent_required`)."},
        "missing_role": {"type": "string", "description": "The permission not granted (`role_missing`)."},
    },
    "additionalProperties": True,
}


class UndocumentedRoute(RuntimeError):
    """A route without a contract: the document would promise nothing about it."""


def finish_document(app: FastAPI, allowed_scopes: Sequence[str] = ()) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's, from the routes' contracts, with the security scheme and the
    ``Problem`` schema, and without FastAPI's ``422``. Refuses a route that declared no contract.

    ``allowed_scopes`` (this deployment's ``ALLOWED_SCOPES``, when the broker is configured) become the
    ``scope`` enum of every request body that has one."""
    undocumented = [
        f"{sorted(getattr(route, 'methods', None) or ())} {route.path}"
        for route in iter_route_contexts(app.routes)
        if isinstance(route.original_route, APIRoute)
        and getattr(route, "include_in_schema", False)
        and CONTRACT_KEY not in (getattr(route, "openapi_extra", None) or {})
    ]
    if undocumented:
        raise UndocumentedRoute(
            "routes without a contract (declare one with broker.http.contract.contract(...)): "
            + ", ".join(undocumented)
        )
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        servers=app.servers,
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Problem"] = PROBLEM_SCHEMA
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": (
                "An Entra ID access token for the broker's app ID URI (`api://<broker client id>/.default`), "
                "app-only (a managed identity or an app registration of the home tenant), carrying the app role "
                "each operation names in `x-app-role`."
            ),
        }
    }
    for path in document.get("paths", {}).values():
        for method, operation in path.items():
            operation.get("responses", {}).pop("422", None)
            _guarded(method, operation, schemas)
            if "parameters" in operation:  # a contract's entry replaces FastAPI's bare one for the same name
                merged = {(p["name"], p["in"]): p for p in operation["parameters"]}
                operation["parameters"] = list(merged.values())
            _name_the_body(operation, schemas)
            if allowed_scopes and "requestBody" in operation:
                ref = operation["requestBody"]["content"]["application/json"]["schema"].get("$ref", "/")
                scope = schemas.get(ref.rsplit("/", 1)[1], {}).get("properties", {}).get("scope")
                if scope is not None:
                    scope["enum"] = list(allowed_scopes)
    return document


def _name_the_body(operation: dict[str, Any], schemas: dict[str, Any]) -> None:
    """A request body's schema goes into ``components`` under its model's name (a generated client then has
    a ``TokenRequest`` class, not one named after the operation)."""
    media = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if media is None or "$ref" in media["schema"] or "title" not in media["schema"]:
        return
    schema = dict(media["schema"])
    schemas.update(schema.pop("$defs", {}))
    schemas[schema["title"]] = schema
    media["schema"] = {"$ref": f"#/components/schemas/{schema['title']}"}


# What ``broker.http.guards.CrossSiteGuard`` can answer before any route runs: a state-changing request that
# is not JSON (every mode), and in a development broker a request for another host or from another origin.
_GUARD_EVERYWHERE: tuple[type[BrokerError], ...] = (HostNotAllowed, OriginNotAllowed)
_STATE_CHANGING = {"post", "put", "patch", "delete"}


def _guarded(method: str, operation: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Add the guard's answers to an operation, and, to a state-changing one without a body, the JSON body
    the guard requires (its content is not read)."""
    extra: list[type[BrokerError]] = list(_GUARD_EVERYWHERE)
    if method in _STATE_CHANGING:
        extra.append(UnsupportedMediaType)
        operation.setdefault(
            "requestBody",
            {
                "required": True,
                "description": "Not read: send `{}`. The request must be `Content-Type: application/json`.",
                "content": {"application/json": {"schema": {}, "example": {}}},
            },
        )
    codes = set(operation.get(CONTRACT_KEY, {}).get("codes", ())) | {e.code for e in extra}
    errors = [_BY_CODE[code] for code in sorted(codes)]
    responses = operation["responses"]
    for status, classes in _by_status(errors).items():
        if str(status) in {e.status and str(e.status) for e in extra}:
            html = "text/html" in responses.get(str(status), {}).get("content", {})
            responses[str(status)] = _problem_response(status, classes)
            if html:
                responses[str(status)]["content"]["text/html"] = {"schema": {"type": "string"}}
    operation[CONTRACT_KEY]["codes"] = sorted(codes)


def _error_classes() -> dict[str, type[BrokerError]]:
    found: dict[str, type[BrokerError]] = {}
    stack: list[type[BrokerError]] = [BrokerError]
    while stack:
        cls = stack.pop()
        found.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    return found


_BY_CODE = _error_classes()
