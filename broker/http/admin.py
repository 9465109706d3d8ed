"""Admin routes: the audit query, the kill switches, adding or changing a tenant
(``PUT /api/admin/tenants/{name}`` with ``{"tenant_id", "api", "region" | "defender_url"}``), onboarding
(``POST /api/admin/tenants``: a pending tenant and its consent link; new links; the doctor) and tenant
health. Every route needs an admin caller (the ``Broker.Admin`` app role and ``"admin": true`` in
``CALLER_POLICY``), and every change is audited."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.concurrency import run_in_threadpool

from broker.audit import parse_moment
from broker.callers import Caller, normalize_principal
from broker.changes import RegistryChanges
from broker.consent import ConsentLink
from broker.doctor import Report
from broker.errors import BadRequest, BrokerError, UnknownTenant
from broker.health import TenantHealth
from broker.http import access
from broker.http.bodies import json_body
from broker.http.summary import request_id, summarised
from broker.tenants import Tenant, is_tenant_guid, normalize_reference
from broker.wiring import Container

MAX_AUDIT_LIMIT = 1000
MAX_AUDIT_DAYS = 93


class TenantBody(BaseModel):
    """The body of ``PUT /api/admin/tenants/{name}``: the tenant's GUID, its incident API, and where its
    Defender XDR API lives (a region code the cloud documents, or a documented URL; neither: the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    api: Literal["defender", "graph"] = "defender"
    region: Annotated[StrictStr, Field(min_length=1, max_length=16)] | None = None
    defender_url: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None


class NewTenant(TenantBody):
    """The body of ``POST /api/admin/tenants``: a tenant to register, pending until it consents."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=63)]


def _changes(c: Container) -> RegistryChanges:
    return RegistryChanges(c.audit, c.tenants, c.callers)


def admin_routes(container: Callable[[], Container]) -> APIRouter:
    router = APIRouter()

    def summary(request: Request, what: str) -> AbstractAsyncContextManager[dict[str, Any]]:
        return summarised(request, "admin.request", outcome="allowed", caller="-", what=what)

    async def run(request: Request, what: str, work: Callable[[Container, Any], Any], *, change: bool = False) -> Any:
        """Authorize an admin, do ``work`` in a thread (its ``ValueError`` is bad input), record it.

        A ``change`` records itself before it takes effect (``RegistryChanges``); a read is recorded after.
        """
        c: Container | None = None
        try:
            c = container()
            caller = await access.require_admin(c, request)
            try:
                result = await run_in_threadpool(work, c, caller)
            except ValueError as exc:
                raise BadRequest(str(exc)) from exc
            if change:
                request.state.audited = True
            else:
                await access.audit(
                    c, request, action="admin", outcome="allowed", code="ok", reason=what, caller=caller, wait=True
                )
            return result
        except BrokerError as exc:
            if c is not None:
                await access.refused(c, request, exc, action="admin")
            raise

    @router.get("/api/audit")
    async def query_audit(request: Request) -> dict[str, Any]:
        async with summary(request, "audit_query"):
            params = request.query_params
            now = datetime.now(UTC)
            end = parse_moment(params.get("to"), default=now, end_of_day=True)
            start = parse_moment(params.get("from"), default=end - timedelta(days=1))
            if start > end or end - start > timedelta(days=MAX_AUDIT_DAYS):
                raise BadRequest(f"'from' must be before 'to', at most {MAX_AUDIT_DAYS} days apart")
            try:
                limit = int(params.get("limit", "100"))
            except ValueError as exc:
                raise BadRequest("limit must be an integer") from exc
            if not 1 <= limit <= MAX_AUDIT_LIMIT:
                raise BadRequest(f"limit must be between 1 and {MAX_AUDIT_LIMIT}")
            tenant_ref = params.get("tenant")
            caller_ref = params.get("caller")

            def work(c: Container, _caller: Any) -> dict[str, Any]:
                tenant = None
                if tenant_ref:
                    ref = normalize_reference(tenant_ref)
                    try:
                        tenant = c.tenants.resolve(ref).tenant_id
                    except UnknownTenant:
                        if not is_tenant_guid(ref):
                            raise  # records are found by GUID: a name means nothing once its tenant is gone
                        tenant = ref  # a removed tenant's GUID still has records
                caller = normalize_principal(caller_ref) if caller_ref else None
                records, cursor = c.audit.query(
                    start, end, tenant=tenant, caller=caller, limit=limit, cursor=params.get("cursor")
                )
                return {"records": records, "next_cursor": cursor}

            result: dict[str, Any] = await run(request, "audit_query", work)
            return result

    async def switch(request: Request, kind: str, target: Callable[[], str], enabled: bool) -> dict[str, Any]:
        """Turn a caller's or a tenant's kill switch: the change is recorded before it takes effect."""
        verb = "enable" if enabled else "disable"
        async with summary(request, f"{kind}_{verb}") as fields:
            ref = target()
            fields["what"] = what = f"{kind}_{verb}:{ref}"

            def work(c: Container, caller: Caller) -> dict[str, Any]:
                changes, rid = _changes(c), request_id(request)
                if kind == "caller":
                    switch = changes.set_caller_enabled(ref, enabled, by=caller, request_id=rid)
                    return {"caller": switch.principal, "enabled": switch.enabled, "updated_at": switch.updated_at}
                tenant = changes.set_tenant_enabled(ref, enabled, by=caller, request_id=rid)
                return {"tenant": tenant.name, "tenant_id": tenant.tenant_id, "enabled": tenant.enabled}

            result: dict[str, Any] = await run(request, what, work, change=True)
            return result

    def principal_of(raw: str) -> Callable[[], str]:
        def check() -> str:
            try:
                return normalize_principal(raw)
            except ValueError as exc:
                raise BadRequest(str(exc)) from exc

        return check

    @router.put("/api/admin/tenants/{name}")
    async def put_tenant(request: Request, name: str) -> dict[str, Any]:
        async with summary(request, "tenant_configure") as fields:
            ref = normalize_reference(name)
            if is_tenant_guid(ref):
                raise BadRequest("a tenant is registered under a name; its GUID goes in the body")
            body = await json_body(request, TenantBody)

            def work(c: Container, caller: Caller) -> dict[str, Any]:
                tenant, created = _changes(c).configure_tenant(
                    ref,
                    body.tenant_id,
                    api=body.api,
                    region=body.region,
                    defender_url=body.defender_url,
                    by=caller,
                    request_id=request_id(request),
                )
                return {
                    "tenant": tenant.name,
                    "tenant_id": tenant.tenant_id,
                    "api": tenant.api,
                    "defender_url": tenant.defender_url or c.settings.defender_api_url or None,
                    "enabled": tenant.enabled,
                    "created": created,
                }

            fields["what"] = what = f"tenant_configure:{ref}"
            result: dict[str, Any] = await run(request, what, work, change=True)
            return result

    @router.post("/api/admin/callers/{principal}/disable")
    async def disable_caller(request: Request, principal: str) -> dict[str, Any]:
        return await switch(request, "caller", principal_of(principal), False)

    @router.post("/api/admin/callers/{principal}/enable")
    async def enable_caller(request: Request, principal: str) -> dict[str, Any]:
        return await switch(request, "caller", principal_of(principal), True)

    @router.post("/api/admin/tenants/{name}/disable")
    async def disable_tenant(request: Request, name: str) -> dict[str, Any]:
        return await switch(request, "tenant", lambda: normalize_reference(name), False)

    @router.post("/api/admin/tenants/{name}/enable")
    async def enable_tenant(request: Request, name: str) -> dict[str, Any]:
        return await switch(request, "tenant", lambda: normalize_reference(name), True)

    def pending(tenant: Tenant, link: ConsentLink) -> dict[str, Any]:
        return {
            "tenant": tenant.name,
            "tenant_id": tenant.tenant_id,
            "api": tenant.api,
            "onboarding": tenant.onboarding,
            "consent_url": link.url,
            "redirect_uri": link.redirect_uri,
            "expires_at": datetime.fromtimestamp(link.expires_at, UTC).isoformat(timespec="seconds"),
        }

    @router.post("/api/admin/tenants", status_code=201)
    async def create_tenant(request: Request) -> dict[str, Any]:
        """Register a pending tenant (audited before it is made) and return its admin-consent link."""
        async with summary(request, "tenant_add") as fields:
            body = await json_body(request, NewTenant)

            def work(c: Container, caller: Caller) -> dict[str, Any]:
                tenant, link = c.onboarding.start(
                    body.name,
                    body.tenant_id,
                    api=body.api,
                    defender_url=body.defender_url,
                    region=body.region,
                    by=caller,
                    request_id=request_id(request),
                )
                return pending(tenant, link)

            fields["what"] = what = f"tenant_add:{body.name}"
            result: dict[str, Any] = await run(request, what, work, change=True)
            return result

    @router.post("/api/admin/tenants/{name}/consent-link")
    async def consent_link(request: Request, name: str) -> dict[str, Any]:
        """A new admin-consent link for a registered tenant (the old ones stay valid until used or expired)."""
        async with summary(request, "tenant_consent_link") as fields:
            ref = normalize_reference(name)
            fields["what"] = what = f"tenant_consent_link:{ref}"
            result: dict[str, Any] = await run(request, what, lambda c, _caller: pending(*c.onboarding.link(ref)))
            return result

    @router.post("/api/admin/tenants/{name}/doctor")
    async def doctor(request: Request, name: str) -> dict[str, Any]:
        """The doctor for one tenant: each step pass, fail or skip, with the fix in words."""
        async with summary(request, "tenant_doctor") as fields:
            ref = normalize_reference(name)
            fields["what"] = what = f"tenant_doctor:{ref}"
            report: Report = await run(request, what, lambda c, _caller: c.doctor.run(ref))
            fields["doctor"] = "pass" if report.ok else "fail"
            return report.to_json()

    @router.get("/api/admin/tenants")
    async def list_tenants(request: Request) -> dict[str, Any]:
        """Every registered tenant with its onboarding state and health record."""
        async with summary(request, "tenant_list"):

            def work(c: Container, _caller: Caller) -> dict[str, Any]:
                health = c.health.view()
                return {
                    "tenants": [
                        {
                            "tenant": t.name,
                            "tenant_id": t.tenant_id,
                            "enabled": t.enabled,
                            "api": t.api,
                            "onboarding": t.onboarding,
                            "onboarded_at": t.onboarded_at or None,
                            "health": (health.get(t.tenant_id) or TenantHealth(t.tenant_id)).to_json(),
                        }
                        for t in c.tenants.all()
                    ]
                }

            result: dict[str, Any] = await run(request, "tenant_list", work)
            return result

    return router
