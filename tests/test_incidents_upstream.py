"""The incident-API client and the persisted call budget: time parsing, 429 bodies, retries, next links,
and sliding windows shared by instances (Azurite, a fake clock)."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from conftest import INSTANT, build_container

from broker.errors import IncidentApiError, SyncBudgetExhausted, UpstreamThrottled, UpstreamUnavailable
from broker.incidents.budget import CallBudget
from broker.incidents.ticks import format_ticks, parse_ticks
from broker.incidents.upstream import CallCounter, IncidentApiClient, RetryPolicy, throttle_seconds
from broker.storage import StorageAccount
from broker.wiring import Container
from sandbox.server import Sandbox
from sandbox.state import Fault


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def storage(azurite: str) -> StorageAccount:
    from broker.settings import Secret, StorageSettings

    return StorageAccount(StorageSettings(Secret(azurite), None, "q" + uuid.uuid4().hex[:10]))


def test_timestamps_keep_microsoft_100ns_resolution() -> None:
    """Seven fraction digits, offsets and missing fractions all parse to exact ticks and format back."""
    assert format_ticks(parse_ticks("2020-09-06T14:46:57.0733333Z")) == "2020-09-06T14:46:57.0733333Z"
    assert parse_ticks("2020-09-06T16:46:57.0733333+02:00") == parse_ticks("2020-09-06T14:46:57.0733333Z")
    assert parse_ticks("2020-09-06T14:46Z") + 1 == parse_ticks("2020-09-06T14:46:00.0000001Z")
    with pytest.raises(ValueError, match="ISO"):
        parse_ticks("yesterday")


def _response(status: int, body: str, headers: dict[str, str] | None = None) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r.raw = io.BytesIO(body.encode())
    r.headers.update(headers or {})
    return r


def test_a_429_is_read_from_retry_after_or_from_the_window_in_the_body() -> None:
    """Retry-After wins; else Defender's "maximum allowed N per HH:MM:SS" names the window to wait."""
    assert throttle_seconds(_response(429, "{}", {"Retry-After": "7"})) == 7
    minute = '{"error": {"code": "429", "message": "API calls quota exceeded! maximum allowed 50 per 00:01:00"}}'
    hour = '{"error": {"code": "429", "message": "API calls quota exceeded! maximum allowed 1500 per 01:00:00"}}'
    assert throttle_seconds(_response(429, minute)) == 60
    assert throttle_seconds(_response(429, hour)) == 3600
    assert throttle_seconds(_response(429, "Too Many Requests")) is None


def test_the_budget_is_a_sliding_window_shared_by_instances(storage: StorageAccount) -> None:
    """Two budget objects (two instances) share one table: 3 calls per 10 s in any window, never more."""
    clock = FakeClock()
    a = CallBudget(lambda: storage.table("budget"), [(3, 10.0)], clock=clock, sleep=clock.sleep, margin=0.5)
    b = CallBudget(lambda: storage.table("budget"), [(3, 10.0)], clock=clock, sleep=clock.sleep, margin=0.5)
    stamps = []
    for budget in (a, b, a):
        budget.take("t1")
        stamps.append(clock.now)
        clock.now += 2
    with pytest.raises(SyncBudgetExhausted) as refused:
        b.take("t1", max_wait=1)
    assert refused.value.retry_after == 5  # the first call leaves the (10 + 0.5) s window at +10.5
    b.take("t1", max_wait=60)
    assert clock.now == pytest.approx(stamps[0] + 10.5)
    assert a.used("t1") == [3]
    assert a.used("t2") == [0]


def test_a_reservation_grants_what_fits_and_counts_it_as_sent_at_the_end_of_its_hold(
    storage: StorageAccount,
) -> None:
    """reserve() takes several calls in one write, never more than fit, and they leave the window only
    a window after the hold ends (the latest moment they may be sent), so the limit holds either way."""
    clock = FakeClock()
    a = CallBudget(lambda: storage.table("budget"), [(3, 10.0)], clock=clock, sleep=clock.sleep, margin=0.5)
    b = CallBudget(lambda: storage.table("budget"), [(3, 10.0)], clock=clock, sleep=clock.sleep, margin=0.5)
    assert a.reserve("t1", want=2, hold=4.0) == (0.0, 2)
    assert b.reserve("t1", want=8, hold=4.0) == (0.0, 1)  # only one more fits
    assert a.used("t1") == [3]
    start = clock.now
    with pytest.raises(SyncBudgetExhausted) as refused:
        b.take("t1", max_wait=10)
    assert refused.value.retry_after == 15  # hold 4 + window 10 + margin 0.5
    assert b.take("t1", max_wait=60) == pytest.approx(14.5)
    assert clock.now == pytest.approx(start + 14.5)


def test_the_hour_budget_counts_in_buckets_and_never_undercounts(storage: StorageAccount) -> None:
    """Limits above 200 calls keep 60 buckets per window, counted whole: conservative, never too few."""
    clock = FakeClock(3600.0 * 1000)
    budget = CallBudget(lambda: storage.table("budget"), [(300, 3600.0)], clock=clock, sleep=clock.sleep, margin=0)
    for _ in range(300):
        budget.take("t")
        clock.now += 1
    with pytest.raises(SyncBudgetExhausted) as refused:
        budget.take("t")
    # exactly, the first call leaves at +3600 s (3300 s from now); a bucket may hold it up to 60 s more
    assert 3300 <= (refused.value.retry_after or 0) <= 3360


def test_a_429_blocks_the_tenant_for_every_instance(storage: StorageAccount) -> None:
    """block() is persisted: another budget object waits it out too."""
    clock = FakeClock()
    a = CallBudget(lambda: storage.table("budget"), [(50, 60.0)], clock=clock, sleep=clock.sleep)
    b = CallBudget(lambda: storage.table("budget"), [(50, 60.0)], clock=clock, sleep=clock.sleep)
    a.block("t", 60)
    with pytest.raises(SyncBudgetExhausted):
        b.take("t", max_wait=10)
    assert b.take("t", max_wait=60) == pytest.approx(60)


@pytest.fixture
def container(sandbox: Sandbox, azurite: str) -> Iterator[Container]:
    c = build_container(sandbox, azurite, retry=INSTANT, SYNC_LOOKBACK_DAYS="3650")
    try:
        yield c
    finally:
        c.close()


def api_client(
    c: Container, budget: CallBudget, *, retry: RetryPolicy = INSTANT, sleep: Callable[[float], None] = time.sleep
) -> IncidentApiClient:
    """The upstream client built through its constructor, on the container's token issuer and settings,
    with a budget (and sleep) the test can read."""
    return IncidentApiClient(
        c.issuer,
        budget,
        defender_url=c.settings.defender_api_url,
        graph_url=c.settings.graph_api_url,
        retry=retry,
        sleep=sleep,
    )


def _tenant(sandbox: Sandbox, c: Container, count: int) -> Any:
    name = "d" + uuid.uuid4().hex[:10]
    t = sandbox.directory.add_customer_tenant(name)
    sandbox.incidents.seed_tenant(t.tenant_id, count)
    return c.tenants.add(name, t.tenant_id)


def test_5xx_is_retried_then_served(sandbox: Sandbox, container: Container) -> None:
    """Two 503s then a page: three calls, each taken from the budget."""
    tenant = _tenant(sandbox, container, 3)
    sandbox.recorder.inject(Fault(service="defender", status=503, path_contains="/api/incidents", times=2))
    budget = CallBudget(lambda: container.storage.table("budget"), [(50, 60.0)])
    counter = CallCounter()
    page = api_client(container, budget).list_page(tenant, counter, low=0)
    assert len(page.incidents) == 3
    assert counter.calls == 3
    assert budget.used(tenant.tenant_id) == [3]


def test_persistent_5xx_gives_up_after_the_attempts(sandbox: Sandbox, container: Container) -> None:
    """The retry cap holds: four attempts, then UpstreamUnavailable."""
    tenant = _tenant(sandbox, container, 3)
    sandbox.recorder.inject(Fault(service="defender", status=500, path_contains="/api/incidents", times=None))
    counter = CallCounter()
    with pytest.raises(UpstreamUnavailable):
        container.incidents.api.list_page(tenant, counter, low=0)
    assert counter.calls == RetryPolicy().attempts


def test_a_next_link_to_another_host_is_never_followed(sandbox: Sandbox, container: Container) -> None:
    """The tenant's token goes only to the endpoint built from settings."""
    tenant = _tenant(sandbox, container, 3)
    before = sandbox.recorder.total("defender")
    with pytest.raises(IncidentApiError):
        container.incidents.api.list_page(
            tenant, CallCounter(), low=0, next_link="https://evil.example/api/incidents?$skip=100"
        )
    assert sandbox.recorder.total("defender") == before


def test_defender_next_links_are_followed_when_the_service_sends_them(sandbox: Sandbox, container: Container) -> None:
    """With @odata.nextLink on (undocumented upstream) the sync still ends exact."""
    tenant = _tenant(sandbox, container, 230)
    sandbox.incidents.defender_next_link = True
    try:
        report = container.incidents.run(tenant)
    finally:
        sandbox.incidents.defender_next_link = False
    assert report.outcome == "complete"
    assert report.stored == 230


def test_ties_larger_than_a_page_are_stepped_through(sandbox: Sandbox, container: Container) -> None:
    """150 incidents sharing one lastUpdateTime: keyset paging cannot move, so $skip steps inside the tie."""
    name = "d" + uuid.uuid4().hex[:10]
    t = sandbox.directory.add_customer_tenant(name)
    for _ in range(150):
        sandbox.incidents.add_incident(t.tenant_id, alerts=0, lastUpdateTime="2024-06-01T00:00:00Z")
    tenant = container.tenants.add(name, t.tenant_id)
    report = container.incidents.run(tenant)
    assert report.outcome == "complete"
    assert report.stored == 150


QUOTA_BODY = '{"error": {"code": "429", "message": "API calls quota exceeded! maximum allowed 50 per 00:00:20"}}'


@pytest.mark.parametrize(
    ("headers", "body", "window"),
    [({"Retry-After": "7"}, "{}", 7.0), ({}, QUOTA_BODY, 20.0)],
    ids=["retry-after", "defender-body-window"],
)
def test_a_short_429_is_waited_out_in_process_through_the_sleep_seam(
    sandbox: Sandbox, container: Container, headers: dict[str, str], body: str, window: float
) -> None:
    """A 429 whose window fits in max_wait is slept (through ``sleep=``) for exactly Retry-After, or the
    window in Defender's body, before the one retry; with ``instant=True`` the same 429 is a deferral."""
    tenant = _tenant(sandbox, container, 3)
    clock = FakeClock()
    waits: list[tuple[float, int]] = []

    def sleep(seconds: float) -> None:
        waits.append((seconds, sandbox.recorder.total("defender") - before))
        clock.sleep(seconds)

    def client(retry: RetryPolicy) -> IncidentApiClient:
        budget = CallBudget(lambda: container.storage.table("budget"), [(50, 60.0)], clock=clock, sleep=sleep)
        return api_client(container, budget, retry=retry, sleep=sleep)

    def throttle() -> None:
        fault = Fault(service="defender", status=429, body=body, headers=headers, path_contains="/api/incidents")
        sandbox.recorder.inject(fault)

    throttle()
    before = sandbox.recorder.total("defender")
    counter = CallCounter()
    page = client(RetryPolicy(max_wait=30.0)).list_page(tenant, counter, low=0)
    assert len(page.incidents) == 3
    assert (counter.calls, counter.throttled) == (2, 1)
    assert waits == [(window, 1)]  # one wait, after the throttled call and before the retry

    clock.now += 3600  # the window above has passed
    throttle()
    waits.clear()
    before = sandbox.recorder.total("defender")
    with pytest.raises(UpstreamThrottled) as deferred:
        client(RetryPolicy(max_wait=30.0, instant=True)).list_page(tenant, CallCounter(), low=0)
    assert deferred.value.retry_after == int(window)
    assert waits == []
    assert sandbox.recorder.total("defender") - before == 1
