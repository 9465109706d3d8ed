"""The doctor: walks one tenant through everything a token and a sync need, and says what to fix.

Steps, in order (a step that cannot run because an earlier one failed is reported as skipped):

1. ``registry``   the tenant is registered (name ↔ GUID) and enabled;
2. ``credential`` the app's credential can be read (Key Vault, or the managed identity in federated mode);
3. per allowed scope: ``token`` (Entra ID issues one, asked afresh: the tenant's MSAL app is rebuilt so no
   cached token or replayed refusal answers), ``tid`` (the token names this tenant) and ``roles`` (it
   carries the role ``SCOPE_ROLES`` names);
4. ``probe``      one smallest call (``$top=1``) to the tenant's incident API, Defender or Graph, with that
   token, counted against the tenant's call budget like any other.

Each step is pass or fail with the fix in words; ``python -m broker doctor`` exits non-zero on any failure.
A passing run marks a pending tenant onboarded and reports to the health record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.errors import BrokerError
from broker.keyvault import CredentialSource
from broker.tenants import Tenant, TenantRegistry
from broker.tokens import TokenIssuer, token_claims

log = logging.getLogger(__name__)

FIXES: Mapping[str, str] = {
    "unknown_tenant": "register it: python -m broker tenants add NAME GUID (docs/onboarding.md)",
    "invalid_tenant": "name the tenant by its registered name or GUID",
    "tenant_disabled": "it is switched off on purpose? if not: python -m broker tenants enable NAME",
    "credential_unavailable": (
        "the broker cannot read its credential: give its identity Key Vault Secrets User on the vault and "
        "check CLIENT_SECRET_NAME / CLIENT_CERTIFICATE_NAME (docs/credentials.md)"
    ),
    "consent_required": (
        "an administrator of the customer tenant must consent: send the link from "
        "python -m broker tenants link NAME; after consent Entra ID can take a few minutes"
    ),
    "role_missing": (
        "the tenant consented without the permission this scope needs (or an administrator removed it): "
        "send a new consent link; check the app's API permissions (docs/app-registration.md)"
    ),
    "tenant_not_found": "Entra ID does not know this GUID: confirm it with the customer, then remove and add again",
    "credential_rejected": (
        "Entra ID refused the broker's own credential (expired secret, unknown certificate, no federated "
        "credential): rotate or fix it (docs/credentials.md); this affects every tenant"
    ),
    "token_mismatch": "Entra ID issued a token for another tenant: the registered GUID is wrong; fix the registry",
    "upstream_throttled": "Entra ID or the API is throttling: wait for Retry-After and run the doctor again",
    "upstream_unavailable": "Entra ID, Key Vault or the API is failing or unreachable: check Azure status, retry",
    "incident_api_error": "the incident API refused the call: check the tenant's API (--api) and regional URL",
    "sync_budget_exhausted": "the tenant's API budget is spent for now: run the doctor again in a minute",
}


@dataclass(frozen=True)
class Step:
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str
    fix: str = ""
    code: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    def to_json(self) -> dict[str, str]:
        body = {"step": self.name, "status": self.status, "detail": self.detail}
        if self.code:
            body["code"] = self.code
        if self.fix:
            body["fix"] = self.fix
        return body


@dataclass(frozen=True)
class Report:
    tenant: str
    tenant_id: str
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(step.status == "pass" for step in self.steps)

    @property
    def first_failure(self) -> Step | None:
        return next((s for s in self.steps if s.status == "fail"), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "tenant_id": self.tenant_id,
            "ok": self.ok,
            "steps": [s.to_json() for s in self.steps],
        }


def _fail(name: str, exc: BrokerError) -> Step:
    return Step(name, "fail", exc.detail, FIXES.get(exc.code, "see docs/operations.md for this code"), exc.code)


class Doctor:
    def __init__(
        self,
        *,
        tenants: TenantRegistry,
        credentials: CredentialSource,
        issuer: TokenIssuer,
        scopes: Sequence[str],
        scope_roles: Mapping[str, str],
        api_scope: Callable[[Tenant], str],
        probe: Callable[[Tenant], int],
        mark_onboarded: Callable[[str], object],
        health: Any = None,
    ) -> None:
        self._tenants = tenants
        self._credentials = credentials
        self._issuer = issuer
        self._scopes = tuple(scopes)
        self._scope_roles = dict(scope_roles)
        self._api_scope = api_scope
        self._probe = probe
        self._mark_onboarded = mark_onboarded
        self._health = health

    def run(self, reference: str) -> Report:
        """Check one tenant (by name or GUID); never raises a ``BrokerError``."""
        steps: list[Step] = []
        try:
            tenant = self._tenants.resolve(reference)
        except BrokerError as exc:
            return Report(reference, "", (_fail("registry", exc),))
        report = self._run(tenant, steps)
        if report.ok and not tenant.onboarded_at:
            self._mark_onboarded(tenant.name)
        if self._health is not None:
            failure = report.first_failure
            if failure is None:
                self._health.success(tenant.tenant_id, "doctor")
            elif failure.code:
                self._health.failure(tenant.tenant_id, failure.code, "doctor")
        log.info(
            "doctor.run tenant=%s outcome=%s failed=%s",
            tenant.tenant_id,
            "pass" if report.ok else "fail",
            ",".join(s.name for s in report.steps if s.status == "fail") or "-",
        )
        return report

    def run_all(self) -> list[Report]:
        return [self.run(t.name) for t in self._tenants.all()]

    def _run(self, tenant: Tenant, steps: list[Step]) -> Report:
        def report() -> Report:
            return Report(tenant.name, tenant.tenant_id, tuple(steps))

        detail = f"{tenant.name} is {tenant.tenant_id}, api={tenant.api}, {tenant.onboarding}"
        if not tenant.enabled:
            steps.append(Step("registry", "fail", detail + ", disabled", FIXES["tenant_disabled"], "tenant_disabled"))
            return report()
        steps.append(Step("registry", "pass", detail))

        try:
            credential = self._credentials.refresh()
            if callable(credential.value):
                credential.value()  # federated: the managed identity must sign the app in now
            steps.append(Step("credential", "pass", f"read, version {credential.version[:12] or '-'}"))
        except BrokerError as exc:
            steps.append(_fail("credential", exc))
            return report()

        self._issuer.evict(tenant.tenant_id)  # ask Entra ID afresh: no cached token, no replayed 400
        probe_scope = self._api_scope(tenant)
        probe_ready = False
        for scope in self._scopes:
            steps.extend(self._token_steps(tenant, scope))
            if scope == probe_scope and all(s.ok for s in steps[-3:]):
                probe_ready = True
        if not probe_ready:
            steps.append(Step("probe", "skip", f"no usable token for {probe_scope}"))
            return report()
        try:
            count = self._probe(tenant)
            steps.append(Step("probe", "pass", f"{tenant.api} incidents $top=1 answered ({count} returned)"))
        except BrokerError as exc:
            steps.append(_fail("probe", exc))
        return report()

    def _token_steps(self, tenant: Tenant, scope: str) -> list[Step]:
        role = self._scope_roles.get(scope, "")
        try:
            token = self._issuer.acquire(tenant.tenant_id, scope)
        except BrokerError as exc:
            # The issuer checks tid and roles itself and refuses the token if either is wrong.
            if exc.code == "token_mismatch":
                return [
                    Step(f"token {scope}", "pass", "issued"),
                    _fail(f"tid {scope}", exc),
                    Step(f"roles {scope}", "skip", "token withheld"),
                ]
            if exc.code == "role_missing":
                return [
                    Step(f"token {scope}", "pass", "issued"),
                    Step(f"tid {scope}", "pass", f"tid is {tenant.tenant_id}"),
                    _fail(f"roles {scope}", exc),
                ]
            return [
                _fail(f"token {scope}", exc),
                Step(f"tid {scope}", "skip", "no token"),
                Step(f"roles {scope}", "skip", "no token"),
            ]
        claims = token_claims(token.value)
        roles = claims.get("roles") or []
        return [
            Step(f"token {scope}", "pass", f"issued, expires in {token.expires_in(time.time())} s"),
            Step(f"tid {scope}", "pass", f"tid is {claims.get('tid')}"),
            Step(f"roles {scope}", "pass", f"carries {role}" if role else f"roles {', '.join(map(str, roles))}"),
        ]
