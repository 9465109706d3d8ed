"""Only well-formed tenant references get past the door; only registry GUIDs reach a URL."""

from __future__ import annotations

import concurrent.futures
import time
import uuid

import pytest

from broker.clouds import CLOUDS
from broker.errors import InvalidTenant, UnknownTenant
from broker.identifiers import guid_shaped
from broker.settings import Secret, StorageSettings
from broker.storage import StorageAccount
from broker.tenants import (
    Tenant,
    TenantRegistry,
    canonical_guid,
    check_defender_url,
    normalize_reference,
)

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


class _CountingTable:
    """A stand-in table that counts scans (the registry's only read)."""

    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows = rows
        self.scans = 0

    def query_entities(self, *_: object, **__: object) -> list[dict[str, object]]:
        self.scans += 1
        time.sleep(0.02)
        return list(self.rows)


def test_a_stale_snapshot_is_reloaded_once_however_many_requests_wait() -> None:
    """Requests that queue behind a reload use its result instead of reloading again (no reload storm)."""
    now = [0.0]
    table = _CountingTable([{"RowKey": "contoso", "TenantId": GUID}])
    registry = TenantRegistry(lambda: table, refresh_seconds=10, clock=lambda: now[0])  # type: ignore[arg-type,return-value]
    assert registry.resolve("contoso").tenant_id == GUID
    now[0] = 11.0
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(registry.resolve, ["contoso"] * 64))
    assert {t.tenant_id for t in found} == {GUID}
    assert table.scans == 2


def test_unknown_names_reload_at_most_once_a_second() -> None:
    now = [0.0]
    table = _CountingTable([{"RowKey": "contoso", "TenantId": GUID}])
    registry = TenantRegistry(lambda: table, refresh_seconds=10, clock=lambda: now[0])  # type: ignore[arg-type,return-value]
    registry.resolve("contoso")
    for name in ("nobody1", "nobody2", "nobody3"):
        with pytest.raises(UnknownTenant):
            registry.resolve(name)
    assert table.scans == 1
    now[0] = 1.5
    with pytest.raises(UnknownTenant):
        registry.resolve("nobody4")
    assert table.scans == 2


@pytest.mark.parametrize(
    "name",
    [GUID, GUID.replace("-", ""), "0b6c1a4e5f1d-4c3b-9a8e-2d7f6e5c4b3a", "0b6c-1a4e-5f1d-4c3b-9a8e-2d7f-6e5c-4b3a"],
)
def test_a_tenant_name_never_looks_like_a_guid(name: str) -> None:
    """Names and GUIDs are separate namespaces: a GUID-shaped name is refused however it is hyphenated."""
    with pytest.raises(ValueError, match="looks like a GUID"):
        Tenant(name, "7bba76b9-53c1-55af-9962-622c29d6e128")
    assert guid_shaped(name)
    assert not guid_shaped("contoso-0b6c1a4e")


@pytest.mark.parametrize("ref", [GUID.replace("-", ""), "0b6c-1a4e-5f1d-4c3b-9a8e-2d7f-6e5c-4b3a"])
def test_a_guid_shaped_reference_that_is_not_a_guid_is_invalid(ref: str) -> None:
    with pytest.raises(InvalidTenant):
        normalize_reference(ref)


def test_the_registry_looks_names_and_guids_up_apart_and_withholds_bad_rows() -> None:
    """A GUID-shaped row and two rows claiming one GUID are reported and not served; good rows are."""
    other = "7bba76b9-53c1-55af-9962-622c29d6e128"
    third = "1d6ea8d0-48dd-55a5-9ff1-ea4ef8d4389a"
    table = _CountingTable(
        [
            {"RowKey": "contoso", "TenantId": GUID},
            {"RowKey": GUID, "TenantId": other},
            {"RowKey": "twin-a", "TenantId": third},
            {"RowKey": "twin-b", "TenantId": third},
        ]
    )
    registry = TenantRegistry(lambda: table)  # type: ignore[arg-type,return-value]
    assert registry.resolve(GUID).name == "contoso"
    assert registry.resolve("contoso").tenant_id == GUID
    for ref in (other, third, "twin-a"):
        with pytest.raises(UnknownTenant):
            registry.resolve(ref)
    refused = registry.refused_rows()
    assert len(refused) == 3
    assert any(GUID in line and "looks like a GUID" in line for line in refused)
    assert [t.name for t in registry.all()] == ["contoso"]


def test_adding_a_name_already_registered_for_another_guid_is_refused(azurite: str) -> None:
    """Re-pointing a name would hand its grants to another tenant: remove it first."""
    account = StorageAccount(StorageSettings(Secret(azurite), None, "t" + uuid.uuid4().hex[:10]))
    registry = TenantRegistry(lambda: account.table("tenants"))
    registry.add("contoso", GUID)
    registry.add("contoso", GUID.upper())  # the same tenant again is fine
    with pytest.raises(ValueError, match="already registered with tenant"):
        registry.add("contoso", "7bba76b9-53c1-55af-9962-622c29d6e128")
    assert registry.resolve("contoso").tenant_id == GUID


def test_a_region_maps_to_the_clouds_documented_host() -> None:
    """Region codes are the public cloud's documented Defender XDR hosts; other clouds document none."""
    public = TenantRegistry(lambda: None, cloud=CLOUDS["public"])  # type: ignore[arg-type,return-value]
    assert public.regional_url("eu") == "https://api-eu.security.microsoft.com"
    assert public.regional_url("UK") == "https://api-uk.security.microsoft.com"
    assert public.regional_url("au") == "https://au.api.security.microsoft.com"
    assert public.regional_url(None) is None
    with pytest.raises(ValueError, match=r"'mars' is not a documented Defender XDR region of the public cloud \(us,"):
        public.regional_url("mars")
    gov = TenantRegistry(lambda: None, cloud=CLOUDS["usgovernment"])  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match=r"region of the usgovernment cloud \(none\)"):
        gov.regional_url("eu")


def test_an_explicit_defender_url_must_be_the_clouds_or_loopback() -> None:
    """A tenant's Defender host is checked against the deployment's cloud; a loopback stand-in always passes."""
    gov = TenantRegistry(lambda: None, cloud=CLOUDS["usgovernment"])  # type: ignore[arg-type,return-value]
    assert gov.regional_url(None, "https://api-gov.security.microsoft.us/") == "https://api-gov.security.microsoft.us"
    assert gov.regional_url(None, "https://localhost:8443") == "https://localhost:8443"
    with pytest.raises(ValueError, match="not a documented Defender XDR API host of the usgovernment cloud"):
        gov.regional_url(None, "https://api-eu.security.microsoft.com")
    with pytest.raises(ValueError, match="not both"):
        gov.regional_url("eu", "https://api-gov.security.microsoft.us")
