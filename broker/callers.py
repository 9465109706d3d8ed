"""Who is asking: the caller identity every tenant-scoped request carries.

``CALLER_AUTH=none`` serves a loopback-only development broker as the single caller ``local``; the
broker refuses that mode on any other bind. ``CALLER_AUTH=entra`` validates the Entra ID bearer token
internal services obtain for the broker (see ``EntraAuthenticator``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Caller:
    """An authenticated internal service."""

    id: str
    tenant_id: str | None = None
    app_id: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)

    @property
    def label(self) -> str:
        return self.app_id or self.id


LOCAL_CALLER = Caller(id="local", roles=frozenset({"Broker.Admin"}))


class Authenticator(Protocol):
    def authenticate(self, headers: Mapping[str, str]) -> Caller: ...


class LoopbackOnly:
    """No authentication: every request is the local developer. Only ever built for a loopback bind."""

    def authenticate(self, headers: Mapping[str, str]) -> Caller:
        return LOCAL_CALLER
