"""Onboarding over HTTP: the admin-consent callback, readiness, and the page an administrator lands on.

- ``GET /api/consent/callback`` is anonymous: the customer's administrator's browser arrives there from
  Entra ID. Trust comes from ``state`` alone (:mod:`broker.onboarding`). The answer is a small HTML page
  that says what happened and what to do next (no script, every value escaped, a content security policy
  that allows nothing but its own inline style), or JSON when the client asks for JSON (``Accept``).
  Failures carry their problem code and HTTP status either way.
- ``GET /api/health/ready`` is anonymous too (probes call it): Key Vault (or the managed identity),
  storage and Entra ID's metadata, each named, cached for a few seconds; 503 ``not_ready`` names what
  failed.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from html import escape
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from broker.errors import (
    BrokerError,
    ConsentAnswerError,
    ConsentStateExpired,
    ConsentStateInvalid,
    ConsentStateMissing,
    ConsentStateUsed,
    ConsentTenantMismatch,
    NotConfigured,
    NotReady,
    UnknownTenant,
    UpstreamUnavailable,
)
from broker.http.contract import GUID_PATTERN, Param, contract
from broker.http.summary import request_id, summarised
from broker.onboarding import ConsentOutcome
from broker.wiring import Container

CALLBACK_PATH = "/api/consent/callback"
_STYLE = (
    "body{font:1rem/1.5 system-ui,sans-serif;max-width:42rem;margin:2rem auto;padding:0 1rem;color:#1b1b1b;"
    "background:#fff}h1{font-size:1.5rem}dt{font-weight:600}dd{margin:0 0 .5rem 0;word-break:break-all}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
PAGE_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
#: What the administrator reads for each refusal Entra ID reports (others: the generic text).
REFUSALS = {
    "access_denied": (
        "Consent was declined",
        "Nothing was granted: the app has no access to your organization.",
        "If declining was a mistake, ask your partner for a new consent link; this one has been used.",
    ),
    "consent_required": (
        "Your account cannot consent for the organization",
        "Entra ID did not let this account grant the permissions, so nothing was granted.",
        "Ask your partner for a new link and open it as a Global Administrator or Privileged Role "
        "Administrator of your organization; this one has been used.",
    ),
}
GENERIC_REFUSAL = (
    "Consent did not complete",
    "Entra ID reported an error, so nothing was granted.",
    "Ask your partner for a new consent link and try again; quote the reference below if it happens again.",
)


class ConsentAnswer(BaseModel):
    """The consent answer was taken: the tenant is onboarded, consented (its check has not passed yet) or
    refused consent. A browser gets a page saying so; a client asking for JSON gets this."""

    outcome: Literal["onboarded", "consented", "refused"]
    tenant: str
    tenant_id: str = Field(pattern=GUID_PATTERN)
    onboarding: str
    error: str | None = Field(None, description="Entra ID's error when consent was refused.")
    aadsts: str | None = None
    correlation_id: str | None = None
    doctor: dict[str, Any] | None = Field(None, description="The doctor's report after consent.")


class Readiness(BaseModel):
    """Every dependency answered: Key Vault (or the managed identity), storage, Entra ID's metadata."""

    status: Literal["ready"]
    checks: dict[str, dict[str, Any]] = Field(description="Each dependency by name: ok, duration_ms, problem?.")


CONSENT_CALLBACK = contract(
    operation_id="consent_callback",
    summary="Where Entra ID sends the customer's administrator after admin consent",
    description=(
        "Anonymous: trust comes from the signed, single-use `state` alone. Entra ID adds `admin_consent=True` "
        "and `tenant`, or `error` and `error_description`. A browser gets a page (no script; a content "
        "security policy); a client that asks for JSON gets JSON. Any other parameter is ignored."
    ),
    role=None,
    ok=ConsentAnswer,
    html=True,
    query=(
        Param("state", {"type": "string", "minLength": 1, "maxLength": 2048}, "The state the consent link carried."),
        Param("admin_consent", {"type": "string", "maxLength": 16}, "`True` when consent was granted."),
        Param("tenant", {"type": "string", "maxLength": 64}, "The tenant that consented (its GUID)."),
        Param("error", {"type": "string", "maxLength": 256}, "Entra ID's error, when consent was not granted."),
        Param("error_description", {"type": "string", "maxLength": 4096}, "Entra ID's description of it."),
    ),
    errors=(
        ConsentAnswerError,
        ConsentStateMissing,
        ConsentStateInvalid,
        ConsentStateExpired,
        ConsentStateUsed,
        ConsentTenantMismatch,
        UnknownTenant,
        UpstreamUnavailable,
        NotConfigured,
    ),
)
READY = contract(
    operation_id="readiness",
    summary="Readiness: the broker's dependencies answer",
    description="Anonymous (probes call it). Checked at most every few seconds; a 503 `not_ready` names what failed.",
    role=None,
    ok=Readiness,
    errors=(NotReady, NotConfigured),
)


def wants_json(request: Request) -> bool:
    """JSON when the client asks for it and does not (also) ask for HTML, as a browser does."""
    accept = request.headers.get("accept", "").lower()
    return ("application/json" in accept or "+json" in accept) and "text/html" not in accept


def page(title: str, paragraphs: list[str], facts: list[tuple[str, str]], *, status: int) -> Response:
    """A small accessible page: a title, what happened, what to do next, the facts; all escaped."""
    body = "".join(f"<p>{escape(p)}</p>" for p in paragraphs)
    listing = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts if v)
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main><h1>{escape(title)}</h1>{body}"
        f"{'<dl>' + listing + '</dl>' if listing else ''}</main></body></html>"
    )
    return Response(html, status_code=status, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


def outcome_page(result: ConsentOutcome, rid: str) -> Response:
    tenant = result.tenant
    facts = [("Organization (tenant ID)", tenant.tenant_id), ("Reference", rid)]
    if result.outcome == "onboarded":
        return page(
            "Consent received",
            [
                f"Thank you. Your organization ({tenant.tenant_id}) has granted the partner's app the permissions "
                "it asked for, and the partner's check of that access passed.",
                "Nothing else is needed; you can close this page. To withdraw consent later, delete the "
                "app's enterprise application in the Microsoft Entra admin center.",
            ],
            facts,
            status=200,
        )
    if result.outcome == "consented":
        failure = result.report.first_failure if result.report else None
        return page(
            "Consent received; the check has not passed yet",
            [
                "Consent was recorded, but the partner's check could not use it yet. Entra ID can take a few "
                "minutes to apply consent, so nothing is needed from you now: your partner checks again and "
                "sends a new link only if the organization has to consent again.",
            ],
            [*facts, ("Failed check", failure.name if failure else ""), ("Problem", failure.code if failure else "")],
            status=200,
        )
    title, what, next_step = REFUSALS.get(result.error, GENERIC_REFUSAL)
    return page(
        title,
        [what, next_step],
        [*facts, ("Error", result.error), ("Entra ID code", result.aadsts), ("Correlation ID", result.correlation_id)],
        status=200,
    )


def outcome_json(result: ConsentOutcome) -> dict[str, Any]:
    body: dict[str, Any] = {
        "outcome": result.outcome,
        "tenant": result.tenant.name,
        "tenant_id": result.tenant.tenant_id,
        "onboarding": result.tenant.onboarding,
    }
    if result.error:
        body.update(error=result.error, aadsts=result.aadsts or None, correlation_id=result.correlation_id or None)
    if result.report is not None:
        body["doctor"] = result.report.to_json()
    return body


def error_page(exc: BrokerError, rid: str) -> Response:
    next_step = (
        "Ask your partner for a new consent link."
        if isinstance(exc, ConsentAnswerError | UnknownTenant)
        else "Try again in a few minutes; if it persists, tell your partner the reference below."
    )
    return page(
        "This consent link cannot be used",
        [exc.detail, next_step],
        [("Problem", exc.code), ("Reference", rid)],
        status=exc.status,
    )


def onboarding_routes(container: Callable[[], Container]) -> APIRouter:
    router = APIRouter()

    @router.get(CALLBACK_PATH, **CONSENT_CALLBACK)
    async def consent_callback(request: Request) -> Response:
        rid = request_id(request)
        params = dict(request.query_params)
        try:
            async with summarised(request, "consent.callback", tenant="-") as fields:
                c = container()
                result = await run_in_threadpool(c.onboarding.complete, params)
                fields.update(outcome=result.outcome, tenant=result.tenant.tenant_id, error=result.error or "-")
        except BrokerError as exc:
            if wants_json(request):
                raise  # the app's problem+json handler
            return error_page(exc, rid)
        if wants_json(request):
            return Response(
                json.dumps(outcome_json(result)),
                media_type="application/json",
                headers={"Cache-Control": "no-store", "X-Request-Id": rid},
            )
        return outcome_page(result, rid)

    @router.get("/api/health/ready", **READY)
    async def ready(request: Request) -> Response:
        async with summarised(request, "health.ready") as fields:
            c = container()
            report = await run_in_threadpool(c.readiness.report)
            fields["failed"] = ",".join(report.failed) or "-"
            if not report.ready:
                raise NotReady(
                    f"not ready: {', '.join(report.failed)}",
                    retry_after=int(c.readiness.ttl),
                    failed=report.failed,
                    checks=report.to_json()["checks"],
                )
            return Response(
                json.dumps(report.to_json()), media_type="application/json", headers={"Cache-Control": "no-store"}
            )

    return router
