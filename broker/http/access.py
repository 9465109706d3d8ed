"""The gate every route passes: who is asking (authentication, the caller kill switch, the rate limit),
may they (the policy, the tenant kill switch), and the audit record of the decision.

Routes call ``authenticate`` and then ``authorize`` (tenant-scoped routes) or ``require_admin``; a refusal
is recorded in the audit log (without waiting) and raised as a problem. ``audit`` records a route's own
outcome. The request's summary fields (:mod:`broker.http.summary`) get the caller, the tenant, the reason of a
refusal and the audit record's reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from broker.audit import AuditRecord, Written
from broker.callers import Caller
from broker.errors import (
    BrokerError,
    Forbidden,
    RateLimited,
    TenantDisabled,
    UnknownTenant,
)
from broker.http.summary import fields, request_id
from broker.policy import ACTION_ROLES, Action
from broker.tenants import Tenant, is_tenant_guid, normalize_reference
from broker.tokens import AccessToken
from broker.wiring import Container

_REASON = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


@dataclass(frozen=True)
class Access:
    caller: Caller
    tenant: Tenant


def client_address(request: Request) -> str:
    """The peer's address; behind the Functions host (no peer), the first ``X-Forwarded-For`` entry."""
    if request.client is not None and request.client.host:
        return request.client.host
    forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
    return forwarded[:64] if forwarded and forwarded.isprintable() else "-"


def reason_of(exc: BrokerError) -> str:
    return exc.diagnostic if _REASON.fullmatch(exc.diagnostic) else exc.code


async def authenticate(c: Container, request: Request, action: Action) -> Caller:
    """The caller, if its token is valid, it is not switched off, and it is within its rate."""
    try:
        caller = await c.authenticator.authenticate(request.headers)
        fields(request)["caller"] = caller.label
        request.state.caller = caller
        await c.callers.ensure_fresh()
        c.callers.check(caller)
        retry_after = c.limiter.take(caller.id)
        if retry_after is not None:
            raise RateLimited(retry_after=retry_after, diagnostic="rate_limited")
        if not c.settings.caller_policy.allows_everything and ACTION_ROLES[action] not in caller.roles:
            raise Forbidden(f"the caller's token lacks the app role {ACTION_ROLES[action]}", diagnostic="role_missing")
        return caller
    except BrokerError as exc:
        await refused(c, request, exc, action=action)
        raise


async def authorize(
    c: Container, request: Request, tenant_ref: object, action: Action, *, caller: Caller, scope: str | None = None
) -> Access:
    """Whether ``caller`` may do ``action`` (with ``scope``) for the tenant it named; deny by default."""
    policy = c.settings.caller_policy
    target: Tenant | str = "-"
    try:
        ref = target = normalize_reference(tenant_ref)
        tenant = c.tenants.cached(ref)
        if tenant is None:
            try:
                tenant = await run_in_threadpool(c.tenants.resolve, ref)
            except UnknownTenant as exc:
                if policy.sees_all_tenants(caller.id, caller.app_id, app_only=caller.app_only):
                    raise
                # Saying "no such tenant" would let a caller map the registry: refuse as for any other.
                raise not_granted("unknown_tenant") from exc
        target = tenant
        fields(request)["tenant"] = tenant.tenant_id
        decision = policy.decide(
            object_id=caller.id,
            app_id=caller.app_id,
            roles=caller.roles,
            action=action,
            tenant_name=tenant.name,
            tenant_id=tenant.tenant_id,
            scope=scope,
            app_only=caller.app_only,
        )
        if not decision.allowed:
            raise not_granted(decision.reason)
        if not tenant.enabled:
            raise TenantDisabled(f"tenant {tenant.name} is disabled", diagnostic="tenant_disabled")
        return Access(caller, tenant)
    except BrokerError as exc:
        await refused(c, request, exc, action=action, tenant=target, scope=scope)
        raise


NOT_GRANTED = "the caller's policy does not grant this tenant and scope"


def not_granted(reason: str) -> Forbidden:
    """The one refusal for a tenant the caller may not use, registered or not: the same words whatever
    the reason (kept for the audit record and the log), naming no tenant, so refusals cannot map the
    registry (which GUID is which name, which names exist)."""
    return Forbidden(NOT_GRANTED, diagnostic=reason)


async def require_admin(c: Container, request: Request) -> Caller:
    """An admin caller: the ``Broker.Admin`` role in its token and ``"admin": true`` in the policy."""
    caller = await authenticate(c, request, "admin")
    decision = c.settings.caller_policy.decide(
        object_id=caller.id, app_id=caller.app_id, roles=caller.roles, action="admin", app_only=caller.app_only
    )
    if not decision.allowed:
        exc = Forbidden(f"caller {caller.label} is not an administrator", diagnostic=decision.reason)
        await refused(c, request, exc, action="admin")
        raise exc
    return caller


async def refused(
    c: Container,
    request: Request,
    exc: BrokerError,
    *,
    action: str,
    tenant: Tenant | str = "-",
    scope: str | None = None,
) -> None:
    """Record a refusal (not waited for: a refusal hands nothing out)."""
    if getattr(request.state, "audited", False):
        return
    caller: Caller | None = getattr(request.state, "caller", None)
    outcome = "denied" if exc.status < 500 else "failed"
    fields(request)["reason"] = reason_of(exc)
    if caller is None and outcome == "denied":
        # Nobody was named: counted per client address and interval, so a flood cannot bury real records.
        request.state.audited = True
        c.audit.refused_before_auth(client_address(request), action, exc.code, reason_of(exc))
        return
    await audit(
        c,
        request,
        action=action,
        outcome=outcome,
        code=exc.code,
        reason=reason_of(exc),
        caller=caller,
        tenant=tenant,
        scope=scope,
        wait=False,
    )


async def audit(
    c: Container,
    request: Request,
    *,
    action: str,
    outcome: str,
    code: str,
    reason: str = "-",
    caller: Caller | None = None,
    tenant: Tenant | str = "-",
    scope: str | None = None,
    token: AccessToken | None = None,
    wait: bool,
) -> Written | None:
    """Record one decision; with ``wait`` return once it is stored (or raise ``AuditUnavailable``)."""
    request.state.audited = True
    rid = request_id(request)
    tenant_id, tenant_name = _tenant_fields(tenant)
    record = AuditRecord(
        action=action,
        outcome=outcome,
        code=code,
        reason=reason,
        caller=caller.id if caller else "-",
        caller_app=(caller.app_id or "-") if caller else "-",
        tenant=tenant_id,
        tenant_name=tenant_name,
        scope=scope or "-",
        request_id=str(rid),
        expires_on=token.expires_on if token else 0,
        fingerprint=token.fingerprint if token else "-",
    )
    written = await c.audit.record(record, wait=wait)
    if written is not None:
        fields(request)["audit"] = written.ref
    return written


def _tenant_fields(tenant: Tenant | str) -> tuple[str, str]:
    """The record's tenant GUID and name, each in its own field: a reference the caller gave goes to the
    field of its kind (a name never lands where a GUID belongs)."""
    if isinstance(tenant, Tenant):
        return tenant.tenant_id, tenant.name
    if is_tenant_guid(tenant):
        return tenant, "-"
    return "-", tenant
