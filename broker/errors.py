"""The broker's errors: one tree, each class with its HTTP status and a stable ``code``.

::

    BrokerError (500 internal)
    ├── RequestError                     the caller sent something we refuse, before any outbound call
    │   ├── BadRequest (400 bad_request)
    │   ├── InvalidJson (400 invalid_json)
    │   ├── InvalidTenant (400 invalid_tenant)      not a GUID or a registered name's shape
    │   ├── ScopeNotAllowed (400 scope_not_allowed)
    │   ├── UnsupportedMediaType (415 unsupported_media_type)
    │   ├── PayloadTooLarge (413 payload_too_large)
    │   ├── MethodNotAllowed (405 method_not_allowed)
    │   ├── UnknownTenant (404 unknown_tenant)      well-formed, not in the registry
    │   ├── NotFound (404 not_found)
    │   └── ConsentAnswerError               the admin-consent callback cannot be trusted
    │       ├── ConsentStateMissing (400 consent_state_missing)
    │       ├── ConsentStateInvalid (400 consent_state_invalid)    altered, forged or not ours
    │       ├── ConsentStateExpired (400 consent_state_expired)
    │       ├── ConsentStateUsed (409 consent_state_used)          a replay
    │       └── ConsentTenantMismatch (400 consent_tenant_mismatch)  tenant is not the pending one
    ├── CallerError                      who is asking
    │   ├── Unauthenticated (401 unauthenticated)
    │   ├── Forbidden (403 forbidden)
    │   ├── TenantDisabled (403 tenant_disabled)
    │   ├── CallerDisabled (403 caller_disabled)
    │   ├── HostNotAllowed (403 host_not_allowed)      development mode: the Host is not loopback
    │   ├── OriginNotAllowed (403 origin_not_allowed)  development mode: a page on another site sent it
    │   └── RateLimited (429 rate_limited)
    ├── TenantStateError                 the customer tenant is not ready for us
    │   ├── ConsentRequired (409 consent_required)  carries the admin-consent link
    │   ├── TenantNotFound (409 tenant_not_found)   Entra does not know the registered GUID
    │   └── RoleMissing (409 role_missing)          consented without the permission the scope needs
    ├── UpstreamError                    Entra ID, Key Vault or the incident APIs failed us
    │   ├── CredentialRejected (502 credential_rejected)
    │   ├── TokenMismatch (502 token_mismatch)      an issued token is not for the tenant asked
    │   ├── UpstreamThrottled (503 upstream_throttled)
    │   ├── UpstreamUnavailable (503 upstream_unavailable)
    │   ├── CredentialUnavailable (503 credential_unavailable)
    │   └── IncidentApiError (502 incident_api_error)  Defender/Graph refused a request or sent nonsense
    └── ServiceError                     the broker itself cannot serve right now
        ├── NotConfigured (503 not_configured)
        ├── NotReady (503 not_ready)                a dependency (Key Vault, storage, Entra ID) is failing
        ├── AuditUnavailable (503 audit_unavailable)
        ├── KillSwitchesStale (503 kill_switches_stale)  storage unreadable past the switches' staleness
        ├── SyncBudgetExhausted (503 sync_budget_exhausted)  the tenant's API budget has no call left now
        └── SyncInProgress (409 sync_in_progress)  another run holds the tenant's sync lease

A foreign failure is translated once, where it happens (``raise TokenMismatch(...) from exc``). The
``detail`` is safe to show a caller: it never carries upstream text, secrets or tokens. Operators get the
upstream detail in ``diagnostic``, which only reaches logs.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

PROBLEM_CONTENT_TYPE = "application/problem+json"


class BrokerError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        diagnostic: str = "",
        retry_after: int | None = None,
        **extensions: Any,
    ) -> None:
        self.detail = detail or self.title
        self.diagnostic = diagnostic
        self.retry_after = retry_after
        self.extensions = extensions
        super().__init__(self.detail)

    def problem(self, request_id: str = "") -> dict[str, Any]:
        """The RFC 9457 problem document for this error."""
        body: dict[str, Any] = {
            "type": f"urn:partner-token-broker:problem:{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if request_id:
            body["request_id"] = request_id
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        body.update(self.extensions)
        return body

    def headers(self) -> dict[str, str]:
        headers = {"Cache-Control": "no-store"}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return headers

    def render(self, request_id: str = "") -> bytes:
        return json.dumps(self.problem(request_id), separators=(",", ":")).encode()


class RequestError(BrokerError):
    status = 400
    code = "bad_request"
    title = "Bad request"


class BadRequest(RequestError):
    pass


class InvalidJson(RequestError):
    code = "invalid_json"
    title = "The body is not valid JSON"


class InvalidTenant(RequestError):
    code = "invalid_tenant"
    title = "The tenant must be a registered tenant name or tenant GUID"


class ScopeNotAllowed(RequestError):
    code = "scope_not_allowed"
    title = "The scope is not one the broker issues"


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"
    title = "The body must be application/json"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"
    title = "The body is too large"


class MethodNotAllowed(RequestError):
    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"


class UnknownTenant(RequestError):
    status = 404
    code = "unknown_tenant"
    title = "No such tenant is registered"


class NotFound(RequestError):
    status = 404
    code = "not_found"
    title = "Not found"


class ConsentAnswerError(RequestError):
    code = "consent_answer_invalid"
    title = "The admin-consent answer cannot be trusted"


class ConsentStateMissing(ConsentAnswerError):
    code = "consent_state_missing"
    title = "The admin-consent answer carries no state"


class ConsentStateInvalid(ConsentAnswerError):
    code = "consent_state_invalid"
    title = "The admin-consent state is not one the broker issued"


class ConsentStateExpired(ConsentAnswerError):
    code = "consent_state_expired"
    title = "The admin-consent link has expired"


class ConsentStateUsed(ConsentAnswerError):
    status = 409
    code = "consent_state_used"
    title = "The admin-consent link has already been used"


class ConsentTenantMismatch(ConsentAnswerError):
    code = "consent_tenant_mismatch"
    title = "Consent came from a tenant other than the one the link was made for"


class CallerError(BrokerError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class Unauthenticated(CallerError):
    status = 401
    code = "unauthenticated"
    title = "A valid bearer token for the broker is required"


class Forbidden(CallerError):
    pass


class TenantDisabled(CallerError):
    code = "tenant_disabled"
    title = "The tenant is disabled"


class CallerDisabled(CallerError):
    code = "caller_disabled"
    title = "The caller is disabled"


class HostNotAllowed(CallerError):
    code = "host_not_allowed"
    title = "A development broker answers only requests addressed to a loopback host"


class OriginNotAllowed(CallerError):
    code = "origin_not_allowed"
    title = "A development broker refuses requests from web pages of other sites"


class RateLimited(CallerError):
    status = 429
    code = "rate_limited"
    title = "Too many requests from this caller"


class TenantStateError(BrokerError):
    status = 409
    code = "tenant_state"
    title = "The tenant is not ready"


class ConsentRequired(TenantStateError):
    code = "consent_required"
    title = "An administrator of the tenant has not consented to the app"


class TenantNotFound(TenantStateError):
    code = "tenant_not_found"
    title = "Entra ID does not know the registered tenant"


class RoleMissing(TenantStateError):
    code = "role_missing"
    title = "The tenant has not granted the permission the scope needs"


class UpstreamError(BrokerError):
    status = 502
    code = "upstream_error"
    title = "An upstream service failed"


class CredentialRejected(UpstreamError):
    code = "credential_rejected"
    title = "Entra ID rejected the app's credential"


class TokenMismatch(UpstreamError):
    code = "token_mismatch"
    title = "The issued token does not match the request"


class UpstreamThrottled(UpstreamError):
    status = 503
    code = "upstream_throttled"
    title = "The identity provider is throttling; retry later"


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"
    title = "An upstream service is unavailable; retry later"


class CredentialUnavailable(UpstreamError):
    status = 503
    code = "credential_unavailable"
    title = "The app's credential cannot be read from Key Vault"


class IncidentApiError(UpstreamError):
    code = "incident_api_error"
    title = "The incident API refused the request"


class ServiceError(BrokerError):
    status = 503
    code = "unavailable"
    title = "Service unavailable"


class NotConfigured(ServiceError):
    code = "not_configured"
    title = "The broker is not configured"


class NotReady(ServiceError):
    code = "not_ready"
    title = "A dependency of the broker is failing"


class AuditUnavailable(ServiceError):
    code = "audit_unavailable"
    title = "The audit log cannot be written; no token is issued without it"

    def __init__(self, detail: str | None = None, *, retry_after: int | None = 5, **kwargs: Any) -> None:
        # An outage of the audit store is transient like any other: the caller is told when to try again.
        super().__init__(detail, retry_after=retry_after, **kwargs)


class KillSwitchesStale(ServiceError):
    code = "kill_switches_stale"
    title = "The kill switches cannot be read; nothing is served until they can"


class SyncBudgetExhausted(ServiceError):
    code = "sync_budget_exhausted"
    title = "The tenant's incident API budget is spent for now; the sync resumes later"


class SyncInProgress(ServiceError):
    status = 409
    code = "sync_in_progress"
    title = "Another sync run for this tenant is in progress"
