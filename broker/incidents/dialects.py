"""What differs between the two incident APIs, Defender XDR ``/api/incidents`` and Graph
``/security/incidents``: path, page size, field names. (Their token scopes depend on the cloud: the client
takes them from ``AZURE_CLOUD``'s preset.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ApiName = Literal["defender", "graph"]


@dataclass(frozen=True)
class Dialect:
    """One incident API as the sync sees it."""

    name: ApiName
    path: str
    top: int
    time_field: str
    id_field: str
    extra: tuple[tuple[str, str], ...] = ()


DEFENDER = Dialect("defender", "/api/incidents", 100, "lastUpdateTime", "incidentId")
GRAPH = Dialect("graph", "/security/incidents", 50, "lastUpdateDateTime", "id", (("$expand", "alerts"),))
DIALECTS: dict[str, Dialect] = {"defender": DEFENDER, "graph": GRAPH}
