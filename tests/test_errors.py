"""The error tree: stable codes, safe problem documents, and a runbook entry for every code."""

from __future__ import annotations

import json
from pathlib import Path

from broker import errors

ROOT = Path(__file__).resolve().parent.parent


def _classes() -> list[type[errors.BrokerError]]:
    found = [errors.BrokerError]
    for cls in found:
        found.extend(sorted(cls.__subclasses__(), key=lambda c: c.__name__))
    return found


def test_codes_are_unique_and_statuses_are_http_errors() -> None:
    """No two classes define the same code (BadRequest, Forbidden reuse their base's on purpose)."""
    codes = [cls.code for cls in _classes() if "code" in vars(cls)]
    assert len(codes) == len(set(codes)), sorted(c for c in codes if codes.count(c) > 1)
    assert all(400 <= cls.status < 600 for cls in _classes())


def test_every_code_has_a_runbook_entry() -> None:
    """docs/operations.md says what each code means and what to do about it."""
    runbook = (ROOT / "docs" / "operations.md").read_text()
    abstract = {"tenant_state", "upstream_error", "unavailable"}  # bases never raised themselves
    missing = [cls.code for cls in _classes() if cls.code not in abstract and f"| `{cls.code}` |" not in runbook]
    assert missing == []


def test_a_problem_document_carries_code_status_and_retry_after() -> None:
    error = errors.UpstreamThrottled(diagnostic="status=429 AADSTS50196", retry_after=17)
    body = json.loads(error.render("rid-1"))
    assert body["code"] == "upstream_throttled"
    assert body["status"] == 503
    assert body["retry_after"] == 17
    assert body["request_id"] == "rid-1"
    assert error.headers()["Retry-After"] == "17"
    assert "AADSTS" not in json.dumps(body), "the diagnostic is for logs, never for the caller"
