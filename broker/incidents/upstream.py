"""The upstream incident APIs, behind one client: Defender XDR ``/api/incidents`` and Graph
``/security/incidents`` (what differs between them is in :mod:`broker.incidents.dialects`).

Both list incidents most recently updated first. The client asks for one *window* page at a time —
``lastUpdate ge LOW [and lastUpdate le HIGH]``, optionally with ``$skip`` — and leaves the paging strategy
to :mod:`broker.incidents.sync` (which explains why it builds its own next request instead of trusting a
``$skip``-based ``@odata.nextLink``).

What goes out: only a token for a tenant GUID from the registry (``TokenIssuer.acquire``, the same cache
the HTTP API uses), only to URLs built from settings plus fixed paths. An ``@odata.nextLink`` is followed
only when it points at the very endpoint we called (same scheme, host, port and path), so a hostile or
broken response cannot make us send a customer's token elsewhere. An incident id from a response goes
into a path only if it passes the one incident-id rule (:func:`broker.incidents.records.parse_incident_id`),
whose characters are all safe in a path segment.

Every request first takes a call from the tenant's :class:`~broker.incidents.budget.CallBudget`. Retries are for
these idempotent GETs only: connection errors, timeouts and 5xx, with full jitter, a cap, and
``Retry-After`` honoured; a 429 blocks the tenant's budget for the reset time — ``Retry-After`` or the
window in Defender's body ("maximum allowed 50 per 00:01:00") — and is waited out in-process only when
that is short (``RetryPolicy.max_wait``); otherwise ``UpstreamThrottled`` tells the sync to defer.
Every wait goes through the client's ``sleep`` seam; ``RetryPolicy(instant=True)`` removes the waits
altogether (see its docstring: it turns them into deferrals, not into shorter sleeps).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from broker.clouds import CLOUDS, Cloud
from broker.errors import IncidentApiError, NotConfigured, RoleMissing, UpstreamThrottled, UpstreamUnavailable
from broker.incidents.budget import CallBudget
from broker.incidents.dialects import DEFENDER, DIALECTS, GRAPH, Dialect
from broker.incidents.records import parse_incident_id
from broker.incidents.ticks import format_ticks
from broker.tenants import Tenant, check_defender_url
from broker.tokens import TokenIssuer

log = logging.getLogger(__name__)

_WINDOW = re.compile(r"per\s+(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})")
MAX_RETRY_AFTER = 3600.0
MAX_RESERVATION = 8  # calls reserved from the budget at once
RESERVATION_SECONDS = 10.0  # how long reserved calls stay usable (the budget counts them as sent then)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for idempotent GETs: ``attempts`` in all, full-jitter backoff from ``base`` capped at ``cap``
    (or the server's ``Retry-After``); a wait longer than ``max_wait`` is never slept: the call fails
    (connection errors, 5xx) or is deferred (429, spent budget) instead.

    ``instant=True`` (tests) never sleeps, and it does *not* merely shorten the waits:

    - a retry after a connection error or 5xx is sent at once (a pause above ``max_wait`` still ends
      the retries, as without ``instant``);
    - a 429 always raises ``UpstreamThrottled``, however short its ``Retry-After``;
    - the call budget is asked with ``max_wait=0``, so a budget that needs any wait raises
      ``SyncBudgetExhausted``.

    Both exceptions make a sync run end ``deferred`` at its last checkpoint: under ``instant`` every
    wait becomes a deferral. To exercise the waits themselves, keep ``instant=False`` and pass the
    client a ``sleep=`` (and the budget a ``clock=``/``sleep=``) that records them.
    """

    attempts: int = 4
    base: float = 0.5
    cap: float = 8.0
    max_wait: float = 30.0
    instant: bool = False

    def backoff(self, attempt: int, rng: Callable[[], float]) -> float:
        return float(rng() * min(self.cap, self.base * 2**attempt))


@dataclass
class Page:
    """One list response: the incidents (newest first) and the service's next link, if any."""

    incidents: list[dict[str, Any]]
    next_link: str | None


@dataclass
class CallCounter:
    """API calls one run has made (every attempt counts: the service counts them too), and its 429s.

    It also holds the calls the run has reserved from the budget and not yet sent: ``slots`` of them,
    usable until ``slots_until`` (``time.monotonic``). Each reservation asks for twice the last one (up to
    ``MAX_RESERVATION``), so a one-page run reserves one call and a backfill writes the budget once for
    several pages."""

    calls: int = 0
    throttled: int = 0
    slots: int = 0
    slots_until: float = 0.0
    want: int = 1

    def use_slot(self) -> bool:
        if self.slots > 0 and time.monotonic() < self.slots_until:
            self.slots -= 1
            return True
        self.slots = 0
        return False

    def granted(self, calls: int, since: float) -> None:
        """``calls`` reserved at ``since`` (monotonic, taken before asking): one is being sent now."""
        self.slots = calls - 1
        self.slots_until = since + RESERVATION_SECONDS
        self.want = min(MAX_RESERVATION, self.want * 2)


def throttle_seconds(response: requests.Response) -> float | None:
    """How long a 429 asks us to stay away: ``Retry-After``, else the window named in Defender's body."""
    raw = response.headers.get("Retry-After", "").strip()
    if raw.isdigit():
        return min(MAX_RETRY_AFTER, float(raw))
    try:
        message = str(response.json().get("error", {}).get("message", ""))
    except (ValueError, AttributeError):
        return None
    match = _WINDOW.search(message)
    if not match:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return min(MAX_RETRY_AFTER, float(days * 86_400 + hours * 3600 + minutes * 60 + seconds))


class IncidentApiClient:
    """Lists and fetches incidents for one registered tenant at a time."""

    def __init__(
        self,
        issuer: TokenIssuer,
        budget: CallBudget,
        *,
        defender_url: str,
        graph_url: str,
        cloud: Cloud = CLOUDS["public"],
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (5.0, 60.0),
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._issuer = issuer
        self._budget = budget
        self._defender_url = defender_url.rstrip("/")
        self._graph_url = graph_url.rstrip("/")
        self._cloud = cloud
        self._scopes = {"defender": cloud.defender_scope, "graph": cloud.graph_scope}
        self.retry = retry or RetryPolicy()
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=8, pool_maxsize=64)
            session.mount("https://", adapter)
        self._session = session
        self._timeout = timeout
        self._sleep = sleep
        self._rng = rng

    def close(self) -> None:
        self._session.close()

    def dialect(self, tenant: Tenant) -> Dialect:
        return DIALECTS[tenant.api]

    def _scope(self, tenant: Tenant, d: Dialect) -> str:
        """The token scope of a tenant's incident API in this cloud (none: that API does not exist here)."""
        scope = self._scopes[d.name]
        if not scope:
            raise NotConfigured(f"the {self._cloud.name} cloud has no {d.name} API; sync {tenant.name} from Graph")
        return scope

    def endpoint(self, tenant: Tenant) -> str:
        """The list URL: settings (or the tenant's regional Defender host, checked again here against the
        cloud, since a customer's token goes there) + a fixed path."""
        if tenant.api == "graph":
            return self._graph_url + GRAPH.path
        base = tenant.defender_url or self._defender_url
        if not base:
            raise NotConfigured(f"the {self._cloud.name} cloud has no Defender XDR API; sync {tenant.name} from Graph")
        if tenant.defender_url:
            try:
                check_defender_url(tenant.defender_url, self._cloud)
            except ValueError as exc:
                raise NotConfigured(f"tenant {tenant.name} names a Defender host outside the cloud") from exc
        return base.rstrip("/") + DEFENDER.path

    # -- requests ------------------------------------------------------------------------------------

    def list_page(
        self,
        tenant: Tenant,
        counter: CallCounter,
        *,
        low: int,
        high: int | None = None,
        skip: int = 0,
        next_link: str | None = None,
        max_wait: float | None = None,
    ) -> Page:
        """One page of ``lastUpdate ge low [and le high]``, newest first (or the page ``next_link`` names)."""
        d = self.dialect(tenant)
        url = self.endpoint(tenant)
        params: list[tuple[str, str]] | None
        if next_link is not None:
            if not _same_endpoint(next_link, url):
                raise IncidentApiError("the incident API sent a next link to another endpoint", diagnostic=next_link)
            url, params = next_link, None
        else:
            expr = f"{d.time_field} ge {format_ticks(low)}"
            if high is not None:
                expr += f" and {d.time_field} le {format_ticks(high)}"
            params = [("$filter", expr), ("$top", str(d.top)), *d.extra]
            if skip:
                params.append(("$skip", str(skip)))
        body = self._get(tenant, d, url, params, counter, max_wait)
        value = body.get("value")
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise IncidentApiError("the incident API answered without a list of incidents")
        link = body.get("@odata.nextLink")
        return Page(value, link if isinstance(link, str) and link else None)

    def probe(self, tenant: Tenant) -> int:
        """The smallest call (``$top=1``): does the tenant's incident API accept its token? Incidents returned."""
        d = self.dialect(tenant)
        body = self._get(tenant, d, self.endpoint(tenant), [("$top", "1")], CallCounter(), 0.0)
        value = body.get("value")
        if not isinstance(value, list):
            raise IncidentApiError("the incident API answered without a list of incidents")
        return len(value)

    def get_incident(
        self, tenant: Tenant, incident_id: str, counter: CallCounter, *, max_wait: float | None = None
    ) -> dict[str, Any] | None:
        """One incident by id (``None`` if the API does not know it)."""
        if parse_incident_id(incident_id) != incident_id:
            raise IncidentApiError("an incident id from the API is not usable", diagnostic=incident_id[:64])
        d = self.dialect(tenant)
        params = list(d.extra) or None
        try:
            body = self._get(tenant, d, f"{self.endpoint(tenant)}/{incident_id}", params, counter, max_wait)
        except _NotFoundError:
            return None
        body.pop("@odata.context", None)
        return body

    def _get(
        self,
        tenant: Tenant,
        d: Dialect,
        url: str,
        params: list[tuple[str, str]] | None,
        counter: CallCounter,
        max_wait: float | None,
    ) -> dict[str, Any]:
        limit = self.retry.max_wait if max_wait is None else max_wait
        attempt = 0
        while True:
            if not counter.use_slot():
                since = time.monotonic()
                _, granted = self._budget.reserve(
                    tenant.tenant_id,
                    want=counter.want,
                    hold=RESERVATION_SECONDS,
                    max_wait=0.0 if self.retry.instant else limit,
                )
                counter.granted(granted, since)
            token = self._issuer.acquire(tenant.tenant_id, self._scope(tenant, d))
            counter.calls += 1
            wait: float | None
            try:
                response = self._session.get(
                    url,
                    params=params,
                    headers={"Authorization": f"Bearer {token.value}", "Accept": "application/json"},
                    timeout=self._timeout,
                )
            except requests.RequestException as exc:
                failure: Exception = UpstreamUnavailable(
                    f"the {d.name} incident API cannot be reached", diagnostic=repr(exc), retry_after=30
                )
                wait = None
                cause: BaseException | None = exc
            else:
                cause = None
                status = response.status_code
                if status == 200:
                    try:
                        data = response.json()
                    except ValueError as exc:
                        raise IncidentApiError("the incident API sent a body that is not JSON") from exc
                    if not isinstance(data, dict):
                        raise IncidentApiError("the incident API sent a body that is not a JSON object")
                    return data
                if status == 404:
                    raise _NotFoundError()
                if status == 429:
                    counter.throttled += 1
                    counter.slots = 0  # the tenant is blocked: reserved calls are not sent
                    seconds = throttle_seconds(response) or 60.0
                    self._budget.block(tenant.tenant_id, seconds)
                    log.warning(
                        "incidents.api tenant=%s api=%s outcome=throttled wait_s=%.0f",
                        tenant.tenant_id,
                        d.name,
                        seconds,
                    )
                    if seconds > limit or self.retry.instant:
                        raise UpstreamThrottled(
                            f"the {d.name} incident API is throttling this tenant", retry_after=max(1, int(seconds))
                        )
                    self._sleep(seconds)
                    continue  # a throttled call is not a failed attempt: it is waited out, not retried blindly
                if status in (401, 403):
                    raise RoleMissing(
                        f"the {d.name} incident API refused the tenant's token ({status}); check consent and roles",
                        diagnostic=response.text[:300],
                    )
                if status < 500:
                    raise IncidentApiError(
                        f"the {d.name} incident API refused the request ({status})", diagnostic=response.text[:300]
                    )
                failure = UpstreamUnavailable(
                    f"the {d.name} incident API failed ({status})", diagnostic=response.text[:300], retry_after=30
                )
                raw = response.headers.get("Retry-After", "").strip()
                wait = float(raw) if raw.isdigit() else None
            attempt += 1
            if attempt >= self.retry.attempts:
                raise failure from cause
            pause = wait if wait is not None else self.retry.backoff(attempt, self._rng)
            if pause > limit:
                raise failure from cause
            log.info(
                "incidents.api tenant=%s api=%s outcome=retry attempt=%d wait_s=%.2f",
                tenant.tenant_id,
                d.name,
                attempt,
                pause,
            )
            if not self.retry.instant:
                self._sleep(pause)


class _NotFoundError(Exception):
    pass


def _same_endpoint(link: str, url: str) -> bool:
    a, b = urlsplit(link), urlsplit(url)
    return (a.scheme, a.hostname, a.port, a.path.rstrip("/")) == (b.scheme, b.hostname, b.port, b.path.rstrip("/"))
