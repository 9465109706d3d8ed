"""The sandbox's control plane (plain http, JSON), so a process other than the sandbox's can drive it.

Routes, all under ``/_sandbox/``:

=========================================  ===================================================
``GET  health``                            ``{"ok": true}``
``GET  env``                               the broker settings pointing at the stand-ins
``GET  counters?prefix=``                  ``{"counts": {...}}``
``DELETE counters``                        reset every counter
``POST faults``                            inject a :class:`~sandbox.state.Fault` (JSON fields)
``DELETE faults``                          clear all faults
``POST latency``                           ``{"service", "seconds"}``
``GET  tenants`` / ``POST tenants``        list / add (``{"name", "consented"?, "roles"?}``)
``POST tenants/{ref}/consent``             grant consent (``{"roles"?}``)
``POST tenants/{ref}/revoke``              revoke consent
``POST tenants/{ref}/admin-answer``        ``{"answer"}``: accept, decline or consent_required
``POST apps/broker/redirect-uris``         ``{"uri"}``: register a redirect URI on the broker app
``POST secrets/rotate``                    ``{"revoke_old"?}`` → ``{"value", "version"}``
``PUT  vault/{name}``                      ``{"value", "content_type"?}`` → ``{"version"}``
``POST tokens/caller``                     ``{"client_id"?, "roles"?, "lifetime"?, "signing"?,
                                           "claims"?}`` → ``{"access_token"}``
``POST signing-key/rotate``                ``{"retire_old"?}`` → ``{"kid"}``
=========================================  ===================================================

Security-API routes (``security_control_routes``) are mounted beside these.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sandbox.directory import Directory
from sandbox.state import Fault, Recorder

PREFIX = "/_sandbox"
_FAULT_FIELDS = ("service", "status", "body", "content_type", "headers", "path_contains", "times", "delay_seconds")


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    return data


def _bad(message: str, status: int = 400) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def control_routes(directory: Directory, recorder: Recorder, env: Callable[[], dict[str, str]]) -> list[BaseRoute]:
    """The identity half of the control plane."""

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def get_env(request: Request) -> Response:
        return JSONResponse(env())

    async def counters(request: Request) -> Response:
        if request.method == "DELETE":
            recorder.reset_counts()
            return JSONResponse({"counts": {}})
        return JSONResponse({"counts": recorder.counts(request.query_params.get("prefix", ""))})

    async def faults(request: Request) -> Response:
        if request.method == "DELETE":
            recorder.clear_faults()
            return JSONResponse({"faults": 0})
        try:
            body = await _json(request)
            fault = Fault(**{k: body[k] for k in _FAULT_FIELDS if k in body})
        except (ValueError, TypeError) as exc:
            return _bad(f"bad fault: {exc}")
        recorder.inject(fault)
        return JSONResponse({"faults": recorder.snapshot()["faults"]}, status_code=201)

    async def latency(request: Request) -> Response:
        try:
            body = await _json(request)
            recorder.set_latency(str(body["service"]), float(body["seconds"]))
        except (ValueError, KeyError, TypeError) as exc:
            return _bad(f"bad latency: {exc}")
        return JSONResponse(recorder.snapshot()["latency"])

    async def tenants(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse({"tenants": [t.to_json() for t in directory.tenants()]})
        try:
            body = await _json(request)
            tenant = directory.add_customer_tenant(
                str(body["name"]),
                consented=bool(body.get("consented", True)),
                roles=body.get("roles"),
                tenant_id=body.get("tenant_id"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            return _bad(f"bad tenant: {exc}")
        return JSONResponse(tenant.to_json(), status_code=201)

    async def consent(request: Request) -> Response:
        ref = request.path_params["ref"]
        try:
            body = await _json(request)
            tenant = directory.grant_consent(ref, body.get("roles"))
        except KeyError:
            return _bad(f"unknown tenant {ref}", 404)
        except (ValueError, TypeError) as exc:
            return _bad(str(exc))
        return JSONResponse(tenant.to_json())

    async def revoke(request: Request) -> Response:
        ref = request.path_params["ref"]
        try:
            tenant = directory.revoke_consent(ref)
        except KeyError:
            return _bad(f"unknown tenant {ref}", 404)
        except ValueError as exc:
            return _bad(str(exc))
        return JSONResponse(tenant.to_json())

    async def admin_answer(request: Request) -> Response:
        ref = request.path_params["ref"]
        try:
            body = await _json(request)
            tenant = directory.set_admin_answer(ref, str(body["answer"]))
        except KeyError:
            return _bad(f"unknown tenant {ref} or no answer", 404)
        except (ValueError, TypeError) as exc:
            return _bad(str(exc))
        return JSONResponse(tenant.to_json())

    async def redirect_uris(request: Request) -> Response:
        try:
            body = await _json(request)
            directory.add_redirect_uri(str(body["uri"]))
        except (ValueError, KeyError, TypeError) as exc:
            return _bad(f"bad redirect URI: {exc}")
        return JSONResponse({"redirect_uris": list(directory.broker.redirect_uris)})

    async def rotate_secret(request: Request) -> Response:
        try:
            body = await _json(request)
        except ValueError as exc:
            return _bad(str(exc))
        value = directory.rotate_client_secret(revoke_old=bool(body.get("revoke_old", False)))
        latest = directory.vault.get_secret(directory.client_secret_name)
        return JSONResponse({"value": value, "version": latest.version if latest else None})

    async def put_vault(request: Request) -> Response:
        try:
            body = await _json(request)
            version = directory.set_secret(
                request.path_params["name"], str(body["value"]), content_type=body.get("content_type")
            )
        except (ValueError, KeyError, TypeError) as exc:
            return _bad(f"bad secret: {exc}")
        return JSONResponse({"version": version})

    async def caller_token(request: Request) -> Response:
        try:
            body = await _json(request)
            token = directory.mint_caller_token(
                body.get("client_id"),
                roles=body.get("roles"),
                lifetime=body.get("lifetime"),
                signing=body.get("signing", "valid"),
                **(body.get("claims") or {}),
            )
        except (ValueError, LookupError, TypeError) as exc:
            return _bad(f"cannot mint: {exc}")
        return JSONResponse({"access_token": token})

    async def rotate_key(request: Request) -> Response:
        body = await _json(request)
        return JSONResponse({"kid": directory.rotate_signing_key(retire_old=bool(body.get("retire_old", False)))})

    return [
        Route(f"{PREFIX}/health", health, methods=["GET"]),
        Route(f"{PREFIX}/env", get_env, methods=["GET"]),
        Route(f"{PREFIX}/counters", counters, methods=["GET", "DELETE"]),
        Route(f"{PREFIX}/faults", faults, methods=["POST", "DELETE"]),
        Route(f"{PREFIX}/latency", latency, methods=["POST"]),
        Route(f"{PREFIX}/tenants", tenants, methods=["GET", "POST"]),
        Route(f"{PREFIX}/tenants/{{ref}}/consent", consent, methods=["POST"]),
        Route(f"{PREFIX}/tenants/{{ref}}/revoke", revoke, methods=["POST"]),
        Route(f"{PREFIX}/tenants/{{ref}}/admin-answer", admin_answer, methods=["POST"]),
        Route(f"{PREFIX}/apps/broker/redirect-uris", redirect_uris, methods=["POST"]),
        Route(f"{PREFIX}/secrets/rotate", rotate_secret, methods=["POST"]),
        Route(f"{PREFIX}/vault/{{name}}", put_vault, methods=["PUT"]),
        Route(f"{PREFIX}/tokens/caller", caller_token, methods=["POST"]),
        Route(f"{PREFIX}/signing-key/rotate", rotate_key, methods=["POST"]),
    ]


def create_control_app(
    directory: Directory,
    recorder: Recorder,
    env: Callable[[], dict[str, str]],
    extra_routes: Iterable[BaseRoute] = (),
) -> Starlette:
    """The control plane; ``extra_routes`` come from the security-API stand-ins."""
    return Starlette(routes=[*control_routes(directory, recorder, env), *extra_routes])
