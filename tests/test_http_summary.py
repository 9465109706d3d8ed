"""The one summary line per request: every route writes it through one helper, and no value can add a
pair or a line to it (read back with a strict ``key=value`` parser)."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest
from conftest import DEFENDER, BrokerServer
from starlette.requests import Request

from broker import requestlog
from broker.errors import BadRequest
from broker.http.summary import MAX_VALUE_CHARS, summarised
from sandbox.server import Sandbox

_PAIR = re.compile(r'([a-z_][a-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^\s"=]+)(?: |$)')
HOSTILE = [
    "a b=c",
    "x\nforged=1",
    "x\r\nforged=1",
    'say "k=v"',
    "back\\slash",
    "line\u2028separator",
    "caf\u00e9",
    "tab\there",
    "",
    "k=v",
    "x" * (MAX_VALUE_CHARS + 50),
]


def parse(message: str) -> tuple[str, dict[str, str]]:
    """``event k=v k="json" ...`` into the event and its pairs; fails on anything else in the line."""
    event, _, rest = message.partition(" ")
    pairs: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _PAIR.match(rest, position)
        assert match, f"not a key=value pair at {rest[position:][:60]!r}"
        key, raw = match.groups()
        assert key not in pairs, f"{key} appears twice"
        pairs[key] = json.loads(raw) if raw.startswith('"') else raw
        position = match.end()
    return event, pairs


def raw_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The summary lines logged so far (they reach the log in batches, one line per line of a message)."""
    requestlog.flush_all()
    return [line for r in caplog.records if r.name == "broker.http.summary" for line in r.getMessage().split("\n")]


def summary_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, str]]]:
    return [parse(line) for line in raw_lines(caplog)]


def _request(headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers or [], "query_string": b""})


def test_no_value_can_forge_a_pair_or_a_line(caplog: pytest.LogCaptureFixture) -> None:
    """Spaces, '=', quotes, CR/LF, U+2028 and non-ASCII come out inside one JSON string each, cut at the cap."""
    caplog.set_level(logging.INFO, logger="broker.http.summary")

    async def serve() -> None:
        async with summarised(_request(), "test.event", outcome="ok") as fields:
            for n, value in enumerate(HOSTILE):
                fields[f"v{n}"] = value

    asyncio.run(serve())
    [message] = raw_lines(caplog)
    assert not re.search(r"[\r\n\u2028\u2029\x00-\x1f\x7f-\uffff]", message)
    event, pairs = parse(message)
    assert event == "test.event"
    assert set(pairs) == {"outcome", "code", "duration_ms", "request_id"} | {f"v{n}" for n in range(len(HOSTILE))}
    for n, value in enumerate(HOSTILE):
        assert pairs[f"v{n}"] == value[:MAX_VALUE_CHARS]
    assert pairs["outcome"] == "ok"


def test_a_refusal_is_summarised_with_its_outcome_code_and_diagnostic(caplog: pytest.LogCaptureFixture) -> None:
    """A BrokerError leaving the block sets outcome and code; an unexpected error is a failure."""
    caplog.set_level(logging.INFO, logger="broker.http.summary")

    async def refuse() -> None:
        async with summarised(_request([(b"x-request-id", b"abc-123")]), "test.refuse", outcome="issued"):
            raise BadRequest("no", diagnostic="bad thing\nforged=1")

    async def crash() -> None:
        async with summarised(_request(), "test.crash", outcome="issued"):
            raise RuntimeError("boom")

    with pytest.raises(BadRequest):
        asyncio.run(refuse())
    with pytest.raises(RuntimeError):
        asyncio.run(crash())
    (_, refused), (_, crashed) = summary_lines(caplog)
    assert (refused["outcome"], refused["code"], refused["diagnostic"]) == (
        "denied",
        "bad_request",
        "bad thing\nforged=1",
    )
    assert refused["request_id"] == "abc-123"
    assert (crashed["outcome"], crashed["code"]) == ("failed", "internal")


def test_every_route_writes_one_summary_line_through_the_helper(
    broker: BrokerServer, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """Token, incidents, sync status and admin routes, served and refused: one parseable line per request,
    with a request id the caller cannot choose when it is not a sane token."""
    caplog.set_level(logging.INFO, logger="broker.http.summary")
    tenant = sandbox.directory.customer_tenants()[0].name
    hostile = {"X-Request-Id": 'rid" forged=1'}
    requests = [
        ("token.issue", lambda: broker.token(tenant, DEFENDER, headers=hostile)),
        ("token.issue", lambda: broker.token("not a tenant=1", DEFENDER)),
        ("incidents.request", lambda: broker.client.get("/api/incidents", params={"tenant": tenant})),
        ("incidents.request", lambda: broker.client.get("/api/incidents", params={"tenant": "a b=c\nforged=1"})),
        ("incidents.request", lambda: broker.client.get("/api/sync/status", headers=hostile)),
        ("admin.request", lambda: broker.client.get("/api/audit", params={"limit": "x y=z"})),
        ("admin.request", lambda: broker.client.post("/api/admin/tenants/x%20y=z/disable", json={})),
        ("admin.request", lambda: broker.client.post("/api/admin/callers/x%0Aforged=1/enable", json={})),
    ]
    statuses = []
    for expected, send in requests:
        caplog.clear()
        response = send()
        statuses.append(response.status_code)
        [(event, pairs)] = summary_lines(caplog)
        assert event == expected
        assert pairs["request_id"] == response.headers.get("X-Request-Id", pairs["request_id"])
        assert re.fullmatch(r"[0-9a-f]{32}|[A-Za-z0-9-]{1,64}", pairs["request_id"])
        assert pairs["outcome"] in {"issued", "ok", "allowed", "denied", "failed"}
        assert "forged" not in pairs
    assert statuses[0] == 200
    assert all(400 <= status < 500 for status in (statuses[1], statuses[3], statuses[5], statuses[6], statuses[7]))
