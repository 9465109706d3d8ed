"""``ControlClient``: drive a sandbox over its control plane, from this or another process.

Mirrors ``sandbox/control.py`` route for route. Uses its own ``httpx.Client`` with ``trust_env=False``
(the control plane is plain http on loopback; proxies and CA variables do not apply).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import httpx

from sandbox.control import PREFIX
from sandbox.security.control import SecurityControlClient
from sandbox.state import Fault


class ControlError(RuntimeError):
    """The control plane refused a request."""


class ControlClient:
    """Counters, faults, latency, tenants, secrets and caller tokens of a running sandbox."""

    def __init__(self, control_url: str, *, timeout: float = 10.0) -> None:
        self.control_url = control_url.rstrip("/")
        self._http = httpx.Client(base_url=self.control_url + PREFIX, trust_env=False, timeout=timeout)
        self._security: SecurityControlClient | None = None

    # -- plumbing ------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise ControlError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    def close(self) -> None:
        self._http.close()
        if self._security is not None:
            self._security.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def security(self) -> SecurityControlClient:
        """The security-API stand-ins' control client."""
        if self._security is None:
            self._security = SecurityControlClient(self.control_url)
        return self._security

    # -- routes --------------------------------------------------------------------------------------

    def health(self) -> bool:
        return bool(self._call("GET", "/health").get("ok"))

    def env(self) -> dict[str, str]:
        result: dict[str, str] = self._call("GET", "/env")
        return result

    def counters(self, prefix: str = "") -> dict[str, int]:
        result: dict[str, int] = self._call("GET", "/counters", params={"prefix": prefix})["counts"]
        return result

    def count(self, key: str) -> int:
        return self.counters(key).get(key, 0)

    def reset_counters(self) -> None:
        self._call("DELETE", "/counters")

    def inject_fault(self, fault: Fault | None = None, /, **fields: Any) -> None:
        """Inject a fault, given as a ``Fault`` or as its fields (``service``, ``status``, ...)."""
        payload = asdict(fault) if fault is not None else fields
        self._call("POST", "/faults", json=payload)

    def throttle(self, service: str, *, retry_after: int = 1, path_contains: str = "", times: int = 1) -> None:
        """Entra's real throttling reply: 429, plain text ``Too Many Requests``, ``Retry-After``."""
        self.inject_fault(
            service=service,
            status=429,
            body="Too Many Requests",
            content_type="text/plain",
            headers={"Retry-After": str(retry_after)},
            path_contains=path_contains,
            times=times,
        )

    def clear_faults(self) -> None:
        self._call("DELETE", "/faults")

    def set_latency(self, service: str, seconds: float) -> None:
        self._call("POST", "/latency", json={"service": service, "seconds": seconds})

    def tenants(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/tenants")["tenants"]
        return result

    def add_tenant(
        self, name: str, *, consented: bool = True, roles: dict[str, list[str]] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "consented": consented}
        if roles is not None:
            body["roles"] = roles
        result: dict[str, Any] = self._call("POST", "/tenants", json=body)
        return result

    def grant_consent(self, ref: str, roles: dict[str, list[str]] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", f"/tenants/{ref}/consent", json={} if roles is None else {"roles": roles}
        )
        return result

    def revoke_consent(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/tenants/{ref}/revoke")
        return result

    def set_admin_answer(self, ref: str, answer: str) -> dict[str, Any]:
        """How the tenant's administrator answers admin consent: accept, decline or consent_required."""
        result: dict[str, Any] = self._call("POST", f"/tenants/{ref}/admin-answer", json={"answer": answer})
        return result

    def add_redirect_uri(self, uri: str) -> None:
        """Register a web redirect URI on the broker's app registration."""
        self._call("POST", "/apps/broker/redirect-uris", json={"uri": uri})

    def rotate_client_secret(self, *, revoke_old: bool = False) -> dict[str, str]:
        """A new app secret, also stored as a new vault version: ``{"value", "version"}``."""
        result: dict[str, str] = self._call("POST", "/secrets/rotate", json={"revoke_old": revoke_old})
        return result

    def set_secret(self, name: str, value: str, *, content_type: str | None = None) -> str:
        body: dict[str, Any] = {"value": value}
        if content_type:
            body["content_type"] = content_type
        return str(self._call("PUT", f"/vault/{name}", json=body)["version"])

    def mint_caller_token(
        self,
        client_id: str | None = None,
        *,
        roles: list[str] | None = None,
        lifetime: int | None = None,
        signing: str = "valid",
        **claims: Any,
    ) -> str:
        """A caller token for the broker's API; ``claims`` override (``None`` removes a claim)."""
        body: dict[str, Any] = {"client_id": client_id, "roles": roles, "lifetime": lifetime, "signing": signing}
        if claims:
            body["claims"] = claims
        return str(self._call("POST", "/tokens/caller", json=body)["access_token"])

    def rotate_signing_key(self, *, retire_old: bool = False) -> str:
        return str(self._call("POST", "/signing-key/rotate", json={"retire_old": retire_old})["kid"])
