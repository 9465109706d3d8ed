"""Helpers for tests with ``CALLER_AUTH=entra``: caller identities in the sandbox's home tenant, a policy
naming them, a broker that checks them, and bearer headers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from conftest import DEFENDER, BrokerServer, start_broker

from broker.policy import ROLE_ADMIN, ROLE_INCIDENTS, ROLE_TOKEN
from sandbox.directory import ManagedIdentity
from sandbox.server import Sandbox

ALL_ROLES = (ROLE_TOKEN, ROLE_INCIDENTS, ROLE_ADMIN)


@dataclass(frozen=True)
class Identity:
    """A caller's user-assigned managed identity in the sandbox (client id = app id, principal = oid)."""

    mi: ManagedIdentity

    @property
    def app_id(self) -> str:
        return self.mi.client_id

    @property
    def object_id(self) -> str:
        return self.mi.principal_id


def new_identity(box: Sandbox, name: str, roles: tuple[str, ...] = (ROLE_TOKEN, ROLE_INCIDENTS)) -> Identity:
    """A fresh caller identity (unique per call) holding ``roles`` on the broker's API."""
    return Identity(box.directory.add_managed_identity(f"{name}-{time.monotonic_ns()}", api_roles=roles))


def token_for(box: Sandbox, who: Identity, **overrides: Any) -> str:
    return box.directory.mint_caller_token(who.app_id, **overrides)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def policy(*entries: dict[str, Any], groups: dict[str, list[str]] | None = None) -> str:
    return json.dumps({"groups": groups or {}, "callers": list(entries)})


def grant(who: Identity, tenants: list[str], scopes: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": who.mi.name,
        "object_id": who.object_id,
        "tenants": tenants,
        "scopes": scopes or [DEFENDER],
        **extra,
    }


def start_entra_broker(box: Sandbox, azurite: str, caller_policy: str, **overrides: str) -> BrokerServer:
    return start_broker(box, azurite, CALLER_AUTH="entra", CALLER_POLICY=caller_policy, **overrides)
