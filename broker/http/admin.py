"""Admin routes: the audit query, the kill switches, adding or changing a tenant
(``PUT /api/admin/tenants/{name}`` with ``{"tenant_id", "api", "region" | "defender_url"}``), onboarding
(``POST /api/admin/tenants``: a pending tenant and its consent link; new links; the doctor) and tenant
health. Every route needs an admin caller (the ``Broker.Admin`` app role and ``"admin": true`` in
``CALLER_POLICY``), and every change is audited."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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
from broker.errors import (
    AuditUnavailable,
    BadRequest,
    BrokerError,
    InvalidJson,
    InvalidTenant,
    PayloadTooLarge,
    UnknownTenant,
    UnsupportedMediaType,
)
from broker.health import TenantHealth
from broker.http import access
from broker.http.bodies import json_body
from broker.http.contract import GATE, GUID_PATTERN, TENANT_NAME, TENANT_REF, Param, contract
from broker.http.summary import request_id, summarised
from broker.policy import ROLE_ADMIN
from broker.tenants import Tenant, is_tenant_guid, normalize_reference
from broker.wiring import Container

MAX_AUDIT_LIMIT = 1000
Plan = tuple[str, Callable[[Container, Any], Any]]  # what is done (for the audit record) and the work
MAX_AUDIT_DAYS = 93


class TenantBody(BaseModel):
    """The body of ``PUT /api/admin/tenants/{name}``: the tenant's GUID, its incident API, and where its
    Defender XDR API lives (a region code the cloud documents, or a documented URL; neither: the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: Annotated[
        StrictStr,
        Field(
            min_length=1, max_length=64, description="The tenant's GUID.", json_schema_extra={"pattern": GUID_PATTERN}
        ),
    ]
    api: Literal["defender", "graph"] = Field("defender", description="Which incident API the sync reads.")
    region: (
        Annotated[
            StrictStr,
            Field(min_length=1, max_length=16, description="A Defender XDR region the deployment's cloud documents."),
        ]
        | None
    ) = None
    defender_url: (
        Annotated[
            StrictStr,
            Field(min_length=1, max_length=256, description="A documented Defender XDR host URL (not with region)."),
        ]
        | None
    ) = None


class NewTenant(TenantBody):
    """The body of ``POST /api/admin/tenants``: a tenant to register, pending until it consents."""

    name: Annotated[
        StrictStr,
        Field(
            min_length=1, max_length=63, description="The tenant's name in the registry.", json_schema_extra=TENANT_NAME
        ),
    ]


class PendingTenant(BaseModel):
    """The tenant as registered, and an admin-consent link for it."""

    tenant: str
    tenant_id: str = Field(pattern=GUID_PATTERN)
    api: Literal["defender", "graph"]
    onboarding: str = Field(description="The onboarding state (pending until consent is confirmed).")
    consent_url: str = Field(description="Send this to the customer's administrator; it works once.")
    redirect_uri: str
    expires_at: str = Field(description="When the link expires (ISO 8601, UTC).")


class DoctorReport(BaseModel):
    """The doctor's steps for one tenant: each pass, fail or skip, with the fix in words."""

    tenant: str
    tenant_id: str = Field(description="The tenant's GUID; empty when no such tenant is registered.")
    ok: bool
    steps: list[dict[str, str]] = Field(description="Each: step, status (pass | fail | skip), detail, code?, fix?.")


class TenantList(BaseModel):
    """Every registered tenant with its onboarding state and health record."""

    tenants: list[dict[str, Any]] = Field(
        description="Each: tenant, tenant_id, enabled, api, onboarding, onboarded_at, health."
    )


class TenantConfigured(BaseModel):
    """The tenant as now registered (every instance sees it within seconds)."""

    tenant: str
    tenant_id: str = Field(pattern=GUID_PATTERN)
    api: Literal["defender", "graph"]
    defender_url: str | None
    enabled: bool
    created: bool = Field(description="Whether the tenant was added (else changed).")


class AuditPage(BaseModel):
    """Audit records, newest first."""

    records: list[dict[str, Any]] = Field(
        description=(
            "Each: time, action, outcome, code, reason, caller, caller_app, tenant, tenant_name, scope, "
            "request_id, expires_on, fingerprint (never the token), and its place in the day's chain."
        )
    )
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class CallerSwitchState(BaseModel):
    """The caller's kill switch, as now stored (every instance sees it within seconds)."""

    caller: str = Field(description="The caller's object id or app id.")
    enabled: bool
    updated_at: str


class TenantSwitchState(BaseModel):
    """The tenant's kill switch, as now stored (every instance sees it within seconds)."""

    tenant: str
    tenant_id: str = Field(pattern=GUID_PATTERN)
    enabled: bool


_PRINCIPAL = Param(
    "principal",
    {"type": "string", "pattern": f"^(?:{GUID_PATTERN[1:-1]}|[lL][oO][cC][aA][lL])$"},
    "The caller's object id or app id (a GUID), or `local`.",
    required=True,
    location="path",
    example="0e8a8c1c-3d1f-4c38-9d53-2b0b8f2b7a11",
)
_TENANT_NAME = Param(
    "name", TENANT_REF, "The tenant: its registered name or GUID.", required=True, location="path", example="contoso"
)
_NEW_TENANT_NAME = Param(
    "name",
    TENANT_NAME,
    "The tenant's name (its GUID goes in the body).",
    required=True,
    location="path",
    example="contoso",
)
_SWITCH_ERRORS = (*GATE, BadRequest, AuditUnavailable)
_ADMIN = 'Caller: an administrator, which also needs `"admin": true` in CALLER_POLICY. The change is audited first.'


def _switch(operation_id: str, summary: str, ok: type[BaseModel], path: Param, *errors: type[BrokerError]) -> Any:
    return contract(
        operation_id=operation_id,
        summary=summary,
        description=_ADMIN,
        role=ROLE_ADMIN,
        ok=ok,
        query=(path,),
        errors=(*_SWITCH_ERRORS, *errors),
    )


QUERY_AUDIT = contract(
    operation_id="query_audit",
    summary="Audit records: who got which token, who was refused, what administrators changed",
    description=(
        f"`from` and `to` bound the records' time (at most {MAX_AUDIT_DAYS} days apart, `from` first; a date "
        'without a time covers the whole day). Caller: an administrator, which also needs `"admin": true` '
        "in CALLER_POLICY."
    ),
    role=ROLE_ADMIN,
    ok=AuditPage,
    query=(
        Param(
            "from",
            {"type": "string", "minLength": 1, "maxLength": 40},
            "ISO 8601 date or date-time (UTC unless an offset is given); default: a day before `to`.",
            example="2025-01-30",
        ),
        Param(
            "to",
            {"type": "string", "minLength": 1, "maxLength": 40},
            "ISO 8601 date or date-time; default: now.",
            example="2025-01-31T12:00:00Z",
        ),
        Param("tenant", TENANT_REF, "Only records for this tenant (a removed tenant by its GUID)."),
        Param("caller", _PRINCIPAL.schema, "Only records of this caller (object id or app id)."),
        Param(
            "limit", {"type": "integer", "minimum": 1, "maximum": MAX_AUDIT_LIMIT, "default": 100}, "Records per page."
        ),
        Param("cursor", {"type": "string", "pattern": "^[A-Za-z0-9_=-]{1,200}$"}, "The previous page's `next_cursor`."),
    ),
    errors=(*GATE, BadRequest, InvalidTenant, UnknownTenant, AuditUnavailable),
)
DISABLE_CALLER = _switch("disable_caller", "Switch a caller off", CallerSwitchState, _PRINCIPAL)
ENABLE_CALLER = _switch("enable_caller", "Switch a caller back on", CallerSwitchState, _PRINCIPAL)
DISABLE_TENANT = _switch(
    "disable_tenant",
    "Switch a tenant off: no token, no incidents",
    TenantSwitchState,
    _TENANT_NAME,
    InvalidTenant,
    UnknownTenant,
)
ENABLE_TENANT = _switch(
    "enable_tenant", "Switch a tenant back on", TenantSwitchState, _TENANT_NAME, InvalidTenant, UnknownTenant
)


CONFIGURE_TENANT = contract(
    operation_id="configure_tenant",
    summary="Add a tenant, or change its incident API and Defender XDR host",
    description=_ADMIN,
    role=ROLE_ADMIN,
    ok=TenantConfigured,
    body=TenantBody,
    body_example={"tenant_id": "7bba76b9-53c1-55af-9962-622c29d6e128", "api": "defender", "region": "eu"},
    query=(_NEW_TENANT_NAME,),
    errors=(*_SWITCH_ERRORS, InvalidTenant, InvalidJson, UnsupportedMediaType, PayloadTooLarge),
)


CREATE_TENANT = contract(
    operation_id="create_tenant",
    summary="Register a pending tenant and get its admin-consent link",
    description=_ADMIN,
    role=ROLE_ADMIN,
    ok=PendingTenant,
    ok_status=201,
    body=NewTenant,
    body_example={"name": "contoso", "tenant_id": "7bba76b9-53c1-55af-9962-622c29d6e128", "api": "defender"},
    errors=(*_SWITCH_ERRORS, InvalidJson, UnsupportedMediaType, PayloadTooLarge),
)
CONSENT_LINK = _switch(
    "new_consent_link",
    "A new admin-consent link for a registered tenant",
    PendingTenant,
    _TENANT_NAME,
    InvalidTenant,
    UnknownTenant,
)
RUN_DOCTOR = _switch(
    "run_doctor",
    "Check a tenant's consent, roles and APIs, step by step",
    DoctorReport,
    _TENANT_NAME,
    InvalidTenant,
    UnknownTenant,
)
LIST_TENANTS = contract(
    operation_id="list_tenants",
    summary="Every registered tenant with its onboarding state and health",
    description=_ADMIN,
    role=ROLE_ADMIN,
    ok=TenantList,
    errors=(*GATE, AuditUnavailable),
)


def _changes(c: Container) -> RegistryChanges:
    return RegistryChanges(c.audit, c.tenants, c.callers)


def admin_routes(container: Callable[[], Container]) -> APIRouter:
    router = APIRouter()

    def summary(request: Request, what: str) -> AbstractAsyncContextManager[dict[str, Any]]:
        return summarised(request, "admin.request", outcome="allowed", caller="-", what=what)

    async def run(request: Request, plan: Callable[[], Awaitable[Plan]], *, change: bool = False) -> Any:
        """Authorize an admin; then ``plan`` reads the request (a refusal of it comes after authentication,
        so a caller without a valid token learns nothing) and names the work, done in a thread (its
        ``ValueError`` is bad input); record it. A ``change`` records itself before it takes effect
        (``RegistryChanges``); a read is recorded after.
        """
        c: Container | None = None
        try:
            c = container()
            caller = await access.require_admin(c, request)
            what, work = await plan()
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

    @router.get("/api/audit", **QUERY_AUDIT)
    async def query_audit(request: Request) -> dict[str, Any]:
        async with summary(request, "audit_query"):

            async def plan() -> Plan:
                params = request.query_params
                empty = sorted(name for name, value in params.multi_items() if not value)
                if empty:
                    raise BadRequest(f"{empty[0][:40]}: empty; give a value or leave the parameter out")
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

                return "audit_query", work

            result: dict[str, Any] = await run(request, plan)
            return result

    async def switch(request: Request, kind: str, target: Callable[[], str], enabled: bool) -> dict[str, Any]:
        """Turn a caller's or a tenant's kill switch: the change is recorded before it takes effect."""
        verb = "enable" if enabled else "disable"
        async with summary(request, f"{kind}_{verb}") as fields:

            async def plan() -> Plan:
                ref = target()
                fields["what"] = what = f"{kind}_{verb}:{ref}"

                def work(c: Container, caller: Caller) -> dict[str, Any]:
                    changes, rid = _changes(c), request_id(request)
                    if kind == "caller":
                        switch = changes.set_caller_enabled(ref, enabled, by=caller, request_id=rid)
                        return {"caller": switch.principal, "enabled": switch.enabled, "updated_at": switch.updated_at}
                    tenant = changes.set_tenant_enabled(ref, enabled, by=caller, request_id=rid)
                    return {"tenant": tenant.name, "tenant_id": tenant.tenant_id, "enabled": tenant.enabled}

                return what, work

            result: dict[str, Any] = await run(request, plan, change=True)
            return result

    def principal_of(raw: str) -> Callable[[], str]:
        def check() -> str:
            try:
                return normalize_principal(raw)
            except ValueError as exc:
                raise BadRequest(str(exc)) from exc

        return check

    @router.put("/api/admin/tenants/{name}", **CONFIGURE_TENANT)
    async def put_tenant(request: Request, name: str) -> dict[str, Any]:
        async with summary(request, "tenant_configure") as fields:

            async def plan() -> Plan:
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
                return what, work

            result: dict[str, Any] = await run(request, plan, change=True)
            return result

    @router.post("/api/admin/callers/{principal}/disable", **DISABLE_CALLER)
    async def disable_caller(request: Request, principal: str) -> dict[str, Any]:
        return await switch(request, "caller", principal_of(principal), False)

    @router.post("/api/admin/callers/{principal}/enable", **ENABLE_CALLER)
    async def enable_caller(request: Request, principal: str) -> dict[str, Any]:
        return await switch(request, "caller", principal_of(principal), True)

    @router.post("/api/admin/tenants/{name}/disable", **DISABLE_TENANT)
    async def disable_tenant(request: Request, name: str) -> dict[str, Any]:
        return await switch(request, "tenant", lambda: normalize_reference(name), False)

    @router.post("/api/admin/tenants/{name}/enable", **ENABLE_TENANT)
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

    @router.post("/api/admin/tenants", status_code=201, **CREATE_TENANT)
    async def create_tenant(request: Request) -> dict[str, Any]:
        """Register a pending tenant (audited before it is made) and return its admin-consent link."""
        async with summary(request, "tenant_add") as fields:

            async def plan() -> Plan:
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
                return what, work

            result: dict[str, Any] = await run(request, plan, change=True)
            return result

    @router.post("/api/admin/tenants/{name}/consent-link", **CONSENT_LINK)
    async def consent_link(request: Request, name: str) -> dict[str, Any]:
        """A new admin-consent link for a registered tenant (the old ones stay valid until used or expired)."""
        async with summary(request, "tenant_consent_link") as fields:

            async def plan() -> Plan:
                ref = normalize_reference(name)
                fields["what"] = what = f"tenant_consent_link:{ref}"
                return what, lambda c, _caller: pending(*c.onboarding.link(ref))

            result: dict[str, Any] = await run(request, plan)
            return result

    @router.post("/api/admin/tenants/{name}/doctor", **RUN_DOCTOR)
    async def doctor(request: Request, name: str) -> dict[str, Any]:
        """The doctor for one tenant: each step pass, fail or skip, with the fix in words."""
        async with summary(request, "tenant_doctor") as fields:

            async def plan() -> Plan:
                ref = normalize_reference(name)
                fields["what"] = what = f"tenant_doctor:{ref}"
                return what, lambda c, _caller: c.doctor.run(ref)

            report: Report = await run(request, plan)
            fields["doctor"] = "pass" if report.ok else "fail"
            return report.to_json()

    @router.get("/api/admin/tenants", **LIST_TENANTS)
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

            async def plan() -> Plan:
                return "tenant_list", work

            result: dict[str, Any] = await run(request, plan)
            return result

    return router
