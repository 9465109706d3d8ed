"""The tenant registry: which customer tenants the broker serves, by name and GUID.

Only a GUID that came out of this registry ever goes into a URL. Caller input is checked against a strict
shape first (a GUID, or a lowercase name), so ``../common``, ``organizations`` or ``evil.example/x`` are
refused before anything is looked up.

Names and GUIDs are separate namespaces. A name never looks like a GUID (``guid_shaped``): one that does is
refused when a tenant is added, and a stored row of that shape is reported and never served. A reference
is looked up among GUIDs when it is one and among names otherwise, never both, so a name can never stand
for another tenant's GUID (``tenants add <fabrikam's GUID> <victim GUID>`` once let a grant for
fabrikam's GUID reach the victim). The registry lives in a storage table and is held in memory as a
snapshot, re-read every ``refresh_seconds`` (the bound within which a change made elsewhere — another
instance, the CLI — is seen) and at once when a well-formed name is not found.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from broker.clouds import CLOUDS, Cloud, EndpointRefused, check_defender
from broker.errors import InvalidTenant, NotFound, UnknownTenant
from broker.identifiers import guid_shaped, is_tenant_name, parse_guid
from broker.storage import PartitionSnapshot, SnapshotBacked

log = logging.getLogger(__name__)

RESERVED_NAMES = frozenset({"common", "organizations", "consumers", "adfs", "me", "default", "api"})
IncidentApi = Literal["defender", "graph"]
PARTITION = "tenant"
MISS_RELOAD_SECONDS = 1.0


@dataclass(frozen=True)
class Tenant:
    """A registered customer tenant."""

    name: str
    tenant_id: str
    enabled: bool = True
    api: IncidentApi = "defender"
    defender_url: str | None = None
    added_at: str = ""
    onboarded_at: str = ""  # when the doctor first passed after consent; empty: consent still pending

    @property
    def onboarding(self) -> str:
        return "onboarded" if self.onboarded_at else "pending"

    def __post_init__(self) -> None:
        if not is_tenant_name(self.name) or self.name in RESERVED_NAMES:
            raise ValueError(f"tenant name {self.name!r} must be lowercase letters, digits and hyphens")
        if guid_shaped(self.name):
            raise ValueError(
                f"tenant name {self.name!r} looks like a GUID; a name must not (names and GUIDs are kept apart)"
            )
        if parse_guid(self.tenant_id) != self.tenant_id:
            raise ValueError("tenant_id must be a lowercase GUID")
        if self.api not in ("defender", "graph"):
            raise ValueError("api must be 'defender' or 'graph'")
        if self.defender_url is not None:
            check_defender_url(self.defender_url)


def check_defender_url(url: str, cloud: Cloud | None = None) -> None:
    """A tenant's Defender XDR API host: one ``cloud`` documents (any cloud, when None), or a loopback
    stand-in; https, nothing else in the URL. Only this and a registry GUID ever shape a sync request."""
    refusals: list[str] = []
    for candidate in [cloud] if cloud is not None else list(CLOUDS.values()):
        try:
            check_defender(url, candidate)
            return
        except EndpointRefused as exc:
            refusals.append(str(exc))
    raise ValueError(f"defender_url: {refusals[0]}")


def is_tenant_guid(ref: str) -> bool:
    """Whether a normalized reference names a tenant by GUID (else it is a name)."""
    return parse_guid(ref) == ref


def normalize_reference(value: object) -> str:
    """Check a caller's tenant reference and return it lowercased; raise ``InvalidTenant`` if malformed.

    The result is either a canonical GUID or a name that does not look like one (``is_tenant_guid`` tells
    which): ``{guid}`` or a GUID without its hyphens is neither, and refused.
    """
    if not isinstance(value, str) or not value or len(value) > 64 or not value.isascii():
        raise InvalidTenant()
    ref = value.lower()
    if parse_guid(ref) == ref:
        return ref
    if ref in RESERVED_NAMES or not is_tenant_name(ref) or guid_shaped(ref):
        raise InvalidTenant()
    return ref


def canonical_guid(value: str) -> str:
    """A tenant GUID in canonical lowercase form, or ``ValueError``."""
    guid = parse_guid(value.strip())
    if guid is None:
        raise ValueError(f"{value!r} is not a tenant GUID")
    return guid


@dataclass(frozen=True)
class RegistryIndex:
    """One read of the registry: tenants by name and, separately, by GUID; rows refused, with why."""

    by_name: Mapping[str, Tenant] = field(default_factory=dict)
    by_id: Mapping[str, Tenant] = field(default_factory=dict)
    refused: tuple[str, ...] = ()

    def get(self, ref: str) -> Tenant | None:
        """The tenant a normalized reference names, looked up in its own namespace only."""
        return (self.by_id if is_tenant_guid(ref) else self.by_name).get(ref)


class TenantRegistry(SnapshotBacked):
    """Tenants in a storage table, served from an in-memory snapshot (fails closed when too stale)."""

    def __init__(
        self,
        table: Callable[[], TableClient],
        *,
        cloud: Cloud = CLOUDS["public"],
        refresh_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table = table
        self.cloud = cloud
        self._snapshot: PartitionSnapshot[RegistryIndex] = PartitionSnapshot(
            table, PARTITION, _index, what="tenant registry", refresh_seconds=refresh_seconds, clock=clock
        )

    # -- reads -------------------------------------------------------------------------------------

    def cached(self, reference: str) -> Tenant | None:
        """The tenant for a normalized reference from a fresh snapshot, without I/O; None if unsure."""
        snapshot = self._snapshot.current()
        return snapshot.get(reference) if snapshot is not None else None

    def resolve(self, value: object) -> Tenant:
        """The registered tenant a caller named, by name or GUID."""
        ref = normalize_reference(value)
        tenant = self.cached(ref)
        if tenant is not None:
            return tenant
        # Stale: re-read (once, however many requests wait). Fresh but not found: re-read at most once
        # a second, so a stream of unknown names cannot become a stream of table scans.
        snapshot = self._snapshot.get(MISS_RELOAD_SECONDS if self._snapshot.fresh() else None)
        tenant = snapshot.get(ref)
        if tenant is None:
            raise UnknownTenant(f"no tenant named or with the ID {ref!r} is registered")
        return tenant

    def all(self) -> list[Tenant]:
        """Every tenant served, read from storage now."""
        return sorted(self._snapshot.get(0.0).by_name.values(), key=lambda t: t.name)

    def enabled(self) -> list[Tenant]:
        """Every enabled tenant, from the snapshot (re-read only once it is older than ``refresh_seconds``)."""
        return sorted((t for t in self._snapshot.get().by_name.values() if t.enabled), key=lambda t: t.name)

    def refused_rows(self) -> tuple[str, ...]:
        """Stored rows the registry does not serve, each with the reason (after the latest read)."""
        return self._snapshot.get().refused

    # -- writes ------------------------------------------------------------------------------------

    def regional_url(self, region: str | None, defender_url: str | None = None) -> str | None:
        """The Defender host for ``region`` (a code the cloud documents) or ``defender_url`` (checked)."""
        if region is not None and defender_url is not None:
            raise ValueError("give a region or a Defender URL, not both")
        if region is not None:
            regions = self.cloud.defender_regions
            if region.lower() not in regions:
                listed = ", ".join(regions) or "none"
                raise ValueError(
                    f"region {region!r} is not a documented Defender XDR region of the {self.cloud.name} cloud "
                    f"({listed})"
                )
            return self.cloud.region_url(region.lower())
        if defender_url is not None:
            defender_url = defender_url.rstrip("/")
            check_defender_url(defender_url, self.cloud)
        return defender_url

    def add(
        self,
        name: str,
        tenant_id: str,
        *,
        api: IncidentApi = "defender",
        defender_url: str | None = None,
        region: str | None = None,
    ) -> Tenant:
        """Register a tenant (replacing a row of the same name); its Defender host is the cloud's default,
        a documented ``region`` of the cloud, or an explicit ``defender_url`` the cloud documents."""
        tenant = Tenant(
            name=name.lower(),
            tenant_id=canonical_guid(tenant_id),
            api=api,
            defender_url=self.regional_url(region, defender_url),
            added_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        table = self._table()
        same_guid = table.query_entities(
            "PartitionKey eq @pk and TenantId eq @tid", parameters={"pk": PARTITION, "tid": tenant.tenant_id}
        )
        for other in same_guid:
            if other["RowKey"] != tenant.name:
                raise ValueError(f"tenant {tenant.tenant_id} is already registered as {other['RowKey']!r}")
        try:
            existing = table.get_entity(PARTITION, tenant.name)
        except ResourceNotFoundError:
            existing = None
        if existing is not None and existing.get("TenantId") != tenant.tenant_id:
            # Re-pointing a name would hand every grant of that name to another tenant: remove it first.
            raise ValueError(f"{tenant.name!r} is already registered with tenant {existing.get('TenantId')}")
        table.upsert_entity(_to_entity(tenant), mode=UpdateMode.REPLACE)
        self._invalidate()
        return tenant

    def configure(
        self,
        name: str,
        tenant_id: str,
        *,
        api: IncidentApi = "defender",
        defender_url: str | None = None,
        region: str | None = None,
    ) -> tuple[Tenant, bool]:
        """Add a tenant, or change an existing one's incident API and Defender host (keeping its switch and
        onboarding state); a name never moves to another GUID. Returns the tenant and whether it is new."""
        guid = canonical_guid(tenant_id)
        url = self.regional_url(region, defender_url)
        try:
            current = self.resolve(name)
        except UnknownTenant:
            return self.add(name, guid, api=api, defender_url=url), True
        if current.name != name.lower() or current.tenant_id != guid:
            raise ValueError(f"tenant {name!r} is registered with another GUID; remove it first")
        updated = replace(current, api=api, defender_url=url)
        self._table().upsert_entity(_to_entity(updated), mode=UpdateMode.REPLACE)
        self._invalidate()
        return updated, False

    def set_enabled(self, name: str, enabled: bool) -> Tenant:
        tenant = self.resolve(name)
        updated = replace(tenant, enabled=enabled)
        self._table().upsert_entity(_to_entity(updated), mode=UpdateMode.REPLACE)
        self._invalidate()
        return updated

    def mark_onboarded(self, name: str) -> Tenant:
        """Record that consent is proven (the doctor passed); a no-op for a tenant already onboarded."""
        tenant = self.resolve(name)
        if tenant.onboarded_at:
            return tenant
        updated = replace(tenant, onboarded_at=datetime.now(UTC).isoformat(timespec="seconds"))
        self._table().update_entity(
            {"PartitionKey": PARTITION, "RowKey": tenant.name, "OnboardedAt": updated.onboarded_at},
            mode=UpdateMode.MERGE,
        )
        self._invalidate()
        return updated

    def remove(self, name: str) -> None:
        tenant = self.resolve(name)
        try:
            self._table().delete_entity(PARTITION, tenant.name)
        except ResourceNotFoundError as exc:
            raise NotFound(f"tenant {name!r} is not registered") from exc
        self._invalidate()

    def _invalidate(self) -> None:
        self._snapshot.invalidate()


def _index(entities: Sequence[Mapping[str, Any]]) -> RegistryIndex:
    """Tenants by name and by GUID. A malformed row (a GUID-shaped name among them) is reported and never
    served; two rows claiming one GUID are both withheld, since either could be the impostor."""
    tenants: list[Tenant] = []
    refused: list[str] = []
    for entity in entities:
        try:
            tenants.append(_from_entity(entity))
        except (KeyError, ValueError) as exc:
            refused.append(f"{_printable(entity.get('RowKey'))}: {exc}")
    claims: dict[str, list[Tenant]] = {}
    for tenant in tenants:
        claims.setdefault(tenant.tenant_id, []).append(tenant)
    by_id: dict[str, Tenant] = {}
    for tenant_id, claimants in claims.items():
        if len(claimants) == 1:
            by_id[tenant_id] = claimants[0]
        else:
            names = ", ".join(sorted(t.name for t in claimants))
            refused += [f"{t.name}: tenant {tenant_id} is also registered as {names}" for t in claimants]
    for problem in refused:
        log.error("tenants.reload outcome=row_refused row=%s", problem)
    return RegistryIndex({t.name: t for t in by_id.values()}, by_id, tuple(refused))


def _printable(value: object) -> str:
    text = str(value)[:80]
    return text if text.isprintable() else repr(text)


def _to_entity(tenant: Tenant) -> dict[str, object]:
    return {
        "PartitionKey": PARTITION,
        "RowKey": tenant.name,
        "TenantId": tenant.tenant_id,
        "Enabled": tenant.enabled,
        "Api": tenant.api,
        "DefenderUrl": tenant.defender_url or "",
        "AddedAt": tenant.added_at,
        "OnboardedAt": tenant.onboarded_at,
    }


def _from_entity(entity: Mapping[str, object]) -> Tenant:
    api = str(entity.get("Api") or "defender")
    return Tenant(
        name=str(entity["RowKey"]),
        tenant_id=str(entity["TenantId"]),
        enabled=bool(entity.get("Enabled", True)),
        api="graph" if api == "graph" else "defender",
        defender_url=str(entity.get("DefenderUrl") or "") or None,
        added_at=str(entity.get("AddedAt") or ""),
        onboarded_at=str(entity.get("OnboardedAt") or ""),
    )
