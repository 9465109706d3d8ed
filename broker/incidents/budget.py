"""The per-tenant incident-API budget, shared by every process and instance through a storage table.

Microsoft counts the incidents quota per application and tenant over *sliding* windows (50 calls a
minute, 1,500 an hour). Fixed per-minute counters would let 2x the budget through across a window
boundary, and an in-process token bucket would not see the other instances a queue-triggered app
scales out to (nor ``python -m broker sync`` run beside it). So the spend is persisted:

- one entity per tenant (``PartitionKey "budget"``, ``RowKey`` the tenant GUID) holds, for each limit,
  either the exact times of the calls still inside its window (limits up to ``EXACT_MAX`` calls — the
  minute budget) or call counts in 60 buckets of ``window / 60`` (the hour budget), counted
  conservatively (a bucket counts while any part of it is inside the window, so the count can only be
  too high, never too low);
- a call is taken by read → check every limit → conditional write (``If-Match`` the ETag read). Two
  instances racing for the last call: one write fails with 412 and re-reads. No call is ever sent
  without its slot having been written first;
- a window is counted ``MARGIN_SECONDS`` longer than its nominal length, so a request stamped here and
  delayed in flight cannot land inside the server's window beside a later one;
- an upstream 429 blocks the tenant for every instance (``BlockedUntil``) for the reset time it names.

``take`` waits (through the ``sleep`` seam) when the next slot is at most ``max_wait`` seconds away,
else raises ``SyncBudgetExhausted`` carrying ``retry_after``, which the sync turns into a deferral.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from broker.errors import SyncBudgetExhausted, UpstreamUnavailable

log = logging.getLogger(__name__)

PARTITION = "budget"
EXACT_MAX = 200
BUCKETS = 60
MARGIN_SECONDS = 1.0
MAX_CONFLICTS = 50


@dataclass(frozen=True)
class Limit:
    calls: int
    window: float

    @property
    def exact(self) -> bool:
        return self.calls <= EXACT_MAX

    @property
    def bucket(self) -> float:
        return self.window / BUCKETS


@dataclass
class _Spend:
    """What one tenant's entity says: per limit a list of call times or a bucket → count map."""

    logs: list[list[float]]
    buckets: list[dict[int, int]]
    blocked_until: float
    etag: str | None


class CallBudget:
    """Sliding-window call budgets per tenant, persisted with ETag-guarded writes."""

    def __init__(
        self,
        table: Callable[[], TableClient],
        limits: Sequence[tuple[int, float]],
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        margin: float = MARGIN_SECONDS,
    ) -> None:
        if not limits:
            raise ValueError("at least one limit")
        self._table = table
        self.limits = tuple(Limit(int(n), float(w)) for n, w in limits)
        self._clock = clock
        self._sleep = sleep
        self._margin = margin

    # -- public --------------------------------------------------------------------------------------

    def take(self, tenant_id: str, *, max_wait: float = 0.0) -> float:
        """Reserve one call now, waiting up to ``max_wait`` seconds; returns the seconds waited."""
        return self.reserve(tenant_id, max_wait=max_wait)[0]

    def reserve(self, tenant_id: str, *, want: int = 1, hold: float = 0.0, max_wait: float = 0.0) -> tuple[float, int]:
        """Reserve between 1 and ``want`` calls (as many as fit now, after waiting up to ``max_wait`` for the
        first) in one read and one write; returns (seconds waited, calls granted).

        The calls are counted as made ``hold`` seconds from now, the latest moment the caller may send
        them (it must drop the ones not sent by then): a window closes over them no earlier than over a
        call really sent at any time in between, so a reservation never lets more calls through than the
        limits allow. A run paging back to back thereby writes the budget once for several pages."""
        waited = 0.0
        conflicts = 0
        while True:
            spend = self._read(tenant_id)
            now = self._clock()
            wait = self._wait_needed(spend, now)
            if wait <= 0:
                granted = max(1, min(want, self._room(spend, now)))
                self._record(spend, now, granted, now + hold)
                if self._write(tenant_id, spend):
                    return waited, granted
                conflicts += 1
                if conflicts > MAX_CONFLICTS:
                    raise UpstreamUnavailable("the sync budget table is contended", retry_after=5)
                continue
            if waited + wait > max_wait:
                raise SyncBudgetExhausted(
                    f"no incident API call left for tenant {tenant_id} for {math.ceil(wait)} s",
                    retry_after=max(1, math.ceil(wait)),
                )
            self._sleep(wait)
            waited += wait

    def block(self, tenant_id: str, seconds: float) -> None:
        """The API said 429: nobody calls for this tenant for ``seconds``."""
        for _ in range(MAX_CONFLICTS):
            spend = self._read(tenant_id)
            spend.blocked_until = max(spend.blocked_until, self._clock() + seconds)
            if self._write(tenant_id, spend):
                return

    def used(self, tenant_id: str) -> list[int]:
        """Calls counted in each window right now (for status and tests)."""
        spend = self._read(tenant_id)
        now = self._clock()
        return [self._count(limit, spend, i, now) for i, limit in enumerate(self.limits)]

    # -- the arithmetic ------------------------------------------------------------------------------

    def _count(self, limit: Limit, spend: _Spend, i: int, now: float) -> int:
        start = now - limit.window - self._margin
        if limit.exact:
            return sum(1 for t in spend.logs[i] if t > start)
        first = math.floor(start / limit.bucket)
        return sum(n for b, n in spend.buckets[i].items() if b >= first)

    def _wait_needed(self, spend: _Spend, now: float) -> float:
        wait = max(0.0, spend.blocked_until - now)
        for i, limit in enumerate(self.limits):
            span = limit.window + self._margin
            if limit.exact:
                inside = sorted(t for t in spend.logs[i] if t > now - span)
                if len(inside) >= limit.calls:
                    # the call that must leave the window before one more fits
                    wait = max(wait, inside[len(inside) - limit.calls] + span - now)
            else:
                first = math.floor((now - span) / limit.bucket)
                counted = sorted((b, n) for b, n in spend.buckets[i].items() if b >= first)
                total = sum(n for _, n in counted)
                for b, n in counted:
                    if total < limit.calls:
                        break
                    total -= n
                    wait = max(wait, (b + 1) * limit.bucket + span - now)
        return wait

    def _room(self, spend: _Spend, now: float) -> int:
        """Calls every limit still allows right now."""
        return min(limit.calls - self._count(limit, spend, i, now) for i, limit in enumerate(self.limits))

    def _record(self, spend: _Spend, now: float, calls: int = 1, stamp: float | None = None) -> None:
        at = now if stamp is None else stamp
        for i, limit in enumerate(self.limits):
            span = limit.window + self._margin
            if limit.exact:
                spend.logs[i] = [t for t in spend.logs[i] if t > now - span] + [at] * calls
            else:
                first = math.floor((now - span) / limit.bucket)
                kept = {b: n for b, n in spend.buckets[i].items() if b >= first}
                here = math.floor(at / limit.bucket)
                kept[here] = kept.get(here, 0) + calls
                spend.buckets[i] = kept

    # -- storage -------------------------------------------------------------------------------------

    def _read(self, tenant_id: str) -> _Spend:
        n = len(self.limits)
        try:
            entity = self._table().get_entity(PARTITION, tenant_id)
        except ResourceNotFoundError:
            return _Spend([[] for _ in range(n)], [{} for _ in range(n)], 0.0, None)
        except AzureError as exc:
            raise UpstreamUnavailable("the sync budget cannot be read", diagnostic=repr(exc), retry_after=5) from exc
        try:
            state = json.loads(str(entity.get("Spend") or "{}"))
            logs = [[float(t) for t in x] for x in state.get("logs", [])]
            buckets = [{int(k): int(v) for k, v in x.items()} for x in state.get("buckets", [])]
        except (ValueError, TypeError, AttributeError):
            log.error("budget.read tenant=%s outcome=corrupt action=reset", tenant_id)
            logs, buckets = [], []
        if len(logs) != n or len(buckets) != n:  # the limits changed: keep what still lines up
            logs = (logs + [[] for _ in range(n)])[:n]
            buckets = (buckets + [{} for _ in range(n)])[:n]
        return _Spend(logs, buckets, float(entity.get("BlockedUntil") or 0.0), entity.metadata.get("etag"))

    def _write(self, tenant_id: str, spend: _Spend) -> bool:
        entity = {
            "PartitionKey": PARTITION,
            "RowKey": tenant_id,
            "Spend": json.dumps(
                {"logs": [[round(t, 3) for t in x] for x in spend.logs], "buckets": spend.buckets},
                separators=(",", ":"),
            ),
            "BlockedUntil": float(spend.blocked_until),
        }
        table = self._table()
        try:
            if spend.etag is None:
                table.create_entity(entity)
            else:
                table.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=spend.etag, match_condition=MatchConditions.IfNotModified
                )
        except ResourceExistsError:
            return False
        except HttpResponseError as exc:
            if exc.status_code in (409, 412):
                return False
            raise UpstreamUnavailable("the sync budget cannot be written", diagnostic=repr(exc), retry_after=5) from exc
        except AzureError as exc:
            raise UpstreamUnavailable("the sync budget cannot be written", diagnostic=repr(exc), retry_after=5) from exc
        return True
