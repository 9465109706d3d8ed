"""Only well-formed tenant references get past the door; only registry GUIDs reach a URL."""

from __future__ import annotations

import pytest

from broker.errors import InvalidTenant
from broker.tenants import Tenant, canonical_guid, check_defender_url, normalize_reference

GUID = "0b6c1a4e-5f1d-4c3b-9a8e-2d7f6e5c4b3a"


@pytest.mark.parametrize(
    "value",
    [
        "../common",
        "evil.example/x",
        "%2e%2e",
        "organizations",
        "common",
        "consumers",
        "contoso.onmicrosoft.com",
        "contöso",
        "",
        " contoso",
        "a" * 65,
        "-contoso",
        "{" + GUID + "}",
        GUID + "/oauth2",
        "contoso?x=1",
        "con\ntoso",
        42,
        None,
        ["contoso"],
    ],
)
def test_malformed_references_are_refused(value: object) -> None:
    """Path tricks, reserved authorities, domains, non-ASCII and non-strings are all invalid_tenant."""
    with pytest.raises(InvalidTenant):
        normalize_reference(value)


@pytest.mark.parametrize(("value", "expected"), [("Contoso", "contoso"), (GUID.upper(), GUID), ("fab-1", "fab-1")])
def test_names_and_guids_are_normalized(value: str, expected: str) -> None:
    assert normalize_reference(value) == expected


def test_a_tenant_validates_itself() -> None:
    with pytest.raises(ValueError, match="GUID"):
        Tenant("contoso", "not-a-guid")
    with pytest.raises(ValueError, match="name"):
        Tenant("organizations", GUID)
    assert canonical_guid(GUID.upper()) == GUID


@pytest.mark.parametrize(
    "url",
    [
        "http://eu.api.security.microsoft.com",
        "https://evil.example",
        "https://eu.api.security.microsoft.com.evil.example",
        "https://user@eu.api.security.microsoft.com",
        "https://eu.api.security.microsoft.com/api?x=1",
    ],
)
def test_regional_defender_urls_are_only_microsoft_hosts(url: str) -> None:
    with pytest.raises(ValueError, match="defender_url"):
        check_defender_url(url)


def test_a_regional_defender_url_is_accepted() -> None:
    check_defender_url("https://eu.api.security.microsoft.com")
