"""``GET /api/incidents`` and ``GET /api/sync/status``: the prefetched incidents, read from storage only.

Every parameter is checked before anything is read, so bad input is a 4xx problem and never reaches the
incident APIs (these routes make no outbound call at all). The tenant goes through ``access.authorize``
(caller policy, tenant kill switch, audit of refusals) in one call, ``_tenant``. Pages come oldest update
first; ``cursor`` continues where the previous page stopped (it is bound to the tenant it was issued for).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from broker.callers import Caller
from broker.errors import BadRequest
from broker.http import access
from broker.http.contract import GATE, GUID_PATTERN, TENANT, TENANT_REF, Param, contract
from broker.http.summary import fields, summarised
from broker.incidents.cursors import decode_cursor, encode_cursor
from broker.incidents.ticks import parse_ticks
from broker.policy import ROLE_INCIDENTS
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


async def _tenant(c: Container, request: Request, caller: Caller, ref: object) -> Tenant:
    """The tenant ``caller`` may read incidents of (policy, kill switch, audit of refusals)."""
    return (await access.authorize(c, request, ref, "incidents", caller=caller)).tenant


class IncidentRow(BaseModel):
    """One stored incident: the index fields and the incident as the tenant's API returned it."""

    id: str = Field(description="The incident id in the tenant's API.")
    lastUpdate: str = Field(description="When it was last updated (ISO 8601, UTC).")  # noqa: N815 (the wire name)
    status: str
    severity: str
    mergedInto: str | None = Field(description="The incident it was merged into, if any.")  # noqa: N815
    incident: dict[str, Any] = Field(description="The incident document (Defender XDR or Graph shape, per `api`).")


class IncidentPage(BaseModel):
    """A page of the tenant's incidents, oldest update first."""

    tenant: str = Field(description="The tenant's registered name.")
    tenant_id: str = Field(pattern=GUID_PATTERN)
    api: Literal["defender", "graph"] = Field(description="Which API the incidents were read from.")
    value: list[IncidentRow]
    nextCursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")  # noqa: N815


class SyncStatusList(BaseModel):
    """The sync status of each tenant the caller may read."""

    tenants: list[dict[str, Any]] = Field(
        description=(
            "Per tenant: tenant, tenant_id, api, enabled, last_success, last_outcome, watermark, "
            "in_progress_window, counts, api_calls, last_error, last_error_at, consecutive_failures, poisoned."
        )
    )


_TIMESTAMP = r"^\s*\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2})?(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})?\s*$"

LIST_INCIDENTS = contract(
    operation_id="list_incidents",
    summary="The tenant's prefetched incidents, from storage, oldest update first",
    description=(
        "Reads only what the sync stored: no call to Defender XDR or Graph. Give `since` for the first page and "
        "`cursor` (the previous page's `nextCursor`) for the next ones, never both; a cursor works only for the "
        "tenant it was issued for. Each parameter at most once; unknown parameters are refused."
    ),
    role=ROLE_INCIDENTS,
    ok=IncidentPage,
    query=(
        Param("tenant", TENANT_REF, "The customer tenant: its registered name or GUID.", required=True),
        Param(
            "since",
            {"type": "string", "pattern": _TIMESTAMP},
            "Only incidents updated at or after this ISO 8601 time (UTC unless an offset is given).",
            example="2024-05-01T08:00:00Z",
        ),
        Param("status", {"type": "string", "enum": sorted(STATUSES)}, "Only this status (case-insensitive)."),
        Param("severity", {"type": "string", "enum": sorted(SEVERITIES)}, "Only this severity (case-insensitive)."),
        Param(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
            "Incidents per page.",
        ),
        Param(
            "cursor",
            {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,400}$"},
            "The previous page's `nextCursor`.",
        ),
    ),
    errors=(*GATE, *TENANT, BadRequest),
)

SYNC_STATUS = contract(
    operation_id="sync_status",
    summary="Incident sync status per tenant",
    description="Without `tenant`: every tenant the caller may read incidents of.",
    role=ROLE_INCIDENTS,
    ok=SyncStatusList,
    query=(Param("tenant", TENANT_REF, "Only this tenant: its registered name or GUID."),),
    errors=(*GATE, *TENANT, BadRequest),
)


def incidents_routes(container: Callable[[], Container]) -> APIRouter:
    router = APIRouter()

    async def serve(request: Request, what: str, work: Callable[[Container], Any]) -> Any:
        async with summarised(request, "incidents.request", what=what):
            return await work(container())

    @router.get("/api/incidents", **LIST_INCIDENTS)
    async def list_incidents(request: Request) -> Any:
        async def work(c: Container) -> Any:
            # Who is asking comes first: a caller without a valid token learns nothing, not even a 400.
            caller = await access.authenticate(c, request, "incidents")
            q = _query(request)
            tenant = await _tenant(c, request, caller, q["tenant"])
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

    @router.get("/api/sync/status", **SYNC_STATUS)
    async def sync_status(request: Request) -> Any:
        async def work(c: Container) -> Any:
            caller = await access.authenticate(c, request, "incidents")
            unknown = sorted(set(request.query_params) - {"tenant"})
            if unknown:
                raise BadRequest(f"unknown parameter {unknown[0][:40]!r}; known: tenant")
            ref = _one(request, "tenant")
            if ref is not None:
                tenants = [await _tenant(c, request, caller, ref)]
            else:
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
