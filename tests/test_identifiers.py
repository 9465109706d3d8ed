"""One GUID rule and one incident-id rule: every entry point that takes a GUID agrees on which spellings are
GUIDs and on their canonical form; the incident-id rule accepts what the store accepts."""

from __future__ import annotations

import json

import pytest
from test_settings import GOOD

from broker.callers import normalize_principal
from broker.errors import InvalidTenant
from broker.identifiers import parse_guid
from broker.incidents.dialects import DEFENDER, GRAPH
from broker.incidents.records import IncidentRecord, parse_incident_id
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


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2972395, "2972395"),
        ("2972395", "2972395"),
        ("ed2d4ea3-merged", "ed2d4ea3-merged"),
        ("a" * 64, "a" * 64),
        ("a" * 65, None),
        ("-1", None),
        ("../1", None),
        ("1/2", None),
        ("1?x=2", None),
        ("", None),
        (True, None),
        (1.5, None),
        (None, None),
    ],
)
def test_the_incident_id_rule(value: object, expected: str | None) -> None:
    """Integers and strings of letters, digits, '_' and '-' (not first), at most 64: nothing that could
    change a request path."""
    assert parse_incident_id(value) == expected


def test_a_record_takes_any_id_the_rule_accepts_from_either_api() -> None:
    """The store keys what the rule accepts; the same rule guards the path of a fetch by id."""
    stamp = "2024-06-01T00:00:00Z"
    defender = IncidentRecord.from_api({"incidentId": 12, "lastUpdateTime": stamp}, DEFENDER)
    graph = IncidentRecord.from_api({"id": "abc-7", "lastUpdateDateTime": stamp, "redirectIncidentId": "x_9"}, GRAPH)
    assert (defender.incident_id, graph.incident_id, graph.merged_into) == ("12", "abc-7", "x_9")
    with pytest.raises(ValueError, match="usable id"):
        IncidentRecord.from_api({"id": "a/b", "lastUpdateDateTime": stamp}, GRAPH)
