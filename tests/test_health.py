"""Tenant health: kept in memory, written on a change of state or once per interval, never per request."""

from __future__ import annotations

import uuid

import pytest

from broker.health import HealthBook
from broker.settings import Secret, StorageSettings
from broker.storage import StorageAccount

TENANT = "7bba76b9-53c1-55af-9962-622c29d6e128"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def account(azurite: str) -> StorageAccount:
    return StorageAccount(StorageSettings(Secret(azurite), None, "h" + uuid.uuid4().hex[:10]))


def test_repeated_successes_write_once_per_interval_not_per_report(account: StorageAccount) -> None:
    """1,000 successes in one interval: one write; the next interval: one more."""
    clock = Clock()
    book = HealthBook(lambda: account.table("tenanthealth"), write_interval=60, clock=clock)
    for _ in range(1000):
        book.success(TENANT, "token")
        clock.now += 0.01
    book.flush()
    assert book.writes == 1
    clock.now += 60
    book.success(TENANT, "token")
    book.flush()
    assert book.writes == 2
    book.close()


def test_a_change_of_state_is_written_at_once_and_seen_by_another_instance(account: StorageAccount) -> None:
    """Revoked consent after one failure, then recovery: each change reaches storage, readable elsewhere."""
    clock = Clock()
    book = HealthBook(lambda: account.table("tenanthealth"), write_interval=3600, clock=clock)
    other = HealthBook(lambda: account.table("tenanthealth"), write_interval=3600, clock=clock)
    book.success(TENANT, "token")
    clock.now += 1
    book.failure(TENANT, "consent_required", "token")
    book.flush()
    seen = other.view()[TENANT]
    assert seen.consent == "revoked"
    assert seen.consecutive_failures == 1
    assert seen.last_failure_code == "consent_required"
    assert seen.healthy is False
    for _ in range(5):  # the same failure again: counted in memory, not written (same state)
        clock.now += 1
        book.failure(TENANT, "consent_required", "token")
    book.flush()
    assert book.writes == 2
    assert book.local(TENANT) is not None
    assert book.local(TENANT).consecutive_failures == 6  # type: ignore[union-attr]
    clock.now += 1
    book.success(TENANT, "sync")
    book.flush()
    recovered = other.view()[TENANT]
    assert (recovered.consent, recovered.consecutive_failures, recovered.healthy) == ("granted", 0, True)
    assert recovered.last_failure_code == "consent_required"  # the last failure stays on record
    assert book.writes == 3
    book.close()
    other.close()


@pytest.mark.parametrize(
    ("before", "code", "after"),
    [
        ("unknown", "consent_required", "missing"),
        ("granted", "consent_required", "revoked"),
        ("granted", "role_missing", "role_missing"),
        ("granted", "upstream_unavailable", "granted"),
        ("refused", "consent_required", "refused"),
    ],
)
def test_consent_state_follows_what_entra_said(account: StorageAccount, before: str, code: str, after: str) -> None:
    book = HealthBook(lambda: account.table("tenanthealth"))
    if before == "granted":
        book.success(TENANT, "token")
    elif before == "refused":
        book.consent_refused(TENANT, "access_denied")
    book.failure(TENANT, code, "token")
    record = book.local(TENANT)
    assert record is not None
    assert record.consent == after
    book.close()
