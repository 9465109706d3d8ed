"""What differs between the two incident APIs, Defender XDR ``/api/incidents`` and Graph
``/security/incidents``: path, page size, field names, scope."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from broker.settings import DEFENDER_SCOPE, GRAPH_SCOPE

ApiName = Literal["defender", "graph"]


@dataclass(frozen=True)
class Dialect:
    """One incident API as the sync sees it."""

    name: ApiName
    path: str
    top: int
    time_field: str
    id_field: str
    scope: str
    extra: tuple[tuple[str, str], ...] = ()


DEFENDER = Dialect("defender", "/api/incidents", 100, "lastUpdateTime", "incidentId", DEFENDER_SCOPE)
GRAPH = Dialect("graph", "/security/incidents", 50, "lastUpdateDateTime", "id", GRAPH_SCOPE, (("$expand", "alerts"),))
DIALECTS: dict[str, Dialect] = {"defender": DEFENDER, "graph": GRAPH}
