"""The incident world: per customer tenant, one list of incident records that both API stand-ins serve from,
with Microsoft's per-tenant rate-limit windows, a call log, and hooks that change the data between pages.

A test compares what an API returned with ``world.truth()``; ``world.clock`` drives windows and update
times without sleeping.
"""

from __future__ import annotations

import bisect
import copy
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sandbox.security.generator import Generator, tenant_domain
from sandbox.security.odata import Clause, Schema, matches
from sandbox.security.records import CLASSIFICATIONS, DEFENDER_STATUSES, SEVERITIES, Incident
from sandbox.security.timestamps import TICKS_PER_SECOND, format_ticks, ticks_from_datetime, to_ticks

log = logging.getLogger(__name__)

APIS = ("defender", "graph")
DEFAULT_LIMITS: dict[str, tuple[tuple[int, float], ...]] = {
    "defender": ((50, 60.0), (1500, 3600.0)),
    "graph": ((150, 60.0),),
}
DEFAULT_SEED_START = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


@dataclass
class _Tenant:
    domain: str
    incidents: dict[int, Incident] = field(default_factory=dict)
    next_id: int = 0
    rng: random.Random = field(default_factory=random.Random)
    tenant_id_override: str | None = None
    override_ids: set[int] | None = None  # None: every incident


@dataclass
class _PageHook:
    api: str | None
    at: int
    callback: Callable[[IncidentWorld], Any]


@dataclass(frozen=True)
class Throttle:
    """Why a call was refused: the limit it hit and how long until a slot frees up."""

    limit: int
    window: float
    retry_after: float


class IncidentWorld:
    """Thread-safe store of per-tenant incidents, rate-limit windows, call logs and page hooks."""

    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        self._lock = threading.RLock()
        self._tenants: dict[str, _Tenant] = {}
        #: Seconds since the epoch; replace it to drive rate-limit windows and update times without sleeping.
        self.clock: Callable[[], float] = clock or time.time
        #: Add ``@odata.nextLink`` to Defender pages when more rows remain (undocumented upstream; off).
        self.defender_next_link = False
        #: Whether a refused (429) call still counts against the window, as Microsoft says it does.
        self.throttled_calls_count = True
        self._limits: dict[str, tuple[tuple[int, float], ...]] = dict(DEFAULT_LIMITS)
        self._tenant_limits: dict[tuple[str, str], tuple[tuple[int, float], ...]] = {}
        self._calls: dict[tuple[str, str], list[float]] = {}
        self._counted: dict[tuple[str, str], list[float]] = {}
        self._throttled: dict[tuple[str, str], int] = {}
        self._pages: dict[tuple[str, str | None], int] = {}
        self._hooks: dict[str, list[_PageHook]] = {}

    # ----- data --------------------------------------------------------------------------------------

    def _tenant(self, tenant_id: str) -> _Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            rng = random.Random(f"tenant:{tenant_id}")
            tenant = _Tenant(domain=tenant_domain(rng), next_id=rng.randint(100_000, 900_000), rng=rng)
            self._tenants[tenant_id] = tenant
        return tenant

    def _now_ticks(self) -> int:
        return int(self.clock() * TICKS_PER_SECOND)

    def tenants(self) -> list[str]:
        with self._lock:
            return sorted(self._tenants)

    def seed_tenant(
        self,
        tenant_id: str,
        count: int,
        *,
        seed: int | str = 0,
        alerts_per_incident: int | None = None,
        start: datetime | str | None = None,
    ) -> list[dict[str, Any]]:
        """Add ``count`` incidents made only from (tenant, seed, arguments): the same call gives the same data.

        Created times advance from ``start`` (default 2024-05-01T08:00Z) by 30 s to 1 h each; about one in ten
        incidents shares its ``lastUpdateTime`` with the one before (ties happen upstream). ``alerts_per_incident``
        None: 1-4 alerts each. Returns the new incidents as Defender documents.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        rng = random.Random(f"seed:{tenant_id}:{seed}:{count}:{alerts_per_incident}")
        at = to_ticks(start) if start is not None else ticks_from_datetime(DEFAULT_SEED_START)
        with self._lock:
            tenant = self._tenant(tenant_id)
            gen = Generator(rng, tenant_id, tenant.domain)
            made: list[Incident] = []
            previous_update: int | None = None
            for _ in range(count):
                at += rng.randint(30 * TICKS_PER_SECOND, 3600 * TICKS_PER_SECOND)
                created = at
                if previous_update is not None and previous_update >= created and rng.random() < 0.1:
                    updated = previous_update
                else:
                    updated = created + rng.choice((0, rng.randint(1, 7200 * TICKS_PER_SECOND)))
                previous_update = updated
                status = rng.choices(("Active", "InProgress", "Resolved"), weights=(70, 10, 20))[0]
                inc = self._build(tenant, gen, created, updated, status, alerts_per_incident)
                made.append(inc)
            return [copy.deepcopy(i.defender()) for i in made]

    def _build(
        self,
        tenant: _Tenant,
        gen: Generator,
        created: int,
        updated: int,
        status: str,
        alerts: int | None,
        incident_id: int | None = None,
    ) -> Incident:
        rng = gen.rng
        if incident_id is None:
            incident_id = tenant.next_id
            tenant.next_id += rng.randint(1, 3)
        else:
            tenant.next_id = max(tenant.next_id, incident_id + 1)
        n_alerts = alerts if alerts is not None else rng.randint(1, 4)
        alert_docs = [gen.alert(incident_id, created, updated, status) for _ in range(n_alerts)]
        sources = {a["serviceSource"] for a in alert_docs}
        devices = {d["mdatpDeviceId"] for a in alert_docs for d in a["devices"]}
        if len(alert_docs) == 1:
            name = alert_docs[0]["title"]
            if devices:
                name += " on one endpoint"
        else:
            categories = sorted({a["category"] for a in alert_docs})[:2]
            name = f"Multi-stage incident involving {' & '.join(categories)}"
            if devices:
                name += f" on {len(devices)} endpoints" if len(devices) > 1 else " on one endpoint"
            if len(sources) > 1:
                name += " reported by multiple sources"
        resolved = status == "Resolved"
        inc = Incident(
            incident_id=incident_id,
            name=name,
            created=created,
            last_update=updated,
            assigned_to=gen.person() if rng.random() < 0.5 else None,
            classification=rng.choice(("FalsePositive", "TruePositive")) if resolved else "Unknown",
            determination=rng.choice(("Malware", "SecurityTesting", "Other")) if resolved else "NotAvailable",
            detection_source=alert_docs[0]["detectionSource"] if alert_docs else None,
            status=status,
            severity=max((a["severity"] for a in alert_docs), key=SEVERITIES.index, default="Informational"),
            tags=["Demo"] if rng.random() < 0.1 else [],
            system_tags=["Ransomware"] if any(a["category"] == "Impact" for a in alert_docs) else [],
            comments=[
                {
                    "comment": "Triaged, escalating to tier 2",
                    "createdBy": gen.person(),
                    "createdTime": format_ticks(updated),
                }
            ]
            if rng.random() < 0.2
            else [],
            alerts=alert_docs,
        )
        tenant.incidents[incident_id] = inc
        return inc

    def add_incident(self, tenant_id: str, **fields: Any) -> dict[str, Any]:
        """Add one incident. ``fields`` use Defender names; ``alerts`` may be a count or a list of alert dicts.

        Unset fields are generated; ``createdTime`` and ``lastUpdateTime`` default to ``world.clock``'s now.
        """
        alerts = fields.pop("alerts", None)
        with self._lock:
            tenant = self._tenant(tenant_id)
            gen = Generator(tenant.rng, tenant_id, tenant.domain)
            now = self._now_ticks()
            created = to_ticks(fields.pop("createdTime", now))
            updated = to_ticks(fields.pop("lastUpdateTime", max(now, created)))
            status = fields.pop("status", "Active")
            incident_id = fields.pop("incidentId", None)
            if incident_id is not None and int(incident_id) in tenant.incidents:
                raise ValueError(f"incident {incident_id} already exists")
            n_alerts = alerts if isinstance(alerts, int) else (0 if alerts is not None else None)
            inc = self._build(
                tenant,
                gen,
                created,
                updated,
                _enum(status, DEFENDER_STATUSES, "status"),
                n_alerts,
                None if incident_id is None else int(incident_id),
            )
            if isinstance(alerts, list):
                inc.alerts = [dict(a, incidentId=inc.incident_id) for a in alerts]
            self._apply(inc, fields)
            return copy.deepcopy(inc.defender())

    def update_incident(self, tenant_id: str, incident_id: int, **changes: Any) -> dict[str, Any]:
        """Change fields (Defender names) and bump ``lastUpdateTime`` (to now, and always forward)."""
        with self._lock:
            inc = self._get(tenant_id, incident_id)
            explicit = changes.pop("lastUpdateTime", None)
            self._apply(inc, changes)
            inc.last_update = to_ticks(explicit) if explicit is not None else self._bump(inc.last_update)
            return copy.deepcopy(inc.defender())

    def merge(self, tenant_id: str, source_id: int, target_id: int) -> dict[str, Any]:
        """Merge ``source`` into ``target``: the source becomes Redirected with ``redirectIncidentId``; its alerts
        move to the target; both get a new ``lastUpdateTime``. Returns the target."""
        with self._lock:
            source = self._get(tenant_id, source_id)
            target = self._get(tenant_id, target_id)
            if source is target:
                raise ValueError("cannot merge an incident into itself")
            moved = [dict(a, incidentId=target.incident_id) for a in source.alerts]
            target.alerts = target.alerts + moved
            source.alerts = []
            source.status = "Redirected"
            source.redirect_incident_id = target.incident_id
            stamp = self._bump(max(source.last_update, target.last_update))
            source.last_update = stamp
            target.last_update = stamp
            return copy.deepcopy(target.defender())

    def _bump(self, previous: int) -> int:
        return max(self._now_ticks(), previous + 1)

    def _get(self, tenant_id: str, incident_id: int) -> Incident:
        tenant = self._tenants.get(tenant_id)
        inc = tenant.incidents.get(int(incident_id)) if tenant else None
        if inc is None:
            raise KeyError(f"no incident {incident_id} in tenant {tenant_id}")
        return inc

    def _apply(self, inc: Incident, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if key == "incidentName":
                inc.name = str(value)
            elif key == "assignedTo":
                inc.assigned_to = value
            elif key == "classification":
                inc.classification = _enum(value, (*CLASSIFICATIONS, "InformationalExpectedActivity"), key)
            elif key == "determination":
                inc.determination = str(value)
            elif key == "detectionSource":
                inc.detection_source = value
            elif key == "status":
                inc.status = _enum(value, DEFENDER_STATUSES, key)
            elif key == "severity":
                inc.severity = _enum(value, SEVERITIES, key)
            elif key == "tags":
                inc.tags = list(value)
            elif key == "systemTags":
                inc.system_tags = list(value)
            elif key == "comments":
                inc.comments = [dict(c) for c in value]
            elif key == "redirectIncidentId":
                inc.redirect_incident_id = None if value is None else int(value)
            elif key == "createdTime":
                inc.created = to_ticks(value)
            elif key == "description":
                inc.description = value
            else:
                raise ValueError(f"unknown incident field {key!r}")

    def simulate_activity(self, tenant_id: str, *, new: int, updated: int) -> tuple[list[int], list[int]]:
        """What a live tenant does in a while: ``new`` incidents created now and ``updated`` existing open ones
        changed now (status, severity or assignment). Returns the ids created and the ids updated."""
        with self._lock:
            tenant = self._tenant(tenant_id)
            rng = tenant.rng
            gen = Generator(rng, tenant_id, tenant.domain)
            now = self._now_ticks()
            created = [self._build(tenant, gen, now, now, "Active", None).incident_id for _ in range(new)]
            open_ids = sorted(i for i, inc in tenant.incidents.items() if inc.status in ("Active", "InProgress"))
            changed = rng.sample(open_ids, min(updated, len(open_ids)))
            for incident_id in changed:
                inc = tenant.incidents[incident_id]
                choice = rng.choice(("status", "severity", "assignedTo"))
                if choice == "status":
                    self._apply(inc, {"status": "InProgress" if inc.status == "Active" else "Resolved"})
                elif choice == "severity":
                    self._apply(inc, {"severity": rng.choice(SEVERITIES)})
                else:
                    self._apply(inc, {"assignedTo": gen.person()})
                inc.last_update = self._bump(inc.last_update)
            return created, changed

    def truth(self, tenant_id: str) -> list[dict[str, Any]]:
        """Every incident of the tenant as Defender documents, in the API's default order (most recent first)."""
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            if tenant is None:
                return []
            ordered = _order(list(tenant.incidents.values()), descending=True)
            return copy.deepcopy([i.defender() for i in ordered])

    def set_tenant_id_override(
        self, tenant_id: str, other: str | None, incident_ids: Iterable[int] | None = None
    ) -> None:
        """Make Graph report ``tenantId=other`` for this tenant's incidents (all, or only ``incident_ids``).
        ``other=None`` removes the override."""
        with self._lock:
            tenant = self._tenant(tenant_id)
            tenant.tenant_id_override = other
            tenant.override_ids = None if incident_ids is None else {int(i) for i in incident_ids}

    def reset(self) -> None:
        """Forget every tenant, call log, limit override and hook (switches return to their defaults)."""
        with self._lock:
            self._tenants.clear()
            self._limits = dict(DEFAULT_LIMITS)
            self._tenant_limits.clear()
            self._calls.clear()
            self._counted.clear()
            self._throttled.clear()
            self._pages.clear()
            self._hooks.clear()
            self.defender_next_link = False
            self.throttled_calls_count = True

    # ----- rate limits and call log ----------------------------------------------------------------

    def set_rate_limits(
        self, api: str, limits: Iterable[tuple[int, float]] | None, *, tenant_id: str | None = None
    ) -> None:
        """``limits``: (calls, window seconds) pairs, e.g. ``[(50, 60), (1500, 3600)]``; ``[]`` means no limit.
        With ``tenant_id``, for that tenant only (``None`` limits: back to the world's). Without, the world's
        default for ``api`` (``None``: back to Microsoft's)."""
        _check_api(api)
        with self._lock:
            parsed = None if limits is None else tuple((int(n), float(w)) for n, w in limits)
            if tenant_id is not None:
                if parsed is None:
                    self._tenant_limits.pop((tenant_id, api), None)
                else:
                    self._tenant_limits[(tenant_id, api)] = parsed
            else:
                self._limits[api] = DEFAULT_LIMITS[api] if parsed is None else parsed

    def rate_limits(self, api: str, tenant_id: str | None = None) -> tuple[tuple[int, float], ...]:
        with self._lock:
            if tenant_id is not None and (tenant_id, api) in self._tenant_limits:
                return self._tenant_limits[(tenant_id, api)]
            return self._limits[api]

    def admit(self, tenant_id: str, api: str) -> Throttle | None:
        """Log one call now; None if within every window, else the :class:`Throttle` that refused it."""
        _check_api(api)
        with self._lock:
            now = self.clock()
            key = (tenant_id, api)
            counted = self._counted.setdefault(key, [])
            refused: Throttle | None = None
            for limit, window in self.rate_limits(api, tenant_id):
                first = bisect.bisect_right(counted, now - window)
                if len(counted) - first >= limit:
                    oldest = counted[len(counted) - limit]
                    refused = Throttle(limit, window, max(0.0, oldest + window - now))
                    break
            bisect.insort(self._calls.setdefault(key, []), now)
            if refused is None or self.throttled_calls_count:
                bisect.insort(counted, now)
            if refused is not None:
                self._throttled[key] = self._throttled.get(key, 0) + 1
            return refused

    def call_times(self, tenant_id: str, api: str) -> list[float]:
        """Clock readings of every authenticated call (served or refused) this tenant made to ``api``."""
        with self._lock:
            return list(self._calls.get((tenant_id, api), []))

    def max_calls_in_window(self, tenant_id: str, api: str, seconds: float) -> int:
        """The most calls seen in any sliding window of ``seconds`` (a window ending at t holds (t - s, t])."""
        times = self.call_times(tenant_id, api)
        best = 0
        lo = 0
        for hi, t in enumerate(times):
            while times[lo] <= t - seconds:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def throttled_count(self, tenant_id: str, api: str) -> int:
        """How many 429s this tenant got from ``api``."""
        with self._lock:
            return self._throttled.get((tenant_id, api), 0)

    def reset_calls(self, tenant_id: str | None = None) -> None:
        """Forget call logs, windows and 429 counts (of one tenant, or all)."""
        with self._lock:
            for store in (self._calls, self._counted, self._throttled):
                for key in [k for k in store if tenant_id is None or k[0] == tenant_id]:
                    del store[key]

    def call_stats(self, tenant_id: str, api: str) -> dict[str, Any]:
        with self._lock:
            return {
                "tenant": tenant_id,
                "api": api,
                "calls": len(self._calls.get((tenant_id, api), [])),
                "throttled": self.throttled_count(tenant_id, api),
                "pages": self.pages_served(tenant_id, api),
                "max_per_minute": self.max_calls_in_window(tenant_id, api, 60),
                "max_per_hour": self.max_calls_in_window(tenant_id, api, 3600),
                "call_times": self.call_times(tenant_id, api),
                "limits": [list(x) for x in self.rate_limits(api, tenant_id)],
            }

    # ----- page hooks ------------------------------------------------------------------------------

    def pages_served(self, tenant_id: str, api: str | None = None) -> int:
        """List pages (200 answers to a list request) served to the tenant, by ``api`` or by either."""
        with self._lock:
            return self._pages.get((tenant_id, api), 0)

    def on_page(
        self,
        tenant_id: str,
        page_number: int,
        callback: Callable[[IncidentWorld], Any],
        *,
        api: str | None = None,
    ) -> None:
        """Run ``callback(world)`` right after the ``page_number``-th list page from now (1 = the next page) has
        been rendered for this tenant, before the client can ask for the following one. ``api`` limits the
        count to one API."""
        if page_number < 1:
            raise ValueError("page_number starts at 1")
        if api is not None:
            _check_api(api)
        with self._lock:
            at = self._pages.get((tenant_id, api), 0) + page_number
            self._hooks.setdefault(tenant_id, []).append(_PageHook(api, at, callback))

    def queue_mutation(
        self, tenant_id: str, after_page: int, action: str, *, api: str | None = None, **args: Any
    ) -> None:
        """:meth:`on_page` with a named action: ``update`` (incident_id, changes), ``add`` (fields), ``merge``
        (source_id, target_id). Used by the control routes, where no callback can travel."""
        if action == "update":
            incident_id, changes = int(args["incident_id"]), dict(args.get("changes") or {})

            def run(world: IncidentWorld) -> Any:
                return world.update_incident(tenant_id, incident_id, **changes)

        elif action == "add":
            fields = dict(args.get("fields") or {})

            def run(world: IncidentWorld) -> Any:
                return world.add_incident(tenant_id, **fields)

        elif action == "merge":
            source, target = int(args["source_id"]), int(args["target_id"])

            def run(world: IncidentWorld) -> Any:
                return world.merge(tenant_id, source, target)

        else:
            raise ValueError(f"unknown action {action!r}")
        self.on_page(tenant_id, after_page, run, api=api)

    def page_served(self, tenant_id: str, api: str) -> None:
        """Count a served list page and run the hooks now due (outside the lock; a failing hook is logged)."""
        for callback in self._count_page(tenant_id, api):
            try:
                callback(self)
            except Exception:
                log.exception("page hook failed tenant=%s api=%s", tenant_id, api)

    def _count_page(self, tenant_id: str, api: str) -> list[Callable[[IncidentWorld], Any]]:
        with self._lock:
            due: list[Callable[[IncidentWorld], Any]] = []
            for key in ((tenant_id, api), (tenant_id, None)):
                self._pages[key] = self._pages.get(key, 0) + 1
            hooks = self._hooks.get(tenant_id, [])
            keep = []
            for hook in hooks:
                if self._pages[(tenant_id, hook.api)] >= hook.at:
                    due.append(hook.callback)
                else:
                    keep.append(hook)
            self._hooks[tenant_id] = keep
            return due

    # ----- queries (used by the apps) --------------------------------------------------------------

    def query(
        self,
        tenant_id: str,
        clauses: list[Clause],
        schema: Schema,
        order: tuple[str, bool],
        skip: int,
        top: int,
        render: Callable[[Incident], dict[str, Any]],
    ) -> tuple[list[dict[str, Any]], int]:
        """(rendered page, total rows matching); rendering happens under the lock, on one snapshot."""
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            rows = [i for i in (tenant.incidents.values() if tenant else ()) if matches(i, clauses, schema)]
            rows = _order(rows, descending=order[1], key=order[0])
            page = rows[skip : skip + top]
            return [render(i) for i in page], len(rows)

    def find(self, tenant_id: str, incident_id: int, render: Callable[[Incident], dict[str, Any]]) -> Any:
        """One incident rendered under the lock, or None if the tenant has no such incident."""
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            inc = tenant.incidents.get(incident_id) if tenant else None
            return None if inc is None else render(inc)

    def graph_tenant_id(self, tenant_id: str, incident_id: int) -> str:
        """The ``tenantId`` Graph reports on this incident (see :meth:`set_tenant_id_override`)."""
        tenant = self._tenants.get(tenant_id)
        if tenant is None or tenant.tenant_id_override is None:
            return tenant_id
        if tenant.override_ids is None or incident_id in tenant.override_ids:
            return tenant.tenant_id_override
        return tenant_id


def _order(rows: list[Incident], *, descending: bool, key: str = "last_update") -> list[Incident]:
    return sorted(rows, key=lambda i: (getattr(i, key), i.incident_id), reverse=descending)


def _enum(value: Any, allowed: tuple[str, ...], name: str) -> str:
    for a in allowed:
        if str(value).lower() == a.lower():
            return a
    raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_api(api: str) -> None:
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}; got {api!r}")
