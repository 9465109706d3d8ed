"""Control routes for the incidents stand-ins, and a client that drives them from another process.

Mounted on the sandbox's plain-http control app; every body is JSON. ``{tenant}`` is the tenant GUID.

=======  ================================================================  ===============================
method   path (under ``/_sandbox/security``)                               body → reply
=======  ================================================================  ===============================
POST     ``/tenants/{tenant}/seed``                                        ``{count, seed?, alerts_per_incident?, start?}`` → ``{"incidents": [...]}``
POST     ``/tenants/{tenant}/incidents``                                   Defender fields → the incident
PATCH    ``/tenants/{tenant}/incidents/{id}``                              changed fields → the incident
POST     ``/tenants/{tenant}/merge``                                       ``{source_id, target_id}`` → the target
GET      ``/tenants/{tenant}/truth``                                       → ``{"incidents": [...]}`` (Defender view)
POST     ``/tenants/{tenant}/tenant-id-override``                          ``{other, incident_ids?}``
POST     ``/tenants/{tenant}/on-page``                                     ``{after_page, action, api?, ...}``
GET      ``/tenants/{tenant}/stats?api=defender|graph``                    → calls, throttled, pages, maxima, call_times
POST     ``/tenants/{tenant}/reset-calls``                                 forget this tenant's call log
POST     ``/rate-limits``                                                  ``{api, limits: [[n, seconds], ...] | null, tenant?}``
POST     ``/defender-next-link``                                           ``{enabled}``
POST     ``/reset``                                                        forget everything
=======  ================================================================  ===============================

A refused body (unknown field, bad enum, unknown incident) answers 400 or 404 with ``{"error": "..."}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.security.world import IncidentWorld

PREFIX = "/_sandbox/security"

Handler = Callable[[Request], Awaitable[Response]]


def _guarded(handler: Callable[[Request], Awaitable[Any]]) -> Handler:
    """Run a handler; map the world's KeyError/ValueError to 404/400 and a returned value to JSON."""

    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(request)
        except KeyError as exc:
            return JSONResponse({"error": str(exc.args[0] if exc.args else exc)}, 404)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse({"ok": True} if result is None else result)

    return endpoint


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data


def security_control_routes(world: IncidentWorld) -> list[Route]:
    """The routes above, bound to ``world``."""

    async def seed(request: Request) -> Any:
        body = await _body(request)
        made = world.seed_tenant(
            request.path_params["tenant"],
            int(body["count"]) if "count" in body else _missing("count"),
            seed=body.get("seed", 0),
            alerts_per_incident=body.get("alerts_per_incident"),
            start=body.get("start"),
        )
        return {"incidents": made} if body.get("return_incidents", True) else {"count": len(made)}

    async def add(request: Request) -> Any:
        return world.add_incident(request.path_params["tenant"], **await _body(request))

    async def update(request: Request) -> Any:
        incident_id = _int(request.path_params["incident_id"])
        return world.update_incident(request.path_params["tenant"], incident_id, **await _body(request))

    async def merge(request: Request) -> Any:
        body = await _body(request)
        return world.merge(request.path_params["tenant"], _int(body.get("source_id")), _int(body.get("target_id")))

    async def truth(request: Request) -> Any:
        return {"incidents": world.truth(request.path_params["tenant"])}

    async def override(request: Request) -> Any:
        body = await _body(request)
        world.set_tenant_id_override(request.path_params["tenant"], body.get("other"), body.get("incident_ids"))

    async def on_page(request: Request) -> Any:
        body = await _body(request)
        after = _int(body.pop("after_page", None))
        action = str(body.pop("action", ""))
        api = body.pop("api", None)
        world.queue_mutation(request.path_params["tenant"], after, action, api=api, **body)

    async def stats(request: Request) -> Any:
        api = request.query_params.get("api", "defender")
        if api not in ("defender", "graph"):
            raise ValueError("api must be defender or graph")
        return world.call_stats(request.path_params["tenant"], api)

    async def reset_calls(request: Request) -> Any:
        world.reset_calls(request.path_params["tenant"])

    async def rate_limits(request: Request) -> Any:
        body = await _body(request)
        limits = body.get("limits")
        world.set_rate_limits(
            str(body.get("api", "")),
            None if limits is None else [(int(n), float(w)) for n, w in limits],
            tenant_id=body.get("tenant"),
        )

    async def next_link(request: Request) -> Any:
        body = await _body(request)
        world.defender_next_link = bool(body.get("enabled", True))

    async def reset(request: Request) -> Any:
        world.reset()

    t = PREFIX + "/tenants/{tenant}"
    return [
        Route(t + "/seed", _guarded(seed), methods=["POST"]),
        Route(t + "/incidents", _guarded(add), methods=["POST"]),
        Route(t + "/incidents/{incident_id}", _guarded(update), methods=["PATCH"]),
        Route(t + "/merge", _guarded(merge), methods=["POST"]),
        Route(t + "/truth", _guarded(truth), methods=["GET"]),
        Route(t + "/tenant-id-override", _guarded(override), methods=["POST"]),
        Route(t + "/on-page", _guarded(on_page), methods=["POST"]),
        Route(t + "/stats", _guarded(stats), methods=["GET"]),
        Route(t + "/reset-calls", _guarded(reset_calls), methods=["POST"]),
        Route(PREFIX + "/rate-limits", _guarded(rate_limits), methods=["POST"]),
        Route(PREFIX + "/defender-next-link", _guarded(next_link), methods=["POST"]),
        Route(PREFIX + "/reset", _guarded(reset), methods=["POST"]),
    ]


def _missing(name: str) -> Any:
    raise ValueError(f"{name} is required")


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"not an integer: {value!r}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class SecurityControlError(RuntimeError):
    """The control app refused a request."""


class SecurityControlClient:
    """Drives an :class:`IncidentWorld` through :func:`security_control_routes` over HTTP.

    ``SecurityControlClient("http://127.0.0.1:8999")`` — the control app's base URL. Methods mirror the
    world's; datetimes travel as ISO-8601 strings.
    """

    def __init__(self, control_base_url: str, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None):
        self._http = httpx.Client(
            base_url=control_base_url.rstrip("/") + PREFIX, trust_env=False, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SecurityControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        response = self._http.request(method, path, json=None if body is None else _jsonable(body), params=params)
        if response.status_code >= 400:
            raise SecurityControlError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    def seed_tenant(
        self,
        tenant_id: str,
        count: int,
        *,
        seed: int | str = 0,
        alerts_per_incident: int | None = None,
        start: datetime | str | None = None,
    ) -> list[dict[str, Any]]:
        body = {"count": count, "seed": seed, "alerts_per_incident": alerts_per_incident, "start": start}
        return list(self._call("POST", f"/tenants/{tenant_id}/seed", body)["incidents"])

    def add_incident(self, tenant_id: str, **fields: Any) -> dict[str, Any]:
        return dict(self._call("POST", f"/tenants/{tenant_id}/incidents", fields))

    def update_incident(self, tenant_id: str, incident_id: int, **changes: Any) -> dict[str, Any]:
        return dict(self._call("PATCH", f"/tenants/{tenant_id}/incidents/{incident_id}", changes))

    def merge(self, tenant_id: str, source_id: int, target_id: int) -> dict[str, Any]:
        body = {"source_id": source_id, "target_id": target_id}
        return dict(self._call("POST", f"/tenants/{tenant_id}/merge", body))

    def truth(self, tenant_id: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/tenants/{tenant_id}/truth")["incidents"])

    def set_tenant_id_override(
        self, tenant_id: str, other: str | None, incident_ids: Iterable[int] | None = None
    ) -> None:
        body = {"other": other, "incident_ids": None if incident_ids is None else list(incident_ids)}
        self._call("POST", f"/tenants/{tenant_id}/tenant-id-override", body)

    def queue_mutation(
        self, tenant_id: str, after_page: int, action: str, *, api: str | None = None, **args: Any
    ) -> None:
        body = {"after_page": after_page, "action": action, "api": api, **args}
        self._call("POST", f"/tenants/{tenant_id}/on-page", body)

    def call_stats(self, tenant_id: str, api: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/tenants/{tenant_id}/stats", params={"api": api}))

    def call_times(self, tenant_id: str, api: str) -> list[float]:
        return list(self.call_stats(tenant_id, api)["call_times"])

    def throttled_count(self, tenant_id: str, api: str) -> int:
        return int(self.call_stats(tenant_id, api)["throttled"])

    def reset_calls(self, tenant_id: str) -> None:
        self._call("POST", f"/tenants/{tenant_id}/reset-calls")

    def set_rate_limits(
        self, api: str, limits: Iterable[tuple[int, float]] | None, *, tenant_id: str | None = None
    ) -> None:
        body = {"api": api, "limits": None if limits is None else [list(x) for x in limits], "tenant": tenant_id}
        self._call("POST", "/rate-limits", body)

    def set_defender_next_link(self, enabled: bool) -> None:
        self._call("POST", "/defender-next-link", {"enabled": enabled})

    def reset(self) -> None:
        self._call("POST", "/reset")
