"""The sync ``BrokerCredential`` and its async twin behave the same towards a broker: every test here runs
against both, over real HTTP to a loopback stand-in of the broker's token route."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import partner_broker_client
import partner_broker_client.aio
import pytest
from azure.core.credentials import AccessToken, AccessTokenInfo, SupportsTokenInfo, TokenCredential
from azure.core.credentials_async import AsyncSupportsTokenInfo, AsyncTokenCredential
from broker_standin import (
    CALLER_TOKEN,
    SCOPE,
    TENANT_GUID,
    Answer,
    AsyncCallerCredential,
    CallerCredential,
    StandInBroker,
    problem,
)
from partner_broker_client import BrokerAuthenticationError

BROKER_SCOPE = "api://broker/.default"
CLAIMS = json.dumps({"access_token": {"nbf": {"essential": True, "value": "1700000000"}}})


class Driver:
    """One credential, sync or async, driven through the same calls."""

    def __init__(self, flavor: str, broker_url: str, **kwargs: Any) -> None:
        self.flavor = flavor
        options: dict[str, Any] = {
            "tenant": "contoso",
            "broker_url": broker_url,
            "broker_scope": BROKER_SCOPE,
            "retry_backoff_factor": 0.01,
            **kwargs,
        }
        if flavor == "sync":
            self.own: Any = CallerCredential()
            self.credential: Any = partner_broker_client.BrokerCredential(credential=self.own, **options)
        else:
            self.loop = asyncio.new_event_loop()
            self.own = AsyncCallerCredential()
            self.credential = partner_broker_client.aio.BrokerCredential(credential=self.own, **options)

    def _run(self, value: Any) -> Any:
        return self.loop.run_until_complete(value) if self.flavor == "async" else value

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return self._run(self.credential.get_token(*scopes, **kwargs))  # type: ignore[no-any-return]

    def get_token_info(self, *scopes: str, **options: Any) -> AccessTokenInfo:
        return self._run(self.credential.get_token_info(*scopes, options=options or None))  # type: ignore[no-any-return]

    def many(self, n: int) -> list[AccessTokenInfo]:
        """``n`` concurrent misses: threads for the sync credential, tasks for the async one."""
        if self.flavor == "sync":
            with ThreadPoolExecutor(n) as pool:
                return list(pool.map(lambda _: self.credential.get_token_info(SCOPE), range(n)))

        async def gather() -> list[AccessTokenInfo]:
            return list(await asyncio.gather(*(self.credential.get_token_info(SCOPE) for _ in range(n))))

        return self.loop.run_until_complete(gather())  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.flavor == "sync":
            self.credential.close()
        else:
            self.loop.run_until_complete(self.credential.close())
            self.loop.close()


@pytest.fixture
def broker() -> Iterator[StandInBroker]:
    with StandInBroker() as server:
        yield server


@pytest.fixture(params=["sync", "async"])
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def driver(flavor: str, broker: StandInBroker) -> Iterator[Driver]:
    d = Driver(flavor, broker.url)
    yield d
    d.close()


def test_the_twins_implement_the_azure_core_protocols() -> None:
    """The sync credential is a TokenCredential and SupportsTokenInfo; the async one their async twins."""
    sync = partner_broker_client.BrokerCredential(
        tenant="contoso", broker_url="https://broker.example", credential=CallerCredential(), broker_scope="x"
    )
    async_ = partner_broker_client.aio.BrokerCredential(
        tenant="contoso", broker_url="https://broker.example", credential=AsyncCallerCredential(), broker_scope="x"
    )
    assert isinstance(sync, TokenCredential)
    assert isinstance(sync, SupportsTokenInfo)
    assert isinstance(async_, AsyncTokenCredential)
    assert isinstance(async_, AsyncSupportsTokenInfo)
    assert asyncio.iscoroutinefunction(async_.get_token)
    assert partner_broker_client.__version__ == partner_broker_client.VERSION


def test_one_round_trip_then_the_cache(driver: Driver, broker: StandInBroker) -> None:
    """The first call asks the broker with the caller's bearer token; the next ones are served from memory."""
    first = driver.get_token(SCOPE)
    second = driver.get_token_info(SCOPE)
    assert second.token == first.token
    assert second.expires_on == first.expires_on
    assert second.refresh_on == second.expires_on - 300
    assert len(broker.seen) == 1
    seen = broker.seen[0]
    assert seen.path == "/api/token"
    assert seen.headers["authorization"] == f"Bearer {CALLER_TOKEN}"
    assert seen.body == {"tenant": "contoso", "scope": SCOPE, "min_ttl_seconds": 300}


def test_user_agent_names_the_client_and_the_caller(flavor: str, broker: StandInBroker) -> None:
    """The user agent is azure-core's, with this distribution's moniker and the caller's own prefix."""
    d = Driver(flavor, broker.url, user_agent="soc-dashboard/2.1")
    try:
        d.get_token(SCOPE)
    finally:
        d.close()
    agent = broker.seen[0].headers["user-agent"]
    assert agent.startswith("soc-dashboard/2.1 azsdk-python-partner-broker-client/0.1.0 Python/")


def test_claims_bypass_the_cache_and_reach_the_broker(driver: Driver, broker: StandInBroker) -> None:
    """A claims challenge asks the broker again, with the claims; the new token then replaces the cached one."""
    cached = driver.get_token(SCOPE)
    challenged = driver.get_token(SCOPE, claims=CLAIMS)
    assert challenged.token != cached.token
    assert broker.seen[1].body["claims"] == CLAIMS
    again = driver.get_token_info(SCOPE)
    assert again.token == challenged.token
    by_options = driver.get_token_info(SCOPE, claims=CLAIMS)
    assert by_options.token not in (cached.token, challenged.token)
    assert len(broker.seen) == 3


def test_claims_must_be_a_json_object(driver: Driver, broker: StandInBroker) -> None:
    """A claims value that is not a JSON object (say, still base64) is refused before any request."""
    with pytest.raises(ValueError, match="JSON object"):
        driver.get_token(SCOPE, claims="eyJhY2Nlc3NfdG9rZW4iOnt9fQ==")
    assert broker.seen == []


def test_tenant_id_may_name_the_bound_tenant(driver: Driver, broker: StandInBroker) -> None:
    """A fresh credential accepts its tenant's name or GUID (confirmed against the broker's answer)."""
    by_guid = driver.get_token(SCOPE, tenant_id=TENANT_GUID.upper())
    assert broker.seen[0].body["tenant"] == "contoso"
    assert driver.get_token(SCOPE, tenant_id="Contoso").token == by_guid.token
    assert driver.get_token_info(SCOPE, tenant_id=TENANT_GUID).token == by_guid.token
    assert len(broker.seen) == 1


def test_another_tenant_is_refused(driver: Driver, broker: StandInBroker) -> None:
    """Another tenant's name, or (once the GUID is known) another GUID, is refused without a request."""
    with pytest.raises(BrokerAuthenticationError) as refused:
        driver.get_token(SCOPE, tenant_id="fabrikam")
    assert refused.value.code == "tenant_mismatch"
    assert broker.seen == []
    driver.get_token(SCOPE)
    with pytest.raises(BrokerAuthenticationError) as refused:
        driver.get_token(SCOPE, tenant_id="11111111-2222-3333-4444-555555555555")
    assert refused.value.code == "tenant_mismatch"
    assert len(broker.seen) == 1


def test_a_fresh_credential_refuses_a_guid_the_broker_does_not_confirm(driver: Driver, broker: StandInBroker) -> None:
    """An unknown GUID on a fresh credential is checked against the answer, and the token is not handed out."""
    with pytest.raises(BrokerAuthenticationError) as refused:
        driver.get_token(SCOPE, tenant_id="11111111-2222-3333-4444-555555555555")
    assert refused.value.code == "tenant_mismatch"
    assert len(broker.seen) == 1
    with pytest.raises(BrokerAuthenticationError):
        driver.get_token(SCOPE, tenant_id="11111111-2222-3333-4444-555555555555")
    assert len(broker.seen) == 1


def test_retry_after_is_honoured(driver: Driver, broker: StandInBroker) -> None:
    """A 429 with Retry-After is retried after that many seconds, and the token is then handed out."""
    broker.queue(problem(429, "rate_limited", **{"Retry-After": "1"}))
    token = driver.get_token(SCOPE)
    assert token.token.startswith("issued-token-")
    assert len(broker.seen) == 2
    assert broker.seen[1].at - broker.seen[0].at >= 0.95


def test_a_long_retry_after_is_left_to_the_caller(driver: Driver, broker: StandInBroker) -> None:
    """A Retry-After above the cap (30 s by default) is not slept through: the refusal carries it."""
    broker.queue(problem(503, "upstream_throttled", **{"Retry-After": "120"}))
    with pytest.raises(BrokerAuthenticationError) as refused:
        driver.get_token(SCOPE)
    assert (refused.value.code, refused.value.status_code, refused.value.retry_after) == (
        "upstream_throttled",
        503,
        120,
    )
    assert len(broker.seen) == 1


def test_server_errors_are_retried_a_bounded_number_of_times(driver: Driver, broker: StandInBroker) -> None:
    """A 502 without Retry-After is retried with backoff, at most retry_total (3) times."""
    broker.queue(*[problem(502, "upstream_error")] * 4)
    with pytest.raises(BrokerAuthenticationError) as refused:
        driver.get_token(SCOPE)
    assert refused.value.code == "upstream_error"
    assert len(broker.seen) == 4


def test_a_refusal_carries_the_problem_code(driver: Driver, broker: StandInBroker) -> None:
    """A 403 is raised at once as ClientAuthenticationError with the code, status and request id."""
    broker.queue(problem(403, "forbidden"))
    with pytest.raises(BrokerAuthenticationError) as refused:
        driver.get_token(SCOPE)
    assert (refused.value.code, refused.value.status_code) == ("forbidden", 403)
    assert len(refused.value.request_id) == 32
    assert len(broker.seen) == 1


def test_an_answer_that_is_not_a_token_is_refused(driver: Driver, broker: StandInBroker) -> None:
    """A 200 whose body is not a token (a proxy's page, say) raises bad_response."""
    broker.queue(Answer(200, b"<html>hello</html>", content_type="text/html"))
    with pytest.raises(BrokerAuthenticationError) as refused:
        driver.get_token(SCOPE)
    assert refused.value.code == "bad_response"


def test_an_unreachable_broker(flavor: str) -> None:
    """No broker listening: broker_unreachable once the bounded retries are spent."""
    with StandInBroker() as gone:
        url = gone.url
    d = Driver(flavor, url, retry_total=1)
    try:
        with pytest.raises(BrokerAuthenticationError) as refused:
            d.get_token(SCOPE)
    finally:
        d.close()
    assert refused.value.code == "broker_unreachable"


def test_concurrent_misses_make_one_request(flavor: str) -> None:
    """Eight callers missing the cache together share one broker round trip."""
    with StandInBroker(delay=0.2) as slow:
        d = Driver(flavor, slow.url)
        try:
            tokens = d.many(8)
        finally:
            d.close()
        assert len({t.token for t in tokens}) == 1
        assert len(slow.seen) == 1


def test_no_token_reaches_the_log(driver: Driver, broker: StandInBroker, caplog: pytest.LogCaptureFixture) -> None:
    """With every logger at DEBUG, neither the caller's token nor the issued one is logged; a summary line is."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="azure")  # another component may have quietened the Azure SDKs
    caplog.set_level(logging.DEBUG, logger="azure.core.pipeline.policies.http_logging_policy")
    broker.queue(problem(429, "rate_limited", **{"Retry-After": "0"}))
    token = driver.get_token(SCOPE)
    driver.get_token(SCOPE, claims=CLAIMS)
    assert "broker.token tenant=contoso" in caplog.text
    assert "Authorization" in caplog.text  # azure-core's HTTP logging ran, with the header redacted
    assert CALLER_TOKEN not in caplog.text
    assert token.token not in caplog.text
    assert "issued-token-" not in caplog.text


def test_min_ttl_is_what_the_broker_is_asked_for(flavor: str, broker: StandInBroker) -> None:
    """A token is reused only while more than min_ttl_seconds remain, and min_ttl_seconds is sent on."""
    broker.lifetime = 1000
    d = Driver(flavor, broker.url, min_ttl_seconds=999)
    try:
        first = d.get_token(SCOPE)
        time.sleep(1.1)
        second = d.get_token(SCOPE)
    finally:
        d.close()
    assert second.token != first.token
    assert [s.body["min_ttl_seconds"] for s in broker.seen] == [999, 999]


@pytest.mark.parametrize(
    ("url", "kwargs", "error"),
    [
        ("http://broker.example.net", {}, "https"),
        ("ftp://broker.example.net", {}, "https"),
        ("https://broker.example.net?x=1", {}, "query"),
        ("https://broker.example.net", {"min_ttl_seconds": 3001}, "min_ttl_seconds"),
        ("https://broker.example.net", {"tenant": " "}, "tenant"),
    ],
)
def test_bad_construction_is_refused(flavor: str, url: str, kwargs: dict[str, Any], error: str) -> None:
    """Plain http off loopback, other schemes, a query, an out-of-range TTL or a blank tenant are refused."""
    options: dict[str, Any] = {"tenant": "contoso", "broker_url": url, "broker_scope": BROKER_SCOPE, **kwargs}
    cls = partner_broker_client.BrokerCredential if flavor == "sync" else partner_broker_client.aio.BrokerCredential
    own = CallerCredential() if flavor == "sync" else AsyncCallerCredential()
    with pytest.raises(ValueError, match=error):
        cls(credential=own, **options)


def test_exactly_one_scope(driver: Driver, broker: StandInBroker) -> None:
    """Tokens are for one resource at a time."""
    with pytest.raises(ValueError, match="exactly one"):
        driver.get_token(SCOPE, "https://api.security.microsoft.com/.default")
    assert broker.seen == []


def test_the_async_credential_never_blocks_the_loop() -> None:
    """While a slow broker answers, the event loop keeps running other work."""

    async def scenario(url: str) -> tuple[int, str]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        async with partner_broker_client.aio.BrokerCredential(
            tenant="contoso", broker_url=url, credential=AsyncCallerCredential(), broker_scope=BROKER_SCOPE
        ) as credential:
            task = asyncio.create_task(ticker())
            token = await credential.get_token(SCOPE)
            stop.set()
            await task
        return ticks, token.token

    with StandInBroker(delay=0.5) as slow:
        ticks, token = asyncio.run(scenario(slow.url))
    assert token.startswith("issued-token-")
    assert ticks >= 10  # a blocked loop would have ticked once


def test_leaving_async_with_closes_it_but_not_the_callers_credential(broker: StandInBroker) -> None:
    """``async with`` closes the credential (tokens forgotten, transport closed); the wrapped one stays open."""

    async def scenario() -> None:
        own = AsyncCallerCredential()
        credential = partner_broker_client.aio.BrokerCredential(
            tenant="contoso", broker_url=broker.url, credential=own, broker_scope=BROKER_SCOPE
        )
        async with credential:
            await credential.get_token(SCOPE)
            await credential.get_token(SCOPE)
        assert len(broker.seen) == 1
        assert not own.closed
        with pytest.raises(ValueError, match="closed"):
            await credential.get_token(SCOPE)
        assert len(broker.seen) == 1

    asyncio.run(scenario())
