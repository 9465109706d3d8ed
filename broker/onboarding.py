"""Onboarding a customer tenant: register it pending, hand out the consent link, take the answer.

``start`` registers a tenant (pending until the doctor passes) and makes its admin-consent link; ``link``
makes a new one for a registered tenant. ``complete`` takes what Entra ID sent the administrator's browser
back with (``admin_consent=True&tenant=…&state=…`` or ``error=…&error_description=…&state=…``):

1. ``state`` is checked and used up (``ConsentStates.redeem``): missing, altered, expired or replayed
   states are refused before anything else happens;
2. an ``error`` is the administrator's refusal (``access_denied``: they declined; ``consent_required``:
   they may not consent): recorded on the tenant's health, the tenant stays pending;
3. on success the ``tenant`` must be the GUID the state was made for (Microsoft: the ``tenant`` parameter
   can be forged, so it is never believed on its own);
4. the tenant's MSAL app is rebuilt (MSAL replays a 400 such as "not consented" for 60 s), and the doctor
   runs: consent is proven only by a checked token and a probe call. A passing doctor marks the tenant
   onboarded; a failing one leaves it consented but pending, with the failing step and its fix.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from broker.callers import Caller
from broker.changes import RegistryChanges
from broker.consent import ConsentLink, ConsentLinks
from broker.doctor import Doctor, Report
from broker.errors import ConsentAnswerError, ConsentTenantMismatch
from broker.health import HealthBook
from broker.tenants import IncidentApi, Tenant, TenantRegistry, canonical_guid
from broker.tokens import TokenIssuer

log = logging.getLogger(__name__)

#: The errors Entra ID documents for the admin-consent redirect; anything else is reported as ``other``.
KNOWN_ERRORS = (
    "access_denied",
    "consent_required",
    "invalid_request",
    "invalid_client",
    "server_error",
    "temporarily_unavailable",
    "unauthorized_client",
    "invalid_scope",
)
_AADSTS = re.compile(r"AADSTS(\d{4,8})")
_CORRELATION = re.compile(r"Correlation ID:\s*([0-9a-fA-F-]{36})")

Outcome = Literal["onboarded", "consented", "refused"]


@dataclass(frozen=True)
class ConsentOutcome:
    """What the consent callback concluded (safe to show: no upstream free text)."""

    outcome: Outcome
    tenant: Tenant
    error: str = ""
    aadsts: str = ""
    correlation_id: str = ""
    report: Report | None = None


class Onboarding:
    def __init__(
        self,
        *,
        tenants: TenantRegistry,
        changes: RegistryChanges,
        links: ConsentLinks,
        doctor: Doctor,
        issuer: TokenIssuer,
        health: HealthBook,
    ) -> None:
        self.tenants = tenants
        self._changes = changes
        self.links = links
        self._doctor = doctor
        self._issuer = issuer
        self._health = health

    def start(
        self,
        name: str,
        tenant_id: str,
        *,
        api: IncidentApi = "defender",
        defender_url: str | None = None,
        region: str | None = None,
        by: Caller,
        request_id: str = "-",
    ) -> tuple[Tenant, ConsentLink]:
        """Register a pending tenant (audited) and make its consent link (no redirect URI: no link, and no
        tenant)."""
        if not self.links.redirect_uri:
            self.links.create(name, tenant_id, api)  # raises NotConfigured, naming the settings
        tenant = self._changes.add_tenant(
            name, tenant_id, api=api, defender_url=defender_url, region=region, by=by, request_id=request_id
        )
        return tenant, self.links.create(tenant.name, tenant.tenant_id, tenant.api)

    def link(self, reference: str) -> tuple[Tenant, ConsentLink]:
        tenant = self.tenants.resolve(reference)
        return tenant, self.links.create(tenant.name, tenant.tenant_id, tenant.api)

    def complete(self, params: Mapping[str, str]) -> ConsentOutcome:
        pending = self.links.states.redeem(params.get("state"))
        tenant = self.tenants.resolve(pending.tenant_id)
        error = params.get("error")
        if error is not None:
            description = params.get("error_description", "")[:2000]
            aadsts = _AADSTS.search(description)
            correlation = _CORRELATION.search(description)
            code = error if error in KNOWN_ERRORS else "other"
            self._health.consent_refused(tenant.tenant_id, code)
            log.info(
                "consent.callback tenant=%s outcome=refused error=%s aadsts=%s",
                tenant.tenant_id,
                code,
                aadsts.group(1) if aadsts else "-",
            )
            return ConsentOutcome(
                "refused",
                tenant,
                error=code,
                aadsts=f"AADSTS{aadsts.group(1)}" if aadsts else "",
                correlation_id=correlation.group(1).lower() if correlation else "",
            )
        if params.get("admin_consent", "").lower() != "true":
            raise ConsentAnswerError("the answer carries neither admin_consent=True nor an error")
        try:
            answered = canonical_guid(params.get("tenant", ""))
        except ValueError:
            answered = ""
        if answered != pending.tenant_id:
            log.warning(
                "consent.callback tenant=%s outcome=tenant_mismatch answered=%s", pending.tenant_id, answered or "-"
            )
            raise ConsentTenantMismatch(
                f"consent came from another tenant than {tenant.name}'s; the link is spent, ask for a new one",
                diagnostic="tenant_mismatch",
            )
        self._issuer.evict(tenant.tenant_id)  # MSAL would replay the earlier "not consented" for 60 s
        report = self._doctor.run(tenant.tenant_id)
        outcome: Outcome = "onboarded" if report.ok else "consented"
        log.info("consent.callback tenant=%s outcome=%s", tenant.tenant_id, outcome)
        return ConsentOutcome(outcome, self.tenants.resolve(tenant.tenant_id), report=report)
