"""One GUID rule: every entry point that takes a GUID agrees on which spellings are GUIDs and on their
canonical form."""

from __future__ import annotations

import json

import pytest
from test_settings import GOOD

from broker.callers import normalize_principal
from broker.errors import InvalidTenant
from broker.identifiers import parse_guid
from broker.policy import Policy, PolicyError
from broker.settings import Settings, SettingsError
from broker.tenants import canonical_guid, normalize_reference

CANONICAL = "7bba76b9-53c1-55af-9962-622c29d6e128"
SPELLINGS = {
    CANONICAL: CANONICAL,
    CANONICAL.upper(): CANONICAL,
    "7Bba76B9-53c1-55AF-9962-622c29d6E128": CANONICAL,
    "{" + CANONICAL + "}": None,
    "urn:uuid:" + CANONICAL: None,
    CANONICAL.replace("-", ""): None,
    CANONICAL.replace("-", "_"): None,
    CANONICAL[:-1] + "g": None,
    CANONICAL[:-1]: None,
    CANONICAL + "0": None,
    "\u0667" + CANONICAL[1:]: None,  # an Arabic-Indic seven: int() and uuid.UUID take it, a URL must not
    "\uff17" + CANONICAL[1:]: None,  # a fullwidth seven
}
DEFENDER_SCOPE = "https://api.security.microsoft.com/.default"


def _settings(value: str) -> str | None:
    try:
        return Settings.from_environ({**GOOD, "BROKER_CLIENT_ID": value}).broker_client_id
    except SettingsError as exc:
        if exc.problems != ["BROKER_CLIENT_ID: not a GUID"]:
            raise
        return None


def _policy(value: str) -> str | None:
    entry = {"name": "svc", "object_id": value, "tenants": ["*"], "scopes": ["*"]}
    try:
        policy = Policy.parse(json.dumps({"callers": [entry]}), [DEFENDER_SCOPE])
    except PolicyError:
        return None
    [grant] = policy.grants
    return grant.object_id


def _registry(value: str) -> str | None:
    try:
        return canonical_guid(value)
    except ValueError:
        return None


def _reference(value: str) -> str | None:
    try:
        return normalize_reference(value)
    except InvalidTenant:
        return None


def _kill_switch(value: str) -> str | None:
    try:
        return normalize_principal(value)
    except ValueError:
        return None


@pytest.mark.parametrize(("spelling", "expected"), SPELLINGS.items())
def test_every_guid_entry_point_applies_the_one_rule(spelling: str, expected: str | None) -> None:
    """Settings, caller policy, tenant registry, tenant references and kill switches accept the same
    spellings, as the same canonical GUID, and refuse the same ones."""
    assert parse_guid(spelling) == expected
    assert _settings(spelling) == expected
    assert _policy(spelling) == expected
    assert _registry(spelling) == expected
    assert _kill_switch(spelling) == expected
    if expected is not None:
        assert _reference(spelling) == expected
    else:  # a tenant reference may also be a name: refused, or taken as a name, never as a GUID
        assert _reference(spelling) in (None, spelling.lower())
