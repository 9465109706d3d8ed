"""Operator changes to the tenant registry and the kill switches, from the CLI or the admin API alike.

Every change is checked first (a malformed name or GUID is refused before anything is written), then
recorded in the audit log and waited for, and only then made: a change the log cannot record
(``AuditUnavailable``) is not made at all. A change that fails after its record was written is recorded
again, as failed, so the log never shows a change as made without saying that it did not happen.

The record of a change is ``action=admin``, ``outcome=allowed``, ``code=ok`` and a reason naming the
change (``tenant_add``, ``tenant_configure``, ``tenant_disable``, ``tenant_enable``, ``tenant_remove``,
``tenant_onboarded``, or
``caller_disable:<id>`` / ``caller_enable:<id>``), with the tenant's GUID and name in their own fields
and the operator (the admin caller, or ``cli``) as the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from broker.audit import AuditLog, AuditRecord
from broker.callers import Caller, CallerSwitch, CallerSwitches, normalize_principal
from broker.errors import BrokerError
from broker.tenants import IncidentApi, Tenant, TenantRegistry, canonical_guid

log = logging.getLogger(__name__)

T = TypeVar("T")

CLI_OPERATOR = Caller(id="cli")
#: Who marks a tenant onboarded: the doctor, once its checks pass (after consent, or when run by hand).
DOCTOR = Caller(id="doctor")


class RegistryChanges:
    """The one way the registry and the switches are changed by an operator."""

    def __init__(self, audit: AuditLog, tenants: TenantRegistry, callers: CallerSwitches) -> None:
        self._audit = audit
        self._tenants = tenants
        self._callers = callers

    def add_tenant(
        self,
        name: str,
        tenant_id: str,
        *,
        api: IncidentApi = "defender",
        defender_url: str | None = None,
        region: str | None = None,
        by: Caller,
        request_id: str = "-",
    ) -> Tenant:
        proposed = self._proposed(name, tenant_id, api, region, defender_url)

        def add() -> Tenant:
            return self._tenants.add(proposed.name, proposed.tenant_id, api=api, defender_url=proposed.defender_url)

        return self._apply("tenant_add", proposed, by, request_id, add)

    def configure_tenant(
        self,
        name: str,
        tenant_id: str,
        *,
        api: IncidentApi = "defender",
        defender_url: str | None = None,
        region: str | None = None,
        by: Caller,
        request_id: str = "-",
    ) -> tuple[Tenant, bool]:
        """Add a tenant or change its incident API and Defender host (``TenantRegistry.configure``)."""
        proposed = self._proposed(name, tenant_id, api, region, defender_url)

        def configure() -> tuple[Tenant, bool]:
            return self._tenants.configure(
                proposed.name, proposed.tenant_id, api=api, defender_url=proposed.defender_url
            )

        return self._apply("tenant_configure", proposed, by, request_id, configure)

    def _proposed(
        self, name: str, tenant_id: str, api: IncidentApi, region: str | None, defender_url: str | None
    ) -> Tenant:
        """The tenant an add or configure would write: its record is audited before the write."""
        url = self._tenants.regional_url(region, defender_url)
        return Tenant(name=name.lower(), tenant_id=canonical_guid(tenant_id), api=api, defender_url=url)

    def set_tenant_enabled(self, reference: str, enabled: bool, *, by: Caller, request_id: str = "-") -> Tenant:
        tenant = self._tenants.resolve(reference)
        verb = "enable" if enabled else "disable"
        return self._apply(
            f"tenant_{verb}", tenant, by, request_id, lambda: self._tenants.set_enabled(tenant.name, enabled)
        )

    def mark_onboarded(self, reference: str, *, by: Caller = DOCTOR, request_id: str = "-") -> Tenant:
        """Record that the tenant's consent is proven (no record, no change when it already is)."""
        tenant = self._tenants.resolve(reference)
        if tenant.onboarded_at:
            return tenant
        return self._apply(
            "tenant_onboarded", tenant, by, request_id, lambda: self._tenants.mark_onboarded(tenant.name)
        )

    def remove_tenant(self, reference: str, *, by: Caller, request_id: str = "-") -> Tenant:
        tenant = self._tenants.resolve(reference)

        def remove() -> Tenant:
            self._tenants.remove(tenant.name)
            return tenant

        return self._apply("tenant_remove", tenant, by, request_id, remove)

    def set_caller_enabled(self, principal: str, enabled: bool, *, by: Caller, request_id: str = "-") -> CallerSwitch:
        target = normalize_principal(principal)
        verb = "enable" if enabled else "disable"
        return self._apply(
            f"caller_{verb}:{target}",
            None,
            by,
            request_id,
            lambda: self._callers.set_enabled(target, enabled, by=by.label),
        )

    def _apply(self, what: str, tenant: Tenant | None, by: Caller, request_id: str, change: Callable[[], T]) -> T:
        """Record ``what``, wait for the record, then make the change (raises ``AuditUnavailable`` first)."""
        self._audit.record_sync(_record(what, "allowed", "ok", tenant, by, request_id))
        try:
            return change()
        except BaseException as exc:
            code = exc.code if isinstance(exc, BrokerError) else "internal"
            try:
                self._audit.record_sync(_record(what, "failed", code, tenant, by, request_id))
            except BrokerError as again:
                log.error("admin.change what=%s outcome=failed audit=unwritten error=%s", what, again.code)
            raise


def _record(what: str, outcome: str, code: str, tenant: Tenant | None, by: Caller, request_id: str) -> AuditRecord:
    return AuditRecord(
        action="admin",
        outcome=outcome,
        code=code,
        reason=what,
        caller=by.id,
        caller_app=by.app_id or "-",
        tenant=tenant.tenant_id if tenant else "-",
        tenant_name=tenant.name if tenant else "-",
        request_id=request_id,
    )
