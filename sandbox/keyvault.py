"""Key Vault secrets stand-in (https): challenge authentication, versions, rotation.

Wire behaviour mirrored from the Key Vault REST API as ``azure-keyvault-secrets`` uses it:

- any request without an acceptable bearer gets 401 with
  ``WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/{home}", resource="https://vault.azure.net"``
  (the cloud's sign-in host and vault resource; the SDK always sends its first request unauthenticated);
- the bearer must be a sandbox-signed token for the vault audience from the home tenant; with an
  allow-list of principals, anyone else gets 403 ``ForbiddenByRbac``;
- ``GET /secrets/{name}/[{version}]``, ``PUT /secrets/{name}``, ``PATCH /secrets/{name}/{version}``,
  ``GET /secrets``, ``GET /secrets/{name}/versions``; 404 ``SecretNotFound``; ``api-version`` required.

Counters: ``kv.challenge``, ``kv.denied``, ``kv.get``, ``kv.set``, ``kv.update``, ``kv.list``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.state import FaultsAndLatency, Recorder

if TYPE_CHECKING:
    from sandbox.directory import Directory

VAULT_SERVICE = "kv"


@dataclass
class SecretVersion:
    name: str
    version: str
    value: str = field(repr=False)
    content_type: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    enabled: bool = True
    created: int = 0
    updated: int = 0
    expires: int | None = None
    not_before: int | None = None

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "enabled": self.enabled,
            "created": self.created,
            "updated": self.updated,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90,
        }
        if self.expires is not None:
            attrs["exp"] = self.expires
        if self.not_before is not None:
            attrs["nbf"] = self.not_before
        return attrs

    def bundle(self, vault_url: str) -> dict[str, Any]:
        """The secret bundle a GET returns: the version's list item, with the value first."""
        return {"value": self.value, **self.item(vault_url, with_version=True)}

    def item(self, vault_url: str, *, with_version: bool) -> dict[str, Any]:
        suffix = f"/{self.version}" if with_version else ""
        item: dict[str, Any] = {
            "id": f"{vault_url}/secrets/{self.name}{suffix}",
            "attributes": self.attributes(),
            "tags": dict(self.tags),
        }
        if self.content_type:
            item["contentType"] = self.content_type
        return item


class Vault:
    """The secrets of one vault, every version kept; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: dict[str, list[SecretVersion]] = {}
        #: Object ids allowed to read and write; ``None``: every principal of the home tenant.
        self.allowed_principals: set[str] | None = None

    def set_secret(
        self,
        name: str,
        value: str,
        *,
        content_type: str | None = None,
        tags: dict[str, str] | None = None,
        enabled: bool = True,
        expires: int | None = None,
        not_before: int | None = None,
    ) -> str:
        """Store a new version; returns its id (32 hex characters, like Key Vault's)."""
        now = int(time.time())
        version = SecretVersion(
            name=name,
            version=uuid.uuid4().hex,
            value=value,
            content_type=content_type,
            tags=dict(tags or {}),
            enabled=enabled,
            created=now,
            updated=now,
            expires=expires,
            not_before=not_before,
        )
        with self._lock:
            self._secrets.setdefault(name.lower(), []).append(version)
        return version.version

    def get_secret(self, name: str, version: str | None = None) -> SecretVersion | None:
        """The named version, or the latest one."""
        with self._lock:
            versions = self._secrets.get(name.lower(), [])
            if not version:
                return versions[-1] if versions else None
            return next((v for v in versions if v.version == version.lower()), None)

    def versions(self, name: str) -> list[SecretVersion]:
        with self._lock:
            return list(self._secrets.get(name.lower(), []))

    def names(self) -> list[str]:
        with self._lock:
            return [versions[-1].name for versions in self._secrets.values() if versions]

    def update(self, name: str, version: str, **changes: Any) -> SecretVersion | None:
        """Change a version's attributes (``enabled``, ``content_type``, ``tags``, ``expires``, ...)."""
        with self._lock:
            found = next((v for v in self._secrets.get(name.lower(), []) if v.version == version.lower()), None)
            if found is not None:
                for key, value in changes.items():
                    if value is not None:
                        setattr(found, key, value)
                found.updated = int(time.time())
            return found


def _error(status: int, code: str, message: str, inner: str | None = None, **headers: str) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return JSONResponse({"error": error}, status_code=status, headers=headers or None)


def create_keyvault_app(directory: Directory, recorder: Recorder) -> Any:
    """The vault as an ASGI app (wrapped for faults and latency)."""
    vault = directory.vault
    challenge = (
        f'Bearer authorization="{directory.shape.login_host}/{directory.home.tenant_id}", '
        f'resource="{directory.shape.vault_resource}"'
    )

    def vault_url(request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}"

    def authorize(request: Request) -> Response | None:
        """None when the bearer is acceptable, else the 401/403 to send."""
        if not request.query_params.get("api-version"):
            return _error(400, "BadParameter", "The api-version query parameter is missing.")
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            recorder.hit("kv.challenge")
            return _error(
                401,
                "Unauthorized",
                "AKV10000: Request is missing a Bearer or PoP token.",
                **{"WWW-Authenticate": challenge},
            )
        try:
            claims = directory.verify_access_token(token.strip(), directory.shape.vault_audiences)
            if claims["tid"] != directory.home.tenant_id:
                raise ValueError("AKV10032: Invalid issuer. Expected the vault's tenant.")
        except ValueError as exc:
            recorder.hit("kv.challenge")
            return _error(401, "Unauthorized", f"Token validation failed: {exc}", **{"WWW-Authenticate": challenge})
        allowed = vault.allowed_principals
        if allowed is not None and claims.get("oid") not in allowed:
            recorder.hit("kv.denied")
            return _error(
                403,
                "Forbidden",
                f"Caller is not authorized to perform action on resource. Caller: oid={claims.get('oid')}",
                inner="ForbiddenByRbac",
            )
        return None

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            denied = authorize(request)
            if denied is not None:
                return denied
            result: Response = await handler(request)
            return result

        return endpoint

    def not_found(name: str) -> Response:
        return _error(
            404,
            "SecretNotFound",
            f"A secret with (name/id) {name} was not found in this key vault. If you recently deleted "
            "this secret you may be able to recover it using the correct recovery command.",
        )

    async def get_secret(request: Request) -> Response:
        name = request.path_params["name"]
        version = request.path_params.get("version", "")
        recorder.hit("kv.get", name.lower())  # also counted per secret: kv.get:<name>
        found = vault.get_secret(name, version or None)
        if found is None:
            return not_found(f"{name}/{version}" if version else name)
        if not found.enabled:
            return _error(403, "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled")
        return JSONResponse(found.bundle(vault_url(request)))

    async def set_secret(request: Request) -> Response:
        name = request.path_params["name"]
        recorder.hit("kv.set")
        try:
            body = json.loads(await request.body() or b"{}")
            value = body["value"]
            if not isinstance(value, str):
                raise TypeError("value")
        except (ValueError, KeyError, TypeError):
            return _error(400, "BadParameter", "The request body must be JSON with a string 'value'.")
        attrs = body.get("attributes") or {}
        version = vault.set_secret(
            name,
            value,
            content_type=body.get("contentType"),
            tags=body.get("tags"),
            enabled=attrs.get("enabled", True),
            expires=attrs.get("exp"),
            not_before=attrs.get("nbf"),
        )
        stored = vault.get_secret(name, version)
        assert stored is not None
        return JSONResponse(stored.bundle(vault_url(request)))

    async def update_secret(request: Request) -> Response:
        name = request.path_params["name"]
        version = request.path_params.get("version", "")
        recorder.hit("kv.update")
        target = vault.get_secret(name, version or None)
        if target is None:
            return not_found(name)
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return _error(400, "BadParameter", "The request body must be JSON.")
        attrs = body.get("attributes") or {}
        updated = vault.update(
            name,
            target.version,
            enabled=attrs.get("enabled"),
            expires=attrs.get("exp"),
            not_before=attrs.get("nbf"),
            content_type=body.get("contentType"),
            tags=body.get("tags"),
        )
        assert updated is not None
        body_out = updated.bundle(vault_url(request))
        body_out.pop("value")
        return JSONResponse(body_out)

    async def list_secrets(request: Request) -> Response:
        recorder.hit("kv.list")
        base = vault_url(request)
        items = []
        for name in vault.names():
            latest = vault.get_secret(name)
            if latest is not None:
                items.append(latest.item(base, with_version=False))
        return JSONResponse({"value": items, "nextLink": None})

    async def list_versions(request: Request) -> Response:
        name = request.path_params["name"]
        recorder.hit("kv.list")
        versions = vault.versions(name)
        if not versions:
            return not_found(name)
        base = vault_url(request)
        return JSONResponse({"value": [v.item(base, with_version=True) for v in versions], "nextLink": None})

    routes = [
        Route("/secrets", guarded(list_secrets), methods=["GET"]),
        Route("/secrets/{name}/versions", guarded(list_versions), methods=["GET"]),
        Route("/secrets/{name}", guarded(set_secret), methods=["PUT"]),
        Route("/secrets/{name}", guarded(get_secret), methods=["GET"]),
        Route("/secrets/{name}", guarded(update_secret), methods=["PATCH"]),
        Route("/secrets/{name}/", guarded(get_secret), methods=["GET"]),
        Route("/secrets/{name}/{version}", guarded(get_secret), methods=["GET"]),
        Route("/secrets/{name}/{version}", guarded(update_secret), methods=["PATCH"]),
    ]
    app = Starlette(routes=routes)
    app.router.redirect_slashes = False
    return FaultsAndLatency(app, VAULT_SERVICE, recorder)
