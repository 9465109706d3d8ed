"""``GET /api/incidents`` and ``GET /api/sync/status``: the prefetched incidents, read from storage only.

Every parameter is checked before anything is read, so bad input is a 4xx problem and never reaches the
incident APIs (these routes make no outbound call at all). The tenant goes through ``access.authorize``
(caller policy, tenant kill switch, audit of refusals) in one call, ``_tenant``. Pages come oldest update
first; ``cursor`` continues where the previous page stopped (it is bound to the tenant it was issued for).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from broker.errors import BadRequest
from broker.http import access
from broker.http.summary import fields, summarised
from broker.incidents.cursors import decode_cursor, encode_cursor
from broker.incidents.ticks import parse_ticks
from broker.tenants import Tenant
from broker.wiring import Container

MAX_LIMIT = 100
DEFAULT_LIMIT = 50
STATUSES = frozenset({"active", "inprogress", "resolved", "redirected", "awaitingaction", "unknownfuturevalue"})
SEVERITIES = frozenset({"informational", "low", "medium", "high", "unknown", "unknownfuturevalue"})
LIST_PARAMS = frozenset({"tenant", "since", "status", "severity", "limit", "cursor"})


def _one(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"{name}: give it at most once")
    return values[0] if values else None


def _query(request: Request) -> dict[str, Any]:
    """The checked parameters of ``GET /api/incidents``."""
    unknown = sorted(set(request.query_params) - LIST_PARAMS)
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0][:40]!r}; known: {', '.join(sorted(LIST_PARAMS))}")
    tenant = _one(request, "tenant")
    if not tenant:
        raise BadRequest("tenant: required (a registered tenant name or GUID)")
    out: dict[str, Any] = {"tenant": tenant, "since": None, "status": None, "severity": None, "cursor": None}
    since = _one(request, "since")
    if since is not None:
        try:
            out["since"] = parse_ticks(since)
        except (ValueError, OverflowError) as exc:
            raise BadRequest("since: an ISO-8601 timestamp, e.g. 2024-05-01T08:00:00Z") from exc
    for name, allowed in (("status", STATUSES), ("severity", SEVERITIES)):
        value = _one(request, name)
        if value is not None:
            if value.lower() not in allowed:
                raise BadRequest(f"{name}: one of {', '.join(sorted(allowed))}")
            out[name] = value.lower()
    raw_limit = _one(request, "limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        if not raw_limit.isascii() or not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise BadRequest(f"limit: an integer from 1 to {MAX_LIMIT}")
        limit = int(raw_limit)
    out["limit"] = limit
    out["cursor"] = _one(request, "cursor")
    if out["cursor"] is not None and out["since"] is not None:
        raise BadRequest("cursor: give either since (first page) or cursor (next pages), not both")
    return out


async def _tenant(c: Container, request: Request, ref: object) -> Tenant:
    """The tenant a caller may read incidents of (authentication, policy, kill switch, audit of refusals)."""
    caller = await access.authenticate(c, request, "incidents")
    return (await access.authorize(c, request, ref, "incidents", caller=caller)).tenant


def incidents_routes(container: Callable[[], Container]) -> APIRouter:
    router = APIRouter()

    async def serve(request: Request, what: str, work: Callable[[Container], Any]) -> Any:
        async with summarised(request, "incidents.request", what=what):
            return await work(container())

    @router.get("/api/incidents")
    async def list_incidents(request: Request) -> Any:
        async def work(c: Container) -> Any:
            q = _query(request)
            tenant = await _tenant(c, request, q["tenant"])
            after = None
            if q["cursor"] is not None:
                try:
                    after = decode_cursor(tenant.tenant_id, q["cursor"])
                except ValueError as exc:
                    raise BadRequest(f"cursor: {exc}") from exc
            items, next_key = await run_in_threadpool(
                c.incidents.store.page,
                tenant.tenant_id,
                since=q["since"],
                after=after,
                status=q["status"],
                severity=q["severity"],
                limit=q["limit"],
            )
            fields(request)["count"] = len(items)
            return {
                "tenant": tenant.name,
                "tenant_id": tenant.tenant_id,
                "api": tenant.api,
                "value": [
                    {
                        "id": i.incident_id,
                        "lastUpdate": i.last_update,
                        "status": i.status,
                        "severity": i.severity,
                        "mergedInto": i.merged_into,
                        "incident": i.document,
                    }
                    for i in items
                ],
                "nextCursor": encode_cursor(tenant.tenant_id, next_key) if next_key else None,
            }

        return await serve(request, "incidents", work)

    @router.get("/api/sync/status")
    async def sync_status(request: Request) -> Any:
        async def work(c: Container) -> Any:
            unknown = sorted(set(request.query_params) - {"tenant"})
            if unknown:
                raise BadRequest(f"unknown parameter {unknown[0][:40]!r}; known: tenant")
            ref = _one(request, "tenant")
            if ref is not None:
                tenants = [await _tenant(c, request, ref)]
            else:
                caller = await access.authenticate(c, request, "incidents")
                policy = c.settings.caller_policy
                # Enabled tenants only, from the registry snapshot (not a table scan per call).
                enabled = await run_in_threadpool(c.tenants.enabled)
                tenants = [
                    t
                    for t in enabled
                    if policy.decide(
                        object_id=caller.id,
                        app_id=caller.app_id,
                        roles=caller.roles,
                        action="incidents",
                        tenant_name=t.name,
                        tenant_id=t.tenant_id,
                        app_only=caller.app_only,
                    ).allowed
                ]
            return {"tenants": await run_in_threadpool(c.incidents.status, tenants)}

        return await serve(request, "sync_status", work)

    return router
