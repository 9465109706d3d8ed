"""Consent states: signed, bound to one pending tenant, single-use and expiring, checked before storage."""

from __future__ import annotations

import concurrent.futures
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest

from broker.consent import ConsentLinks, ConsentStates, admin_consent_url
from broker.errors import (
    BrokerError,
    ConsentStateExpired,
    ConsentStateInvalid,
    ConsentStateMissing,
    ConsentStateUsed,
    NotConfigured,
)
from broker.settings import Secret, StorageSettings
from broker.storage import StorageAccount

TENANT = "7bba76b9-53c1-55af-9962-622c29d6e128"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class CountingTable:
    """The real table client, counting the calls made through it."""

    def __init__(self, table: object) -> None:
        self._table = table
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        self.calls += 1
        return getattr(self._table, name)


@pytest.fixture
def table(azurite: str) -> CountingTable:
    account = StorageAccount(StorageSettings(Secret(azurite), None, "c" + uuid.uuid4().hex[:10]))
    return CountingTable(account.table("consent"))


def test_a_state_redeems_once_for_the_tenant_it_was_made_for(table: CountingTable) -> None:
    """The state names its pending tenant; a second use is a replay."""
    states = ConsentStates(lambda: table, ttl_seconds=3600)  # type: ignore[arg-type,return-value]
    state, expires_at = states.issue("contoso", TENANT)
    pending = states.redeem(state)
    assert (pending.tenant_name, pending.tenant_id, pending.expires_at) == ("contoso", TENANT, expires_at)
    with pytest.raises(ConsentStateUsed):
        states.redeem(state)


def test_altered_forged_and_missing_states_are_refused_without_a_storage_call(
    table: CountingTable, azurite: str
) -> None:
    """Every altered character, a state from another key, garbage: refused from memory."""
    states = ConsentStates(lambda: table, ttl_seconds=3600)  # type: ignore[arg-type,return-value]
    state, _ = states.issue("contoso", TENANT)
    elsewhere = StorageAccount(StorageSettings(Secret(azurite), None, "c" + uuid.uuid4().hex[:10]))
    other = ConsentStates(lambda: elsewhere.table("consent"), ttl_seconds=3600)  # another broker, its own key
    forged, _ = other.issue("contoso", TENANT)
    before = table.calls
    flips = [state[:i] + ("A" if state[i] != "A" else "B") + state[i + 1 :] for i in range(0, len(state), 7)]
    for bad in [*flips, forged, "x" * 90, "../../etc", state + "=", state.upper()]:
        with pytest.raises(ConsentStateInvalid):
            states.redeem(bad)
    for absent in (None, ""):
        with pytest.raises(ConsentStateMissing):
            states.redeem(absent)
    assert table.calls == before
    assert states.redeem(state).tenant_id == TENANT  # the genuine one still works


def test_an_expired_state_is_refused_before_storage(table: CountingTable) -> None:
    """Past its time the state is refused from its signed expiry, with no storage call."""
    clock = Clock()
    states = ConsentStates(lambda: table, ttl_seconds=60, clock=clock)  # type: ignore[arg-type,return-value]
    state, expires_at = states.issue("contoso", TENANT)
    clock.now = expires_at + 1
    before = table.calls
    with pytest.raises(ConsentStateExpired):
        states.redeem(state)
    assert table.calls == before


def test_concurrent_redeems_of_one_state_succeed_exactly_once(table: CountingTable) -> None:
    """Sixteen simultaneous uses (two instances' worth of retries): one wins, the rest are replays."""
    states = ConsentStates(lambda: table, ttl_seconds=3600)  # type: ignore[arg-type,return-value]
    state, _ = states.issue("contoso", TENANT)

    def redeem(_: int) -> str:
        try:
            return states.redeem(state).tenant_id
        except BrokerError as exc:
            return exc.code

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(redeem, range(16)))
    assert results.count(TENANT) == 1
    assert results.count("consent_state_used") == 15


def test_the_key_is_shared_by_every_instance_on_the_same_storage(table: CountingTable) -> None:
    """A state made by one instance redeems on another (the key is created once, first writer wins)."""
    first = ConsentStates(lambda: table, ttl_seconds=3600)  # type: ignore[arg-type,return-value]
    second = ConsentStates(lambda: table, ttl_seconds=3600)  # type: ignore[arg-type,return-value]
    state, _ = first.issue("contoso", TENANT)
    assert second.redeem(state).tenant_name == "contoso"


def test_the_link_is_v2_admin_consent_with_scope_redirect_and_state(table: CountingTable) -> None:
    """{authority}/{tenant}/v2.0/adminconsent?client_id&scope={resource}/.default&redirect_uri&state."""
    states = ConsentStates(lambda: table, ttl_seconds=3600)  # type: ignore[arg-type,return-value]
    links = ConsentLinks(
        states,
        authority_host="https://login.microsoftonline.com",
        client_id="11111111-2222-3333-4444-555555555555",
        redirect_uri="https://broker.azurewebsites.net/api/consent/callback",
        scope_for=lambda api: (
            "https://graph.microsoft.com/.default" if api == "graph" else "https://api.security.microsoft.com/.default"
        ),
    )
    link = links.create("fabrikam", TENANT, "graph")
    parts = urlsplit(link.url)
    assert (
        f"{parts.scheme}://{parts.netloc}{parts.path}"
        == f"https://login.microsoftonline.com/{TENANT}/v2.0/adminconsent"
    )
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query["client_id"] == "11111111-2222-3333-4444-555555555555"
    assert query["scope"] == "https://graph.microsoft.com/.default"
    assert query["redirect_uri"] == "https://broker.azurewebsites.net/api/consent/callback"
    assert states.redeem(query["state"]).tenant_name == "fabrikam"
    assert admin_consent_url("https://h", TENANT, "c", scope="s", redirect_uri="r", state="x").startswith(
        f"https://h/{TENANT}/v2.0/adminconsent?"
    )


def test_no_redirect_uri_means_no_link(table: CountingTable) -> None:
    """Without WEBSITE_HOSTNAME or CONSENT_REDIRECT_URI the link cannot come back: say so, store nothing."""
    links = ConsentLinks(
        ConsentStates(lambda: table, ttl_seconds=3600),  # type: ignore[arg-type,return-value]
        authority_host="https://login.microsoftonline.com",
        client_id="11111111-2222-3333-4444-555555555555",
        redirect_uri=None,
        scope_for=lambda api: "https://api.security.microsoft.com/.default",
    )
    with pytest.raises(NotConfigured) as info:
        links.create("contoso", TENANT, "defender")
    assert "WEBSITE_HOSTNAME" in info.value.detail
    assert table.calls == 0
