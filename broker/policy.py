"""Who may ask for what: the caller policy, deny by default, and the per-caller rate limit.

A request is allowed only when both hold:

1. the caller's token carries the app role for the action (``Broker.Token.Request`` for ``token``,
   ``Broker.Incidents.Read`` for ``incidents``, ``Broker.Admin`` for ``admin``) — granted to the
   caller's managed identity or app registration in the home tenant by an Entra administrator;
2. an entry of ``CALLER_POLICY`` names the caller (by object id or app id) and grants the tenant (by
   name, GUID, ``group:<name>`` or ``*``) and, for tokens, the scope (or ``*``); ``admin`` needs
   ``"admin": true``.

Tenant names and GUIDs are separate namespaces here as in the registry: a GUID in a grant matches only a
tenant's GUID, a name only a tenant's name, and a name that looks like a GUID is refused. An entry keyed
by ``app_id`` applies only to an app-only token of that application (``Caller.app_only``): a user's
delegated token carries the client's app id too, and must not inherit what the application was granted.

``CALLER_POLICY`` is an app setting (JSON, shown below). It is read and validated once, when a worker
process builds its container; every problem is reported by entry. A change is an app-setting change,
after which Azure Functions restarts the app, so every instance reads the new policy on its next start::

    {
      "groups": {"eu": ["contoso", "fabrikam"]},
      "callers": [
        {"name": "soc-dashboard", "app_id": "<guid>", "tenants": ["group:eu", "northwind"],
         "scopes": ["https://api.security.microsoft.com/.default"]},
        {"name": "soc-ops", "object_id": "<guid>", "tenants": ["*"], "scopes": ["*"], "admin": true}
      ]
    }

With ``CALLER_AUTH=none`` (loopback development) the single local caller is allowed everything.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from broker.identifiers import guid_shaped, is_tenant_name, parse_guid

Action = Literal["token", "incidents", "admin"]

ROLE_TOKEN = "Broker.Token.Request"  # noqa: S105 (an app role name)
ROLE_INCIDENTS = "Broker.Incidents.Read"
ROLE_ADMIN = "Broker.Admin"
ACTION_ROLES: Mapping[str, str] = {"token": ROLE_TOKEN, "incidents": ROLE_INCIDENTS, "admin": ROLE_ADMIN}

_GROUP = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ENTRY_KEYS = frozenset({"name", "object_id", "app_id", "tenants", "scopes", "admin"})


class PolicyError(ValueError):
    """``CALLER_POLICY`` is not usable; ``problems`` names each entry at fault."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Grant:
    """One policy entry, with groups expanded."""

    name: str
    object_id: str | None
    app_id: str | None
    tenant_names: frozenset[str]
    tenant_ids: frozenset[str]
    scopes: frozenset[str]  # scopes, or {"*"}
    admin: bool
    all_tenants: bool = False

    def allows_tenant(self, name: str, tenant_id: str) -> bool:
        return self.all_tenants or name in self.tenant_names or tenant_id in self.tenant_ids

    def allows_scope(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # a stable reason code: allowed, role_missing, no_policy_entry, tenant_not_granted, ...


class Policy:
    """The parsed ``CALLER_POLICY``; ``Policy.allow_all()`` is the loopback development policy."""

    def __init__(self, grants: Iterable[Grant] = (), *, allow_all: bool = False) -> None:
        self.grants = tuple(grants)
        self.allows_everything = allow_all
        self._by_object: dict[str, list[Grant]] = {}
        self._by_app: dict[str, list[Grant]] = {}
        for grant in self.grants:
            if grant.object_id:
                self._by_object.setdefault(grant.object_id, []).append(grant)
            if grant.app_id:
                self._by_app.setdefault(grant.app_id, []).append(grant)

    @classmethod
    def allow_all(cls) -> Policy:
        return cls(allow_all=True)

    @classmethod
    def parse(cls, text: str, allowed_scopes: Iterable[str]) -> Policy:
        """Parse and validate ``CALLER_POLICY``; an empty text is the empty (deny-all) policy."""
        return _parse(text, frozenset(allowed_scopes))

    def grants_for(self, object_id: str, app_id: str | None, *, app_only: bool) -> list[Grant]:
        """The entries naming this caller: by object id, and by app id only for an app-only token."""
        found = list(self._by_object.get(object_id, ()))
        if app_only and app_id:
            found += [g for g in self._by_app.get(app_id, ()) if g not in found]
        return found

    def decide(
        self,
        *,
        object_id: str,
        app_id: str | None,
        roles: frozenset[str],
        action: Action,
        tenant_name: str = "",
        tenant_id: str = "",
        scope: str | None = None,
        app_only: bool,
    ) -> Decision:
        """Deny by default: the role for ``action`` and a grant naming the caller must both allow it."""
        if self.allows_everything:
            return Decision(True, "allowed")
        if ACTION_ROLES[action] not in roles:
            return Decision(False, "role_missing")
        grants = self.grants_for(object_id, app_id, app_only=app_only)
        if not grants:
            return Decision(False, "no_policy_entry")
        if action == "admin":
            return Decision(True, "allowed") if any(g.admin for g in grants) else Decision(False, "not_admin")
        tenant_grants = [g for g in grants if g.allows_tenant(tenant_name, tenant_id)]
        if not tenant_grants:
            return Decision(False, "tenant_not_granted")
        if scope is not None and not any(g.allows_scope(scope) for g in tenant_grants):
            return Decision(False, "scope_not_granted")
        return Decision(True, "allowed")

    def sees_all_tenants(self, object_id: str, app_id: str | None, *, app_only: bool) -> bool:
        """Whether telling this caller that a tenant does not exist reveals nothing it could not ask for."""
        return self.allows_everything or any(
            g.all_tenants for g in self.grants_for(object_id, app_id, app_only=app_only)
        )


def _parse(text: str, allowed_scopes: frozenset[str]) -> Policy:
    if not text.strip():
        return Policy()
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise PolicyError([f"not JSON ({exc})"]) from exc
    if not isinstance(data, dict):
        raise PolicyError(['must be a JSON object {"groups": {...}, "callers": [...]}'])
    problems: list[str] = []
    unknown = set(data) - {"groups", "callers"}
    if unknown:
        problems.append(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    groups: dict[str, frozenset[tuple[str, str]]] = {}
    raw_groups = data.get("groups", {})
    if not isinstance(raw_groups, dict):
        problems.append("groups: must be an object of group name to a list of tenant names")
        raw_groups = {}
    for group, members in raw_groups.items():
        where = f"groups.{group}"
        if not _GROUP.fullmatch(str(group)):
            problems.append(f"{where}: a group name is lowercase letters, digits, '-' and '_'")
        if not isinstance(members, list) or not members:
            problems.append(f"{where}: must be a non-empty list of tenant names or GUIDs")
            continue
        checked = set()
        for member in members:
            tenant = _tenant_ref(member)
            if tenant is None or tenant[0] == "*":
                problems.append(f"{where}: {member!r} is not a tenant name or GUID")
            else:
                checked.add(tenant)
        groups[str(group)] = frozenset(checked)
    callers = data.get("callers", [])
    if not isinstance(callers, list):
        problems.append("callers: must be a list of entries")
        callers = []
    grants: list[Grant] = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(callers):
        grant = _entry(index, entry, groups, allowed_scopes, problems)
        if grant is None:
            continue
        for principal in (grant.object_id, grant.app_id):
            if principal and principal in seen:
                problems.append(f"callers[{index}] ({grant.name}): {principal} is already named by {seen[principal]}")
            elif principal:
                seen[principal] = f"callers[{index}] ({grant.name})"
        grants.append(grant)
    if problems:
        raise PolicyError(problems)
    return Policy(grants)


def _tenant_ref(value: object) -> tuple[str, str] | None:
    """``("id", guid)``, ``("name", name)`` or ``("*", "*")``; None for anything else, including a name that
    looks like a GUID without being one in canonical form (it could only ever be mistaken for one)."""
    if not isinstance(value, str):
        return None
    if value == "*":
        return ("*", "*")
    ref = value.lower()
    guid = parse_guid(ref)
    if guid:
        return ("id", guid)
    return ("name", ref) if is_tenant_name(ref) and not guid_shaped(ref) else None


def _list_of(entry: dict[str, Any], key: str, where: str, problems: list[str]) -> list[Any]:
    """``entry[key]`` if it is a list (absent: empty); otherwise a problem, and nothing."""
    value = entry.get(key, [])
    if isinstance(value, list):
        return value
    problems.append(f"{where}: {key!r} must be a list")
    return []


def _entry(
    index: int,
    entry: object,
    groups: Mapping[str, frozenset[tuple[str, str]]],
    allowed_scopes: frozenset[str],
    problems: list[str],
) -> Grant | None:
    if not isinstance(entry, dict):
        problems.append(f"callers[{index}]: must be an object")
        return None
    name = entry.get("name")
    where = f"callers[{index}]" + (f" ({name})" if isinstance(name, str) and name else "")
    before = len(problems)
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        problems.append(f"{where}: 'name' is required (a label for logs, at most 64 characters)")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    object_id = entry.get("object_id")
    app_id = entry.get("app_id")
    if object_id is None and app_id is None:
        problems.append(f"{where}: needs 'object_id' or 'app_id' (the caller identity's GUID)")
    for key, value in (("object_id", object_id), ("app_id", app_id)):
        if value is not None and parse_guid(value) is None:
            problems.append(f"{where}: {key} {value!r} is not a GUID")
    tenants: set[tuple[str, str]] = set()
    for ref in _list_of(entry, "tenants", where, problems):
        if isinstance(ref, str) and ref.startswith("group:"):
            group = ref.removeprefix("group:")
            if group not in groups:
                problems.append(f"{where}: tenants names unknown group {group!r}")
            else:
                tenants |= groups[group]
            continue
        tenant = _tenant_ref(ref)
        if tenant is None:
            problems.append(f"{where}: tenants entry {ref!r} is not a tenant name, GUID, 'group:<name>' or '*'")
        else:
            tenants.add(tenant)
    scopes: set[str] = set()
    for scope in _list_of(entry, "scopes", where, problems):
        if scope != "*" and scope not in allowed_scopes:
            problems.append(f"{where}: scope {scope!r} is not in ALLOWED_SCOPES")
        else:
            scopes.add(str(scope))
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        problems.append(f"{where}: 'admin' must be true or false")
    if not tenants and not admin:
        problems.append(f"{where}: grants nothing (no tenants and not admin)")
    if len(problems) != before:
        return None
    return Grant(
        name=str(name),
        object_id=parse_guid(object_id),
        app_id=parse_guid(app_id),
        tenant_names=frozenset(ref for kind, ref in tenants if kind == "name"),
        tenant_ids=frozenset(ref for kind, ref in tenants if kind == "id"),
        scopes=frozenset(scopes),
        admin=bool(admin),
        all_tenants=("*", "*") in tenants,
    )


class RateLimiter:
    """A token bucket per caller: ``rate_per_minute`` requests a minute, bursts up to that many.

    Held in memory per instance (each instance grants the rate; N instances grant up to N times it).
    The table of buckets is bounded; the least recently seen caller is forgotten first.
    """

    def __init__(
        self, rate_per_minute: int, *, clock: Callable[[], float] = time.monotonic, max_callers: int = 10_000
    ) -> None:
        self.capacity = float(rate_per_minute)
        self.per_second = rate_per_minute / 60.0
        self._clock = clock
        self._max = max_callers
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, caller_id: str) -> int | None:
        """Spend one request; ``None`` when allowed, else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(caller_id, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.per_second)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[caller_id] = (tokens, now)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        if allowed:
            return None
        return max(1, math.ceil((1.0 - tokens) / self.per_second))
